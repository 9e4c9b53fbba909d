"""OMOP CDM 5.3/5.4: codes are concept ids (``OMOP/192671``) from condition_occurrence, and on request
drug_exposure and procedure_occurrence. PERSON gives sex and birth year (and the birth date when month and day
are there); DEATH, when the table exists, gives the death flag.

A visit is the row's ``visit_occurrence_id`` (when present and not 0), else the event date: extracts often
leave it blank or point it at no VISIT_OCCURRENCE row (GiBleed has 1,037 visit rows but 62,359 distinct visit
ids on its condition rows). The visit time is the VISIT_OCCURRENCE start (its datetime, else its date) when
that row exists, else the earliest event time in the visit. Visit rows with no event of the chosen tables
become empty visits, counted (or kept) by the builder.

Concept id 0 means "no standard concept": such rows are dropped and counted, except when ``*_source_value`` is
itself a typed code of a known system (``ICD9CM/4019``), which is how
:func:`ehrsynth.data.writers.omop.write_omop` stores non-OMOP codes -- so a written corpus reads back intact.

Table file names may be upper or lower case, as .csv, .csv.gz or .parquet.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.checks import check_birth_years
from ehrsynth.data.notes import collects_notes, optional_table_missing
from ehrsynth.data.tables import clean_code, find_table, parse_datetime, parse_int, read_table
from ehrsynth.data.vocab import KNOWN_SYSTEMS
from ehrsynth.errors import ConfigError, EmptyTableError, InputError

# table name -> (file, concept column, date column, datetime column, source value column)
OMOP_TABLES = {
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_date",
                  "condition_start_datetime", "condition_source_value"),
    "drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_date",
             "drug_exposure_start_datetime", "drug_source_value"),
    "procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_date",
                  "procedure_datetime", "procedure_source_value"),
}
ID_WIDTH = 20  # digits of a visit id in the visit key (int64 has at most 19)
FEMALE_CONCEPT = 8532
MALE_CONCEPT = 8507
# A source value that is already a typed code of a known system, e.g. "ICD9CM/4019".
TYPED_CODE_PATTERN = rf"^(?:{'|'.join(KNOWN_SYSTEMS)})/\S"


@collects_notes
def read_omop(
    directory: str | Path,
    *,
    tables: Sequence[str] = ("condition",),
    options: BuildOptions | None = None,
) -> PatientCorpus:
    """Read an OMOP CDM directory into a corpus.

    Args:
        directory: folder holding PERSON and the event tables (VISIT_OCCURRENCE and DEATH are optional).
        tables: event tables to use, any of ``'condition'``, ``'drug'``, ``'procedure'``.
        options: corpus build options.

    Returns:
        The corpus; ``stats`` adds ``unmapped_concept_rows`` (concept id 0, dropped) and ``omop_visits``:
        ``rows_dated_by_event`` (rows without a usable visit id, grouped by date) and
        ``visit_ids_without_visit_row`` (visits timed by their earliest event).

    Raises:
        ConfigError: for an unknown table name.
        InputError: for a missing table or column, an empty table, or a bad id or date.

    Example:
        >>> corpus = read_omop("omop-gibleed", tables=("condition", "drug"))  # doctest: +SKIP
    """
    unknown = set(tables) - set(OMOP_TABLES)
    if unknown or not tables:
        raise ConfigError(f"tables must be a non-empty subset of {tuple(OMOP_TABLES)}, got {tuple(tables)!r}")
    directory = Path(directory)
    person_path = find_table(directory, "person")  # checked first: it is what marks a directory as OMOP
    frames = [_events(directory, name, offset) for offset, name in enumerate(t for t in OMOP_TABLES if t in tables)]
    events = pl.concat(frames, how="vertical")
    if events.height == 0:  # one empty table among several is fine (a writer emits all three)
        names = ", ".join(OMOP_TABLES[t][0] for t in OMOP_TABLES if t in tables)
        raise EmptyTableError(f"no event rows in {names}", file=directory)
    unmapped = int(events["code"].is_null().sum())
    events = events.filter(pl.col("code").is_not_null())

    # A visit id counts when it is present and not 0; other rows are grouped by their date.
    has_id = pl.col("visit_id").is_not_null() & (pl.col("visit_id") != 0)
    visit_rows = _visit_rows(directory)
    events = events.with_columns(
        # zero-padded so that visits at the same time sort by id as numbers, not as text
        pl.when(has_id).then(pl.lit("id:") + pl.col("visit_id").cast(pl.String).str.zfill(ID_WIDTH))
        .otherwise(pl.lit("date:") + pl.col("date").dt.date().cast(pl.String)).alias("visit"),
        pl.when(has_id).then(pl.col("visit_id")).otherwise(None).alias("visit_id"),
    )
    n_from_date = int(events.select((~has_id).sum()).item())
    ids_used = events.select(pl.col("visit_id").drop_nulls().unique())
    if visit_rows is not None:
        orphan_ids = ids_used.join(visit_rows, on="visit_id", how="anti").height
        events = events.join(visit_rows.select("visit_id", "visit_time"), on="visit_id", how="left")
        # Visit rows with no event of the chosen tables: a null-code row each, so the builder counts them.
        empty = visit_rows.join(ids_used, on="visit_id", how="anti").select(
            "patient", (pl.lit("id:") + pl.col("visit_id").cast(pl.String).str.zfill(ID_WIDTH)).alias("visit"),
            pl.col("visit_time").alias("time"), pl.lit(None, dtype=pl.String).alias("code"),
            pl.lit(None, dtype=pl.Int64).alias("order"),
        )
    else:
        orphan_ids = ids_used.height
        events = events.with_columns(pl.lit(None, dtype=pl.Datetime("us")).alias("visit_time"))
        empty = None
    events = events.select(
        "patient", "visit", pl.coalesce("visit_time", "date").alias("time"), "code", "order"
    )
    if empty is not None and empty.height:
        events = pl.concat([events, empty], how="vertical")

    patients = _patients(directory, person_path, events["time"])
    corpus = build_corpus(events, patients, options, source="omop")
    corpus.stats["unmapped_concept_rows"] = unmapped
    corpus.stats["omop_visits"] = {"rows_dated_by_event": n_from_date, "visit_ids_without_visit_row": orphan_ids}
    return corpus


def _events(directory: Path, name: str, offset: int) -> pl.DataFrame:
    """One event table as (patient, visit_id, date, code, order); code is null when unmapped."""
    table, concept, date, datetime, source = OMOP_TABLES[name]
    path = find_table(directory, table)
    frame = read_table(path, ["person_id", concept, date], [datetime, "visit_occurrence_id", source],
                       allow_empty=True)
    concept_id = parse_int(frame, concept, path)
    when = parse_datetime(frame, date, path)
    if datetime in frame.columns:
        when = pl.select(pl.coalesce(parse_datetime(frame, datetime, path), when)).to_series()
    typed_source = pl.lit(None, dtype=pl.String)
    if source in frame.columns:
        value = clean_code(frame[source])
        typed_source = pl.when(pl.lit(value).str.contains(TYPED_CODE_PATTERN)).then(pl.lit(value))
    concept_id_expr = pl.lit(concept_id)
    code = (pl.when(concept_id_expr.is_not_null() & (concept_id_expr != 0))
            .then(pl.lit("OMOP/") + concept_id_expr.cast(pl.String))
            .otherwise(typed_source))
    visit_id = (parse_int(frame, "visit_occurrence_id", path) if "visit_occurrence_id" in frame.columns
                else pl.repeat(None, frame.height, dtype=pl.Int64, eager=True).alias("visit_occurrence_id"))
    return pl.DataFrame({
        "patient": parse_int(frame, "person_id", path),
        "visit_id": visit_id,
        "date": when,
        "code": pl.select(code).to_series(),
        # Source order, tables in the order asked for, so max_codes_per_visit keeps the first table's codes.
        "order": frame["_row"].cast(pl.Int64) + offset * 1_000_000_000,
    })


def _visit_rows(directory: Path) -> pl.DataFrame | None:
    """VISIT_OCCURRENCE as (visit_id, patient, visit_time), or None when the table is absent."""
    path = find_table(directory, "visit_occurrence", required=False)
    if path is None:
        optional_table_missing("visit_occurrence", "not found")
        return None
    try:
        frame = read_table(path, ["visit_occurrence_id", "person_id"], ["visit_start_date", "visit_start_datetime"],
                           allow_empty=True)
    except InputError as exc:
        optional_table_missing("visit_occurrence", f"unreadable ({exc.reason})")
        return None
    start = pl.repeat(None, frame.height, dtype=pl.Datetime("us"), eager=True).alias("visit_time")
    for column in ("visit_start_date", "visit_start_datetime"):  # the datetime, when given, wins
        if column in frame.columns:
            start = pl.select(pl.coalesce(parse_datetime(frame, column, path), start)).to_series()
    return pl.DataFrame({
        "visit_id": parse_int(frame, "visit_occurrence_id", path),
        "patient": parse_int(frame, "person_id", path),
        "visit_time": start,
    }).unique("visit_id", keep="first", maintain_order=True)


def _patients(directory: Path, path: Path, event_times: pl.Series) -> pl.DataFrame:
    """PERSON (and DEATH) as (patient, sex, birth_year, birth_date, death)."""
    frame = read_table(path, ["person_id"], ["gender_concept_id", "gender_source_value", "year_of_birth",
                                             "month_of_birth", "day_of_birth"])
    out = pl.DataFrame({"patient": parse_int(frame, "person_id", path)})
    sex = pl.lit(None, dtype=pl.String)
    if "gender_source_value" in frame.columns:
        sex = pl.lit(clean_code(frame["gender_source_value"]))
    if "gender_concept_id" in frame.columns:
        gender = pl.lit(parse_int(frame, "gender_concept_id", path))
        sex = pl.when(gender == FEMALE_CONCEPT).then(pl.lit("F")).when(gender == MALE_CONCEPT).then(pl.lit("M")) \
            .otherwise(sex)
    out = out.with_columns(sex.alias("sex"))
    if "year_of_birth" in frame.columns:
        year = parse_int(frame, "year_of_birth", path)
        check_birth_years(year, frame["_row"], path, "year_of_birth", event_times)
        out = out.with_columns(year.alias("birth_year"))
        if "month_of_birth" in frame.columns and "day_of_birth" in frame.columns:
            month, day = parse_int(frame, "month_of_birth", path), parse_int(frame, "day_of_birth", path)
            # Formatted then parsed leniently, so an impossible date (Feb 30) becomes null, not an error.
            pad = [pl.lit(part).cast(pl.String).str.zfill(width) for part, width in ((year, 4), (month, 2), (day, 2))]
            text = pl.select(pl.format("{}-{}-{}", *pad)).to_series()
            out = out.with_columns(text.str.to_datetime("%Y-%m-%d", strict=False, time_unit="us").alias("birth_date"))
    death_path = find_table(directory, "death", required=False)
    deaths = None
    if death_path is None:
        optional_table_missing("death", "not found")
    else:
        try:
            deaths = read_table(death_path, ["person_id"], allow_empty=True)
        except InputError as exc:
            optional_table_missing("death", f"unreadable ({exc.reason})")
    if deaths is None:
        return out.with_columns(pl.lit(None, dtype=pl.Int64).alias("death"))
    dead = parse_int(deaths, "person_id", death_path).unique().alias("patient")
    # Persons only in DEATH still count: the builder sees them as patients without codes.
    out = pl.concat([out, dead.to_frame()], how="diagonal_relaxed").unique("patient", keep="first",
                                                                           maintain_order=True)
    return out.with_columns(pl.col("patient").is_in(dead.implode()).cast(pl.Int64).alias("death"))
