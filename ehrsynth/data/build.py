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

    Raises:
        EmptyTableError: when no patient with a code is left.
    """
    options = options or BuildOptions()
    stats: dict[str, object] = {"source": source, "options": _jsonable(asdict(options)), "input_rows": events.height}
    if "order" not in events.columns:
        events = events.with_row_index("order")
    events = events.select(
        "patient", "visit", pl.col("time").cast(pl.Datetime("us")), pl.col("code").cast(pl.String),
        pl.col("order").cast(pl.Int64),
    )

    # ---- codes: roll-up, system filter, de-duplication, minimum count -------------------------------------
    if options.icd9_rollup:
        events = events.with_columns(icd9_rollup_expr(pl.col("code")).alias("code"))
    if options.systems is not None:
        keep = pl.col("code").str.split_exact("/", 1).struct.field("field_0").is_in(list(options.systems))
        stats["events_other_systems"] = int(events.select((pl.col("code").is_not_null() & ~keep).sum()).item())
        events = events.with_columns(pl.when(keep).then(pl.col("code")).otherwise(None).alias("code"))
    before = events.height
    events = events.sort("order").unique(["patient", "visit", "code"], keep="first", maintain_order=True)
    stats["duplicate_events"] = before - events.height
    coded = events.filter(pl.col("code").is_not_null())
    code_counts = coded.group_by("code").len("count")
    rare = code_counts.filter(pl.col("count") < options.min_count)
    stats["codes_below_min_count"] = rare.height
    stats["events_below_min_count"] = int(rare["count"].sum())
    if rare.height:
        events = events.with_columns(
            pl.when(pl.col("code").is_in(rare["code"].implode())).then(None).otherwise(pl.col("code")).alias("code")
        )

    # ---- visits: order in time, cap codes per visit, handle empty visits ----------------------------------
    visits = events.group_by("patient", "visit").agg(
        pl.col("time").min(), pl.col("code").is_not_null().sum().alias("n_codes")
    )
    if options.max_codes_per_visit is not None:
        coded = events.filter(pl.col("code").is_not_null())
        rank = pl.col("order").rank("ordinal").over("patient", "visit")
        capped = coded.filter(rank <= options.max_codes_per_visit)
        stats["codes_over_visit_cap"] = coded.height - capped.height
        events = pl.concat([capped, events.filter(pl.col("code").is_null())])
    empty_visits = visits.filter(pl.col("n_codes") == 0)
    stats["empty_visits"] = empty_visits.height
    if options.empty == "drop":
        visits = visits.filter(pl.col("n_codes") > 0)
    visits = visits.sort("patient", "time", "visit", nulls_last=True)
    visits = visits.with_columns(pl.int_range(pl.len()).over("patient").alias("rank"),
                                 pl.len().over("patient").alias("n_visits"))
    if options.max_visits is not None:
        over = visits.filter(pl.col("n_visits") > options.max_visits)
        stats["visits_over_cap"] = over.height - over["patient"].n_unique() * options.max_visits if over.height else 0
        stats["patients_truncated"] = over["patient"].n_unique()
        if options.keep_visits == "last":
            visits = visits.filter(pl.col("rank") >= pl.col("n_visits") - options.max_visits)
        else:
            visits = visits.filter(pl.col("rank") < options.max_visits)

    # ---- patients: union of event and patient-table ids; those without codes are dropped or kept ----------
    all_patients = visits.select("patient").unique()
    known_patients = events.select("patient").unique()
    if patients is not None:
        known_patients = pl.concat([known_patients, patients.select(pl.col("patient").cast(known_patients["patient"].dtype, strict=False))]).unique()
    missing = known_patients.join(all_patients, on="patient", how="anti")
    stats["patients_without_codes"] = missing.height
    if options.empty == "keep" and missing.height:
        visits = pl.concat([
            visits,
            missing.with_columns(
                pl.lit(None, dtype=pl.String).cast(visits["visit"].dtype).alias("visit"),
                pl.lit(None, dtype=pl.Datetime("us")).alias("time"),
                pl.lit(0, dtype=visits["n_codes"].dtype).alias("n_codes"),
                pl.lit(0, dtype=visits["rank"].dtype).alias("rank"),
                pl.lit(1, dtype=visits["n_visits"].dtype).alias("n_visits"),
            ).select(visits.columns),
        ])
    visits = visits.sort("patient", "time", "visit", nulls_last=True)
    if visits.height == 0:
        raise EmptyTableError(f"no patient with a code remains after filtering ({source})")
    visits = visits.with_columns(
        pl.col("patient").rank("dense").cast(pl.Int64).sub(1).alias("patient_idx"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("visit_idx"),
    )

    # ---- vocabulary (descending count) and code ids -------------------------------------------------------
    kept = events.filter(pl.col("code").is_not_null()).join(
        visits.select("patient", "visit", "visit_idx"), on=["patient", "visit"], how="inner", nulls_equal=False
    )
    vocab_frame = kept.group_by("code").len("count").sort(["count", "code"], descending=[True, False])
    vocab = Vocabulary(tuple(vocab_frame["code"].to_list()), vocab_frame["count"].to_numpy().astype(np.int64))
    ids = vocab_frame.with_row_index("code_id").select("code", pl.col("code_id").cast(pl.Int32))
    kept = kept.join(ids, on="code", how="inner").select("visit_idx", "code_id").sort("visit_idx", "code_id")

    # ---- CSR arrays ---------------------------------------------------------------------------------------
    n_patients = int(visits["patient_idx"].max()) + 1
    n_visits = visits.height
    visit_offsets = np.zeros(n_patients + 1, dtype=np.int64)
    np.cumsum(np.bincount(visits["patient_idx"].to_numpy(), minlength=n_patients), out=visit_offsets[1:])
    code_offsets = np.zeros(n_visits + 1, dtype=np.int64)
    np.cumsum(np.bincount(kept["visit_idx"].to_numpy(), minlength=n_visits), out=code_offsets[1:])
    codes = kept["code_id"].to_numpy().astype(np.int32)

    times = visits["time"]
    first_time = visits.select(pl.col("time").min().over("patient_idx")).to_series()
    visit_days = ((times - first_time).dt.total_microseconds() / 86_400e6).to_numpy().astype(np.float64)
    visit_days = np.where(np.isfinite(visit_days), visit_days, np.nan)
    visit_start = times.cast(pl.Datetime("us")).to_numpy().astype("datetime64[s]")

    # ---- per-patient statics and labels -------------------------------------------------------------------
    roster = visits.group_by("patient_idx", maintain_order=True).agg(pl.col("patient").first(),
                                                                     pl.col("time").min().alias("first_time"))
    statics = _statics(roster, patients)
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
