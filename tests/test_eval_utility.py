"""TSTR / TRTR utility: exact scores on separable toys, skips with reasons, and real data used as synthetic."""

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
from ehrsynth.evaluation.utility import downstream_utility

T0 = datetime(2020, 1, 1)

WHOLE = BuildOptions(split=(1.0, 0.0, 0.0))  # toys keep every code: no held-out part to filter by


def toy(records: list[list[list[str]]], labels: dict[str, list[int]] | None = None, *,
        first_id: int = 0) -> PatientCorpus:
    """A corpus from [patient][visit] = codes (visit v on day 10 v), with optional per-patient labels."""
    rows = [(first_id + p, f"{p}-{v}", T0 + timedelta(days=10 * v), f"X/{code}")
            for p, visits in enumerate(records) for v, codes in enumerate(visits) for code in codes]
    frame = pl.DataFrame(rows, schema=["patient", "visit", "time", "code"], orient="row")
    patients = None
    if labels:
        patients = pl.DataFrame({"patient": np.arange(len(records)) + first_id,
                                 **{f"label:{name}": values for name, values in labels.items()}})
    return build_corpus(frame, patients, WHOLE, source="toy")


def by_key(result, target, model, trained_on):
    (score,) = [s for s in result.scores if (s.target, s.model, s.trained_on) == (target, model, trained_on)]
    return score


@pytest.fixture(scope="module")
def label_toys():
    # y = 1 exactly when the patient has code A; the synthetic corpus has the relation inverted.
    train = toy([[["A"]]] * 25 + [[["B"]]] * 25,
                {"y": [1] * 25 + [0] * 25, "flat": [1] * 25 + [0] * 25, "only_real": [0, 1] * 25})
    test = toy([[["A"]]] * 4 + [[["B"]]] * 4, {"y": [1] * 4 + [0] * 4, "flat": [1] * 4 + [0] * 4,
                                               "only_real": [0, 1] * 4}, first_id=1000)
    synthetic = toy([[["B"]]] * 25 + [[["A"]]] * 25, {"y": [1] * 25 + [0] * 25, "flat": [0] * 50}, first_id=2000)
    return train, test, synthetic


def test_labels_exact(label_toys):
    result = downstream_utility(*label_toys, seed=0)
    assert result.task == "labels" and result.targets == ("y", "flat", "only_real")
    for model in ("logistic", "gbm"):
        trtr, tstr = by_key(result, "y", model, "real"), by_key(result, "y", model, "synthetic")
        assert (trtr.auroc, trtr.auprc) == (1.0, 1.0)
        # inverted: every positive scores below every negative; AP has one threshold at recall 1, precision 1/2
        assert (tstr.auroc, tstr.auprc) == (0.0, 0.5)
        assert (tstr.n_train, tstr.n_train_positive, tstr.n_test, tstr.n_test_positive) == (50, 25, 8, 4)
        # TRTR also scores "flat" (= y, 1.0) and "only_real" (independent of the codes, exactly 0.5 here)
        assert result.mean_auroc[f"trtr.{model}"] == pytest.approx(2.5 / 3, abs=1e-15)
        assert result.mean_auroc[f"tstr.{model}"] == 0.0
    flat = by_key(result, "flat", "logistic", "synthetic")
    assert flat.skipped == "one class in the synthetic training data" and math.isnan(flat.auroc)
    missing = by_key(result, "only_real", "gbm", "synthetic")
    assert missing.skipped == "the synthetic training corpus has no label 'only_real'"
    assert by_key(result, "only_real", "logistic", "real").skipped is None
    out = result.as_dict()
    assert out["metric"] == "utility.tstr" and out["scores"][0]["target"] == "y"
    json.dumps(out)


def test_one_class_in_test_is_skipped(label_toys):
    train, test, synthetic = label_toys
    one_class = test.subset(np.arange(4))  # only y = 1 patients
    result = downstream_utility(train, one_class, synthetic, models=("logistic",))
    assert {s.skipped for s in result.scores if s.target == "y"} == {"one class in the real test data"}
    assert math.isnan(result.mean_auroc["tstr.logistic"])


def test_next_visit_exact():
    # history A -> last visit X, history B -> last visit Y; one-visit patients are not eligible
    train = toy([[["A"], ["X"]]] * 25 + [[["B"], ["Y"]]] * 25 + [[["A", "X"]]] * 5)
    test = toy([[["A", "C"], ["X"]]] * 4 + [[["B"], ["B"], ["Y"]]] * 4, first_id=1000)
    synthetic = toy([[["A"], ["Y"]]] * 25 + [[["B"], ["X"]]] * 25, first_id=2000)
    result = downstream_utility(train, test, synthetic, top_k=2, seed=0)
    assert result.task == "next_visit"
    assert result.targets == ("next_visit:X/X", "next_visit:X/Y")  # tied counts: by code string
    for target in result.targets:
        for model in ("logistic", "gbm"):
            assert by_key(result, target, model, "real").auroc == 1.0
            synthetic_score = by_key(result, target, model, "synthetic")
            assert synthetic_score.auroc == 0.0 and synthetic_score.n_train == 50 and synthetic_score.n_test == 8
    assert result.mean_auroc == {"tstr.logistic": 0.0, "trtr.logistic": 1.0, "tstr.gbm": 0.0, "trtr.gbm": 1.0}


def test_bad_arguments(label_toys):
    with pytest.raises(ConfigError, match="task must be one of"):
        downstream_utility(*label_toys, task="survival")
    with pytest.raises(ConfigError, match="models must be"):
        downstream_utility(*label_toys, models=("svm",))
    plain = toy([[["A"]], [["B"]]])
    with pytest.raises(ConfigError, match="task='labels' needs labels"):
        downstream_utility(plain, plain, plain, task="labels")


def test_training_data_as_synthetic_matches_trtr(mimic3_corpus):
    """MIMIC-III demo mortality: the training part itself (vocabulary reordered) scores exactly as TRTR."""
    train, test = mimic3_corpus.part("train"), mimic3_corpus.part("test")
    perm = np.random.default_rng(0).permutation(train.vocab_size)
    visit, codes = train.code_visit(), perm[train.codes]
    order = np.lexsort((codes, visit))
    inverse = np.argsort(perm)
    copy = replace(train, codes=codes[order].astype(np.int32),
                   vocab=Vocabulary(tuple(np.asarray(train.vocab.codes, dtype=object)[inverse]),
                                    np.asarray(train.vocab.counts)[inverse]))
    result = downstream_utility(train, test, copy, models=("logistic",), seed=0)
    tstr, trtr = by_key(result, "mortality", "logistic", "synthetic"), by_key(result, "mortality", "logistic", "real")
    assert tstr.skipped is None and tstr.n_test_positive == 5
    assert tstr.auroc == trtr.auroc and tstr.auprc == trtr.auprc
    assert 0.0 <= tstr.auroc <= 1.0


def test_gbm_finds_a_label_defined_by_a_less_common_code():
    # 300 codes every patient has outrank the defining code R by prevalence; GBM must still be given R
    fillers = [f"F{i:03d}" for i in range(300)]
    records = [[fillers + (["R"] if p % 2 else [])] for p in range(60)]
    labels = {"has_r": [p % 2 for p in range(60)]}
    train, test = toy(records, labels), toy(records[:8], {"has_r": labels["has_r"][:8]}, first_id=1000)
    result = downstream_utility(train, test, train, models=("gbm",))
    assert [s.auroc for s in result.scores] == [1.0, 1.0]


def test_next_visit_with_one_visit_synthetic_is_skipped():
    train = toy([[["A"], ["X"]]] * 3 + [[["B"], ["Y"]]] * 3)
    one_visit = toy([[["A", "X"]]] * 4, first_id=100)
    result = downstream_utility(train, train, one_visit, models=("logistic",), top_k=1)
    (tstr,) = [s for s in result.scores if s.trained_on == "synthetic"]
    assert tstr.skipped == "no eligible patients in the synthetic training data" and tstr.n_train == 0
