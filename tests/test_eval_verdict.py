"""Bootstrap intervals, the noise-ceiling reference, the per-code view and the verdict's thresholds."""

from __future__ import annotations

import pytest

from ehrsynth.errors import ConfigError
from ehrsynth.evaluation import fidelity
from ehrsynth.evaluation.bootstrap import _row_pairs, bootstrap_intervals
from ehrsynth.evaluation.per_code import per_code_view
from ehrsynth.evaluation.structure import structure_fidelity
from ehrsynth.evaluation.suite import privacy_reference_split, reference_sample
from ehrsynth.evaluation.verdict import THRESHOLDS, verdict
from test_eval_fidelity import REAL, SYNTH, toy


@pytest.fixture(scope="module")
def gibleed_parts(data_dir):
    from ehrsynth.data.readers.omop import read_omop

    corpus = read_omop(data_dir / "omop-gibleed")
    return corpus.part("train"), corpus.part("test")


def test_intervals_hold_the_estimate_and_are_seeded(gibleed_parts):
    train, test = gibleed_parts
    intervals = bootstrap_intervals(train, test, replicates=30, seed=4)
    halo, structure = fidelity.halo_fidelity(train, test), structure_fidelity(train, test)
    prevalence = fidelity.prevalence_fidelity(train, test)
    estimates = {"halo": halo, "structure": structure, "prevalence": prevalence}
    assert len(intervals) == 11
    for key, interval in intervals.items():
        result, field = key.split(".")
        estimate = getattr(estimates[result], field)
        assert interval.low <= estimate + 1e-12 and estimate - 1e-12 <= interval.high, key
        assert (interval.level, interval.replicates, interval.seed) == (0.95, 30, 4)
    # real shares are all 0 here: every replicate is 0
    assert (intervals["structure.empty_visit_share"].low, intervals["structure.empty_visit_share"].high) == (0, 0)
    assert intervals["halo.visit_pair_r2"].high - intervals["halo.visit_pair_r2"].low > 0.01
    again = bootstrap_intervals(train, test, replicates=30, seed=4)
    assert again == intervals
    with pytest.raises(ConfigError, match="replicates"):
        bootstrap_intervals(train, test, replicates=1)


def test_row_pairs_match_the_pair_matrix(gibleed_parts):
    from ehrsynth.evaluation.features import aligned_code_matrices

    visits = aligned_code_matrices(gibleed_parts[1]).visits[0]
    first, second, _ = _row_pairs(visits)
    expected = (visits.T @ visits).tocoo()
    upper = expected.row < expected.col
    assert len(first) == int(expected.data[upper].sum()) and (first < second).all()


def test_reference_sample_and_privacy_split(gibleed_parts):
    _, test = gibleed_parts
    assert reference_sample(test, 10_000) is test
    small = reference_sample(test, 100, seed=1)
    assert small.n_patients == 100 and reference_sample(test, 100, seed=1).equals(small)
    stand_in, nonmembers = privacy_reference_split(test, 200, seed=0)
    assert (stand_in.n_patients, nonmembers.n_patients) == (200, test.n_patients - 200)
    assert not set(stand_in.patient_ids) & set(nonmembers.patient_ids)


def test_per_code_view_exact():
    real, synthetic = toy(REAL), toy(SYNTH, first_id=10)
    view = per_code_view(real, synthetic, top=2, descriptions={"X/E": "code E"})
    # patient prevalence real A 2/3, B 2/3, C 2/3, E 0; synthetic A 1/2, B 1/2, C 1/2, E 1/2
    assert [(r["code"], r["description"]) for r in view["prevalence_gaps"]] == [("X/E", "code E"), ("X/A", "")]
    assert view["prevalence_gaps"][0]["gap"] == pytest.approx(0.5)
    # visit pairs real (5 visits) AB 1/5, AC 1/5, BC 1/5; synthetic (3 visits) AB 1/3, CE 1/3
    over = [(r["code_a"], r["code_b"]) for r in view["over_generated_pairs"]]
    under = [(r["code_a"], r["code_b"]) for r in view["under_generated_pairs"]]
    assert over == [("X/C", "X/E"), ("X/A", "X/B")] and under == [("X/A", "X/C"), ("X/B", "X/C")]
    assert view["one_sided"] == {"codes_real_only": 0, "codes_synthetic_only": 1, "pairs_real_only": 2,
                                 "pairs_synthetic_only": 1}
    assert view["described"] == 1


def _metrics(**changes) -> dict:
    """A hand-made evaluate output where every check sits exactly at its reference."""
    structure = {"empty_visit_share": 0.0, "empty_visit_share_real": 0.0, "undated_visit_share": 0.0,
                 "undated_visit_share_real": 0.0, "unknown_sex_share": 0.0, "unknown_sex_share_real": 0.0,
                 "codes_per_visit_tv": 0.02, "visits_per_patient_tv": 0.05, "log2_gap_days_tv": 0.03}
    halo = {"visit_code_r2": 0.99, "record_code_r2": 0.98, "visit_pair_pearson": 0.9}
    metrics = {"structure": dict(structure), "halo": dict(halo), "prevalence": {"pearson": 0.99},
               "detection": {"auroc": 0.5},
               "utility": {"mean_auroc": {"tstr.logistic": 0.8, "trtr.logistic": 0.8, "tstr.gbm": 0.8,
                                          "trtr.gbm": 0.8}},
               "membership": {"auroc": 0.5}, "dcr": {"share_closer_to_train": 0.5},
               "exact_copies": {"copy_rate": 0.01, "holdout_copy_rate": 0.01},
               "attribute": {"f1": 0.1, "baseline_f1": 0.1},
               "ceiling": {"structure": dict(structure), "halo": dict(halo), "prevalence": {"pearson": 0.99},
                           "detection": {"auroc": 0.5}, "membership": {"auroc": 0.5},
                           "dcr": {"share_closer_to_train": 0.5}}}
    for path, value in changes.items():
        *keys, last = path.split("__")
        target = metrics
        for key in keys:
            target = target[key]
        target[last] = value
    return metrics


def test_verdict_thresholds():
    assert {area: v["status"] for area, v in verdict(_metrics()).items()} == dict.fromkeys(
        ("structure", "fidelity", "utility", "privacy"), "pass")
    # 30% empty visits against a real 0: fail, and the sentence says so
    result = verdict(_metrics(structure__empty_visit_share=0.30))["structure"]
    assert result["status"] == "fail" and result["sentence"].startswith("Empty visits is 0.300 against 0.000 (real)")
    # a TV 0.05 above the ceiling: between the pass (0.03) and warn (0.10) limits
    assert verdict(_metrics(structure__codes_per_visit_tv=0.07))["structure"]["status"] == "warn"
    assert THRESHOLDS["tv_over_ceiling"] == (0.03, 0.10)
    assert verdict(_metrics(halo__visit_code_r2=0.96))["fidelity"]["status"] == "warn"
    # TSTR 0.65 vs TRTR 0.8 loses half of TRTR's lift over chance
    assert verdict(_metrics(**{"utility__mean_auroc__tstr.gbm": 0.65}))["utility"]["status"] == "fail"
    # an attack that could not run does not count
    na = verdict(_metrics(attribute={"metric": "privacy.attribute_inference", "not_applicable": True}))["privacy"]
    assert na["status"] == "pass"
    assert [c["status"] for c in na["checks"] if c["label"] == "Attribute-inference F1"] == ["not applicable"]
    assert verdict({})["privacy"]["status"] == "not applicable"


def test_a_ceiling_too_small_to_run_is_not_applicable():
    from ehrsynth.evaluation.suite import _or_reason

    real, one = toy(REAL), toy([[(0, ["A"])]], first_id=50)
    result = _or_reason(lambda: fidelity.maximum_mean_discrepancy(real, one))
    assert result["not_applicable"] is True and "at least 2 patient" in result["reason"]
    assert _or_reason(lambda: fidelity.prevalence_fidelity(real, one))["metric"] == "fidelity.prevalence"
