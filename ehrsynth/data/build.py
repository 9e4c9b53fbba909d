"""Events table -> PatientCorpus: the single builder every reader ends in.

A reader's job is only to turn its source into two tidy frames:

* ``events``: one row per (patient, visit, code) with columns ``patient`` (any id type), ``visit`` (a visit key:
  an id or a timestamp), ``time`` (Datetime or null), ``code`` (typed ``SYSTEM/value`` string, or null for a
  visit with no code) and optionally ``order`` (source order within the visit, e.g. MIMIC's seq_num).
* ``patients`` (optional): ``patient`` plus any of ``sex`` ('F'/'M'), ``birth_year``, ``birth_date``,
  ``age`` (years at first visit), ``death`` (0/1) and ``label:<name>`` (0/1) columns.

Filtering, de-duplication, caps, vocabulary and split all happen here, once, and every drop is counted in
``corpus.stats``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import polars as pl

from ehrsynth.data.corpus import PatientCorpus, random_split
from ehrsynth.data.vocab import Vocabulary, icd9_rollup_expr
from ehrsynth.errors import ConfigError, EmptyTableError

LABEL_PREFIX = "label:"


@dataclass(frozen=True)
class BuildOptions:
    """How raw events become a corpus.

    Attributes:
        min_count: drop codes present in fewer than this many visits (counted after de-duplication).
        systems: keep only codes of these systems (e.g. ``("ICD9CM",)``); None keeps all.
        icd9_rollup: roll ICD-9 diagnoses to 3 characters (4 for E-codes) and procedures to 3, as EHRDiff.
        max_visits: cap on visits per patient; None for no cap.
        keep_visits: which end of a long history survives the cap: the most recent (``'last'``, default --
            recent history is what the next visit depends on) or the earliest (``'first'``).
        max_codes_per_visit: cap on codes per visit; the first codes in source order (e.g. MIMIC seq_num,
            primary diagnosis first) are kept.
        empty: ``'drop'`` visits and patients left with no code (counted), or ``'keep'`` them as empty visits.
        split: train/val/test fractions of patients.
        seed: seed of the split.
    """

    min_count: int = 1
    systems: tuple[str, ...] | None = None
    icd9_rollup: bool = False
    max_visits: int | None = None
    keep_visits: Literal["first", "last"] = "last"
    max_codes_per_visit: int | None = None
    empty: Literal["drop", "keep"] = "drop"
    split: tuple[float, float, float] = (0.72, 0.08, 0.2)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ConfigError(f"min_count must be >= 1, got {self.min_count!r}")
        if self.max_visits is not None and self.max_visits < 1:
            raise ConfigError(f"max_visits must be >= 1, got {self.max_visits!r}")
        if self.max_codes_per_visit is not None and self.max_codes_per_visit < 1:
            raise ConfigError(f"max_codes_per_visit must be >= 1, got {self.max_codes_per_visit!r}")
        if self.keep_visits not in ("first", "last"):
            raise ConfigError(f"keep_visits must be 'first' or 'last', got {self.keep_visits!r}")
        if self.empty not in ("drop", "keep"):
            raise ConfigError(f"empty must be 'drop' or 'keep', got {self.empty!r}")


def build_corpus(
    events: pl.DataFrame,
    patients: pl.DataFrame | None = None,
    options: BuildOptions | None = None,
    *,
    source: str = "events",
) -> PatientCorpus:
    """Build a corpus from tidy ``events`` (and optional ``patients``), see the module docstring.

    Polars does the keyed work (distinct codes, visit keys, the patient join); everything per event runs on
    int arrays in numpy, so memory stays a few bytes per event.

    Raises:
        EmptyTableError: when no patient with a code is left.
    """
    options = options or BuildOptions()
    stats: dict[str, object] = {"source": source, "options": _jsonable(asdict(options)), "input_rows": events.height}
    order = (events["order"] if "order" in events.columns else pl.int_range(events.height, eager=True))
    ev_order = order.cast(pl.Int64).fill_null(0).to_numpy()

    # ---- codes: roll-up and system filter run on the distinct codes only; events carry int ids (-1: none) --
    raw_codes = events["code"].cast(pl.String).drop_nulls().unique(maintain_order=True)
    mapped = pl.DataFrame({"code": raw_codes})
    if options.icd9_rollup:
        mapped = mapped.with_columns(icd9_rollup_expr(pl.col("code")).alias("code"))
    if options.systems is not None:
        keep = pl.col("code").str.split_exact("/", 1).struct.field("field_0").is_in(list(options.systems))
        mapped = mapped.with_columns(pl.when(keep).then(pl.col("code")).otherwise(None).alias("code"))
    code_names = mapped["code"].drop_nulls().unique(maintain_order=True)
    raw_to_code = np.full(len(raw_codes) + 1, -1, dtype=np.int32)  # last slot: a null code
    raw_to_code[: len(raw_codes)] = mapped["code"].cast(pl.Enum(code_names)).to_physical().fill_null(-1).to_numpy()
    raw_ids = events["code"].cast(pl.String).cast(pl.Enum(raw_codes)).to_physical().cast(pl.Int64)
    ev_code = raw_to_code[raw_ids.fill_null(len(raw_codes)).to_numpy()]
    if options.systems is not None:
        stats["events_other_systems"] = int(((ev_code < 0) & raw_ids.is_not_null().to_numpy()).sum())
    del raw_ids

    # ---- visits: one row per (patient, visit) key, ordered by patient then time (numpy on int keys) --------
    listed = None if patients is None else patients["patient"]
    patient_key, patient_values = _int_keys(events["patient"], listed)
    visit_key, _ = _int_keys(events["visit"])
    time_us = events["time"].cast(pl.Datetime("us")).to_physical().fill_null(_LAST).to_numpy()
    if listed is not None:  # patients with no event at all get a key-less, timeless visit: empty by construction
        listed_key, _ = _int_keys(listed, events["patient"])
        absent = np.setdiff1d(listed_key[listed_key != _LAST], patient_key)
        patient_key = np.concatenate([patient_key, absent])
        visit_key = np.concatenate([visit_key, np.full(len(absent), _LAST)])
        time_us = np.concatenate([time_us, np.full(len(absent), _LAST)])
    by_key = np.lexsort((visit_key, patient_key))
    new_key = np.ones(len(by_key), dtype=bool)
    new_key[1:] = ((patient_key[by_key[1:]] != patient_key[by_key[:-1]])
                   | (visit_key[by_key[1:]] != visit_key[by_key[:-1]]))
    starts = np.flatnonzero(new_key)
    event_key = np.empty(len(by_key), dtype=np.int64)
    event_key[by_key] = np.cumsum(new_key) - 1
    key_patient, key_visit = patient_key[by_key[starts]], visit_key[by_key[starts]]
    key_time = np.minimum.reduceat(time_us[by_key], starts) if len(starts) else time_us[:0]
    del by_key, new_key, visit_key, time_us
    in_time_order = np.lexsort((key_visit, key_time, key_patient))  # unknown times sort last
    visit_of_key = np.empty(len(in_time_order), dtype=np.int64)
    visit_of_key[in_time_order] = np.arange(len(in_time_order))
    ev_visit = visit_of_key[event_key[: events.height]]
    del event_key, visit_of_key
    key_patient, key_time = key_patient[in_time_order], key_time[in_time_order]
    visits = pl.DataFrame({
        "patient": pl.Series(key_patient) if patient_values is None else patient_values.gather(key_patient),
        "time": pl.Series(key_time).replace(_LAST, None).cast(pl.Datetime("us")),
    })
    if patient_values is None:
        visits = visits.with_columns(pl.col("patient").cast(events["patient"].dtype))
    visit_key_patient = np.cumsum(np.r_[True, key_patient[1:] != key_patient[:-1]]) - 1  # (V0,) dense rank
    n_visits0 = visits.height
    del key_patient, key_time, key_visit, in_time_order

    # ---- events: drop null codes, de-duplicate (visit, code) keeping source order, minimum count ----------
    coded = ev_code >= 0
    ev_visit, ev_code, ev_order = ev_visit[coded], ev_code[coded], ev_order[coded]
    by_visit_code = np.lexsort((ev_order, ev_code, ev_visit))
    ev_visit, ev_code, ev_order = ev_visit[by_visit_code], ev_code[by_visit_code], ev_order[by_visit_code]
    first = np.ones(len(ev_code), dtype=bool)
    first[1:] = (ev_visit[1:] != ev_visit[:-1]) | (ev_code[1:] != ev_code[:-1])
    stats["duplicate_events"] = int((~first).sum())
    ev_visit, ev_code, ev_order = ev_visit[first], ev_code[first], ev_order[first]
    code_counts = np.bincount(ev_code, minlength=len(code_names))
    rare = (code_counts > 0) & (code_counts < options.min_count)
    stats["codes_below_min_count"] = int(rare.sum())
    stats["events_below_min_count"] = int(code_counts[rare].sum())
    common = ~rare[ev_code]
    ev_visit, ev_code, ev_order = ev_visit[common], ev_code[common], ev_order[common]
    if options.max_codes_per_visit is not None:
        by_order = np.lexsort((ev_order, ev_visit))
        rank = _rank_within_runs(ev_visit[by_order])
        keep_code = np.empty(len(ev_code), dtype=bool)
        keep_code[by_order] = rank < options.max_codes_per_visit
        stats["codes_over_visit_cap"] = int((~keep_code).sum())
        ev_visit, ev_code = ev_visit[keep_code], ev_code[keep_code]

    # ---- visits: empty ones dropped or kept; cap on visits per patient --------------------------------------
    codes_in_visit = np.bincount(ev_visit, minlength=n_visits0)
    empty = codes_in_visit == 0
    stats["empty_visits"] = int(empty.sum())
    keep_visit = ~empty if options.empty == "drop" else np.ones(n_visits0, dtype=bool)
    stats["patients_without_codes"] = int(len(np.unique(visit_key_patient))
                                          - len(np.unique(visit_key_patient[~empty])))
    if options.max_visits is not None:
        kept_ids = np.flatnonzero(keep_visit)
        rank = _rank_within_runs(visit_key_patient[kept_ids])
        n_in_patient = np.bincount(visit_key_patient[kept_ids])[visit_key_patient[kept_ids]]
        if options.keep_visits == "last":
            survive = rank >= n_in_patient - options.max_visits
        else:
            survive = rank < options.max_visits
        stats["visits_over_cap"] = int((~survive).sum())
        stats["patients_truncated"] = int(len(np.unique(visit_key_patient[kept_ids][~survive])))
        keep_visit[kept_ids[~survive]] = False
    if not keep_visit.any():
        raise EmptyTableError(f"no patient with a code remains after filtering ({source})")
    new_visit = np.cumsum(keep_visit) - 1
    on_kept = keep_visit[ev_visit]
    ev_visit, ev_code = new_visit[ev_visit[on_kept]], ev_code[on_kept]
    visits = visits.filter(pl.Series(keep_visit))
    kept_patient_key = visit_key_patient[keep_visit]
    patient_of_visit = np.cumsum(np.r_[True, kept_patient_key[1:] != kept_patient_key[:-1]]) - 1
    n_patients, n_visits = int(patient_of_visit.max()) + 1, visits.height

    # ---- vocabulary (descending count, ties by code) and final code ids -------------------------------------
    used_counts_all = np.bincount(ev_code, minlength=len(code_names))
    used_ids = np.flatnonzero(used_counts_all)
    used_counts = used_counts_all[used_ids].astype(np.int64)
    used_names = np.array(code_names.to_list(), dtype=str)[used_ids] if len(used_ids) else np.array([], dtype=str)
    by_count = np.lexsort((used_names, -used_counts))
    vocab = Vocabulary(tuple(used_names[by_count].tolist()), used_counts[by_count])
    remap = np.full(max(len(code_names), 1), -1, dtype=np.int32)
    remap[used_ids[by_count]] = np.arange(len(by_count), dtype=np.int32)
    ev_code = remap[ev_code]
    csr_order = np.lexsort((ev_code, ev_visit))
    codes = ev_code[csr_order].astype(np.int32)
    visit_offsets = np.zeros(n_patients + 1, dtype=np.int64)
    np.cumsum(np.bincount(patient_of_visit, minlength=n_patients), out=visit_offsets[1:])
    code_offsets = np.zeros(n_visits + 1, dtype=np.int64)
    np.cumsum(np.bincount(ev_visit, minlength=n_visits), out=code_offsets[1:])
    del ev_visit, ev_code, csr_order

    # ---- times ---------------------------------------------------------------------------------------------
    visits = visits.with_columns(pl.Series("patient_idx", patient_of_visit))
    first_time = visits.select(pl.col("time").min().over("patient_idx")).to_series()
    visit_days = ((visits["time"] - first_time).dt.total_microseconds() / 86_400e6).to_numpy().astype(np.float64)
    visit_days = np.where(np.isfinite(visit_days), visit_days, np.nan)
    visit_start = visits["time"].to_numpy().astype("datetime64[s]")

    # ---- per-patient statics and labels ---------------------------------------------------------------------
    roster = visits.group_by("patient_idx", maintain_order=True).agg(pl.col("patient").first(),
                                                                     pl.col("time").min().alias("first_time"))
    statics = _statics(roster, patients)
    # A birth after the first visit (a typo'd year, swapped dates) gives a negative age: unknown, and counted.
    negative_age = statics["age"] < 0
    stats["negative_ages_dropped"] = int(negative_age.sum())
    statics = statics.with_columns(pl.when(negative_age).then(float("nan")).otherwise(pl.col("age")).alias("age"))
    label_names = tuple(c[len(LABEL_PREFIX):] for c in statics.columns if c.startswith(LABEL_PREFIX))
    labels = (statics.select([pl.col(LABEL_PREFIX + n).fill_null(0).cast(pl.UInt8) for n in label_names])
              .to_numpy().astype(np.uint8).reshape(n_patients, len(label_names)))

    stats["patients"] = n_patients
    stats["visits"] = n_visits
    stats["code_occurrences"] = int(len(codes))
    return PatientCorpus(
        patient_ids=roster["patient"].cast(pl.String).to_numpy().astype(str).astype(object),
        visit_offsets=visit_offsets,
        code_offsets=code_offsets,
        codes=codes,
        visit_days=visit_days,
        visit_start=visit_start,
        sex=statics["sex_code"].to_numpy().astype(np.int8),
        birth_year=statics["birth_year"].to_numpy().astype(np.int32),
        age_at_first_visit=statics["age"].to_numpy().astype(np.float32),
        death=statics["death"].to_numpy().astype(np.int8),
        labels=labels,
        label_names=label_names,
        vocab=vocab,
        split=random_split(n_patients, options.split, seed=options.seed),
        stats=stats,
    )


_LAST = np.iinfo(np.int64).max  # key of a missing visit id or time: sorts after every real one


def _int_keys(series: pl.Series, also: pl.Series | None = None) -> tuple[np.ndarray, pl.Series | None]:
    """Order-preserving int64 keys for an id column.

    Integers keep their value; dates and times use their physical value; anything else (strings) becomes its
    rank among the sorted distinct values of ``series`` and ``also``, returned as the second element so keys map
    back to values. Nulls become the largest key.
    """
    if series.dtype.is_integer() and (also is None or also.dtype.is_integer()):
        return series.cast(pl.Int64).fill_null(_LAST).to_numpy(), None
    if series.dtype == pl.Date or isinstance(series.dtype, pl.Datetime):
        return series.to_physical().cast(pl.Int64).fill_null(_LAST).to_numpy(), None
    text = series.cast(pl.String)
    pool = text if also is None else pl.concat([text, also.cast(pl.String)])
    values = pool.drop_nulls().unique().sort()
    keys = text.cast(pl.Enum(values)).to_physical().cast(pl.Int64).fill_null(_LAST).to_numpy()
    return keys, values


def _rank_within_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal consecutive keys."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - run_start


def _statics(roster: pl.DataFrame, patients: pl.DataFrame | None) -> pl.DataFrame:
    """Join the patient table onto the roster and derive sex code, birth year, age at first visit, death."""
    frame = roster
    if patients is not None:
        patients = patients.with_columns(pl.col("patient").cast(roster["patient"].dtype, strict=False))
        patients = patients.unique("patient", keep="first", maintain_order=True)
        frame = roster.join(patients, on="patient", how="left")
    for name, dtype in (("sex", pl.String), ("birth_year", pl.Int64), ("birth_date", pl.Datetime("us")),
                        ("age", pl.Float64), ("death", pl.Int64)):
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
    sex = pl.col("sex").cast(pl.String).str.to_uppercase().str.slice(0, 1)
    birth_year = pl.coalesce(pl.col("birth_year").cast(pl.Int64), pl.col("birth_date").dt.year().cast(pl.Int64))
    age_from_date = (pl.col("first_time") - pl.col("birth_date")).dt.total_days() / 365.25
    age_from_year = (pl.col("first_time").dt.year() - birth_year).cast(pl.Float64)
    return frame.with_columns(
        pl.when(sex == "F").then(0).when(sex == "M").then(1).otherwise(-1).alias("sex_code"),
        birth_year.fill_null(-1).alias("birth_year"),
        pl.coalesce(pl.col("age").cast(pl.Float64), age_from_date, age_from_year).fill_null(float("nan")).alias("age"),
        pl.col("death").cast(pl.Int64).fill_null(-1).alias("death"),
    )


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
