"""Synthea CSV export: one visit per encounter, codes from conditions and procedures (SNOMED CT) and
medications (RxNorm), joined to their encounter by ``ENCOUNTER``.

An event whose ``ENCOUNTER`` is blank or names no row of ``encounters`` is not dropped: it falls back to a visit
keyed by the patient and the event's own date (``date:YYYY-MM-DD``), as the OMOP reader does for a missing
visit_occurrence_id, and is counted in ``stats['events_without_encounter']``. ``patients`` gives sex, birth date
and a death flag (1 when DEATHDATE is filled, else 0).

Synthea writes upper-case headers (``Id``, ``START``); like every reader this one matches names
case-insensitively.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.checks import check_birth_years
from ehrsynth.data.notes import collects_notes
from ehrsynth.data.tables import ROW, clean_code, find_table, parse_datetime, read_table
from ehrsynth.errors import ConfigError

# table name -> code system of its CODE column
SYNTHEA_TABLES = {"conditions": "SNOMED", "medications": "RXNORM", "procedures": "SNOMED"}
# Gap between the ``order`` ranges of successive tables, so caps keep codes in requested-table order
# whatever the table sizes.
_TABLE_ORDER_STRIDE = 1 << 40


@collects_notes
def read_synthea(
    directory: str | Path,
    *,
    tables: Sequence[str] = ("conditions",),
    options: BuildOptions | None = None,
) -> PatientCorpus:
    """Read a Synthea CSV export into a corpus.

    Args:
        directory: folder holding patients, encounters and the code tables (.csv, .csv.gz or .parquet).
        tables: code tables to use, any of ``'conditions'``, ``'medications'``, ``'procedures'``. A requested
            table that is missing is skipped and counted in ``stats['missing_tables']`` (names in
            ``stats['missing_table_names']``), unless every requested table is missing.
        options: corpus build options.

    Returns:
        The corpus; ``stats`` also counts ``events_without_encounter`` (placed by date), ``events_without_visit``
        (no encounter and no date or patient: dropped) and ``encounters_without_id`` (dropped).

    Raises:
        ConfigError: for an unknown table name.
        InputError: for a missing directory, encounters or patients table, or column, an empty table or a bad
            date; :class:`~ehrsynth.errors.MissingFileError` when no requested code table exists.

    Example:
        >>> corpus = read_synthea("synthea-111", tables=("conditions", "medications"))  # doctest: +SKIP
    """
    unknown = set(tables) - set(SYNTHEA_TABLES)
    if unknown or not tables:
        raise ConfigError(f"tables must be a non-empty subset of {tuple(SYNTHEA_TABLES)}, got {tuple(tables)!r}")
    tables = tuple(dict.fromkeys(tables))  # drop repeats, keep order
    directory = Path(directory)
    encounters, encounters_without_id = _encounters(directory)

    paths = {name: find_table(directory, name, required=False) for name in tables}
    missing = [name for name, path in paths.items() if path is None]
    if len(missing) == len(tables):
        find_table(directory, tables[0])  # raises MissingFileError naming the directory and the table
    codes = pl.concat(
        [_codes(path, SYNTHEA_TABLES[name], offset=i * _TABLE_ORDER_STRIDE)
         for i, (name, path) in enumerate(paths.items()) if path is not None],
        how="vertical",
    )

    # Events on a known encounter take its patient and start time.
    placed = codes.join(encounters, on="visit", how="inner").select("patient", "visit", "time", "code", "order")
    # The rest fall back to a visit on the event's own day, keyed by patient and date.
    loose = codes.join(encounters, on="visit", how="anti")
    day = loose["start"].dt.truncate("1d")
    loose = loose.with_columns(
        pl.col("event_patient").alias("patient"),
        ("date:" + day.dt.strftime("%Y-%m-%d")).alias("visit"),
        day.alias("time"),
    )
    unplaceable = loose.filter(pl.col("patient").is_null() | pl.col("visit").is_null())
    loose = loose.filter(pl.col("patient").is_not_null() & pl.col("visit").is_not_null())
    # Every encounter is a visit, so build_corpus can count (or keep) those without codes.
    empty = encounters.with_columns(pl.lit(None, dtype=pl.String).alias("code"), pl.lit(-1, pl.Int64).alias("order"))
    columns = ["patient", "visit", "time", "code", "order"]
    events = pl.concat([placed, loose.select(columns), empty.select(columns)], how="vertical")

    corpus = build_corpus(events, _patients(directory, encounters["time"]), options, source="synthea")
    corpus.stats["missing_tables"] = len(missing)
    corpus.stats["missing_table_names"] = missing
    corpus.stats["events_without_encounter"] = loose.height + unplaceable.height
    corpus.stats["events_without_visit"] = unplaceable.height
    corpus.stats["encounters_without_id"] = encounters_without_id
    return corpus


def _encounters(directory: Path) -> tuple[pl.DataFrame, int]:
    """(visit, patient, time) per encounter with an Id and a patient, and the number of rows without them."""
    path = find_table(directory, "encounters")
    frame = read_table(path, ["id", "start", "patient"])
    out = pl.DataFrame({
        "visit": clean_code(frame["id"]),
        "patient": clean_code(frame["patient"]),
        "time": parse_datetime(frame, "start", path),
    })
    kept = out.filter(pl.col("visit").is_not_null() & pl.col("patient").is_not_null())
    kept = kept.unique("visit", keep="first", maintain_order=True)  # an Id names one encounter
    return kept, out.height - kept.height


def _codes(path: Path, system: str, *, offset: int) -> pl.DataFrame:
    """(visit, typed code, order, event patient, event start) rows of one code table; blank codes dropped."""
    frame = read_table(path, ["start", "patient", "encounter", "code"])
    return pl.DataFrame({
        "visit": clean_code(frame["encounter"]),
        "code": (system + "/" + clean_code(frame["code"])).alias("code"),
        "order": frame[ROW].cast(pl.Int64) + offset,
        "event_patient": clean_code(frame["patient"]),
        "start": parse_datetime(frame, "start", path),
    }).filter(pl.col("code").is_not_null())


def _patients(directory: Path, event_times: pl.Series) -> pl.DataFrame:
    """Sex, birth date and death flag per patient."""
    path = find_table(directory, "patients")
    frame = read_table(path, ["id"], ["gender", "birthdate", "deathdate"])
    out = pl.DataFrame({"patient": clean_code(frame["id"])})
    if "gender" in frame.columns:
        out = out.with_columns(frame["gender"].alias("sex"))
    if "birthdate" in frame.columns:
        birth = parse_datetime(frame, "birthdate", path)
        check_birth_years(birth.dt.year(), frame[ROW], path, "birthdate", event_times)
        out = out.with_columns(birth.alias("birth_date"))
    if "deathdate" in frame.columns:
        # Parsed only to refuse garbage; a filled, valid DEATHDATE means the patient died.
        died = parse_datetime(frame, "deathdate", path).is_not_null().cast(pl.Int64)
        out = out.with_columns(died.alias("death"))
    return out.filter(pl.col("patient").is_not_null())
