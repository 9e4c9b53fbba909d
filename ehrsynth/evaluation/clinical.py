"""Clinical validity: records that break clinical knowledge, counted in real and synthetic data alike.

Four checks, each a rate per 1,000 records with its top offending codes (definitions in docs/metrics.md,
``clinical.validity``):

* ``sex_specific``: a code of one sex (pregnancy, prostate, ovary...) in a record of the other sex;
* ``perinatal_after_infancy``: a perinatal code in a visit at age one year or more (where age is known);
* ``events_after_death``: a visit after the first visit holding a death code;
* ``visits_before_birth``: a visit before the birth year (where birth year and visit time are known).

Nothing here prints; only counts and code strings leave this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.vocab import code_system, code_value
from ehrsynth.evaluation.features import MetricResult, check_corpus

# Sex-specific and perinatal code ranges, inclusive, on the first three characters of the code (dots removed).
# Sources: the ICD-10-CM Tabular List (CMS/NCHS FY2024: chapter 15 O00-O9A, chapter 16 P00-P96, blocks C51-C58,
# C60-C63, N40-N53, N70-N98, Z33-Z37) and the ICD-9-CM Tabular List (NCHS 2011: 630-679, 760-779, 179-184,
# 185-187, 600-608, 614-629, V22-V24); the same ranges drive the CMS Medicare Code Editor's sex and age edits.
FEMALE, MALE = 0, 1  # the corpus's sex codes
ICD_RANGES: tuple[tuple[str, str, str, str], ...] = (
    # (system, low, high, kind) with kind "F" (female only), "M" (male only) or "perinatal"
    ("ICD10CM", "O00", "O9A", "F"),   # pregnancy, childbirth and the puerperium
    ("ICD10CM", "Z33", "Z37", "F"),   # pregnancy state, supervision, outcome of delivery
    ("ICD10CM", "C51", "C58", "F"),   # malignant neoplasms of female genital organs
    ("ICD10CM", "N70", "N98", "F"),   # inflammatory and other disorders of female pelvic and genital organs
    ("ICD10CM", "C60", "C63", "M"),   # malignant neoplasms of male genital organs
    ("ICD10CM", "N40", "N53", "M"),   # diseases of male genital organs
    ("ICD10CM", "P00", "P96", "perinatal"),
    ("ICD9CM", "630", "679", "F"),    # complications of pregnancy, childbirth and the puerperium
    ("ICD9CM", "V22", "V24", "F"),    # normal pregnancy, high-risk pregnancy supervision, postpartum care
    ("ICD9CM", "179", "184", "F"),    # malignant neoplasms of uterus, cervix, placenta, ovary, other female
    ("ICD9CM", "614", "629", "F"),    # disorders of female genital organs
    ("ICD9CM", "185", "187", "M"),    # malignant neoplasms of prostate, testis, penis
    ("ICD9CM", "600", "608", "M"),    # diseases of male genital organs
    ("ICD9CM", "760", "779", "perinatal"),
)
# SNOMED CT concepts of the shared data sets that belong to one sex (Synthea-111 conditions.csv; the 80 GiBleed
# OMOP condition concepts hold none). Meaning from each concept's fully specified name in SNOMED CT.
SNOMED_KINDS: dict[str, str] = {
    "SNOMED/72892002": "F",    # Normal pregnancy
    "SNOMED/156073000": "F",   # Complete miscarriage
    "SNOMED/19169002": "F",    # Miscarriage in first trimester
}
# Codes that record a death: SNOMED 419620001 "Death", OMOP concept 4306655 "Death", ICD-10-CM R99 "ill-defined
# and unknown cause of mortality", ICD-9-CM 798 "sudden death, cause unknown" (all subcodes), MEDS_DEATH.
DEATH_CODES = frozenset({"SNOMED/419620001", "OMOP/4306655", "ICD10CM/R99", "MEDS/MEDS_DEATH"})
DEATH_PREFIXES = ("ICD9CM/798",)
INFANCY_YEARS = 1.0
CHECKS = ("sex_specific", "perinatal_after_infancy", "events_after_death", "visits_before_birth")


def code_kinds(codes: Sequence[str]) -> np.ndarray:
    """(codes,) object array: "F", "M", "perinatal", "death" or "" for each typed code."""
    out = np.full(len(codes), "", dtype=object)
    for i, code in enumerate(codes):  # once per vocabulary entry, not per occurrence
        if code in SNOMED_KINDS:
            out[i] = SNOMED_KINDS[code]
        elif code in DEATH_CODES or code.startswith(DEATH_PREFIXES):
            out[i] = "death"
        else:
            system, head = code_system(code), code_value(code).replace(".", "")[:3].upper()
            for rule_system, low, high, kind in ICD_RANGES:
                if system == rule_system and low <= head <= high:
                    out[i] = kind
                    break
    return out


@dataclass(frozen=True)
class CheckCounts:
    """One check on one corpus: records breaking it, records it could be checked on, and the top codes.

    Attributes:
        records: records with at least one violation.
        checked: records the check applies to (e.g. sex known); the rate's denominator is all records.
        per_1000: 1000 * records / all records (NaN for an empty corpus).
        top_codes: up to 10 (code, records) pairs, most offending first (ties by code).
    """

    records: int
    checked: int
    per_1000: float
    top_codes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ClinicalValidity(MetricResult):
    """Each check (CHECKS) counted in real, synthetic and reference (holdout) data.

    Attributes:
        real, synthetic, reference: check name -> :class:`CheckCounts` (reference empty when not given).
        n_real, n_synthetic, n_reference: records per corpus.
    """

    metric = "clinical.validity"
    real: dict[str, CheckCounts]
    synthetic: dict[str, CheckCounts]
    reference: dict[str, CheckCounts]
    n_real: int
    n_synthetic: int
    n_reference: int


def clinical_validity(real: PatientCorpus, synthetic: PatientCorpus,
                      reference: PatientCorpus | None = None) -> ClinicalValidity:
    """Count the records breaking each clinical check in each corpus.

    Example:
        >>> clinical_validity(train, synthetic).synthetic["sex_specific"].per_1000  # doctest: +SKIP
    """
    check_corpus("real", real)
    check_corpus("synthetic", synthetic)
    return ClinicalValidity(
        real=corpus_checks(real), synthetic=corpus_checks(synthetic),
        reference=corpus_checks(reference) if reference is not None else {},
        n_real=real.n_patients, n_synthetic=synthetic.n_patients,
        n_reference=reference.n_patients if reference is not None else 0,
    )


def corpus_checks(corpus: PatientCorpus) -> dict[str, CheckCounts]:
    """Every check on one corpus."""
    kinds = code_kinds(corpus.vocab.codes)[np.asarray(corpus.codes, dtype=np.int64)]  # (N,) kind per occurrence
    visit = corpus.code_visit()                                                       # (N,)
    visit_patient = corpus.visit_patient()
    patient = visit_patient[visit]                                                    # (N,)
    sex = np.asarray(corpus.sex)[patient]
    age_first = np.asarray(corpus.age_at_first_visit, dtype=np.float64)
    visit_age = age_first[visit_patient] + np.asarray(corpus.visit_days, dtype=np.float64) / 365.25   # (V,)
    code_ids = np.asarray(corpus.codes, dtype=np.int64)
    out = {}
    bad = ((kinds == "F") & (sex == MALE)) | ((kinds == "M") & (sex == FEMALE))
    out["sex_specific"] = _counts(corpus, patient[bad], code_ids[bad], int((np.asarray(corpus.sex) >= 0).sum()))
    late = (kinds == "perinatal") & (visit_age[visit] >= INFANCY_YEARS)
    out["perinatal_after_infancy"] = _counts(corpus, patient[late], code_ids[late], int(np.isfinite(age_first).sum()))
    # first visit holding a death code, per patient; any later visit of that patient is after death
    death_visit = np.full(corpus.n_patients, np.iinfo(np.int64).max)
    dead = kinds == "death"
    np.minimum.at(death_visit, patient[dead], visit[dead])
    after = visit > death_visit[patient]
    out["events_after_death"] = _counts(corpus, patient[after], code_ids[after], int(len(np.unique(patient[dead]))))
    out["visits_before_birth"] = _before_birth(corpus, visit_age)
    return out


def _before_birth(corpus: PatientCorpus, visit_age: np.ndarray) -> CheckCounts:
    """Records with a visit at negative age, or whose visit year precedes the birth year."""
    birth = np.asarray(corpus.birth_year, dtype=np.int64)
    visit_patient = corpus.visit_patient()
    start = np.asarray(corpus.visit_start).astype("datetime64[Y]")
    year = np.where(np.isnat(start), -1, start.astype(np.int64) + 1970)
    known_year = (year >= 0) & (birth[visit_patient] > 0)
    early = (visit_age < 0) | (known_year & (year < birth[visit_patient]))
    checkable = np.isfinite(np.asarray(corpus.age_at_first_visit, dtype=np.float64)) | (birth > 0)
    records = len(np.unique(visit_patient[early]))
    return CheckCounts(records=records, checked=int(checkable.sum()), per_1000=_rate(records, corpus.n_patients),
                       top_codes=())


def _counts(corpus: PatientCorpus, patients: np.ndarray, code_ids: np.ndarray, checked: int) -> CheckCounts:
    records = len(np.unique(patients))
    top: tuple[tuple[str, int], ...] = ()
    if len(patients):
        pairs = np.unique(np.stack([code_ids, patients]), axis=1)   # (2, distinct (code, record))
        ids, counts = np.unique(pairs[0], return_counts=True)
        names = np.asarray(corpus.vocab.codes, dtype=object)[ids]
        order = np.lexsort((names.astype(str), -counts))[:10]
        top = tuple((str(names[k]), int(counts[k])) for k in order)
    return CheckCounts(records=records, checked=checked, per_1000=_rate(records, corpus.n_patients), top_codes=top)


def _rate(records: int, total: int) -> float:
    return 1000.0 * records / total if total else float("nan")
