"""MEDS (Medical Event Data Standard): Parquet rows of ``subject_id``, ``time``, ``code`` (``numeric_value``
optional), one file or a directory of shards (``data/**/*.parquet`` under a MEDS root).

* Clinical codes are those with a system, ``SYSTEM//value``; they become typed codes ``SYSTEM/value``
  (``ICD9CM//401.9`` -> ``ICD9CM/401.9``; only the first ``//`` changes).
* Events at the same time form a visit; with ``visit_window_hours``, a visit takes every event up to that many
  hours after its first event, and the next event starts a new visit.
* Per-subject rows: ``GENDER//F`` / ``GENDER//M`` give the sex; ``MEDS_BIRTH`` (whose time is the birth
  date) the birth date and year; ``MEDS_DEATH`` sets death to 1 (0 for everyone else); ``LABEL//<name>`` with
  numeric_value 0 or 1 gives the label ``<name>``.
* Other rows -- codes without a system (``HOSPITAL_ADMISSION``) and other static rows (null time) -- carry no
  clinical code: they are skipped and counted in ``stats``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ehrsynth.data.build import LABEL_PREFIX, BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.checks import check_birth_years
from ehrsynth.data.notes import collects_notes
from ehrsynth.data.tables import ROW, clean_code, parse_datetime, parse_int, read_table
from ehrsynth.errors import ConfigError, EmptyTableError, MissingFileError, ParseError

BIRTH, DEATH, GENDER, LABEL = "MEDS_BIRTH", "MEDS_DEATH", "GENDER//", "LABEL//"
MAX_VISIT_WINDOW_HOURS = 1e6  # about 114 years: anything longer is one visit anyway, and stays int64-safe


@collects_notes
def read_meds(
    path: str | Path,
    *,
    visit_window_hours: float | None = None,
    options: BuildOptions | None = None,
) -> PatientCorpus:
    """Read MEDS Parquet data into a corpus.

    Args:
        path: a Parquet file, a directory of Parquet shards, or a MEDS root (its ``data/`` is read).
        visit_window_hours: merge events up to this many hours after a visit's first event into that visit;
            None (default) makes one visit per distinct time.
        options: corpus build options.

    Returns:
        The corpus; ``stats`` adds ``rows_without_system`` and ``static_rows_skipped``.

    Raises:
        ConfigError: for a negative ``visit_window_hours``.
        InputError: for a missing path or column, no Parquet file, an empty table, a bad id or time, or a
            label whose numeric_value is not 0 or 1.

    Example:
        >>> corpus = read_meds("meds_root", visit_window_hours=24)  # doctest: +SKIP
    """
    if visit_window_hours is not None and not 0 <= visit_window_hours <= MAX_VISIT_WINDOW_HOURS:
        raise ConfigError(f"--visit-window-hours must be a number of hours in [0, {MAX_VISIT_WINDOW_HOURS:g}], "
                          f"got {visit_window_hours!r}")
    path = Path(path)
    shards = _shards(path)
    frame = pl.concat([_read_shard(shard, i) for i, shard in enumerate(shards)], how="vertical_relaxed")
    if frame.height == 0:  # an empty shard is fine, an empty dataset is not
        raise EmptyTableError("no row with a code", file=path)
    code = pl.col("code")

    births = frame.filter(code == BIRTH)
    for index, shard in enumerate(shards):
        in_shard = births.filter(pl.col("shard") == index)
        check_birth_years(in_shard["time"].dt.year(), in_shard[ROW], shard, "time",
                          frame.filter(code != BIRTH)["time"])
    birth = births.group_by("patient").agg(pl.col("time").min().alias("birth_date"))
    dead = frame.filter(code == DEATH).select("patient").unique()
    sex = frame.filter(code.str.starts_with(GENDER)).group_by("patient").agg(
        code.first().str.slice(len(GENDER)).alias("sex"))
    labels = _labels(frame.filter(code.str.starts_with(LABEL)), shards)

    special = (code == BIRTH) | (code == DEATH) | code.str.starts_with(GENDER) | code.str.starts_with(LABEL)
    clinical = code.str.contains("//", literal=True) & pl.col("time").is_not_null() & ~special
    skipped = frame.filter(~special & ~clinical).select(
        pl.col("time").is_null().sum().alias("static"), pl.col("time").is_not_null().sum().alias("no_system"))
    events = frame.filter(clinical).select(
        "patient", "time", code.str.replace("//", "/", literal=True).alias("code"), pl.col(ROW).alias("order"))
    events = events.with_columns(_visit_starts(events, visit_window_hours).alias("visit"))

    patients = frame.select("patient").unique()
    for part in (sex, birth, labels):
        patients = patients.join(part, on="patient", how="left")
    patients = patients.with_columns(
        pl.col("patient").is_in(dead["patient"].implode()).cast(pl.Int64).alias("death"))
    corpus = build_corpus(events, patients, options, source=f"meds:{path.name}")
    corpus.stats["rows_without_system"] = int(skipped["no_system"].item())
    corpus.stats["static_rows_skipped"] = int(skipped["static"].item())
    return corpus


def _shards(path: Path) -> list[Path]:
    """The Parquet files to read: ``path`` itself, ``path/data/**``, or ``path/**`` minus ``metadata/``."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingFileError("file or directory not found", file=path)
    root = path / "data" if (path / "data").is_dir() else path
    shards = sorted(p for p in root.rglob("*.parquet") if "metadata" not in p.relative_to(root).parts)
    if not shards:
        raise MissingFileError("no .parquet file found", file=root)
    return shards


def _read_shard(path: Path, index: int) -> pl.DataFrame:
    """One shard as (patient, time, code, numeric_value, _row, shard); rows without a code are dropped."""
    frame = read_table(path, ["subject_id", "time", "code"], ["numeric_value"], allow_empty=True)
    value = (frame["numeric_value"].cast(pl.Float64, strict=False) if "numeric_value" in frame.columns
             else pl.repeat(None, frame.height, dtype=pl.Float64, eager=True))
    return pl.DataFrame({
        "patient": parse_int(frame, "subject_id", path),
        "time": parse_datetime(frame, "time", path),
        "code": clean_code(frame["code"]),
        "numeric_value": value,
        ROW: frame[ROW].cast(pl.Int64),
        "shard": pl.repeat(index, frame.height, dtype=pl.Int32, eager=True),  # for error messages
    }).filter(pl.col("code").is_not_null())


def _labels(rows: pl.DataFrame, shards: list[Path]) -> pl.DataFrame:
    """``LABEL//<name>`` rows -> one ``label:<name>`` column per name (max over a subject's rows)."""
    bad = rows.filter(~pl.col("numeric_value").is_in([0.0, 1.0]) | pl.col("numeric_value").is_null())
    if bad.height:
        first = bad.row(0, named=True)
        raise ParseError(f"label {first['code']!r} needs numeric_value 0 or 1, got {first['numeric_value']!r}",
                         file=shards[first["shard"]], column="numeric_value", row=first[ROW])
    if rows.height == 0:
        return pl.DataFrame({"patient": pl.Series([], dtype=pl.Int64)})
    long = rows.group_by("patient", pl.col("code").str.slice(len(LABEL)).alias("name")).agg(
        pl.col("numeric_value").max().cast(pl.Int64))
    wide = long.pivot(on="name", index="patient", values="numeric_value")
    return wide.rename({c: LABEL_PREFIX + c for c in wide.columns if c != "patient"})


def _visit_starts(events: pl.DataFrame, window_hours: float | None) -> pl.Series:
    """(rows,) the start time of each event's visit: its own time, or with a window, the greedy window start.

    The greedy rule (a visit spans the window from its first event; the first event after it opens the next
    visit) is sequential, so all patients advance together: one vectorised ``searchsorted`` step per visit of
    the longest history, over the (patient, time) pairs sorted and packed into one int64 key.
    """
    if window_hours is None:
        return events["time"]
    distinct = events.select("patient", "time").unique().sort("patient", "time")
    t = distinct["time"].dt.epoch("us").to_numpy()
    n = len(t)
    patient = distinct["patient"].to_numpy()
    first = np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]]) if n else np.zeros(0, dtype=np.int64)
    end = np.r_[first[1:], n].astype(np.int64)  # one past each patient's last distinct time
    # Key = patient rank * M + time rank: increasing along the sorted rows and far below int64 overflow.
    times = np.unique(t)
    m = len(times) + 1
    patient_rank = np.repeat(np.arange(len(first), dtype=np.int64), end - first)
    key = patient_rank * m + np.searchsorted(times, t)
    window = int(round(window_hours * 3_600e6))
    is_start = np.zeros(n, dtype=bool)
    current, stop = first.astype(np.int64), end
    while len(current):
        is_start[current] = True
        # The next visit starts at the patient's first time beyond (current time + window).
        last_inside = np.searchsorted(times, t[current] + window, side="right") - 1
        nxt = np.searchsorted(key, patient_rank[current] * m + last_inside, side="right")
        alive = nxt < stop
        current, stop = nxt[alive], stop[alive]
    start_row = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))  # each patient's first row is a start
    starts = distinct.with_columns(pl.Series("visit", distinct["time"].to_numpy()[start_row]).cast(pl.Datetime("us")))
    return events.join(starts, on=["patient", "time"], how="left", maintain_order="left")["visit"]
