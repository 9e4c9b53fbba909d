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
from ehrsynth.data.checks import check_birth_years, check_flag, check_not_negative
from ehrsynth.data.dates import looks_like_dates
from ehrsynth.data.notes import collects_notes
from ehrsynth.data.tables import ROW, clean_code, parse_datetime, read_table, table_columns
from ehrsynth.errors import ConfigError, ParseError, short

STATIC_COLUMNS = ("sex", "birth_year", "age_at_first_visit", "death")


@collects_notes
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
    _check_distinct_columns(patient=patient, visit=visit, code=code, time=time)
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
    elif looks_like_dates(frame[visit]):
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
                _check_static(frame, column, path, event_time)
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


def _check_distinct_columns(**columns: str | None) -> None:
    """Two roles given the same column (``--patient-col x --time-col x``) would silently read one column twice."""
    seen: dict[str, str] = {}
    for role, name in columns.items():
        if name is None:
            continue
        if name.lower() in seen:
            raise ConfigError(f"--{seen[name.lower()]}-col and --{role}-col both name column {name!r}; "
                              "each role needs its own column")
        seen[name.lower()] = role


def _check_static(frame: pl.DataFrame, column: str, path: Path, event_time: pl.Series) -> None:
    """Refuse a static value outside its domain (a label of 7, a NaN or year-0 birth year, a negative age)
    before it reaches the builder."""
    text = frame[column].cast(pl.String).str.strip_chars()
    given = pl.select(pl.when(text == "").then(None).otherwise(text)).to_series()
    if column == "death" or column.startswith(LABEL_PREFIX):
        check_flag(given, frame[ROW], path, column)
    elif column == "birth_year":
        year = given.cast(pl.Float64, strict=False)
        bad = given.is_not_null() & ~(year.is_finite() & (year == year.floor())).fill_null(False)
        if bad.any():
            index = int(bad.arg_true()[0])
            raise ParseError(f"expected a year, got {short(frame[column][index])}", file=path, column=column,
                             row=int(frame[ROW][index]))
        check_birth_years(given, frame[ROW], path, column, event_time)
    else:
        check_not_negative(given, frame[ROW], path, column)
        value = given.cast(pl.Float64, strict=False)
        bad = given.is_not_null() & ~value.is_finite().fill_null(False)
        if bad.any():
            index = int(bad.arg_true()[0])
            raise ParseError(f"expected a non-negative number, got {short(frame[column][index])}", file=path,
                             column=column, row=int(frame[ROW][index]))


def _check_not_blank(frame: pl.DataFrame, column: str, path: Path) -> None:
    blank = frame[column].is_null()
    if frame[column].dtype == pl.String:
        blank = blank | (frame[column].str.strip_chars() == "")
    if blank.any():
        row = int(frame[ROW][int(blank.arg_true()[0])])
        raise ParseError("blank identifier", file=path, column=column, row=row)
