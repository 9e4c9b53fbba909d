"""OMOP CDM 5.4 output (CSV), the layout :func:`ehrsynth.data.readers.omop.read_omop` reads.

Tables written: ``person``, ``visit_occurrence``, ``condition_occurrence``, ``drug_exposure``,
``procedure_occurrence``, and ``death`` when the corpus records deaths (any ``death`` flag other than -1).

* An ``OMOP/<id>`` code goes in ``*_concept_id``; any other code gets concept 0 ("no matching concept", the
  corpus has no vocabulary mapping). Every row keeps its typed code in ``*_source_value`` (``ICD9CM/4019``),
  which the reader turns back into the code when the concept is 0.
* The table follows the code system: diagnoses (ICD9CM, ICD10CM, SNOMED) to condition_occurrence, drugs (NDC,
  RXNORM) to drug_exposure, procedures (ICD9PROC, ICD10PCS, CPT4) to procedure_occurrence. ``OMOP/`` codes carry
  no domain in the corpus, so they go to condition_occurrence unless ``domains`` says otherwise; codes of any
  other system (LOINC, ...) also go to condition_occurrence, as no measurement table is written.
* Dates: the real visit start where known, else plausible dates from ``visit_days`` (see
  :func:`ehrsynth.data.writers.common.visit_times`). Every event of a visit is on the visit's date.
* ``person_id`` is the corpus id when all ids are integers, else 1..P with the corpus id in
  ``person_source_value``. Type, race and ethnicity concepts are 0 (unknown). Labels have no OMOP home and are
  not written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.corpus import SEX_NAMES, PatientCorpus
from ehrsynth.data.writers.common import (
    DEFAULT_ANCHOR, code_rows, code_systems, integer_patient_ids, staging_directory, visit_times,
)
from ehrsynth.errors import ConfigError

SYSTEM_DOMAINS = {
    "ICD9CM": "condition", "ICD10CM": "condition", "SNOMED": "condition", "OMOP": "condition",
    "NDC": "drug", "RXNORM": "drug",
    "ICD9PROC": "procedure", "ICD10PCS": "procedure", "CPT4": "procedure",
}
GENDER_CONCEPTS = (8532, 8507)  # OMOP concepts of SEX_NAMES: FEMALE, MALE
# domain -> (table, id column, concept column, date column, datetime column, type column, source column)
EVENT_TABLES = {
    "condition": ("condition_occurrence", "condition_occurrence_id", "condition_concept_id", "condition_start_date",
                  "condition_start_datetime", "condition_type_concept_id", "condition_source_value"),
    "drug": ("drug_exposure", "drug_exposure_id", "drug_concept_id", "drug_exposure_start_date",
             "drug_exposure_start_datetime", "drug_type_concept_id", "drug_source_value"),
    "procedure": ("procedure_occurrence", "procedure_occurrence_id", "procedure_concept_id", "procedure_date",
                  "procedure_datetime", "procedure_type_concept_id", "procedure_source_value"),
}
_CSV = {"date_format": "%Y-%m-%d", "datetime_format": "%Y-%m-%d %H:%M:%S"}


def write_omop(
    corpus: PatientCorpus,
    directory: str | Path,
    *,
    anchor_date: str = DEFAULT_ANCHOR,
    domains: Mapping[str, str] | None = None,
) -> Path:
    """Write ``corpus`` as OMOP CDM CSV tables in ``directory`` (replaced atomically if it exists).

    Args:
        corpus: the corpus to write.
        directory: the folder to create.
        anchor_date: first-visit date for patients with neither visit dates nor birth year and age.
        domains: typed code -> ``'condition'``, ``'drug'`` or ``'procedure'``, overriding the routing by
            system (e.g. ``{"OMOP/1124957": "drug"}``).

    Returns:
        ``directory``.

    Raises:
        ConfigError: for a bad ``anchor_date`` or an unknown domain.

    Example:
        >>> write_omop(corpus, "synthetic_omop", domains={"OMOP/1124957": "drug"})  # doctest: +SKIP
    """
    domains = dict(domains or {})
    bad = sorted({d for d in domains.values() if d not in EVENT_TABLES})
    if bad:
        raise ConfigError(f"domains values must be one of {tuple(EVENT_TABLES)}, got {bad[0]!r}")
    person_ids = integer_patient_ids(corpus)
    times = pl.Series("time", visit_times(corpus, anchor_date)).cast(pl.Datetime("us"))
    visit_person = person_ids[corpus.visit_patient()]

    person = _person(corpus, person_ids)
    visits = pl.DataFrame({
        "visit_occurrence_id": np.arange(1, corpus.n_visits + 1, dtype=np.int64),
        "person_id": visit_person,
        "visit_concept_id": np.zeros(corpus.n_visits, dtype=np.int64),
        "visit_start_date": times.dt.date(),
        "visit_start_datetime": times,
        "visit_end_date": times.dt.date(),  # the stay length is unknown: one-day visits
        "visit_end_datetime": times,
        "visit_type_concept_id": np.zeros(corpus.n_visits, dtype=np.int64),
    })

    # Table and concept id per vocabulary code, then per row by code id (string work once per code).
    vocab = pl.DataFrame({"code": list(corpus.vocab.codes)}, schema={"code": pl.String}).with_columns(
        code_systems(pl.col("code")).alias("system"))
    system_domain = pl.col("system").replace_strict(SYSTEM_DOMAINS, default="condition", return_dtype=pl.String)
    vocab = vocab.with_columns(
        (pl.col("code").replace_strict(domains, default=system_domain, return_dtype=pl.String) if domains
         else system_domain).alias("domain"),
        pl.when(pl.col("system") == "OMOP")
        .then(pl.col("code").str.split_exact("/", 1).struct.field("field_1").cast(pl.Int64, strict=False))
        .fill_null(0).alias("concept_id"),
    )
    rows = code_rows(corpus)
    visit, code_id = rows["visit_idx"].to_numpy(), rows["code_id"]
    rows = rows.with_columns(
        pl.Series("person_id", visit_person[visit]), times.gather(visit).alias("time"),
        vocab["domain"].gather(code_id).alias("domain"), vocab["concept_id"].gather(code_id).alias("concept_id"),
    )

    with staging_directory(directory) as staging:
        person.write_csv(staging / "person.csv", **_CSV)
        visits.write_csv(staging / "visit_occurrence.csv", **_CSV)
        for domain, columns in EVENT_TABLES.items():
            _event_table(rows.filter(pl.col("domain") == domain), domain, columns).write_csv(
                staging / f"{columns[0]}.csv", **_CSV)
        if (np.asarray(corpus.death) >= 0).any():
            _death(corpus, person_ids, times).write_csv(staging / "death.csv", **_CSV)
    return Path(directory)


def _person(corpus: PatientCorpus, person_ids: np.ndarray) -> pl.DataFrame:
    sex = np.asarray(corpus.sex, dtype=np.int64)
    birth_year = np.asarray(corpus.birth_year, dtype=np.int64)
    n = corpus.n_patients
    return pl.DataFrame({
        "person_id": person_ids,
        "gender_concept_id": np.where(sex >= 0, np.array(GENDER_CONCEPTS)[np.clip(sex, 0, 1)], 0),
        "year_of_birth": pl.Series(np.where(birth_year >= 0, birth_year, 0)).set(pl.Series(birth_year < 0), None),
        "month_of_birth": pl.repeat(None, n, dtype=pl.Int64, eager=True),
        "day_of_birth": pl.repeat(None, n, dtype=pl.Int64, eager=True),
        "birth_datetime": pl.repeat(None, n, dtype=pl.Datetime("us"), eager=True),
        "race_concept_id": np.zeros(n, dtype=np.int64),
        "ethnicity_concept_id": np.zeros(n, dtype=np.int64),
        "person_source_value": np.asarray(corpus.patient_ids).astype(str),
        "gender_source_value": pl.select(
            pl.lit(sex).replace_strict({0: SEX_NAMES[0], 1: SEX_NAMES[1]}, default=None, return_dtype=pl.String)
        ).to_series(),
    })


def _event_table(rows: pl.DataFrame, domain: str, columns: tuple[str, ...]) -> pl.DataFrame:
    table, id_column, concept, date, datetime, type_concept, source = columns
    out = rows.select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(id_column),
        "person_id",
        pl.col("concept_id").alias(concept),
        pl.col("time").dt.date().alias(date),
        pl.col("time").alias(datetime),
        *([pl.col("time").dt.date().alias("drug_exposure_end_date")] if domain == "drug" else []),
        pl.lit(0, dtype=pl.Int64).alias(type_concept),
        (pl.col("visit_idx") + 1).alias("visit_occurrence_id"),
        pl.col("code").alias(source),
        pl.lit(0, dtype=pl.Int64).alias(source.replace("_value", "_concept_id")),
    )
    return out


def _death(corpus: PatientCorpus, person_ids: np.ndarray, times: pl.Series) -> pl.DataFrame:
    """DEATH rows for patients whose flag is 1, dated at their last visit (the corpus has no death date)."""
    last = pl.DataFrame({"patient_idx": corpus.visit_patient(), "time": times}).group_by("patient_idx").agg(
        pl.col("time").max())
    dead = pl.DataFrame({"patient_idx": np.flatnonzero(np.asarray(corpus.death) == 1).astype(np.int64)})
    dead = dead.join(last, on="patient_idx", how="left", maintain_order="left")
    return dead.select(
        pl.Series("person_id", person_ids[dead["patient_idx"].to_numpy()]),
        pl.col("time").dt.date().alias("death_date"),
        pl.col("time").alias("death_datetime"),
        pl.lit(0, dtype=pl.Int64).alias("death_type_concept_id"),
    )
