"""Strict table input shared by every reader.

Readers never call polars directly on user files: they go through these helpers, which find a table whatever
its case and extension, lower-case its column names, keep the 1-based source row number in ``_row``, and turn
every failure (missing file or column, empty table, bad UTF-8, unparsable date or number) into a one-line
:class:`~ehrsynth.errors.InputError` naming the file, column and first bad row.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ehrsynth.errors import EmptyTableError, MissingColumnError, MissingFileError, ParseError

ROW = "_row"
TABLE_EXTENSIONS = (".parquet", ".csv.gz", ".csv")
DATETIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%SZ",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.fZ",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y%m%d",
)


def find_table(directory: str | Path, name: str, *, required: bool = True) -> Path | None:
    """Find table ``name`` in ``directory`` as .parquet, .csv.gz or .csv, in any letter case.

    Raises:
        MissingFileError: when ``required`` and no such file exists.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError("directory not found", file=directory)
    by_lower = {p.name.lower(): p for p in directory.iterdir() if p.is_file()}
    for ext in TABLE_EXTENSIONS:
        hit = by_lower.get(name.lower() + ext)
        if hit is not None:
            return hit
    if required:
        wanted = " or ".join(name + ext for ext in TABLE_EXTENSIONS)
        raise MissingFileError(f"required table {name!r} not found (looked for {wanted})", file=directory)
    return None


def table_columns(path: Path) -> list[str]:
    if path.name.lower().endswith(".parquet"):
        return list(pl.read_parquet_schema(path).keys())
    try:
        return pl.read_csv(path, n_rows=0, infer_schema=False).columns
    except pl.exceptions.NoDataError:
        raise EmptyTableError("file is empty (no header)", file=path) from None
    except pl.exceptions.ComputeError as exc:
        _raise_if_bad_utf8(path)
        raise ParseError(f"cannot read CSV header: {str(exc).splitlines()[0]}", file=path) from None


def _raise_if_bad_utf8(path: Path) -> None:
    """Locate the first non-UTF-8 byte and raise with its row; do nothing if the file decodes."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    record, in_quotes = 0, False  # record 0 is the header, so ``record`` is the 1-based data row
    with opener(path, "rb") as handle:
        for line in handle:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ParseError(
                    f"invalid UTF-8 byte {line[exc.start:exc.start + 1]!r} (re-encode the file as UTF-8)",
                    file=path,
                    row=record,
                ) from None
            # A quoted field may span lines: a record ends only on a line that leaves no quote open.
            in_quotes ^= line.count(b'"') % 2 == 1
            if not in_quotes:
                record += 1


def read_table(
    path: str | Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    allow_empty: bool = False,
) -> pl.DataFrame:
    """Read the named columns of a CSV/CSV.gz/Parquet table with lower-case names, all as read.

    CSV columns come back as strings (parsing is explicit and checked, see :func:`parse_datetime`); Parquet
    columns keep their types. A ``_row`` column holds the 1-based data row of each record.

    Args:
        path: the table file.
        required: columns that must exist (matched case-insensitively).
        optional: columns to read when present.
        allow_empty: accept a table with no data rows.

    Raises:
        MissingFileError, MissingColumnError, EmptyTableError, ParseError.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("file not found", file=path)
    header = table_columns(path)
    by_lower = {c.lower(): c for c in header}
    for col in required:
        if col.lower() not in by_lower:
            raise MissingColumnError(f"required column missing (have: {', '.join(map(repr, header))})", file=path, column=col)
    wanted = [c for c in [*required, *optional] if c.lower() in by_lower]
    source_names = [by_lower[c.lower()] for c in wanted]
    rename = {by_lower[c.lower()]: c.lower() for c in wanted}
    try:
        if path.name.lower().endswith(".parquet"):
            frame = pl.read_parquet(path, columns=source_names, row_index_name=ROW, row_index_offset=1)
        else:
            frame = pl.read_csv(
                path, columns=source_names, infer_schema=False, row_index_name=ROW, row_index_offset=1
            )
    except pl.exceptions.ComputeError as exc:
        _raise_if_bad_utf8(path)
        raise ParseError(f"cannot read table: {str(exc).splitlines()[0]}", file=path) from None
    frame = frame.rename(rename)
    if frame.height == 0 and not allow_empty:
        raise EmptyTableError("table has no data rows", file=path)
    return frame


def _first_failure(frame: pl.DataFrame, source: pl.Series, parsed: pl.Series) -> tuple[int, object] | None:
    bad = source.is_not_null() & parsed.is_null()
    if source.dtype == pl.String:
        bad = bad & (source.str.strip_chars() != "")
    if not bad.any():
        return None
    index = int(bad.arg_true()[0])
    return int(frame[ROW][index]) if ROW in frame.columns else index + 1, source[index]


def parse_datetime(frame: pl.DataFrame, column: str, file: str | Path) -> pl.Series:
    """Parse ``column`` to ``Datetime[us]``, trying the common EHR formats; blanks become null.

    Raises:
        ParseError: naming the first row whose non-blank value matches no format.
    """
    source = frame[column]
    if source.dtype in (pl.Date,) or isinstance(source.dtype, pl.Datetime):
        return source.cast(pl.Datetime("us")).alias(column)
    text = source.cast(pl.String).str.strip_chars()
    parsed = pl.select(
        pl.coalesce([text.str.to_datetime(fmt, strict=False, time_unit="us") for fmt in DATETIME_FORMATS])
    ).to_series()
    failure = _first_failure(frame, text, parsed)
    if failure is not None:
        raise ParseError(f"unparsable date {failure[1]!r}", file=file, column=column, row=failure[0])
    return parsed.alias(column)


def parse_int(frame: pl.DataFrame, column: str, file: str | Path) -> pl.Series:
    """Parse ``column`` to Int64, accepting integral floats such as ``'4483.0'`` (OMOP exports write these).

    Raises:
        ParseError: naming the first row that is not an integer.
    """
    source = frame[column]
    if source.dtype.is_integer():
        return source.cast(pl.Int64)
    as_float = source.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
    parsed = pl.select(pl.when(as_float == as_float.floor()).then(as_float).otherwise(None)).to_series()
    failure = _first_failure(frame, source.cast(pl.String), parsed)
    if failure is not None:
        raise ParseError(f"not an integer: {failure[1]!r}", file=file, column=column, row=failure[0])
    return parsed.cast(pl.Int64).alias(column)


def clean_code(series: pl.Series) -> pl.Series:
    """Strip whitespace and turn blank codes into null."""
    text = series.cast(pl.String).str.strip_chars()
    return pl.select(pl.when(text == "").then(None).otherwise(text)).to_series().alias(series.name)
