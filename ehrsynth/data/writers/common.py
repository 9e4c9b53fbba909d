"""What every writer needs: integer patient ids, plausible visit times, one row per code, atomic output."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError
from ehrsynth.outputs import staged_file, staged_output

DEFAULT_ANCHOR = "2100-01-01"
_DAYS_PER_YEAR = 365.25


def patient_id_series(corpus: PatientCorpus) -> pl.Series:
    """(P,) the corpus ids as Int64 when every one is a canonical integer (``'123'``, not ``'0123'``), so they
    write and re-read as numbers; else as strings."""
    ids = pl.Series("patient", np.asarray(corpus.patient_ids).astype(str), dtype=pl.String)
    numbers = ids.cast(pl.Int64, strict=False)
    if numbers.is_not_null().all() and (numbers.cast(pl.String) == ids).all():
        return numbers
    return ids


def integer_patient_ids(corpus: PatientCorpus) -> np.ndarray:
    """(P,) int64 ids for formats that need integers (MEDS subject_id, OMOP person_id).

    The corpus ids themselves when they are unique canonical integers (see :func:`patient_id_series`);
    otherwise 1..P in corpus order.
    """
    ids = patient_id_series(corpus)
    if ids.dtype == pl.Int64 and ids.n_unique() == len(ids):
        return ids.to_numpy().astype(np.int64)
    return np.arange(1, corpus.n_patients + 1, dtype=np.int64)


def parse_anchor(anchor_date: str) -> np.datetime64:
    """``anchor_date`` as datetime64[s].

    Raises:
        ConfigError: naming ``anchor_date`` when it is not an ISO date.
    """
    try:
        value = np.datetime64(anchor_date, "s")
    except ValueError:
        raise ConfigError(f"anchor_date must be an ISO date such as '2100-01-01', got {anchor_date!r}") from None
    if np.isnat(value):
        raise ConfigError(f"anchor_date must be an ISO date such as '2100-01-01', got {anchor_date!r}")
    return value


def birth_year_start(birth_year: np.ndarray) -> np.ndarray:
    """(P,) datetime64[us] 1 January of each birth year (NaT where unknown, i.e. -1)."""
    birth_year = np.asarray(birth_year, dtype=np.int64)
    start = (birth_year - 1970).astype("datetime64[Y]").astype("datetime64[us]")
    return np.where(birth_year >= 0, start, np.datetime64("NaT", "us"))


def visit_times(corpus: PatientCorpus, anchor_date: str = DEFAULT_ANCHOR) -> np.ndarray:
    """(V,) datetime64[us] visit times: the real start where known, else a plausible date from ``visit_days``.

    Generated HALO records arrive dated (:mod:`ehrsynth.models.dates` draws their calendar from the training
    data), so this fallback serves input that genuinely has no dates, e.g. EHRDiff output (one visit per
    patient, no statics) or a corpus read without times. Such a first visit is put at 1 January of the birth
    year plus ``age_at_first_visit`` years (365.25 days each) when both are known, so a re-read gives back the
    age; otherwise at ``anchor_date`` (default 2100-01-01: plainly not a real date, as MIMIC's shifted years are
    not, and the same for every such patient -- nothing about it is learnt from data). Later visits follow at
    ``visit_days``; a visit with no day offset is put one day after the visit before it (the smallest gap
    that reads as a separate dated visit in OMOP, whose visit_start_date is a date). Derived times are whole
    seconds, like ``visit_start``, and distinct within a patient: visits whose offsets are equal move 1 s
    apart, so MEDS does not merge them.
    """
    anchor = parse_anchor(anchor_date).astype("datetime64[us]")
    known = np.asarray(corpus.visit_start).astype("datetime64[s]").astype("datetime64[us]")
    age = np.asarray(corpus.age_at_first_visit, dtype=np.float64)
    born = birth_year_start(corpus.birth_year)
    age_seconds = np.where(np.isfinite(age), age, 0.0) * _DAYS_PER_YEAR * 86_400
    from_birth = born + np.round(age_seconds).astype(np.int64).astype("timedelta64[s]").astype("timedelta64[us]")
    first = np.where(np.isnat(born) | ~np.isfinite(age), anchor, from_birth)  # (P,)
    days = np.array(corpus.visit_days, dtype=np.float64)
    # An unknown day is one day after its predecessor (a patient's first visit is day 0), so no visit is lost.
    first_visits = np.asarray(corpus.visit_offsets[:-1])[corpus.visits_per_patient() > 0]
    days[first_visits] = np.where(np.isfinite(days[first_visits]), days[first_visits], 0.0)
    position = np.arange(len(days))
    last_known = np.maximum.accumulate(np.where(np.isfinite(days), position, 0))
    days = days[last_known] + (position - last_known) if len(days) else days
    offset = np.round(np.where(np.isfinite(days), days, 0.0) * 86_400).astype(np.int64).astype("timedelta64[s]")
    derived = np.where(np.isfinite(days), first[corpus.visit_patient()] + offset, np.datetime64("NaT", "us"))
    # Visits of one patient on the same derived time would merge in time-keyed formats (MEDS): a tie moves
    # 1 s later per earlier visit at that time, which keeps the corpus order.
    patient, stamp = corpus.visit_patient(), derived.view(np.int64)
    in_order = bool(np.all((patient[1:] != patient[:-1]) | (stamp[1:] >= stamp[:-1])))
    # Visits are normally in time order already; sort (stable: ties keep corpus order) only when not.
    order = None if in_order else np.lexsort((stamp, patient))
    p, t = (patient, derived) if order is None else (patient[order], derived[order])
    same = np.r_[False, (p[1:] == p[:-1]) & (t[1:] == t[:-1])]  # NaT never equals NaT
    position = np.arange(len(t))
    ties = position - np.maximum.accumulate(np.where(same, 0, position))  # (V,) rank within a run of ties
    if order is not None:
        ties[order] = ties.copy()
    derived = derived + (ties * 1_000_000).astype("timedelta64[us]")
    return np.where(np.isnat(known), derived, known)


def code_rows(corpus: PatientCorpus, *, empty_visits: bool = False, names: pl.Series | None = None) -> pl.DataFrame:
    """One row per code occurrence, in corpus order: ``patient_idx``, ``visit_idx``, ``code_id`` and ``code``
    (the typed string).

    With ``empty_visits`` a visit without codes contributes one row with a null code, so it is not lost.
    ``names`` replaces the vocabulary strings (one per code id), e.g. to rewrite codes once per code rather
    than once per row.
    """
    codes = pl.Series("code", list(corpus.vocab.codes) if names is None else names, dtype=pl.String)
    code_id = pl.Series("code_id", np.asarray(corpus.codes, dtype=np.int64))
    rows = pl.DataFrame({"visit_idx": corpus.code_visit(), "code_id": code_id,
                         "code": codes.gather(code_id) if corpus.n_codes else codes.clear()})
    if empty_visits:
        empty = np.flatnonzero(corpus.codes_per_visit() == 0)
        if len(empty):
            rows = pl.concat([rows, pl.DataFrame({"visit_idx": empty.astype(np.int64)})], how="diagonal")
            rows = rows.sort("visit_idx", maintain_order=True)
    visit_patient = pl.Series(corpus.visit_patient())
    return rows.select(visit_patient.gather(rows["visit_idx"]).alias("patient_idx"), "visit_idx", "code_id", "code")


def code_systems(code: pl.Expr) -> pl.Expr:
    """The system prefix of typed codes (``'ICD9CM/4019'`` -> ``'ICD9CM'``)."""
    return code.str.split_exact("/", 1).struct.field("field_0")


def staging_directory(target: str | Path) -> contextlib.AbstractContextManager[Path]:
    """An empty directory beside ``target``; on success it replaces ``target``, on error it is removed.

    So a writer that fails half way leaves neither a partial ``target`` nor its staging directory behind, and
    an existing ``target`` is replaced only when ehrsynth wrote it (see :mod:`ehrsynth.outputs`).
    """
    return staged_output(target, "synthetic")


def staging_file(target: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary path beside ``target``; on success it is renamed to ``target``, on error removed (with the
    folders this call had to create for it)."""
    return staged_file(target, "synthetic")
