"""Long format: one row per code, the shape :func:`ehrsynth.data.readers.long.read_long` reads.

Columns: ``patient``, ``visit`` (the visit's number within the patient, 0-based), ``time`` (the visit
datetime), ``code``, then the per-patient ``sex`` ('F'/'M'), ``birth_year``, ``age_at_first_visit`` and
``death`` (1/0) -- each null when unknown -- and one ``label:<name>`` column (0/1) per label.
A visit without codes is one row with a null code; a patient without visits has no row.

Visits without a start (synthetic corpora) are dated as in :func:`ehrsynth.data.writers.common.visit_times`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.build import LABEL_PREFIX
from ehrsynth.data.corpus import SEX_NAMES, PatientCorpus
from ehrsynth.data.writers.common import DEFAULT_ANCHOR, code_rows, patient_id_series, staging_file, visit_times
from ehrsynth.errors import ConfigError

LONG_SUFFIXES = (".parquet", ".csv", ".csv.gz")


def write_long(corpus: PatientCorpus, path: str | Path, *, anchor_date: str = DEFAULT_ANCHOR) -> Path:
    """Write ``corpus`` as a long table: Parquet, or CSV (``.csv``/``.csv.gz``) by suffix; atomically.

    Args:
        corpus: the corpus to write.
        path: the output file; its suffix picks the format.
        anchor_date: first-visit date for patients with neither visit dates nor birth year and age.

    Returns:
        ``path``.

    Raises:
        ConfigError: for an unsupported suffix or a bad ``anchor_date``.

    Example:
        >>> write_long(corpus, "synthetic.parquet")  # doctest: +SKIP
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(LONG_SUFFIXES):
        raise ConfigError(f"long output must end in one of {LONG_SUFFIXES}, got {path.name!r}")
    frame = long_frame(corpus, anchor_date=anchor_date)
    with staging_file(path) as staging:
        if name.endswith(".parquet"):
            frame.write_parquet(staging)
        elif name.endswith(".gz"):
            with gzip.open(staging, "wb") as handle:
                frame.write_csv(handle, datetime_format="%Y-%m-%d %H:%M:%S")
        else:
            frame.write_csv(staging, datetime_format="%Y-%m-%d %H:%M:%S")
    return path


def long_frame(corpus: PatientCorpus, *, anchor_date: str = DEFAULT_ANCHOR) -> pl.DataFrame:
    """The long table of ``corpus`` as a DataFrame (see the module docstring for its columns)."""
    rows = code_rows(corpus, empty_visits=True)
    patient = rows["patient_idx"].to_numpy()
    visit = rows["visit_idx"].to_numpy()
    first_visit = np.asarray(corpus.visit_offsets)[:-1]
    statics = pl.DataFrame({
        # Integer ids stay integers, so a re-read orders patients as the source did.
        "patient": patient_id_series(corpus),
        "sex": pl.Series(np.asarray(corpus.sex), dtype=pl.Int8),
        "birth_year": pl.Series(np.asarray(corpus.birth_year), dtype=pl.Int32),
        "age_at_first_visit": pl.Series(np.asarray(corpus.age_at_first_visit), dtype=pl.Float32),
        "death": pl.Series(np.asarray(corpus.death), dtype=pl.Int8),
        **{LABEL_PREFIX + name: pl.Series(np.asarray(corpus.labels)[:, i], dtype=pl.UInt8)
           for i, name in enumerate(corpus.label_names)},
    }).with_columns(
        pl.col("sex").replace_strict({0: SEX_NAMES[0], 1: SEX_NAMES[1]}, default=None, return_dtype=pl.String),
        # unknowns are nulls (read_long refuses -1 and NaN)
        pl.when(pl.col("birth_year") >= 0).then(pl.col("birth_year")).alias("birth_year"),
        pl.col("age_at_first_visit").fill_nan(None),
        pl.when(pl.col("death") >= 0).then(pl.col("death")).alias("death"),
    )
    events = pl.DataFrame({
        "visit": (visit - first_visit[patient]).astype(np.int64),
        "time": pl.Series(visit_times(corpus, anchor_date)[visit]).cast(pl.Datetime("us")),
        "code": rows["code"],
    })
    per_row = statics[patient]
    return pl.concat([per_row.select("patient"), events, per_row.drop("patient")], how="horizontal")
