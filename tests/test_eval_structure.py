"""Structure metrics: validity shares and shape-distribution distances, exact on hand-made corpora."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ehrsynth.evaluation import fidelity
from ehrsynth.evaluation.structure import log2_gap_bins, record_shape, structure_fidelity, total_variation
from test_eval_fidelity import REAL, SYNTH, toy


def with_empty_undated(corpus):
    """The corpus with its last visit emptied and undated, and its first patient's sex unknown."""
    offsets = np.asarray(corpus.code_offsets).copy()
    cut = int(offsets[-2])
    days = np.asarray(corpus.visit_days, dtype=np.float64).copy()
    days[-1] = np.nan
    sex = np.zeros(corpus.n_patients, dtype=np.int8)
    sex[0] = -1
    offsets[-1] = cut
    return replace(corpus, code_offsets=offsets, codes=np.asarray(corpus.codes)[:cut], visit_days=days, sex=sex)


def test_record_shape_counts_exactly():
    synthetic = with_empty_undated(toy(SYNTH))          # 3 visits, the last {A,B} now empty; 2 patients
    shape = record_shape(synthetic)
    assert (shape.empty_visit_share, shape.undated_visit_share, shape.unknown_sex_share) == (1 / 3, 1 / 3, 0.5)
    assert (shape.n_patients, shape.n_visits) == (2, 3)
    real = record_shape(toy(REAL))
    assert (real.empty_visit_share, real.undated_visit_share) == (0.0, 0.0)
    assert real.unknown_sex_share == 1.0                  # toy corpora carry no sex


def test_structure_fidelity_exact():
    real, synthetic = toy(REAL), with_empty_undated(toy(SYNTH))
    result = structure_fidelity(real, synthetic)
    assert (result.empty_visit_share, result.empty_visit_share_real) == (1 / 3, 0.0)
    assert (result.undated_visit_share, result.undated_visit_share_real) == (1 / 3, 0.0)
    # codes per visit real [2,2,1,1,2] vs synthetic [2,1,0]: p = {1: .4, 2: .6}, q = {0: 1/3, 1: 1/3, 2: 1/3}
    assert result.codes_per_visit_tv == pytest.approx(0.5 * (1 / 3 + abs(0.4 - 1 / 3) + abs(0.6 - 1 / 3)))
    # visits per patient [2,1,2] vs [1,2]: |1/3 - 1/2| + |2/3 - 1/2| = 1/3, halved
    assert result.visits_per_patient_tv == pytest.approx(1 / 6)
    # gaps real 30 d (bin 4), 10 d (bin 3); synthetic gap touches the undated visit: no gap left
    assert np.isnan(result.log2_gap_days_tv) and result.gap_days.n_synthetic == 0
    assert result.as_dict()["metric"] == "fidelity.structure"
    assert fidelity.structure_fidelity is structure_fidelity  # the old import path still works


def test_gap_bins_and_tv():
    assert log2_gap_bins(np.array([0.0, 0.5, 1.0, 1.9, 2.0, 30.0, 1e6])).tolist() == [-1, -1, 0, 0, 1, 4, 12]
    assert total_variation(np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2])) == 0.25
    assert total_variation(np.array([3]), np.array([3])) == 0.0
    assert total_variation(np.array([0]), np.array([5])) == 1.0
    assert np.isnan(total_variation(np.array([], dtype=int), np.array([1])))


def test_real_parts_have_valid_structure(data_dir):
    from ehrsynth.data.readers.omop import read_omop

    gibleed = read_omop(data_dir / "omop-gibleed")
    train, test = gibleed.part("train"), gibleed.part("test")
    result = structure_fidelity(train, test)
    # the real data keeps no empty visit, dates every visit and records every sex
    assert result.empty_visit_share == result.empty_visit_share_real == 0.0
    assert result.undated_visit_share == result.undated_visit_share_real == 0.0
    assert result.unknown_sex_share == result.unknown_sex_share_real == 0.0
    # two random parts of one population: small distances
    assert result.codes_per_visit_tv < 0.02 and result.visits_per_patient_tv < 0.15 and result.log2_gap_days_tv < 0.05
    assert result.gap_days.n_real > 1000
    halo = fidelity.halo_fidelity(train, test)
    assert 0.99 < halo.visit_code_pearson <= 1 and halo.visit_code_r2 <= halo.visit_code_pearson ** 2 + 1e-9
