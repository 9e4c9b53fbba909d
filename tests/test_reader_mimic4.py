"""MIMIC-IV reader on the real demo release (hosp/, .csv.gz): exact counts, typing by icd_version, statics,
either directory level, upper case / parquet copies, and a refused icd_version.
"""

from __future__ import annotations

import gzip
import re
import shutil

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.mimic4 import read_mimic4 as _read_mimic4
from ehrsynth.errors import ParseError

from conftest import all_train

read_mimic4 = all_train(_read_mimic4)  # source facts: every patient in train


def counts(corpus) -> tuple[int, int, int, int]:
    """(patients, visits, code occurrences, vocabulary size): assert on these, never on the corpus repr."""
    return corpus.n_patients, corpus.n_visits, corpus.n_codes, corpus.vocab_size


@pytest.fixture(scope="module")
def hosp(data_dir):
    return data_dir / "mimic-iv-demo" / "hosp"


@pytest.fixture(scope="module")
def mimic4_corpus(hosp):
    return read_mimic4(hosp)


def _raw(hosp, name: str) -> pl.DataFrame:
    return pl.read_csv(hosp / f"{name}.csv.gz", infer_schema=False)


def test_default_acceptance_counts(mimic4_corpus, hosp):
    got = counts(mimic4_corpus)
    assert got == (100, 275, 4506, 1474)
    systems = mimic4_corpus.vocab.systems()
    assert systems == {"ICD9CM": 740, "ICD10CM": 734}
    # 1,474 typed codes although only 1,472 distinct strings: two strings are both an ICD-9 and an ICD-10 code.
    raw = _raw(hosp, "diagnoses_icd")
    assert raw.select("icd_code", "icd_version").unique().height == 1474
    assert raw["icd_code"].n_unique() == 1472
    versions = dict(zip(*raw["icd_version"].value_counts().sort("icd_version").to_dict().values()))
    assert versions == {"10": 2313, "9": 2193}
    stats = mimic4_corpus.stats
    assert (stats["input_rows"], stats["duplicate_events"], stats["empty_visits"]) == (4506, 0, 0)
    assert stats["code_rows_without_admission"] == 0


def test_parent_directory_is_accepted(hosp, mimic4_corpus):
    same = read_mimic4(hosp.parent).equals(mimic4_corpus)
    assert same


def test_statics(mimic4_corpus, hosp):
    c = mimic4_corpus
    summary = c.describe()
    assert summary["sex"] == {"F": 43, "M": 57, "unknown": 0}
    assert summary["labels"] == {"mortality": 15}
    deaths = np.bincount(c.death.astype(np.int64), minlength=2).tolist()
    assert deaths == [85, 15]
    assert summary["split"] == {"train": 100, "val": 0, "test": 0}  # all_train
    assert np.bincount(_read_mimic4(hosp).split, minlength=3).tolist() == [72, 8, 20]
    # birth_year = anchor_year - anchor_age; age = anchor_age + (year of first admission - anchor_year).
    patients = _raw(hosp, "patients").select(
        pl.col("subject_id"), pl.col("anchor_age").cast(pl.Int64), pl.col("anchor_year").cast(pl.Int64)
    )
    first = _raw(hosp, "admissions").group_by("subject_id").agg(
        pl.col("admittime").str.to_datetime("%Y-%m-%d %H:%M:%S").min().dt.year().alias("first_year")
    )
    expected = patients.join(first, on="subject_id").with_columns(
        (pl.col("anchor_year") - pl.col("anchor_age")).alias("birth_year"),
        (pl.col("anchor_age") + pl.col("first_year") - pl.col("anchor_year")).cast(pl.Float64).alias("age"),
    )
    got = pl.DataFrame({
        "subject_id": c.patient_ids.astype(str),
        "birth_year_got": c.birth_year.astype(np.int64),
        "age_got": c.age_at_first_visit.astype(np.float64),
    })
    joined = got.join(expected, on="subject_id")
    wrong = (
        joined.height,
        joined.filter(pl.col("birth_year_got") != pl.col("birth_year")).height,
        joined.filter(pl.col("age_got") != pl.col("age")).height,
    )
    assert wrong == (100, 0, 0)
    age_range = (float(c.age_at_first_visit.min()), float(c.age_at_first_visit.max()))
    assert age_range[0] >= 18 and age_range[1] <= 91  # MIMIC-IV holds adults, anchor_age capped at 91


def test_procedures_and_prescriptions(hosp):
    c = read_mimic4(hosp, tables=("diagnoses", "procedures", "prescriptions"))
    systems = c.vocab.systems()
    assert systems == {"NDC": 1249, "ICD9CM": 740, "ICD10CM": 734, "ICD9PROC": 183, "ICD10PCS": 169}
    got = counts(c)
    assert got == (100, 275, 14192, 3075)
    stats = c.stats
    assert stats["duplicate_events"] == 6492
    procedures = _raw(hosp, "procedures_icd")
    assert procedures.height == 722
    assert procedures.select("icd_code", "icd_version").unique().height == 183 + 169
    prescriptions = _raw(hosp, "prescriptions")
    ndc = prescriptions["ndc"].str.strip_chars()
    usable = prescriptions.filter(ndc.is_not_null() & (ndc != "") & (ndc != "0"))
    assert usable["ndc"].n_unique() == 1249
    assert stats["input_rows"] == 4506 + 722 + usable.height


def test_procedures_only_leave_empty_admissions(hosp):
    admissions = _raw(hosp, "admissions")
    without = admissions.join(_raw(hosp, "procedures_icd"), on="hadm_id", how="anti").height
    dropped = read_mimic4(hosp, tables=("procedures",))
    kept = read_mimic4(hosp, tables=("procedures",), options=BuildOptions(empty="keep"))
    assert dropped.stats["empty_visits"] == without == kept.stats["empty_visits"]
    got = (dropped.n_visits, kept.n_visits, kept.n_patients)
    assert got == (275 - without, 275, 100)


def test_upper_case_names_plain_csv(hosp, tmp_path, mimic4_corpus):
    """An upper-cased, uncompressed copy (file and column names) reads to the same corpus."""
    for name in ("admissions", "patients", "diagnoses_icd"):
        frame = _raw(hosp, name)
        frame.rename({col: col.upper() for col in frame.columns}).write_csv(tmp_path / f"{name.upper()}.CSV")
    same = read_mimic4(tmp_path).equals(mimic4_corpus)
    assert same


def test_typed_parquet(hosp, tmp_path, mimic4_corpus):
    """Parquet with inferred (integer) id and version columns reads to the same corpus."""
    for name in ("admissions", "patients", "diagnoses_icd"):
        pl.read_csv(hosp / f"{name}.csv.gz", infer_schema_length=None).write_parquet(tmp_path / f"{name}.parquet")
    dtype = pl.read_parquet_schema(tmp_path / "diagnoses_icd.parquet")["icd_version"]
    assert dtype == pl.Int64
    same = read_mimic4(tmp_path).equals(mimic4_corpus)
    assert same


def _copy_with_bad_version(hosp, tmp_path, row: int, value: str):
    for name in ("admissions", "patients"):
        shutil.copy(hosp / f"{name}.csv.gz", tmp_path / f"{name}.csv.gz")
    frame = _raw(hosp, "diagnoses_icd")
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == row - 1).then(pl.lit(value)).otherwise(pl.col("icd_version"))
        .alias("icd_version")
    )
    path = tmp_path / "diagnoses_icd.csv.gz"
    with gzip.open(path, "wb") as handle:
        frame.write_csv(handle)
    return path


@pytest.mark.parametrize(("value", "shown"), [("11", "'11'"), ("ICD9", "'ICD9'"), ("", "''")])
def test_bad_icd_version_names_file_column_row(hosp, tmp_path, value, shown):
    path = _copy_with_bad_version(hosp, tmp_path, row=37, value=value)
    pattern = re.escape(f"{path}, column 'icd_version', row 37: ") + ".*" + re.escape(shown)
    with pytest.raises(ParseError, match=pattern):
        read_mimic4(tmp_path)
