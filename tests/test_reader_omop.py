"""OMOP reader on the real Eunomia GiBleed extract and on a hand-made five-person directory.

GiBleed's README counts (2,694 persons, 80 condition concepts, 113 drug concepts, 1,037 visit rows against
62,359 distinct visit ids on condition rows, 102 condition rows without a visit id) are asserted as numbers;
what the reader derives from them (visits, duplicates, date-fallback visits) is also recomputed here from the
raw CSVs with polars, independently of the reader.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.omop import read_omop as _read_omop
from ehrsynth.demo_data import demo_directory
from ehrsynth.errors import ConfigError, MissingColumnError, MissingFileError, ParseError

GIBLEED_TABLES = ("person", "visit_occurrence", "condition_occurrence", "drug_exposure", "procedure_occurrence",
                  "death")

from conftest import all_train

read_omop = all_train(_read_omop)  # source facts: every patient in train


@pytest.fixture(scope="module")
def gibleed(data_dir):
    return data_dir / "omop-gibleed"


@pytest.fixture(scope="module")
def conditions(gibleed):
    return read_omop(gibleed)


def counts(corpus) -> tuple[int, int, int, int]:
    """(patients, visits, code occurrences, vocabulary size)."""
    return corpus.n_patients, corpus.n_visits, corpus.n_codes, corpus.vocab_size


def _raw(gibleed, name: str) -> pl.DataFrame:
    return pl.read_csv(gibleed / f"{name}.csv.gz", infer_schema=False)


def _expected_visits(gibleed, table: str, date: str) -> int:
    """Visits of one event table, recomputed: distinct visit ids plus distinct (person, date) without one."""
    raw = _raw(gibleed, table)
    with_id = raw.filter(pl.col("visit_occurrence_id").is_not_null())
    return (with_id["visit_occurrence_id"].n_unique()
            + raw.filter(pl.col("visit_occurrence_id").is_null()).select("person_id", date).unique().height)


def test_condition_acceptance_counts(conditions, gibleed):
    assert counts(conditions) == (2694, 62456, 65332, 80)
    assert conditions.describe()["codes_by_system"] == {"OMOP": 80}
    # 62,359 visit ids plus 97 (person, date) visits from the 102 rows without a visit id.
    assert conditions.n_visits == _expected_visits(gibleed, "condition_occurrence", "condition_start_date") == 62456
    stats = conditions.stats
    assert stats["omop_visits"]["rows_dated_by_event"] == 102
    # only 548 of the visit ids have a VISIT_OCCURRENCE row
    assert stats["omop_visits"]["visit_ids_without_visit_row"] == 62359 - 548
    assert stats["empty_visits"] == 1037 - 548  # visit rows with no condition: counted, then dropped
    assert stats["unmapped_concept_rows"] == 0
    assert stats["duplicate_events"] == 0
    raw_concepts = _raw(gibleed, "condition_occurrence")["condition_concept_id"].cast(pl.Float64).cast(pl.Int64)
    assert set(conditions.vocab.codes) == {f"OMOP/{c}" for c in raw_concepts.unique().to_list()}
    assert "OMOP/192671" in conditions.vocab.codes  # GI bleed itself, written "192671.0" in the file


def test_statics(conditions, gibleed):
    person = _raw(gibleed, "person")
    summary = conditions.describe()
    assert summary["sex"] == {"F": 1373, "M": 1321, "unknown": 0}
    assert (person["gender_concept_id"] == "8532.0").sum() == 1373
    assert (conditions.birth_year >= 1900).all()
    # month/day of birth give a birth date, so the age at the first visit is fractional and never missing
    assert np.isfinite(conditions.age_at_first_visit).all()
    assert (conditions.age_at_first_visit != np.round(conditions.age_at_first_visit)).mean() > 0.9
    # the DEATH table exists but is empty: nobody died, and that is known (0, not -1)
    assert (conditions.death == 0).all()


def test_drug_and_procedure_tables(gibleed):
    drugs = read_omop(gibleed, tables=("drug",))
    assert counts(drugs) == (2694, 56429, 67672, 113)
    assert drugs.stats["duplicate_events"] == 35  # same drug twice in one visit
    assert drugs.stats["omop_visits"]["rows_dated_by_event"] == 520
    assert drugs.n_visits == _expected_visits(gibleed, "drug_exposure", "drug_exposure_start_date")

    procedures = read_omop(gibleed, tables=("procedure",))
    assert counts(procedures) == (2593, 33924, 37388, 51)
    assert procedures.stats["patients_without_codes"] == 2694 - 2593
    assert procedures.n_visits == _expected_visits(gibleed, "procedure_occurrence", "procedure_date")

    everything = read_omop(gibleed, tables=("condition", "drug", "procedure"))
    assert counts(everything) == (2694, 110583, 170392, 80 + 113 + 51)
    assert everything.stats["omop_visits"]["rows_dated_by_event"] == 102 + 520 + 81


def test_visits_fall_back_to_dates(gibleed, tmp_path):
    """Without any visit id, visits are exactly the distinct (person, condition_start_date) pairs."""
    raw = _raw(gibleed, "condition_occurrence").with_columns(pl.lit(None, dtype=pl.String).alias("visit_occurrence_id"))
    raw.write_csv(tmp_path / "condition_occurrence.csv")
    shutil.copy(gibleed / "person.csv.gz", tmp_path / "person.csv.gz")
    corpus = read_omop(tmp_path)
    assert corpus.n_visits == raw.select("person_id", "condition_start_date").unique().height
    assert corpus.stats["omop_visits"]["rows_dated_by_event"] == 65332
    # no VISIT_OCCURRENCE or DEATH table: times come from the events, death is unknown
    assert not np.isnat(corpus.visit_start).any()
    assert (corpus.death == -1).all()


def test_upper_case_file_names(gibleed, conditions, tmp_path):
    for name in GIBLEED_TABLES:
        shutil.copy(gibleed / f"{name}.csv.gz", tmp_path / f"{name.upper()}.csv.gz")
    assert read_omop(tmp_path).equals(conditions)


def test_parquet_copy(gibleed, conditions, tmp_path):
    # typed Parquet: float ids (as the CSV writes them) and real Date columns
    for name in GIBLEED_TABLES:
        pl.read_csv(gibleed / f"{name}.csv.gz", try_parse_dates=True).write_parquet(tmp_path / f"{name}.parquet")
    assert pl.read_parquet_schema(tmp_path / "condition_occurrence.parquet")["condition_start_date"] == pl.Date
    assert read_omop(tmp_path).equals(conditions)


def test_bundled_demo(conditions):
    demo = read_omop(demo_directory())
    assert counts(demo) == counts(conditions)
    assert demo.vocab.codes == conditions.vocab.codes
    assert (demo.death == -1).all()  # the demo ships no DEATH table


def test_options_reach_the_builder(gibleed, conditions):
    frequent = int((conditions.vocab.counts >= 100).sum())
    vocab_counts = read_omop(gibleed, options=BuildOptions(min_count=100)).vocab.counts
    assert len(vocab_counts) == frequent < 80
    assert int(vocab_counts.min()) >= 100
    longest = int(read_omop(gibleed, options=BuildOptions(max_visits=5)).visits_per_patient().max())
    assert longest == 5


@pytest.fixture()
def tiny(tmp_path):
    """Five persons covering each rule: visit row time, min event time, date fallback, id 0, concept 0."""
    pl.DataFrame({
        "person_id": [1, 2, 3, 4, 5],
        "gender_concept_id": [8532, 8507, 0, 0, 8532],
        "gender_source_value": ["F", "M", "M", None, "F"],
        "year_of_birth": [1950, 1960, 1970, None, 1990],
        "month_of_birth": [2, None, 6, None, 2],
        "day_of_birth": [10, None, 15, None, 30],  # Feb 30: no birth date, the year still counts
    }).write_csv(tmp_path / "Person.csv")
    pl.DataFrame({
        "visit_occurrence_id": [10],
        "person_id": [1],
        "visit_start_date": ["2020-01-01"],
    }).write_csv(tmp_path / "VISIT_OCCURRENCE.csv")
    pl.DataFrame({
        "person_id": [1, 1, 1, 2, 2, 3, 3, 4, 4],
        "condition_concept_id": ["100.0", "200.0", "100.0", "300.0", "0", "0", "100", "0", "200"],
        "condition_start_date": ["2020-01-03", "2020-01-05", "2020-02-01", "2021-03-01", "2021-03-04",
                                 "2019-05-05", "2019-05-05", "2018-01-01", "2018-01-02"],
        "visit_occurrence_id": ["10", "10", "11", "12", "12", "0", None, None, None],
        "condition_source_value": ["x", "y", "z", "K92.2", "ICD10CM/K92.2", "ICD9CM/4019", "q", "no/system", "w"],
    }).write_csv(tmp_path / "condition_occurrence.csv")
    pl.DataFrame({"person_id": [2]}).write_csv(tmp_path / "death.csv")
    return tmp_path


def test_hand_made_directory(tiny):
    corpus = read_omop(tiny, options=BuildOptions(empty="drop"))
    # codes within a visit follow the vocabulary: by count (OMOP/100 and OMOP/200 twice), then by code
    got = {pid: corpus.patient_codes(i) for i, pid in enumerate(corpus.patient_ids)}
    assert got == {
        "1": [["OMOP/100", "OMOP/200"], ["OMOP/100"]],  # visit 10 (its row), visit 11 (no row)
        "2": [["ICD10CM/K92.2", "OMOP/300"]],  # concept 0 with a typed source value is recovered
        "3": [["OMOP/100", "ICD9CM/4019"]],  # visit id 0 and no visit id: both fall back to the same date
        "4": [["OMOP/200"]],  # concept 0 with an untyped source value ("no/system") is dropped
    }
    assert corpus.stats["unmapped_concept_rows"] == 1
    assert corpus.stats["omop_visits"]["rows_dated_by_event"] == 3  # of the mapped rows: persons 3 (two) and 4 (one)
    assert corpus.stats["omop_visits"]["visit_ids_without_visit_row"] == 2
    assert corpus.stats["patients_without_codes"] == 1  # person 5
    start = corpus.visit_start.astype("datetime64[D]").astype(str).tolist()
    # visit 10 starts at its row's date (before its events); visit 11 and 12 at their earliest event
    assert start == ["2020-01-01", "2020-02-01", "2021-03-01", "2019-05-05", "2018-01-02"]
    assert corpus.visit_days.tolist() == [0.0, 31.0, 0.0, 0.0, 0.0]
    assert corpus.sex.tolist() == [0, 1, 1, -1]  # 0 concept falls back to the source value
    assert corpus.birth_year.tolist() == [1950, 1960, 1970, -1]
    assert corpus.death.tolist() == [0, 1, 0, 0]
    age = corpus.age_at_first_visit
    assert age[0] == pytest.approx((np.datetime64("2020-01-01") - np.datetime64("1950-02-10")).astype(int) / 365.25)
    assert age[1] == 2021 - 1960  # no month/day: the age comes from the year


def test_hand_made_keeps_empty_visits(tiny):
    pl.DataFrame({"visit_occurrence_id": [10, 99], "person_id": [1, 5],
                  "visit_start_date": ["2020-01-01", "2022-01-01"]}).write_csv(tiny / "VISIT_OCCURRENCE.csv")
    corpus = read_omop(tiny, options=BuildOptions(empty="keep"))
    assert corpus.n_patients == 5
    assert corpus.patient_codes(4) == [[]]  # person 5's visit row has no condition
    assert corpus.visit_start[corpus.visit_offsets[4]] == np.datetime64("2022-01-01")


def test_errors_name_the_problem(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"tables must be .*'labs'"):
        read_omop(tiny, tables=("condition", "labs"))
    with pytest.raises(MissingFileError, match="drug_exposure"):
        read_omop(tiny, tables=("drug",))
    (tiny / "Person.csv").unlink()
    with pytest.raises(MissingFileError, match="'person'"):
        read_omop(tiny)
    pl.DataFrame({"person_id": [1], "condition_concept_id": ["abc"], "condition_start_date": ["2020-01-01"]}) \
        .write_csv(tmp_path / "condition_occurrence.csv")
    pl.DataFrame({"person_id": [1]}).write_csv(tmp_path / "person.csv")
    with pytest.raises(ParseError, match=r"condition_concept_id.*row 1.*not an integer: 'abc'"):
        read_omop(tmp_path)
    pl.DataFrame({"person_id": [1], "condition_concept_id": [1]}).write_csv(tmp_path / "condition_occurrence.csv")
    with pytest.raises(MissingColumnError, match="condition_start_date"):
        read_omop(tmp_path)
