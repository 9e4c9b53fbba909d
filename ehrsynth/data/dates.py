"""Date and time parsing for every reader: one format per column, chosen from a documented list.

Accepted without options (``DATE_FAMILIES``; each also with `` HH:MM`` or `` HH:MM:SS`` after the date):

* ISO 8601: ``2164-10-23``, ``2164-10-23 14:05:00``, ``2164-10-23T14:05:00Z`` (fractions allowed), ``21641023``;
* ``2164/10/23``; ``23-Oct-2164``; ``23 Oct 2164``; ``23.10.2164``;
* ``23/10/2164`` (day first) or ``10/23/2164`` (month first): the order the column's values allow. A column
  where both orders fit every value (no day above 12) is ambiguous and refused: pass ``--date-format``.

A column is parsed with the one family that reads most of its values (``prepare --date-format FMT``, a
strftime pattern such as ``%d/%m/%Y``, is tried before ISO). When more than :data:`MAX_UNPARSED_DATE_SHARE` of
the non-empty values still fail, the read stops with an error naming the column, the first bad row and the
expected format; a smaller share becomes null and is counted in ``corpus.stats['unparsed_dates']``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ehrsynth.data import notes
from ehrsynth.errors import ConfigError, ParseError, short

MAX_UNPARSED_DATE_SHARE = 0.01  # above this share of non-empty values failing, a date column is refused

ISO_FORMATS = (
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
DATETIME_FORMATS = ISO_FORMATS  # the name older code imports


def _with_times(date: str) -> tuple[str, ...]:
    return (f"{date} %H:%M:%S", f"{date} %H:%M", date)


# family name (shown in messages) -> formats tried together
DATE_FAMILIES: dict[str, tuple[str, ...]] = {
    "ISO (YYYY-MM-DD)": ISO_FORMATS,
    "YYYY/MM/DD": _with_times("%Y/%m/%d"),
    "DD-Mon-YYYY": _with_times("%d-%b-%Y"),
    "DD Mon YYYY": _with_times("%d %b %Y"),
    "DD.MM.YYYY": _with_times("%d.%m.%Y"),
    "DD/MM/YYYY": _with_times("%d/%m/%Y"),
    "MM/DD/YYYY": _with_times("%m/%d/%Y"),
}
_AMBIGUOUS = ("DD/MM/YYYY", "MM/DD/YYYY")


def _parse(text: pl.Series, formats: tuple[str, ...]) -> pl.Series:
    return pl.select(
        pl.coalesce([text.str.to_datetime(fmt, strict=False, time_unit="us") for fmt in formats])
    ).to_series()


def _user_format(text: pl.Series, fmt: str) -> pl.Series:
    try:
        return text.str.to_datetime(fmt, strict=False, time_unit="us")
    except pl.exceptions.PolarsError:
        raise ConfigError(f"--date-format {fmt!r} is not a usable strftime pattern (e.g. '%d/%m/%Y')") from None


def best_parse(text: pl.Series, date_format: str | None = None) -> tuple[str, pl.Series]:
    """(family name, parsed values) of the family that reads most non-blank values of ``text``.

    Raises:
        ParseError: when day-first and month-first both read every value (the caller adds the file).
    """
    candidates: dict[str, pl.Series] = {}
    if date_format:
        candidates[date_format] = _user_format(text, date_format)
    iso = _parse(text, ISO_FORMATS)
    candidates["ISO (YYYY-MM-DD)"] = iso if not date_format else pl.select(
        pl.coalesce(candidates[date_format], iso)).to_series()
    wanted = int((text.is_not_null() & (text != "")).sum())
    best = max(candidates, key=lambda k: int(candidates[k].is_not_null().sum()))
    if int(candidates[best].is_not_null().sum()) == wanted:
        return best, candidates[best]
    for name, formats in DATE_FAMILIES.items():
        if name not in candidates:
            candidates[name] = _parse(text, formats)
    found = {name: int(series.is_not_null().sum()) for name, series in candidates.items()}
    best = max(found, key=found.__getitem__)  # dict order breaks ties: ISO and the user's format first
    if best in _AMBIGUOUS and found[_AMBIGUOUS[0]] == found[_AMBIGUOUS[1]] and not date_format:
        raise ParseError("dates fit both DD/MM/YYYY and MM/DD/YYYY; pass --date-format '%d/%m/%Y' or '%m/%d/%Y'")
    return best, candidates[best]


def parse_datetime(frame: pl.DataFrame, column: str, file: str | Path) -> pl.Series:
    """Parse ``column`` to ``Datetime[us]`` (see the module docstring); blanks become null.

    Raises:
        ParseError: naming the column, the first bad row and the expected format when more than
            :data:`MAX_UNPARSED_DATE_SHARE` of the non-empty values fail, or when the day/month order is
            ambiguous.
    """
    from ehrsynth.data.tables import first_failure

    source = frame[column]
    if source.dtype == pl.Date or isinstance(source.dtype, pl.Datetime):
        return source.cast(pl.Datetime("us")).alias(column)
    if source.dtype.is_numeric() or source.dtype == pl.Boolean:
        raise ParseError(f"expected dates, found a {source.dtype} column", file=file, column=column)
    text = source.cast(pl.String).str.strip_chars()
    text = pl.select(pl.when(text == "").then(None).otherwise(text)).to_series()
    read_notes = notes.current()
    try:
        family, parsed = best_parse(text, read_notes.date_format)
    except ParseError as exc:
        raise ParseError(exc.reason, file=file, column=column) from None
    failure = first_failure(frame, text, parsed)
    if failure is not None:
        failed = int((text.is_not_null() & parsed.is_null()).sum())
        given = int(text.is_not_null().sum())
        if failed > MAX_UNPARSED_DATE_SHARE * given:
            expected = family if family in DATE_FAMILIES else f"--date-format {family!r}"
            raise ParseError(f"unparsable date {short(failure[1])} ({failed} of {given} fail; expected {expected})",
                             file=file, column=column, row=failure[0])
        key = f"{Path(file).name}:{column}"
        read_notes.unparsed_dates[key] = read_notes.unparsed_dates.get(key, 0) + failed
    return parsed.alias(column)


def looks_like_dates(series: pl.Series) -> bool:
    """Whether a visit column holds dates: a temporal type, or text most of whose first 1,000 values parse as
    one family (plain digits excepted: ``20200101`` may be a visit id). The parse proper then applies the
    unparsed-share rule, so a column of dates with a few bad ones is refused, not read as visit ids."""
    if series.dtype == pl.Date or isinstance(series.dtype, pl.Datetime):
        return True
    if series.dtype != pl.String:
        return False
    head = series.drop_nulls().str.strip_chars().head(1000)
    head = head.filter(head != "")
    if head.len() == 0 or head.str.contains(r"^\d+$").all():
        return False
    if head.str.contains(r"^\d{4}-\d{2}-\d{2}").all():
        return True
    try:
        _, parsed = best_parse(head, notes.current().date_format)
    except (ParseError, ConfigError):
        return True  # dates after all; parse_datetime reports the ambiguity with the file name
    return bool(parsed.is_not_null().mean() >= 0.5)
