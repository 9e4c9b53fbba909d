"""The project's own exceptions.

Every user-facing failure is one of these, so the CLI can print a single line and exit 2 instead of a
traceback. Messages name the file, column and first bad row (1-based data row, header excluded), and show
the bad value with ``repr`` -- never a whole patient row.
"""

from __future__ import annotations

from pathlib import Path

MAX_MESSAGE_CHARS = 300  # a message is one line a user reads whole; longer ones are cut
MAX_VALUE_CHARS = 80  # a bad value is shown as its repr, cut to this many characters


def short(value: object) -> str:
    """``repr(value)`` cut to :data:`MAX_VALUE_CHARS`, so a hostile 1 MB cell never floods a message."""
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


class EhrsynthError(Exception):
    """Base class for every error the project raises on purpose."""


class InputError(EhrsynthError):
    """Bad user input: a file, table, column or value that cannot be used.

    Args:
        message: what is wrong, in one line.
        file: the file (or directory) the problem is in.
        column: the column, if one is to blame.
        row: the first bad data row, 1-based, header excluded.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.column = column
        self.row = row
        self.reason = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        text = f"{', '.join(where)}: {message}" if where else message
        text = " ".join(text.splitlines())  # one line, whatever a file or column name holds
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(text)


class MissingFileError(InputError):
    """A required input file or directory does not exist."""


class MissingColumnError(InputError):
    """A required column is absent from a table."""


class EmptyTableError(InputError):
    """A table has a header but no data rows (or nothing survives filtering)."""


class ParseError(InputError):
    """A value (date, number, byte sequence) cannot be parsed."""


class ConfigError(EhrsynthError):
    """An invalid parameter or configuration value. The message names the parameter."""


class NotFittedError(EhrsynthError):
    """A model was asked to sample or score before it was trained or loaded."""


class OutputError(ConfigError):
    """An output path that would destroy something: a file or folder ehrsynth did not write, another kind of
    ehrsynth output, an existing output without ``--overwrite``, or a path overlapping an input."""
