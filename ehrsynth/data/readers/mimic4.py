"""MIMIC-IV (hosp module): one visit per admission, codes from diagnoses_icd and optionally procedures_icd and
prescriptions (NDC).

Unlike MIMIC-III, one table mixes ICD-9 and ICD-10 (column ``icd_version``), so each code is typed by its own
row: diagnoses become ``ICD9CM/`` or ``ICD10CM/``, procedures ``ICD9PROC/`` or ``ICD10PCS/``. The same string
can be a different code in each version, which is why a code is the (version, code) pair and never the string
alone. ``patients`` gives sex and, through the anchor year, birth year; HOSPITAL_EXPIRE_FLAG gives the death flag
and the ``mortality`` label exactly as :mod:`ehrsynth.data.readers.mimic3` does.

Either the ``hosp/`` directory or its parent (the release root) may be given. Tables may be .csv, .csv.gz or
.parquet, in any letter case.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers.mimic3 import ndc_codes, read_admissions
from ehrsynth.data.checks import check_birth_years, check_not_negative
from ehrsynth.data.notes import collects_notes
from ehrsynth.data.tables import ROW, clean_code, find_table, parse_int, read_table
from ehrsynth.errors import ConfigError, ParseError

MIMIC4_TABLES = ("diagnoses", "procedures", "prescriptions")
# icd_version -> system prefix, per table. Any other version is an error, not a guess.
DIAGNOSIS_SYSTEMS = {9: "ICD9CM", 10: "ICD10CM"}
PROCEDURE_SYSTEMS = {9: "ICD9PROC", 10: "ICD10PCS"}


@collects_notes
def read_mimic4(
    directory: str | Path,
    *,
    tables: Sequence[str] = ("diagnoses",),
    options: BuildOptions | None = None,
) -> PatientCorpus:
    """Read a MIMIC-IV ``hosp/`` directory (or the release root holding it) into a corpus.

    Args:
        directory: ``hosp/`` or its parent, holding admissions, patients and the code tables.
        tables: code tables to use, any of ``'diagnoses'``, ``'procedures'``, ``'prescriptions'``.
        options: corpus build options.

    Returns:
        The corpus; ``stats['code_rows_without_admission']`` counts code rows whose hadm_id is unknown.

    Raises:
        ConfigError: for an unknown table name.
        InputError: for a missing table or column, an empty table, a bad date or id, or an ``icd_version``
            other than 9 or 10 (:class:`~ehrsynth.errors.ParseError`, naming file, column and row).

    Example:
        >>> corpus = read_mimic4("mimic-iv-demo/hosp", tables=("diagnoses", "procedures"))  # doctest: +SKIP
    """
    unknown = set(tables) - set(MIMIC4_TABLES)
    if unknown or not tables:
        raise ConfigError(f"tables must be a non-empty subset of {MIMIC4_TABLES}, got {tuple(tables)!r}")
    directory = hosp_directory(Path(directory))
    admissions = read_admissions(directory)
    code_frames = []
    if "diagnoses" in tables:
        code_frames.append(_icd_codes(directory, "diagnoses_icd", DIAGNOSIS_SYSTEMS, offset=0))
    if "procedures" in tables:
        code_frames.append(_icd_codes(directory, "procedures_icd", PROCEDURE_SYSTEMS, offset=1_000_000))
    if "prescriptions" in tables:
        code_frames.append(ndc_codes(directory))
    codes = pl.concat(code_frames, how="vertical")
    # Admissions without any code keep a null-code row, so build_corpus can count (or keep) empty visits.
    events = admissions.select("patient", "visit", "time").join(
        codes, on="visit", how="left"
    ).select("patient", "visit", "time", "code", "order")
    orphan = codes.join(admissions, on="visit", how="anti").height
    corpus = build_corpus(events, _patients(directory, admissions), options, source="mimic4")
    corpus.stats["code_rows_without_admission"] = orphan
    return corpus


def hosp_directory(directory: Path) -> Path:
    """``directory`` itself if it holds the admissions table, else its ``hosp`` sub-directory when there is one.

    Users point at either level of the release; the error for neither names the directory they gave.
    """
    if directory.is_dir() and find_table(directory, "admissions", required=False) is None:
        hosp = [p for p in directory.iterdir() if p.is_dir() and p.name.lower() == "hosp"]
        if hosp:
            return hosp[0]
    return directory


def _icd_codes(directory: Path, table: str, systems: dict[int, str], *, offset: int) -> pl.DataFrame:
    """(visit, typed code, order) rows of an ICD table, each typed by its own ``icd_version``."""
    path = find_table(directory, table)
    frame = read_table(path, ["hadm_id", "icd_code", "icd_version"], ["seq_num"])
    code = clean_code(frame["icd_code"])
    version = parse_int(frame, "icd_version", path)
    # A row with a code but a missing or unknown version cannot be typed: refuse it rather than guess.
    bad = code.is_not_null() & ~version.is_in(list(systems)).fill_null(False)
    if bad.any():
        index = int(bad.arg_true()[0])
        raise ParseError(
            f"icd_version must be one of {sorted(systems)}, got {frame['icd_version'][index]!r}",
            file=path, column="icd_version", row=int(frame[ROW][index]),
        )
    system = version.replace_strict(systems, default=None, return_dtype=pl.String)
    # Order codes by table (diagnoses before procedures) then seq_num, so caps keep primary codes first.
    seq = parse_int(frame, "seq_num", path) if "seq_num" in frame.columns else frame[ROW].cast(pl.Int64)
    return pl.DataFrame({
        "visit": parse_int(frame, "hadm_id", path),
        "code": (system + "/" + code).alias("code"),
        "order": seq.fill_null(999) + offset,
    })


def _patients(directory: Path, admissions: pl.DataFrame) -> pl.DataFrame:
    """Sex, birth year and death/mortality per patient.

    MIMIC-IV shifts dates per patient and publishes only ``anchor_age`` (age in ``anchor_year``), so the birth
    year is ``anchor_year - anchor_age``; build_corpus then derives the age at the first kept visit as
    ``anchor_age + (year of that visit - anchor_year)``.
    """
    path = find_table(directory, "patients")
    frame = read_table(path, ["subject_id"], ["gender", "anchor_age", "anchor_year"])
    out = pl.DataFrame({"patient": parse_int(frame, "subject_id", path)})
    if "gender" in frame.columns:
        out = out.with_columns(frame["gender"].alias("sex"))
    if "anchor_age" in frame.columns and "anchor_year" in frame.columns:
        anchor_age = parse_int(frame, "anchor_age", path)
        check_not_negative(anchor_age, frame[ROW], path, "anchor_age")
        birth_year = parse_int(frame, "anchor_year", path) - anchor_age
        check_birth_years(birth_year, frame[ROW], path, "anchor_year", admissions["time"])
        out = out.with_columns(birth_year.alias("birth_year"))
    expired = admissions.group_by("patient").agg(pl.col("expired").max())
    out = out.join(expired, on="patient", how="full", coalesce=True)
    return out.with_columns(
        pl.col("expired").alias("death"), pl.col("expired").fill_null(0).alias("label:mortality")
    ).drop("expired")
