"""Writers: a corpus (real or synthetic) out to the formats users bring, each readable by its reader.

``long`` (one Parquet/CSV table), ``meds`` (a MEDS root) and ``omop`` (OMOP CDM CSV tables). Every write is
atomic: the output is built beside its target under a temporary name and renamed into place, so a failed or
killed run leaves no partial output. Visits without dates (synthetic corpora) are dated as documented in
:func:`ehrsynth.data.writers.common.visit_times`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError

WRITE_FORMATS = ("long", "meds", "omop")
LONG_FILE_NAME = "long.parquet"


def write_corpus(corpus: PatientCorpus, out_dir: str | Path, format: Literal["long", "meds", "omop"],
                 **kwargs: Any) -> Path:
    """Write ``corpus`` to ``out_dir`` in ``format``; ``kwargs`` go to the format's writer.

    For ``long``, ``out_dir`` may name the file itself (ending .parquet, .csv or .csv.gz); otherwise the table
    is ``out_dir/long.parquet``. For ``meds`` and ``omop``, ``out_dir`` is the directory written.

    Returns:
        The path written (the long file, or the directory).

    Raises:
        ConfigError: for an unknown format or a writer option it does not take.

    Example:
        >>> write_corpus(corpus, "out/synthetic_omop", "omop", anchor_date="2050-01-01")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if format == "long":
        from ehrsynth.data.writers.long import LONG_SUFFIXES, write_long

        if out_dir.name.lower().endswith(LONG_SUFFIXES):
            return _call(write_long, corpus, out_dir, format, kwargs)
        from ehrsynth.outputs import staged_output

        with staged_output(out_dir, "synthetic") as staging:  # the folder is the output: marked, atomic
            _call(write_long, corpus, staging / LONG_FILE_NAME, format, kwargs)
        return out_dir / LONG_FILE_NAME
    if format == "meds":
        from ehrsynth.data.writers.meds import write_meds

        return _call(write_meds, corpus, out_dir, format, kwargs)
    if format == "omop":
        from ehrsynth.data.writers.omop import write_omop

        return _call(write_omop, corpus, out_dir, format, kwargs)
    raise ConfigError(f"format must be one of {WRITE_FORMATS}, got {format!r}")


def _call(writer: Any, corpus: PatientCorpus, path: Path, format: str, kwargs: dict[str, Any]) -> Path:
    refused = sorted(set(kwargs) - set(inspect.signature(writer).parameters))
    if refused:
        raise ConfigError(f"format {format!r} does not take option(s): {', '.join(refused)}")
    return writer(corpus, path, **kwargs)
