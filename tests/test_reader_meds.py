"""MEDS reader: a hand-made five-row file with its exact expected corpus, the static-row conventions, the
visit window (checked against a plain-Python greedy reference), shards, and MEDS written from real corpora."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.corpus import PatientCorpus, random_split
from ehrsynth.data.readers.meds import read_meds
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.data.readers.omop import read_omop
from ehrsynth.data.vocab import Vocabulary
from ehrsynth.data.writers.meds import write_meds
from ehrsynth.errors import ConfigError, MissingColumnError, MissingFileError, ParseError

SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}


def _meds(rows: list[tuple], path) -> None:
    pl.DataFrame(rows, schema=SCHEMA, orient="row").write_parquet(path)


@pytest.fixture(scope="module")
def mimic3_all(data_dir):
    return read_mimic3(data_dir / "mimic-iii-demo", tables=("diagnoses", "procedures", "prescriptions"))


def test_five_rows_exact_corpus(tmp_path):
    t1, t2 = datetime(2020, 1, 1, 10), datetime(2020, 1, 2, 9)
    _meds([
        (7, None, "GENDER//F", None),
        (7, datetime(1950, 6, 1), "MEDS_BIRTH", None),
        (7, t1, "ICD9CM//401.9", None),
        (7, t1, "NDC//0001", None),
        (7, t2, "ICD10CM//I10", None),
    ], tmp_path / "five.parquet")
    corpus = read_meds(tmp_path / "five.parquet")
    # vocabulary: every code in one visit, so ties are broken by the code: ICD10CM/... < ICD9CM/... < NDC/...
    expected = PatientCorpus(
        patient_ids=np.array(["7"], dtype=object),
        visit_offsets=np.array([0, 2]),
        code_offsets=np.array([0, 2, 3]),
        codes=np.array([1, 2, 0], dtype=np.int32),
        visit_days=np.array([0.0, 23 / 24]),
        visit_start=np.array([t1, t2], dtype="datetime64[s]"),
        sex=np.array([0], dtype=np.int8),
        birth_year=np.array([1950], dtype=np.int32),
        age_at_first_visit=np.array([25_416 / 365.25], dtype=np.float32),  # whole days from birth to t1
        death=np.array([0], dtype=np.int8),
        labels=np.zeros((1, 0), dtype=np.uint8),
        label_names=(),
        vocab=Vocabulary(("ICD10CM/I10", "ICD9CM/401.9", "NDC/0001"), np.array([1, 1, 1])),
        split=random_split(1, (0.72, 0.08, 0.2), seed=0),
    )
    # 23 hours, as days: polars' division may differ from Python's in the last bit
    np.testing.assert_allclose(corpus.visit_days, expected.visit_days, rtol=1e-15)
    assert corpus.equals(dataclasses.replace(expected, visit_days=corpus.visit_days))
    assert corpus.vocab == expected.vocab

    merged = read_meds(tmp_path / "five.parquet", visit_window_hours=24)
    assert merged.patient_codes(0) == [["ICD10CM/I10", "ICD9CM/401.9", "NDC/0001"]]
    assert merged.visit_start.tolist() == [t1]
    assert read_meds(tmp_path / "five.parquet", visit_window_hours=22).n_visits == 2


def test_labels_death_and_skipped_rows(tmp_path):
    t = datetime(2021, 5, 5)
    _meds([
        (1, None, "LABEL//readmission", 1.0),
        (1, None, "RACE//WHITE", None),  # another static row: skipped
        (1, t, "HOSPITAL_ADMISSION", None),  # no system: not a clinical code
        (1, t, "ICD10CM//E11.9", 3.5),  # a value on a code is ignored
        (1, datetime(2021, 6, 1), "MEDS_DEATH", None),
        (2, None, "GENDER//M", None),
        (2, None, "LABEL//readmission", 0.0),
        (2, t, "LAB//50912//mg/dL", 1.2),  # only the first // becomes /
    ], tmp_path / "meds.parquet")
    corpus = read_meds(tmp_path / "meds.parquet")
    assert corpus.label_names == ("readmission",)
    assert corpus.labels[:, 0].tolist() == [1, 0]
    assert corpus.death.tolist() == [1, 0]
    assert corpus.sex.tolist() == [-1, 1]
    assert corpus.birth_year.tolist() == [-1, -1]
    assert [corpus.patient_codes(i) for i in range(2)] == [[["ICD10CM/E11.9"]], [["LAB/50912//mg/dL"]]]
    assert corpus.stats["rows_without_system"] == 1
    assert corpus.stats["static_rows_skipped"] == 1


def test_errors(tmp_path):
    _meds([(1, None, "LABEL//x", 2.0), (1, datetime(2020, 1, 1), "ICD9CM//1", None)], tmp_path / "bad.parquet")
    with pytest.raises(ParseError, match=r"bad.parquet.*numeric_value.*row 1.*'LABEL//x' needs numeric_value 0 or 1"):
        read_meds(tmp_path / "bad.parquet")
    pl.DataFrame({"subject_id": [1], "code": ["ICD9CM//1"]}).write_parquet(tmp_path / "notime.parquet")
    with pytest.raises(MissingColumnError, match="'time'"):
        read_meds(tmp_path / "notime.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="no .parquet file"):
        read_meds(tmp_path / "empty")
    with pytest.raises(MissingFileError, match="not found"):
        read_meds(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"--visit-window-hours must be a number of hours in \[0, 1e\+06\], got -1"):
        read_meds(tmp_path / "bad.parquet", visit_window_hours=-1)


def _greedy_visits(frame: pl.DataFrame, hours: float) -> int:
    """Reference: per subject, walk the sorted distinct times and open a visit past first + window."""
    total = 0
    for _, group in frame.filter(pl.col("time").is_not_null() & pl.col("code").str.contains("//"))\
            .filter(~pl.col("code").str.starts_with("LABEL//") & ~pl.col("code").str.starts_with("GENDER//"))\
            .group_by("subject_id"):
        start = None
        for time in sorted(set(group["time"].to_list())):
            if start is None or (time - start).total_seconds() > hours * 3600:
                start, total = time, total + 1
    return total


@pytest.mark.parametrize("hours", [0, 12, 24 * 30, 24 * 365])
def test_visit_window_matches_greedy_reference(mimic3_all, tmp_path, hours):
    root = write_meds(mimic3_all, tmp_path / "meds")
    frame = pl.read_parquet(root / "data" / "0.parquet")
    corpus = read_meds(root, visit_window_hours=hours)
    assert corpus.n_visits == _greedy_visits(frame, hours)
    assert corpus.n_codes <= mimic3_all.n_codes  # merging visits can only merge duplicate codes
    if hours == 0:
        assert corpus.n_visits == mimic3_all.n_visits == 129
    if hours == 24 * 365:
        assert corpus.n_visits < 129


def test_meds_from_mimic3_reads_back(mimic3_all, tmp_path):
    root = write_meds(mimic3_all, tmp_path / "meds")
    corpus = read_meds(root)
    # every array but the age (MEDS_BIRTH is written on 1 January of the birth year) comes back exactly
    assert corpus.equals(dataclasses.replace(mimic3_all, age_at_first_visit=corpus.age_at_first_visit))
    assert corpus.label_names == ("mortality",)
    assert int(corpus.labels.sum()) == int(mimic3_all.labels.sum())


def test_meds_from_gibleed_merges_same_day_visits(data_dir, tmp_path):
    """MEDS has no visit ids: GiBleed's distinct visits that share a date become one visit."""
    source = read_omop(data_dir / "omop-gibleed")
    corpus = read_meds(write_meds(source, tmp_path / "meds"))
    same_time = pl.DataFrame({"patient": source.visit_patient(), "time": source.visit_start.astype("datetime64[us]")})
    assert corpus.n_visits == same_time.unique().height == 62436
    assert corpus.n_patients == 2694
    assert corpus.n_codes == source.n_codes == 65332  # no visit shares a code with a same-day visit
    assert np.array_equal(corpus.sex, source.sex) and np.array_equal(corpus.birth_year, source.birth_year)


def test_directory_of_shards(mimic3_all, tmp_path):
    root = write_meds(mimic3_all, tmp_path / "meds")
    frame = pl.read_parquet(root / "data" / "0.parquet")
    shards = tmp_path / "shards"
    (shards / "train").mkdir(parents=True)
    cut = int(frame["subject_id"].unique().sort()[50])
    frame.filter(pl.col("subject_id") < cut).write_parquet(shards / "train" / "0.parquet")
    frame.filter(pl.col("subject_id") >= cut).write_parquet(shards / "1.parquet")
    assert read_meds(shards).equals(read_meds(root))
