"""Privacy metrics: exact values on hand-computed toys; copies vs independent data on OMOP GiBleed.

GiBleed (2,694 Synthea persons; condition and drug concepts; every person's code set is distinct) is split into
three disjoint parts: train (members), holdout (non-members) and "other", a real sample the generator never saw,
which stands in for a perfectly private synthetic corpus.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.errors import ConfigError
from ehrsynth.evaluation import privacy
from ehrsynth.evaluation.features import nearest_hamming

T0 = datetime(2020, 1, 1)

WHOLE = BuildOptions(split=(1.0, 0.0, 0.0))  # toys keep every code: no held-out part to filter by


def toy(code_sets: list[list[str]], labels: dict[str, list[int]] | None = None, *,
        first_id: int = 0) -> PatientCorpus:
    """One single-visit patient per code set; codes get the prefix ``X/``."""
    rows = [(first_id + p, p, T0, f"X/{code}") for p, codes in enumerate(code_sets) for code in codes]
    frame = pl.DataFrame(rows, schema=["patient", "visit", "time", "code"], orient="row")
    patients = None
    if labels:
        patients = pl.DataFrame({"patient": np.arange(len(code_sets)) + first_id,
                                 **{f"label:{name}": values for name, values in labels.items()}})
    return build_corpus(frame, patients, WHOLE, source="toy")


# Nearest synthetic distances: members t1..t4 -> 0, 1, 2, 2; non-members h1..h4 -> 1, 1, 1, 3.
TRAIN = [["A", "B"], ["C"], ["A", "D"], ["B", "C"]]
HOLDOUT = [["A", "B", "C"], ["D"], ["E"], ["B", "D", "E"]]
SYNTH = [["A", "B"], ["C", "D"], ["E", "F"]]


@pytest.fixture(scope="module")
def toys():
    return toy(TRAIN), toy(HOLDOUT, first_id=100), toy(SYNTH, first_id=200)


def test_nearest_hamming_matches_brute_force():
    rng = np.random.default_rng(0)
    import scipy.sparse as sp

    for n_codes in (7, 400):  # under and over the dense-column split
        a = sp.csr_matrix((rng.random((30, n_codes)) < 0.1).astype(np.int32))
        b = sp.csr_matrix((rng.random((40, n_codes)) < 0.1).astype(np.int32))
        brute = (a.toarray()[:, None, :] != b.toarray()[None, :, :]).sum(axis=2)   # (30, 40)
        got = nearest_hamming(a, b, chunk_cells=100)
        assert (got.distance == brute.min(1)).all() and (got.index == brute.argmin(1)).all()
        assert (got.reverse_distance == brute.min(0)).all()
        self_brute = (a.toarray()[:, None, :] != a.toarray()[None, :, :]).sum(axis=2).astype(float)
        np.fill_diagonal(self_brute, np.inf)
        assert (nearest_hamming(a, a, exclude_self=True, chunk_cells=64).distance == self_brute.min(1)).all()


def test_distance_membership_exact(toys):
    result = privacy.distance_membership_inference(*toys, seed=0)
    # 8 distances [0,1,2,2 | 1,1,1,3], median 1: only t1 is predicted a member
    assert result.median_distance == 1.0
    assert (result.accuracy, result.precision, result.recall, result.f1) == (5 / 8, 1.0, 0.25, pytest.approx(0.4))
    assert result.auroc == 8.5 / 16   # member closer: 4 + 2.5 + 1 + 1 wins of 16, ties half
    assert (result.mean_distance_members, result.mean_distance_nonmembers) == (1.25, 1.5)
    assert (result.n_members, result.n_nonmembers, result.n_synthetic, result.seed) == (4, 4, 3, 0)
    json.dumps(result.as_dict())


def test_likelihood_membership_exact():
    result = privacy.likelihood_membership_inference(np.array([-1.0, -2.0, -3.0]), np.array([-2.5, -4.0, -5.0]))
    assert result.median_loglik == -2.75
    assert result.auroc == pytest.approx(8 / 9, abs=1e-15)
    assert (result.accuracy, result.precision, result.recall, result.f1) == (
        pytest.approx(4 / 6), pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
    unequal = privacy.likelihood_membership_inference(np.zeros(10), np.ones(4), seed=5)
    assert (unequal.n_members, unequal.n_nonmembers, unequal.auroc) == (4, 4, 0.0)
    with pytest.raises(ConfigError, match="member_loglik must be finite"):
        privacy.likelihood_membership_inference(np.array([0.0, np.nan]), np.zeros(2))


def test_attribute_inference_exact():
    # known codes = top 2 of train: A, B (ties A, B, X, Y broken by code string); hidden = the rest
    train = toy([["A", "B", "X"], ["A", "Y"], ["B"]])
    synthetic = toy([["A", "B", "X"], ["A", "Z"], ["C"]], first_id=100)
    holdout = toy([["A", "B", "Y"], ["B"]], first_id=200)
    result = privacy.attribute_inference(train, holdout, synthetic, top_k=2)
    # synthetic: t1 -> s1 guesses {X} (TP), t2 -> s2 guesses {Z} (FP, FN), t3 -> s1 (tie, lower index) {X} (FP)
    assert (result.precision, result.recall, result.f1) == (pytest.approx(1 / 3), 0.5, pytest.approx(0.4))
    # holdout: t1 -> h1 {Y} (FP, FN), t2 -> h1 {Y} (TP), t3 -> h2 {} -> TP 1, predicted 2, true 2
    assert (result.baseline_precision, result.baseline_recall, result.baseline_f1) == (0.5, 0.5, 0.5)
    assert (result.known_codes, result.labels_used, result.n_attacked) == (2, (), 3)


def test_attribute_inference_uses_shared_labels():
    train = toy([["A", "X"], ["A"]], {"sick": [1, 0], "other": [0, 1]})
    synthetic = toy([["A"], ["A", "X"]], {"sick": [0, 1]}, first_id=100)
    holdout = toy([["A"]], {"sick": [0], "other": [0]}, first_id=200)
    result = privacy.attribute_inference(train, holdout, synthetic, top_k=1)
    assert result.labels_used == ("sick",)
    assert result.f1 == 1.0   # the label finds the right twin: t1 -> s2 {X}, t2 -> s1 {}


def test_nnaa_exact():
    train = toy([["A"], ["A", "B"], ["B"]])
    holdout = toy([["C"], ["C", "D"], ["A", "C", "D"]], first_id=100)
    synthetic = toy([["C", "D"], ["C", "D", "E"], ["A", "C"]], first_id=200)
    result = privacy.nearest_neighbour_adversarial_accuracy(train, holdout, synthetic)
    # train: d_TS [1,2,3] > d_TT [1,1,1] twice; d_ST [3,4,1] > d_SS [1,1,2] twice -> 2/3
    # holdout: d_ES [1,0,1] vs d_EE [1,1,1] never; d_SE [0,1,1] vs d_SS never -> 0
    assert result.aa_train == pytest.approx(2 / 3) and result.aa_test == 0.0
    assert result.nnaar == pytest.approx(-2 / 3) and result.n_per_set == 3


def test_dcr_and_exact_copies_exact(toys):
    dcr = privacy.distance_to_closest_record(*toys)
    # s1: train 0 < holdout 1; s2: 1 = 1 (tie); s3: train 3 > holdout 1
    assert (dcr.share_closer_to_train, dcr.share_ties) == (0.5, pytest.approx(1 / 3))
    assert (dcr.median_dcr_train, dcr.median_dcr_holdout, dcr.n_reference, dcr.n_synthetic) == (1.0, 1.0, 4, 3)
    copies = privacy.exact_copies(*toys)
    assert (copies.copy_rate, copies.holdout_copy_rate) == (pytest.approx(1 / 3), 0.0)
    assert copies.as_dict()["metric"] == "privacy.exact_copies"


def test_bad_arguments(toys):
    with pytest.raises(ConfigError, match="n must be an integer >= 1"):
        privacy.distance_membership_inference(*toys, n=0)
    train, holdout, _ = toys
    with pytest.raises(ConfigError, match="synthetic needs at least 2"):
        privacy.nearest_neighbour_adversarial_accuracy(train, holdout, train.subset(np.array([0])))


@pytest.fixture(scope="module")
def gibleed_parts(data_dir) -> tuple[PatientCorpus, PatientCorpus, PatientCorpus]:
    corpus = read_omop(data_dir / "omop-gibleed", tables=("condition", "drug"))
    assert corpus.n_patients == 2694
    order = np.random.default_rng(0).permutation(corpus.n_patients)
    return corpus.subset(order[:1000]), corpus.subset(order[1000:1847]), corpus.subset(order[1847:])


def rebuilt(corpus: PatientCorpus) -> PatientCorpus:
    """The same patients rebuilt from events, so they get their own vocabulary (as a written synthetic corpus)."""
    visit = corpus.code_visit()
    frame = pl.DataFrame({
        "patient": corpus.visit_patient()[visit] + 10_000_000, "visit": visit,
        "time": [T0 + timedelta(days=float(d)) for d in np.asarray(corpus.visit_days)[visit]],
        "code": np.asarray(corpus.vocab.codes, dtype=object)[corpus.codes].tolist(),
    })
    return build_corpus(frame, None, WHOLE, source="copy")


def test_training_copies_leak(gibleed_parts):
    train, holdout, _ = gibleed_parts
    copies = rebuilt(train)
    assert copies.vocab.codes != train.vocab.codes
    membership = privacy.distance_membership_inference(train, holdout, copies, seed=0)
    assert membership.accuracy >= 0.9 and membership.auroc >= 0.9
    assert privacy.exact_copies(train, holdout, copies).copy_rate == 1.0
    assert privacy.distance_to_closest_record(train, holdout, copies).share_closer_to_train > 0.9
    nnaa = privacy.nearest_neighbour_adversarial_accuracy(train, holdout, copies, seed=0)
    assert nnaa.aa_train < 0.05 and nnaa.nnaar > 0.2   # not 0: train and copies are subsampled apart


def test_independent_real_data_does_not_leak(gibleed_parts):
    train, holdout, other = gibleed_parts
    membership = privacy.distance_membership_inference(train, holdout, other, seed=0)
    assert 0.4 <= membership.accuracy <= 0.6 and 0.4 <= membership.auroc <= 0.6
    assert membership.n_members == membership.n_nonmembers == holdout.n_patients
    assert privacy.exact_copies(train, holdout, other).copy_rate < 0.05
    assert 0.4 <= privacy.distance_to_closest_record(train, holdout, other).share_closer_to_train <= 0.6
    assert abs(privacy.nearest_neighbour_adversarial_accuracy(train, holdout, other, seed=0).nnaar) < 0.1
    attack = privacy.attribute_inference(train, holdout, other, top_k=100)
    assert abs(attack.f1 - attack.baseline_f1) < 0.1
