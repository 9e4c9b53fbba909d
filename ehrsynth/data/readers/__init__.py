"""Readers: one module per source format, each ending in :func:`ehrsynth.data.build.build_corpus`.

:func:`read_source` dispatches by name so the CLI and the evaluation can accept any format.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.notes import reading
from ehrsynth.errors import ConfigError

SOURCES = {
    "long": ("ehrsynth.data.readers.long", "read_long"),
    "meds": ("ehrsynth.data.readers.meds", "read_meds"),
    "mimic3": ("ehrsynth.data.readers.mimic3", "read_mimic3"),
    "mimic4": ("ehrsynth.data.readers.mimic4", "read_mimic4"),
    "omop": ("ehrsynth.data.readers.omop", "read_omop"),
    "synthea": ("ehrsynth.data.readers.synthea", "read_synthea"),
}


def reader(source: str):
    """The reader function of ``source``.

    Raises:
        ConfigError: for an unknown source.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    module, name = SOURCES[source]
    return getattr(importlib.import_module(module), name)


def read_source(source: str, path: str | Path, *, options: BuildOptions | None = None, date_format: str | None = None,
                **kwargs: Any) -> PatientCorpus:
    """Read ``path`` with the reader of ``source``; ``kwargs`` the reader does not take are refused by name.

    ``date_format`` (a strftime pattern) is tried first on every date column, see :mod:`ehrsynth.data.dates`.

    Raises:
        ConfigError: for an unknown source or an option the reader does not accept.
    """
    function = reader(source)
    accepted = set(inspect.signature(function).parameters)
    given = {k: v for k, v in kwargs.items() if v is not None}
    refused = sorted(set(given) - accepted)
    if refused:
        raise ConfigError(f"--source {source} does not take option(s): {', '.join(refused)}")
    with reading(date_format=date_format):
        return function(path, options=options, **given)
