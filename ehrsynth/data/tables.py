"""Strict table input shared by every reader.

Readers never call polars directly on user files: they go through these helpers, which find a table whatever
its case and extension, lower-case its column names, keep the 1-based source row number in ``_row``, and turn
every failure (missing file or column, empty table, bad UTF-8, unparsable date or number) into a one-line
:class:`~ehrsynth.errors.InputError` naming the file, column and first bad row.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ehrsynth.data.dates import DATETIME_FORMATS, parse_datetime  # noqa: F401  (readers import them from here)
from ehrsynth.errors import EmptyTableError, InputError, MissingColumnError, MissingFileError, ParseError, short

ROW = "_row"
TABLE_EXTENSIONS = (".parquet", ".csv.gz", ".csv")
# Longest id, code, date or other field a reader accepts, and longest column name. Real EHR values are far
# shorter (an ICD-10-PCS code has 7 characters, a UUID 36); a longer one is an error naming its row, found with
# one length pass per column before any per-value work, so a hostile 1 MB cell costs megabytes, not gigabytes.
MAX_FIELD_CHARS = 256
_INT64_MAX = 2**63 - 1


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
    """The header of a table, refused when it is empty, unreadable or holds an absurdly long name."""
    try:
        if _is_parquet(path):
            names = list(pl.read_parquet_schema(path).keys())
        else:
            names = pl.read_csv(path, n_rows=0, infer_schema=False).columns
    except pl.exceptions.NoDataError:
        raise EmptyTableError("file is empty (no header)", file=path) from None
    except Exception as exc:  # noqa: BLE001 -- every failure to open a user file becomes one InputError
        raise unreadable(path, exc) from None
    for name in names:
        if len(name) > MAX_FIELD_CHARS:
            raise ParseError(f"a column name is longer than {MAX_FIELD_CHARS} characters: {short(name[:200])}",
                             file=path)
    return names


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


def unreadable(path: Path, exc: BaseException) -> InputError:
    """The one-line error for a file that cannot be opened or decoded; never echoes the library's message,
    which may quote a row."""
    if isinstance(exc, InputError):
        return exc
    if isinstance(exc, PermissionError):
        return InputError("permission denied (the file is not readable by this user)", file=path)
    if isinstance(exc, IsADirectoryError):
        return MissingFileError("is a directory, expected a table file", file=path)
    if isinstance(exc, pl.exceptions.DuplicateError):
        return ParseError("a column name appears twice in the file", file=path)
    if _is_parquet(path):
        return ParseError("not a readable Parquet file (damaged or truncated?)", file=path)
    if path.name.lower().endswith(".gz") and isinstance(exc, (OSError, EOFError)):
        return ParseError("corrupt or truncated gzip file (copy or compress it again)", file=path)
    _raise_if_bad_utf8(path)
    return ParseError(f"cannot read CSV ({type(exc).__name__}: broken quoting or line structure?)", file=path)


def _raise_if_bad_utf8(path: Path) -> None:
    """Locate the first non-UTF-8 byte and raise with its row; do nothing if the file decodes (or cannot be
    opened: the caller reports that)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    record, in_quotes = 0, False  # record 0 is the header, so ``record`` is the 1-based data row
    try:
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
    except (OSError, EOFError):
        return


def _check_row_widths(path: Path, header: list[str]) -> None:
    """Refuse a CSV record with fewer or more fields than the header (a file cut mid-row, a stray separator).

    polars fills a short row with nulls, which would silently drop its values; Arrow's CSV parser reports it.
    Only the first column is converted, so the pass is cheap.
    """
    import pyarrow as pa  # late: only CSV input needs it
    import pyarrow.csv as pa_csv

    bad: list[tuple[int | None, int, int]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, row.expected_columns, row.actual_columns))
        return "error"

    try:
        reader = pa_csv.open_csv(
            pa.input_stream(str(path), compression="detect"),
            # Latin-1 maps every byte to a character, so a stray non-UTF-8 byte cannot break the row counting
            # (polars' read then reports it with its row); separators and quotes are ASCII either way.
            read_options=pa_csv.ReadOptions(use_threads=False, block_size=1 << 24, encoding="latin-1"),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(include_columns=[header[0]], column_types={header[0]: pa.string()}),
        )
        for _ in reader:
            pass
    except Exception as exc:  # noqa: BLE001
        if not bad:
            raise unreadable(path, exc) from None
    if bad:
        number, expected, actual = bad[0]
        row = None if number is None else number - 1  # Arrow counts the header line as 1
        kind = "too few" if actual < expected else "too many"
        raise ParseError(f"{kind} fields ({actual}, the header has {expected}); is the file truncated or "
                         "a separator misplaced?", file=path, row=row)


def _columns_by_lower(header: list[str], wanted: Sequence[str], path: Path) -> dict[str, str]:
    """Lower-case name -> header name; a wanted column present twice (in any letter case) is an error."""
    by_lower: dict[str, str] = {}
    wanted_lower = {c.lower() for c in wanted}
    for name in header:
        duplicate = re.fullmatch(r"(.*)_duplicated_\d+", name)  # polars' rename of a repeated CSV name
        base = duplicate.group(1) if duplicate and duplicate.group(1) in header else name
        lower = base.lower()
        if lower in by_lower and lower in wanted_lower:
            raise ParseError(f"column named twice ({by_lower[lower]!r} and {base!r}); rename or drop one",
                             file=path, column=base)
        by_lower.setdefault(lower, name)
    return by_lower


_PARQUET_TYPES_OK = (pl.String, pl.Categorical, pl.Enum, pl.Boolean, pl.Date, pl.Datetime, pl.Null)


def _check_parquet_types(path: Path, columns: list[str]) -> None:
    schema = pl.read_parquet_schema(path)
    for name in columns:
        dtype = schema[name]
        if not (dtype.is_numeric() or isinstance(dtype, _PARQUET_TYPES_OK) or dtype in _PARQUET_TYPES_OK):
            raise ParseError(f"unsupported column type {dtype} (expected text, numbers or dates)",
                             file=path, column=name)


def _check_values(frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Categoricals become text, unsigned 64-bit integers Int64 (refusing values above its range), and no text
    field may exceed :data:`MAX_FIELD_CHARS`."""
    for name in frame.columns:
        series = frame[name]
        if name == ROW:
            continue
        if isinstance(series.dtype, (pl.Categorical, pl.Enum)):
            frame = frame.with_columns(series.cast(pl.String))
        elif series.dtype == pl.UInt64:
            too_big = (series > _INT64_MAX).fill_null(False)
            if too_big.any():
                index = int(too_big.arg_true()[0])
                raise ParseError(f"integer too large: {series[index]!r}", file=path, column=name,
                                 row=int(frame[ROW][index]))
            frame = frame.with_columns(series.cast(pl.Int64))
        if frame[name].dtype == pl.String:
            too_long = (frame[name].str.len_chars() > MAX_FIELD_CHARS).fill_null(False)
            if too_long.any():
                index = int(too_long.arg_true()[0])
                raise ParseError(f"value longer than {MAX_FIELD_CHARS} characters: "
                                 f"{short(frame[name][index][:200])}", file=path, column=name,
                                 row=int(frame[ROW][index]))
    return frame


def read_table(
    path: str | Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    allow_empty: bool = False,
) -> pl.DataFrame:
    """Read the named columns of a CSV/CSV.gz/Parquet table with lower-case names, all as read.

    CSV columns come back as strings (parsing is explicit and checked, see :func:`parse_datetime`); Parquet
    columns keep their types (categoricals become text). A ``_row`` column holds the 1-based data row of each
    record. Every record must have as many fields as the header, every text field at most
    :data:`MAX_FIELD_CHARS` characters, and no wanted column may appear twice in any letter case.

    Args:
        path: the table file.
        required: columns that must exist (matched case-insensitively).
        optional: columns to read when present.
        allow_empty: accept a table with no data rows.

    Raises:
        MissingFileError, MissingColumnError, EmptyTableError, ParseError, InputError (permission denied).
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError("file not found", file=path)
    if path.is_dir():
        raise MissingFileError("is a directory, expected a table file", file=path)
    header = table_columns(path)
    by_lower = _columns_by_lower(header, [*required, *optional], path)
    for col in required:
        if col.lower() not in by_lower:
            have = ", ".join(repr(c[:40]) for c in header[:12]) + (", ..." if len(header) > 12 else "")
            raise MissingColumnError(f"required column missing (have: {have})", file=path, column=col)
    wanted = list(dict.fromkeys(c.lower() for c in [*required, *optional] if c.lower() in by_lower))
    source_names = [by_lower[c] for c in wanted]
    rename = {by_lower[c]: c for c in wanted}
    try:
        if _is_parquet(path):
            _check_parquet_types(path, source_names)
            frame = pl.read_parquet(path, columns=source_names, row_index_name=ROW, row_index_offset=1)
        else:
            _check_row_widths(path, header)
            frame = pl.read_csv(
                path, columns=source_names, infer_schema=False, row_index_name=ROW, row_index_offset=1
            )
    except Exception as exc:  # noqa: BLE001 -- one InputError naming the file, never a library traceback
        raise unreadable(path, exc) from None
    frame = _check_values(frame.rename(rename), path)
    if frame.height == 0 and not allow_empty:
        raise EmptyTableError("table has no data rows", file=path)
    return frame


def first_failure(frame: pl.DataFrame, source: pl.Series, parsed: pl.Series) -> tuple[int, object] | None:
    bad = source.is_not_null() & parsed.is_null()
    if source.dtype == pl.String:
        bad = bad & (source.str.strip_chars() != "")
    if not bad.any():
        return None
    index = int(bad.arg_true()[0])
    return int(frame[ROW][index]) if ROW in frame.columns else index + 1, source[index]


def parse_int(frame: pl.DataFrame, column: str, file: str | Path) -> pl.Series:
    """Parse ``column`` to Int64, accepting integral floats such as ``'4483.0'`` (OMOP exports write these).

    Raises:
        ParseError: naming the first row that is not an integer.
    """
    source = frame[column]
    if source.dtype.is_integer():
        return source.cast(pl.Int64)
    if not (source.dtype.is_numeric() or source.dtype in (pl.String, pl.Null)):
        raise ParseError(f"expected integers, found a {source.dtype} column", file=file, column=column)
    text = source.cast(pl.String).str.strip_chars()
    as_float = text.cast(pl.Float64, strict=False)
    # NaN, infinities and values beyond Int64 are not ids: they fail here rather than overflow a cast.
    integral = as_float.is_finite() & (as_float == as_float.floor()) & (as_float.abs() < 2.0**63)
    parsed = pl.select(pl.coalesce(
        text.cast(pl.Int64, strict=False),
        pl.when(integral).then(as_float).otherwise(None).cast(pl.Int64, strict=False),
    )).to_series()
    failure = first_failure(frame, text, parsed)
    if failure is not None:
        raise ParseError(f"not an integer: {short(failure[1])}", file=file, column=column, row=failure[0])
    return parsed.alias(column)


def clean_code(series: pl.Series) -> pl.Series:
    """Strip whitespace and turn blank codes into null."""
    text = series.cast(pl.String).str.strip_chars()
    return pl.select(pl.when(text == "").then(None).otherwise(text)).to_series().alias(series.name)
