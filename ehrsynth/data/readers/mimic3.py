"""MIMIC-III: one visit per admission (ADMISSIONS), codes from DIAGNOSES_ICD and optionally PROCEDURES_ICD and
PRESCRIPTIONS (NDC). PATIENTS gives sex and birth year; HOSPITAL_EXPIRE_FLAG gives the ``mortality`` label
(1 if the patient died in any admission) and the death flag.

Column and file names are matched case-insensitively: the demo release is lower case, the full one upper case.
ICD-9 codes are kept as MIMIC writes them (no dot), e.g. ``ICD9CM/4019``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.checks import check_birth_years, check_flag
from ehrsynth.data.notes import collects_notes
from ehrsynth.data.tables import clean_code, find_table, parse_datetime, parse_int, read_table
from ehrsynth.errors import ConfigError

MIMIC3_TABLES = ("diagnoses", "procedures", "prescriptions")


@collects_notes
def read_mimic3(
    directory: str | Path,
    *,
    tables: Sequence[str] = ("diagnoses",),
    options: BuildOptions | None = None,
) -> PatientCorpus:
    """Read a MIMIC-III directory into a corpus.

    Args:
        directory: folder holding ADMISSIONS, PATIENTS and the code tables (.csv, .csv.gz or .parquet).
        tables: code tables to use, any of ``'diagnoses'``, ``'procedures'``, ``'prescriptions'``.
        options: corpus build options.

    Raises:
        InputError: for a missing table or column, an empty table, a bad date or id.
    """
    unknown = set(tables) - set(MIMIC3_TABLES)
    if unknown or not tables:
        raise ConfigError(f"tables must be a non-empty subset of {MIMIC3_TABLES}, got {tuple(tables)!r}")
    directory = Path(directory)
    admissions = read_admissions(directory)
    code_frames = []
    if "diagnoses" in tables:
        code_frames.append(_icd_codes(directory, "diagnoses_icd", "ICD9CM"))
    if "procedures" in tables:
        code_frames.append(_icd_codes(directory, "procedures_icd", "ICD9PROC"))
    if "prescriptions" in tables:
        code_frames.append(ndc_codes(directory))
    codes = pl.concat(code_frames, how="vertical")
    # Admissions without any code keep a null-code row, so build_corpus can count (or keep) empty visits.
    events = admissions.select("patient", "visit", "time").join(
        codes, on=["visit"], how="left"
    ).select("patient", "visit", "time", "code", "order")
    orphan = codes.join(admissions, on="visit", how="anti").height
    patients = _patients(directory, admissions)
    corpus = build_corpus(events, patients, options, source="mimic3")
    corpus.stats["code_rows_without_admission"] = orphan
    # MIMIC shifts the birth date of patients over 89 to about 300 years before admission: report them as 90.
    corpus.age_at_first_visit = np.where(corpus.age_at_first_visit > 89, 90.0, corpus.age_at_first_visit).astype(np.float32)
    return corpus


def read_admissions(directory: Path) -> pl.DataFrame:
    """MIMIC's admissions table (III and IV share it) as ``patient``, ``visit``, ``time`` and ``expired``."""
    path = find_table(directory, "admissions")
    admissions = read_table(path, ["subject_id", "hadm_id", "admittime"], ["hospital_expire_flag"])
    if "hospital_expire_flag" in admissions.columns:
        check_flag(parse_int(admissions, "hospital_expire_flag", path), admissions["_row"], path,
                   "hospital_expire_flag")
    return admissions.select(
        parse_int(admissions, "subject_id", path).alias("patient"),
        parse_int(admissions, "hadm_id", path).alias("visit"),
        parse_datetime(admissions, "admittime", path).alias("time"),
        (parse_int(admissions, "hospital_expire_flag", path)
         if "hospital_expire_flag" in admissions.columns else pl.lit(None, dtype=pl.Int64)).alias("expired"),
    )


def _icd_codes(directory: Path, table: str, system: str) -> pl.DataFrame:
    path = find_table(directory, table)
    frame = read_table(path, ["hadm_id", "icd9_code"], ["seq_num"])
    # Order codes by table (diagnoses before procedures) then seq_num, so caps keep primary codes first.
    offset = {"ICD9CM": 0, "ICD9PROC": 1_000_000}[system]
    seq = parse_int(frame, "seq_num", path) if "seq_num" in frame.columns else frame["_row"].cast(pl.Int64)
    return pl.DataFrame({
        "visit": parse_int(frame, "hadm_id", path),
        "code": pl.select(pl.lit(f"{system}/") + clean_code(frame["icd9_code"])).to_series(),
        "order": seq.fill_null(999) + offset,
    })


def ndc_codes(directory: Path) -> pl.DataFrame:
    path = find_table(directory, "prescriptions")
    frame = read_table(path, ["hadm_id", "ndc"])
    ndc = clean_code(frame["ndc"])
    ndc = pl.select(pl.when(ndc == "0").then(None).otherwise(ndc)).to_series()  # MIMIC writes 0 for "no NDC"
    return pl.DataFrame({
        "visit": parse_int(frame, "hadm_id", path),
        "code": pl.select(pl.lit("NDC/") + ndc).to_series(),
        "order": frame["_row"].cast(pl.Int64) + 2_000_000,
    }).filter(pl.col("code").is_not_null())


def _patients(directory: Path, admissions: pl.DataFrame) -> pl.DataFrame:
    path = find_table(directory, "patients")
    frame = read_table(path, ["subject_id"], ["gender", "dob"])
    out = pl.DataFrame({"patient": parse_int(frame, "subject_id", path)})
    if "gender" in frame.columns:
        out = out.with_columns(frame["gender"].alias("sex"))
    if "dob" in frame.columns:
        dob = parse_datetime(frame, "dob", path)
        check_birth_years(dob.dt.year(), frame["_row"], path, "dob", admissions["time"])
        out = out.with_columns(dob.alias("birth_date"))
    expired = admissions.group_by("patient").agg(pl.col("expired").max())
    out = out.join(expired, on="patient", how="full", coalesce=True)
    return out.with_columns(
        pl.col("expired").alias("death"), pl.col("expired").fill_null(0).alias("label:mortality")
    ).drop("expired")
