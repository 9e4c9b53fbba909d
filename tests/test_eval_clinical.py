"""Clinical validity checks: exact counts on hand-made records, and real data that passes them."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.evaluation.clinical import clinical_validity, code_kinds, corpus_checks

T0 = datetime(2020, 1, 1)


def records(patients: list[list[tuple[int, list[str]]]], sex: list[int], age: list[float]):
    """A corpus from [patient][visit] = (day, typed codes), with sex and age at first visit per patient."""
    rows = [(p, f"{p}-{v}", T0 + timedelta(days=day), code)
            for p, visits in enumerate(patients) for v, (day, codes) in enumerate(visits) for code in codes]
    corpus = build_corpus(pl.DataFrame(rows, schema=["patient", "visit", "time", "code"], orient="row"),
                          options=BuildOptions(split=(1.0, 0.0, 0.0)))  # every hand-made code kept (split-first)
    order = np.asarray(corpus.patient_ids).astype(int)  # build order -> the lists' order
    return replace(corpus, sex=np.asarray(sex, dtype=np.int8)[order],
                   age_at_first_visit=np.asarray(age, dtype=np.float32)[order])


HAND_MADE = dict(
    patients=[
        [(0, ["ICD10CM/O80"]), (10, ["ICD9CM/185"])],   # 0 male with a delivery code (and a male code: fine)
        [(0, ["ICD9CM/6000"])],                          # 1 female with prostate hyperplasia
        [(0, ["ICD9CM/4019"])],                          # 2 male, nothing wrong
        [(0, ["ICD10CM/O80"])],                          # 3 unknown sex: not checkable
        [(0, ["SNOMED/419620001"]), (5, ["ICD9CM/4019"])],  # 4 a visit after death
        [(0, ["ICD9CM/7700"]), (365, ["ICD9CM/7700"])],  # 5 perinatal code at 0.5 (fine) and at 1.5 years
        [(0, ["ICD9CM/4019"])],                          # 6 first visit before birth
    ],
    sex=[1, 0, 1, -1, 0, 1, 0],
    age=[30, 40, 50, 60, 70, 0.5, -0.2],
)


def test_hand_made_records_exact_counts():
    corpus = records(**HAND_MADE)
    result = corpus_checks(corpus)
    sex = result["sex_specific"]
    assert (sex.records, sex.checked) == (2, 6)
    assert sex.per_1000 == pytest.approx(1000 * 2 / 7)
    assert sex.top_codes == (("ICD10CM/O80", 1), ("ICD9CM/6000", 1))
    assert (result["events_after_death"].records, result["events_after_death"].checked) == (1, 1)
    assert result["events_after_death"].top_codes == (("ICD9CM/4019", 1),)
    assert result["perinatal_after_infancy"].records == 1
    assert result["perinatal_after_infancy"].top_codes == (("ICD9CM/7700", 1),)
    assert result["visits_before_birth"].records == 1


def test_real_against_hand_made_synthetic(mimic3_corpus):
    synthetic = records(**HAND_MADE)
    result = clinical_validity(mimic3_corpus, synthetic)
    # MIMIC-III demo: 100 adults with recorded sex, no sex-specific conflict, no perinatal code after infancy
    assert result.real["sex_specific"].records == 0 and result.real["sex_specific"].checked == 100
    assert result.real["perinatal_after_infancy"].records == 0
    assert result.real["visits_before_birth"].records == 0
    assert result.synthetic["sex_specific"].records == 2 and result.n_synthetic == 7
    assert result.reference == {} and result.as_dict()["metric"] == "clinical.validity"


def test_code_kinds_ranges():
    kinds = code_kinds(["ICD10CM/O9A11", "ICD10CM/O99", "ICD10CM/P96", "ICD10CM/P97", "ICD9CM/V221", "ICD9CM/6089",
                        "ICD9CM/609", "SNOMED/72892002", "ICD9CM/7981", "OMOP/192671", "ICD10CM/C61"])
    assert kinds.tolist() == ["F", "F", "perinatal", "", "F", "M", "", "F", "death", "", "M"]
