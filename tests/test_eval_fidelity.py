"""Fidelity metrics: exact values on hand-computed toys; identities and a shuffle control on the MIMIC-III demo."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.vocab import Vocabulary
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation import fidelity
from ehrsynth.evaluation.features import aligned_code_matrices, align_vocabularies

T0 = datetime(2020, 1, 1)

WHOLE = BuildOptions(split=(1.0, 0.0, 0.0))  # toys keep every code: no held-out part to filter by


def toy(records: list[list[tuple[int, list[str]]]], *, first_id: int = 0) -> PatientCorpus:
    """A corpus from [patient][visit] = (day, codes); codes get the prefix ``X/``."""
    rows = [(first_id + p, f"{p}-{v}", T0 + timedelta(days=day), f"X/{code}")
            for p, visits in enumerate(records) for v, (day, codes) in enumerate(visits) for code in codes]
    frame = pl.DataFrame(rows, schema=["patient", "visit", "time", "code"], orient="row")
    return build_corpus(frame, None, WHOLE, source="toy")


def r2(y: list[float], f: list[float]) -> float:
    """R^2 by its definition, 1 - SS_res / SS_tot."""
    y, f = np.asarray(y, dtype=float), np.asarray(f, dtype=float)
    return 1 - float(((y - f) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())


# Real: p1 {A,B} d0 -> {A,C} d30 ; p2 {A} ; p3 {B} d0 -> {B,C} d10.   Synthetic: q1 {A} d0 -> {A,B} d5 ; q2 {E,C}.
REAL = [[(0, ["A", "B"]), (30, ["A", "C"])], [(0, ["A"])], [(0, ["B"]), (10, ["B", "C"])]]
SYNTH = [[(0, ["E", "C"])], [(0, ["A"]), (5, ["A", "B"])]]


@pytest.fixture(scope="module")
def real() -> PatientCorpus:
    return toy(REAL)


@pytest.fixture(scope="module")
def synthetic() -> PatientCorpus:
    return toy(SYNTH, first_id=100)


def test_alignment_unions_typed_codes(real, synthetic):
    codes, (r, s) = align_vocabularies(real, synthetic)
    assert codes == ("X/A", "X/B", "X/C", "X/E")
    assert [codes[i] for i in r] == list(real.vocab.codes)
    assert [codes[i] for i in s] == list(synthetic.vocab.codes)
    aligned = aligned_code_matrices(real, synthetic)
    assert aligned.patients[0].toarray().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]]
    assert aligned.visits[1].shape == (3, 4) and aligned.visits[1].sum() == 5


def test_halo_statistics_exact(real, synthetic):
    s = fidelity.halo_statistics(real, synthetic)
    expected = {  # keys in union order: codes A < B < C < E, pairs row-major
        "visit_code": ([3 / 5, 3 / 5, 2 / 5, 0], [2 / 3, 1 / 3, 1 / 3, 1 / 3]),
        "record_code": ([2 / 3, 2 / 3, 2 / 3, 0], [1 / 2, 1 / 2, 1 / 2, 1 / 2]),
        "visit_pair": ([1 / 5, 1 / 5, 1 / 5, 0], [1 / 3, 0, 0, 1 / 3]),              # AB AC BC CE
        "record_pair": ([1 / 3, 1 / 3, 2 / 3, 0], [1 / 2, 0, 0, 1 / 2]),              # AB AC BC CE
        "consecutive": ([1, 0, 1, 1 / 2, 1 / 2, 1], [1, 1, 0, 0, 0, 0]),              # AA AB AC BA BB BC
    }
    for name, (want_real, want_synth) in expected.items():
        np.testing.assert_allclose(s[name][0], want_real, rtol=0, atol=1e-15, err_msg=name)
        np.testing.assert_allclose(s[name][1], want_synth, rtol=0, atol=1e-15, err_msg=name)


def test_halo_fidelity_exact(real, synthetic):
    result = fidelity.halo_fidelity(real, synthetic)
    assert result.visit_code_r2 == pytest.approx(11 / 54, abs=1e-12)  # 1 - (43/225) / (54/225)
    assert result.record_code_r2 == pytest.approx(r2([2 / 3, 2 / 3, 2 / 3, 0], [1 / 2] * 4), abs=1e-12)
    assert result.visit_pair_r2 == pytest.approx(r2([1 / 5, 1 / 5, 1 / 5, 0], [1 / 3, 0, 0, 1 / 3]), abs=1e-12)
    assert result.record_pair_r2 == pytest.approx(r2([1 / 3, 1 / 3, 2 / 3, 0], [1 / 2, 0, 0, 1 / 2]), abs=1e-12)
    assert result.consecutive_r2 == pytest.approx(r2([1, 0, 1, .5, .5, 1], [1, 1, 0, 0, 0, 0]), abs=1e-12)
    assert (result.n_visit_code, result.n_visit_pair, result.n_consecutive) == (4, 4, 6)
    out = result.as_dict()
    assert out["metric"] == "fidelity.halo_r2"
    json.dumps(out)


def test_prevalence_exact():
    real = toy([[(0, ["A", "B"])], [(0, ["A"])], [(0, ["A", "C"])], [(0, ["B"])]])   # A 3/4, B 1/2, C 1/4
    synthetic = toy([[(0, ["A", "B"])], [(0, ["A", "D"])]], first_id=10)           # A 1, B 1/2, D 1/2
    result = fidelity.prevalence_fidelity(real, synthetic)
    assert result.pearson == pytest.approx(math.sqrt(0.4), abs=1e-12)
    assert result.spearman == pytest.approx(math.sqrt(0.4), abs=1e-12)
    assert (result.nzc_synthetic, result.nzc_real, result.nzc_shared, result.n_codes) == (3, 3, 2, 4)


def test_prevalence_constant_is_nan(real, synthetic):
    result = fidelity.prevalence_fidelity(real, synthetic)  # synthetic prevalence is 1/2 for every code
    assert math.isnan(result.pearson) and result.as_dict()["pearson"] is None


def test_cmd_exact():
    real = toy([[(0, ["A", "B"])], [(0, ["A"])], [(0, ["A", "C"])], [(0, ["B"])]])
    synthetic = toy([[(0, ["A", "B"])], [(0, ["A", "D"])]], first_id=10)
    # top 2 real codes A, B: corr_real(A, B) = -1/sqrt(3); A is constant in synthetic, so R_s = I
    result = fidelity.correlation_matrix_distance(real, synthetic, top_k=2)
    assert result.k == 2
    assert result.cmd == pytest.approx(1 - math.sqrt(3) / 2, abs=1e-12)
    assert result.mean_abs_difference == pytest.approx(1 / math.sqrt(3), abs=1e-12)
    assert fidelity.correlation_matrix_distance(real, real, top_k=2).cmd == pytest.approx(0, abs=1e-12)
    with pytest.raises(ConfigError, match="top_k"):
        fidelity.correlation_matrix_distance(real, synthetic, top_k=1)


def test_mmd_exact():
    real = toy([[(0, ["A"])], [(0, ["B"])]])
    synthetic = toy([[(0, ["A"])], [(0, ["A", "B"])]], first_id=10)
    # pooled pairwise Hamming 2,0,1,2,1,1 -> median 1; k = exp(-H / 2)
    result = fidelity.maximum_mean_discrepancy(real, synthetic, n=10, seed=3)
    assert result.sigma2 == 1.0
    assert result.mmd2 == pytest.approx((math.exp(-1) - 1) / 2, abs=1e-12)
    assert (result.n_real, result.n_synthetic, result.n, result.seed) == (2, 2, 10, 3)


def test_structure_exact(real, synthetic):
    result = fidelity.structure_fidelity(real, synthetic)
    vpp, cpv, gaps = result.visits_per_patient, result.codes_per_visit, result.gap_days
    assert (vpp.wasserstein, vpp.ks) == (pytest.approx(1 / 6), pytest.approx(1 / 6))     # [2,1,2] vs [1,2]
    assert (cpv.wasserstein, cpv.ks) == (pytest.approx(1 / 15), pytest.approx(1 / 15))   # [2,2,1,1,2] vs [2,1,2]
    assert (gaps.wasserstein, gaps.ks, gaps.mean_real, gaps.mean_synthetic) == (15.0, 1.0, 20.0, 5.0)
    assert (gaps.n_real, gaps.n_synthetic) == (2, 1)


def test_detection_separable_and_recorded():
    real = toy([[(0, ["A"])]] * 20)
    synthetic = toy([[(0, ["B"])]] * 20, first_id=100)
    result = fidelity.detection_auroc(real, synthetic, folds=4, seed=1)
    assert result.auroc == 1.0 and result.auroc_std == 0.0
    assert (result.n_per_class, result.folds, result.seed) == (20, 4, 1)
    with pytest.raises(ConfigError, match="folds"):
        fidelity.detection_auroc(real, synthetic, folds=50)


def reorder_vocabulary(corpus: PatientCorpus, seed: int) -> PatientCorpus:
    """The same patients with a permuted vocabulary (as a synthetic corpus read from CSV would have)."""
    perm = np.random.default_rng(seed).permutation(corpus.vocab_size)   # old id -> new id
    visit = corpus.code_visit()
    codes = perm[corpus.codes]
    order = np.lexsort((codes, visit))                                    # ids ascending within each visit
    vocab = Vocabulary(tuple(np.asarray(corpus.vocab.codes, dtype=object)[np.argsort(perm)]),
                       np.asarray(corpus.vocab.counts)[np.argsort(perm)])
    return replace(corpus, codes=codes[order].astype(np.int32), vocab=vocab)


def test_mimic_against_itself(mimic3_corpus):
    shuffled = reorder_vocabulary(mimic3_corpus, seed=0)
    assert shuffled.vocab.codes != mimic3_corpus.vocab.codes
    halo = fidelity.halo_fidelity(mimic3_corpus, shuffled)
    assert [halo.visit_code_r2, halo.record_code_r2, halo.visit_pair_r2, halo.record_pair_r2,
            halo.consecutive_r2] == [1.0] * 5
    prevalence = fidelity.prevalence_fidelity(mimic3_corpus, shuffled)
    assert prevalence.pearson == pytest.approx(1.0, abs=1e-12) and prevalence.spearman == pytest.approx(1.0)
    assert prevalence.nzc_synthetic == prevalence.nzc_real == mimic3_corpus.vocab_size
    assert fidelity.correlation_matrix_distance(mimic3_corpus, shuffled).cmd == pytest.approx(0, abs=1e-12)
    structure = fidelity.structure_fidelity(mimic3_corpus, shuffled)
    assert structure.codes_per_visit.wasserstein == 0 and structure.gap_days.ks == 0


def shuffle_columns(corpus: PatientCorpus, seed: int) -> PatientCorpus:
    """Permute each code column of the patient multi-hot matrix independently across patients (one visit each)."""
    rng = np.random.default_rng(seed)
    x = corpus.patient_multi_hot(np.arange(corpus.n_patients), dtype=np.int8)
    x = np.take_along_axis(x, rng.random(x.shape).argsort(axis=0), axis=0)   # (P, V), each column permuted
    patient, code = np.nonzero(x)
    frame = pl.DataFrame({"patient": patient, "visit": patient, "time": [T0] * len(patient),
                          "code": np.asarray(corpus.vocab.codes, dtype=object)[code].tolist()})
    return build_corpus(frame, None, WHOLE, source="shuffled")


def test_shuffled_codes_keep_prevalence_not_cooccurrence(mimic3_corpus):
    shuffled = shuffle_columns(mimic3_corpus, seed=0)
    real_vs_real = fidelity.halo_fidelity(mimic3_corpus, mimic3_corpus)
    result = fidelity.halo_fidelity(mimic3_corpus, shuffled)
    assert real_vs_real.record_pair_r2 == 1.0
    assert result.record_code_r2 > 0.99          # column sums are unchanged: exactly 1 here
    assert fidelity.prevalence_fidelity(mimic3_corpus, shuffled).pearson > 0.99
    assert result.record_pair_r2 < 0.5           # about -0.6: the pairs are gone
    assert fidelity.correlation_matrix_distance(mimic3_corpus, shuffled).cmd > 0.3
