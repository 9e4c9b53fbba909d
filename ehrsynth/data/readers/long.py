"""Long format: one row per code, with user-named patient, visit, code and optional time columns.

This is the door for any source ehrsynth does not know. ``visit`` may be a visit id or a timestamp; when it is
a timestamp (a Datetime column, or strings that all parse as dates) it also gives the visit time. Columns
named ``sex``, ``birth_year``, ``age_at_first_visit``, ``death`` and ``label:<name>`` are read as per-patient
attributes when present (the long writer emits them, so a written corpus reads back whole).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ehrsynth.data.build import LABEL_PREFIX, BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.tables import ROW, clean_code, parse_datetime, read_table, table_columns
from ehrsynth.errors import ParseError

STATIC_COLUMNS = ("sex", "birth_year", "age_at_first_visit", "death")


def read_long(
    path: str | Path,
    *,
    patient: str = "patient",
    visit: str = "visit",
    code: str = "code",
    time: str | None = None,
    code_system: str | None = None,
    options: BuildOptions | None = None,
) -> PatientCorpus:
    """Read a long CSV/CSV.gz/Parquet table into a corpus.

    Args:
        path: the table.
        patient, visit, code: column names.
        time: optional column with the event time; otherwise a timestamp-valued ``visit`` gives it.
        code_system: prefix added as ``SYSTEM/`` to codes that carry none (e.g. ``'ICD10CM'``).
        options: corpus build options.

    Raises:
        InputError: for a missing file or column, an empty table, a bad date or a non-UTF-8 byte.
    """
    path = Path(path)
    header_columns = table_columns(path) if path.is_file() else []
    if time is None and visit.lower() != "time" and "time" in (c.lower() for c in header_columns):
        time = "time"  # the column the long writer emits: a written corpus reads back with its dates
    statics = [c for c in header_columns if c.lower() in STATIC_COLUMNS or c.lower().startswith(LABEL_PREFIX)]
    required = [patient, visit, code] + ([time] if time else [])
    frame = read_table(path, required, optional=statics)
    patient, visit, code = patient.lower(), visit.lower(), code.lower()
    frame = frame.with_columns(clean_code(frame[code]).alias(code))
    _check_not_blank(frame, patient, path)
    _check_not_blank(frame, visit, path)
    frame = frame.with_columns(_integral_ids(frame[patient]), _integral_ids(frame[visit]))
    if code_system:
        frame = frame.with_columns(
            pl.when(pl.col(code).str.contains("/", literal=True)).then(pl.col(code))
            .otherwise(pl.lit(f"{code_system}/") + pl.col(code)).alias(code)
        )
    if time:
        event_time = parse_datetime(frame, time.lower(), path)
    elif _looks_like_time(frame[visit]):
        event_time = parse_datetime(frame, visit, path)
    else:
        event_time = pl.Series("time", [None] * frame.height, dtype=pl.Datetime("us"))
    events = pl.DataFrame({
        "patient": frame[patient], "visit": frame[visit], "time": event_time, "code": frame[code],
        "order": frame[ROW].cast(pl.Int64),
    })
    patients = None
    if statics:
        lowered = [c.lower() for c in statics]
        for column in lowered:
            if column != "sex":
                _check_static(frame, column, path)
        patients = frame.select(pl.col(patient).alias("patient"), *lowered).unique("patient", keep="first")
        patients = patients.rename({"age_at_first_visit": "age"} if "age_at_first_visit" in lowered else {})
        patients = patients.with_columns(
            [pl.col(c).cast(pl.Float64, strict=False) for c in patients.columns if c not in ("patient", "sex")]
        )
    del frame, event_time  # the builder holds the only copy from here on
    return build_corpus(events, patients, options, source=f"long:{path.name}")


def _integral_ids(series: pl.Series) -> pl.Series:
    """Text ids that are all canonical integers become Int64, so a CSV orders patients and visits as Parquet
    does (numerically: '9' before '10')."""
    if series.dtype != pl.String:
        return series
    text = series.str.strip_chars()
    numbers = text.cast(pl.Int64, strict=False)
    if numbers.is_null().any() or not (numbers.cast(pl.String) == text).all():
        return series
    return numbers


def _check_static(frame: pl.DataFrame, column: str, path: Path) -> None:
    """Refuse a static value outside its domain (a label of 7, a NaN birth year) before it reaches the builder."""
    value = frame[column].cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
    given = frame[column].is_not_null() & (frame[column].cast(pl.String).str.strip_chars() != "")
    if column == "death" or column.startswith(LABEL_PREFIX):
        valid, allowed = value.is_in([0.0, 1.0]), "0 or 1"
    elif column == "birth_year":
        valid, allowed = value.is_finite() & (value == value.floor()) & value.is_between(0, 9999), "a year"
    else:
        valid, allowed = value.is_finite() & (value >= 0), "a non-negative number"
    bad = given & ~valid.fill_null(False)
    if bad.any():
        index = int(bad.arg_true()[0])
        raise ParseError(f"expected {allowed}, got {frame[column][index]!r}", file=path, column=column,
                         row=int(frame[ROW][index]))


def _check_not_blank(frame: pl.DataFrame, column: str, path: Path) -> None:
    blank = frame[column].is_null()
    if frame[column].dtype == pl.String:
        blank = blank | (frame[column].str.strip_chars() == "")
    if blank.any():
        row = int(frame[ROW][int(blank.arg_true()[0])])
        raise ParseError("blank identifier", file=path, column=column, row=row)


def _looks_like_time(series: pl.Series) -> bool:
    if series.dtype == pl.Date or isinstance(series.dtype, pl.Datetime):
        return True
    if series.dtype != pl.String:
        return False
    head = series.drop_nulls().head(1000)
    if head.len() == 0 or not head.str.contains(r"^\d{4}-\d{2}-\d{2}").all():
        return False
    return True
