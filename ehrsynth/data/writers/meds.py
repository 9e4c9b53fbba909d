"""MEDS (Medical Event Data Standard) output, the layout :func:`ehrsynth.data.readers.meds.read_meds` reads.

``data/0.parquet`` holds one row per event -- ``subject_id`` (int64), ``time`` (datetime[us]), ``code``
(string), ``numeric_value`` (float32) -- contiguous per subject and sorted by time, static rows (null time)
first. Codes are written ``SYSTEM//value`` (``ICD9CM//4019``). Per subject:

* ``GENDER//F`` or ``GENDER//M`` (null time) when the sex is known;
* ``LABEL//<name>`` (null time) with numeric_value 0 or 1 for each corpus label;
* ``MEDS_BIRTH`` at 1 January of the birth year (the corpus keeps only the year) when it is known;
* the codes of each visit, at the visit time (see :func:`ehrsynth.data.writers.common.visit_times`);
* ``MEDS_DEATH`` at the last visit time when ``death`` is 1.

``metadata/`` holds ``dataset.json``, ``codes.parquet`` (one row per code) and ``subject_splits.parquet``
(the corpus split as MEDS's ``train``/``tuning``/``held_out``). MEDS cannot hold empty visits, nor visits with
neither a date nor a day offset (a null time marks a static row): both are left out.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.corpus import SEX_NAMES, PatientCorpus
from ehrsynth.data.writers.common import (
    DEFAULT_ANCHOR, birth_year_start, code_rows, integer_patient_ids, staging_directory, visit_times,
)

MEDS_SPLITS = ("train", "tuning", "held_out")  # MEDS's names for the corpus split parts 0, 1, 2
SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
# Order of rows that share a subject and a time: statics, birth, clinical codes, death.
_STATIC, _BIRTH, _EVENT, _DEATH = 0, 1, 2, 3


def write_meds(corpus: PatientCorpus, directory: str | Path, *, anchor_date: str = DEFAULT_ANCHOR) -> Path:
    """Write ``corpus`` as a MEDS dataset in ``directory`` (replaced atomically if it exists).

    Args:
        corpus: the corpus to write.
        directory: the MEDS root to create.
        anchor_date: first-visit date for patients with neither visit dates nor birth year and age.

    Returns:
        ``directory``.

    Raises:
        ConfigError: for a bad ``anchor_date``.

    Example:
        >>> write_meds(corpus, "synthetic_meds")  # doctest: +SKIP
    """
    frame = meds_frame(corpus, anchor_date=anchor_date)
    subject_ids = integer_patient_ids(corpus)
    with staging_directory(directory) as staging:
        (staging / "data").mkdir()
        (staging / "metadata").mkdir()
        frame.write_parquet(staging / "data" / "0.parquet")
        pl.DataFrame({
            "subject_id": pl.Series(subject_ids, dtype=pl.Int64),
            "split": pl.Series(np.array(MEDS_SPLITS, dtype=object)[np.asarray(corpus.split, dtype=np.int64)],
                               dtype=pl.String),
        }).write_parquet(staging / "metadata" / "subject_splits.parquet")
        frame.select(pl.col("code").unique().sort()).with_columns(
            pl.lit(None, dtype=pl.String).alias("description"),
            pl.lit([], dtype=pl.List(pl.String)).alias("parent_codes"),
        ).write_parquet(staging / "metadata" / "codes.parquet")
        (staging / "metadata" / "dataset.json").write_text(json.dumps({
            "dataset_name": str(corpus.stats.get("source", "ehrsynth")),
            "etl_name": "ehrsynth",
            "etl_version": _package_version(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        }, indent=2))
    return Path(directory)


def meds_frame(corpus: PatientCorpus, *, anchor_date: str = DEFAULT_ANCHOR) -> pl.DataFrame:
    """The MEDS data rows of ``corpus``, sorted by subject then time (statics first; death last at its time)."""
    subject = integer_patient_ids(corpus)
    times = visit_times(corpus, anchor_date)
    pieces = []

    names = pl.Series(list(corpus.vocab.codes), dtype=pl.String).str.replace("/", "//", literal=True)
    rows = code_rows(corpus, names=names)  # codes as SYSTEM//value (the first slash only is doubled)
    pieces.append(pl.DataFrame({
        "patient_idx": rows["patient_idx"],
        "time": pl.Series(times[rows["visit_idx"].to_numpy()]).cast(pl.Datetime("us")),
        "code": rows["code"],
        "numeric_value": pl.repeat(None, rows.height, dtype=pl.Float32, eager=True),
        "kind": pl.Series(np.full(rows.height, _EVENT, dtype=np.int8)),
    }).filter(pl.col("time").is_not_null()))  # an undated visit would read back as static rows

    sex = np.asarray(corpus.sex)
    known = np.flatnonzero(sex >= 0)
    pieces.append(_statics(known, pl.Series(np.array([f"GENDER//{s}" for s in SEX_NAMES], dtype=object)[sex[known]],
                                            dtype=pl.String), None, _STATIC))
    everyone = np.arange(corpus.n_patients)
    labels = np.asarray(corpus.labels)
    for i, name in enumerate(corpus.label_names):
        pieces.append(_statics(everyone, pl.repeat(f"LABEL//{name}", corpus.n_patients, eager=True),
                               labels[:, i].astype(np.float32), _STATIC))

    born = birth_year_start(corpus.birth_year)
    with_birth = np.flatnonzero(~np.isnat(born))
    pieces.append(_statics(with_birth, pl.repeat("MEDS_BIRTH", len(with_birth), eager=True), None, _BIRTH,
                           time=born[with_birth]))

    # Death: at the patient's last dated visit (the corpus flag says only that it happened).
    dead = np.flatnonzero(np.asarray(corpus.death) == 1)
    last_time = pl.DataFrame({"patient_idx": corpus.visit_patient(),
                              "time": pl.Series(times).cast(pl.Datetime("us"))}).group_by("patient_idx").agg(
        pl.col("time").max())
    death_time = (pl.DataFrame({"patient_idx": dead.astype(np.int64)})
                  .join(last_time, on="patient_idx", how="left", maintain_order="left")["time"])
    pieces.append(_statics(dead, pl.repeat("MEDS_DEATH", len(dead), eager=True), None, _DEATH,
                           time=death_time))

    frame = pl.concat(pieces, how="vertical")
    frame = frame.with_columns(pl.Series("subject_id", subject[frame["patient_idx"].to_numpy()], dtype=pl.Int64))
    frame = frame.sort(["subject_id", "time", "kind"], nulls_last=False, maintain_order=True)
    return frame.select(list(SCHEMA)).cast(SCHEMA)


def _statics(patients: np.ndarray, codes: pl.Series, values: np.ndarray | None, kind: int,
             *, time: np.ndarray | pl.Series | None = None) -> pl.DataFrame:
    n = len(patients)
    return pl.DataFrame({
        "patient_idx": pl.Series(patients.astype(np.int64)),
        "time": (pl.repeat(None, n, dtype=pl.Datetime("us"), eager=True) if time is None
                 else pl.Series(time).cast(pl.Datetime("us"))),
        "code": codes.cast(pl.String),
        "numeric_value": (pl.repeat(None, n, dtype=pl.Float32, eager=True) if values is None
                          else pl.Series(values, dtype=pl.Float32)),
        "kind": pl.Series(np.full(n, kind, dtype=np.int8)),
    })


def _package_version() -> str:
    try:
        return version("ehrsynth")
    except PackageNotFoundError:
        return "unknown"
