"""Domain checks readers run on per-patient values before they reach the builder.

* A flag (death, a label, MIMIC's ``hospital_expire_flag``) is 0 or 1; anything else is an error, not a label
  value of 7.
* A birth year lies in [:data:`MIN_BIRTH_YEAR`, current year + 1]. De-identified extracts that shift every date
  into the future (MIMIC: admissions in 2100-2200, patients over 89 born 300 years before) widen both ends by
  that shift -- how far the data's latest event lies past the current year -- so their own years stay valid
  while year 0, negative years or 9999 are still refused.
* Ages are never negative.

Each failure is a :class:`~ehrsynth.errors.ParseError` naming the file, column and first bad row.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import polars as pl

from ehrsynth.errors import ParseError, short

MIN_BIRTH_YEAR = 1850


def birth_year_bounds(event_times: pl.Series | None) -> tuple[int, int]:
    """The accepted birth years, given the data's event times (see the module docstring)."""
    now = datetime.date.today().year
    latest = None
    if event_times is not None and len(event_times):
        latest = event_times.cast(pl.Datetime("us")).dt.year().max()
    shift = max(0, int(latest) - now) if latest is not None else 0
    return MIN_BIRTH_YEAR - shift, now + 1 + shift


def _raise_first(bad: pl.Series, values: pl.Series, rows: pl.Series, message: str, path: Path | str,
                 column: str) -> None:
    bad = bad.fill_null(False)
    if bad.any():
        index = int(bad.arg_true()[0])
        raise ParseError(f"{message}, got {short(values[index])}", file=path, column=column, row=int(rows[index]))


def check_flag(values: pl.Series, rows: pl.Series, path: Path | str, column: str) -> None:
    """Refuse a flag other than 0 or 1 (nulls pass: unknown)."""
    number = values.cast(pl.Float64, strict=False)
    _raise_first(values.is_not_null() & ~number.is_in([0.0, 1.0]).fill_null(False), values, rows,
                 "expected 0 or 1", path, column)


def check_birth_years(years: pl.Series, rows: pl.Series, path: Path | str, column: str,
                      event_times: pl.Series | None) -> None:
    """Refuse a birth year outside :func:`birth_year_bounds` (nulls pass: unknown)."""
    low, high = birth_year_bounds(event_times)
    number = years.cast(pl.Float64, strict=False)
    _raise_first(years.is_not_null() & ~number.is_between(low, high).fill_null(False), years, rows,
                 f"expected a birth year in [{low}, {high}]", path, column)


def check_not_negative(values: pl.Series, rows: pl.Series, path: Path | str, column: str) -> None:
    """Refuse a negative age (nulls pass)."""
    number = values.cast(pl.Float64, strict=False)
    _raise_first(values.is_not_null() & ~(number >= 0).fill_null(False), values, rows,
                 "expected an age >= 0", path, column)
