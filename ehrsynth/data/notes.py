"""What a read tolerated, and the settings every table helper of one read shares.

A reader may meet things that are not errors but must not pass silently: a few unparsable dates (below
:data:`~ehrsynth.data.dates.MAX_UNPARSED_DATE_SHARE`), a missing or unreadable optional table. The helpers
record them here; :func:`collects_notes` (on every reader) copies them into ``corpus.stats``, so ``describe``
shows them, and notices go to stderr as one line each through the ``ehrsynth`` logger -- counts and names only,
never patient values.

The same context carries ``date_format`` (``prepare --date-format``) to :func:`~ehrsynth.data.dates.parse_datetime`
without threading it through every reader's signature.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

LOG = logging.getLogger("ehrsynth")


@dataclass
class ReadNotes:
    """Settings and tolerated oddities of one read."""

    date_format: str | None = None
    unparsed_dates: dict[str, int] = field(default_factory=dict)  # "file:column" -> count
    missing_optional_tables: list[str] = field(default_factory=list)

    def to_stats(self) -> dict[str, object]:
        return {
            "unparsed_dates": sum(self.unparsed_dates.values()),
            "unparsed_dates_by_column": dict(self.unparsed_dates),
            "missing_optional_tables": len(self.missing_optional_tables),
            "missing_optional_table_names": list(self.missing_optional_tables),
        }


_CURRENT: ContextVar[ReadNotes | None] = ContextVar("ehrsynth_read_notes", default=None)


@contextmanager
def reading(date_format: str | None = None) -> Iterator[ReadNotes]:
    """Open a read context (nested readers share the outer one)."""
    outer = _CURRENT.get()
    if outer is not None:
        if date_format is not None:
            outer.date_format = date_format
        yield outer
        return
    notes = ReadNotes(date_format=date_format)
    token = _CURRENT.set(notes)
    try:
        yield notes
    finally:
        _CURRENT.reset(token)


def current() -> ReadNotes:
    """The notes of the read in progress (a throw-away one outside any read)."""
    return _CURRENT.get() or ReadNotes()


def notice(message: str) -> None:
    """One line on stderr (the ``ehrsynth`` logger's last-resort handler prints WARNING and above)."""
    LOG.warning("notice: %s", message)


def optional_table_missing(name: str, why: str) -> None:
    """Record and announce an optional table that was absent or could not be read."""
    current().missing_optional_tables.append(name)
    notice(f"optional table {name!r} {why}; continuing without it")


def collects_notes(function):
    """Reader decorator: run inside a read context and copy its notes into the corpus stats."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with reading() as notes:
            corpus = function(*args, **kwargs)
        corpus.stats.update(notes.to_stats())
        return corpus

    return wrapper
