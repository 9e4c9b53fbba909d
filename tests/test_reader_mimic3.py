"""MIMIC-III reader on the real demo release: exact counts, statics, split, caps and code options.

Counts that the README of the data gives (100 patients, 129 admissions, 1,761 diagnosis rows, 581 distinct
codes, 164 distinct procedures) are asserted as numbers; the rest are recomputed from the raw CSVs with polars,
independently of the reader, and also pinned so a change in behaviour is seen.
"""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.mimic3 import read_mimic3 as _read_mimic3

from conftest import all_train

read_mimic3 = all_train(_read_mimic3)  # source facts: every patient in train


@pytest.fixture(scope="module")
def mimic3_dir(data_dir):
    return data_dir / "mimic-iii-demo"


@pytest.fixture(scope="module")
def mimic3_corpus(mimic3_dir):
    return read_mimic3(mimic3_dir)


def counts(corpus) -> tuple[int, int, int, int]:
    """(patients, visits, code occurrences, vocabulary size): assert on these, never on the corpus repr."""
    return corpus.n_patients, corpus.n_visits, corpus.n_codes, corpus.vocab_size


def _raw(mimic3_dir, name: str) -> pl.DataFrame:
    return pl.read_csv(mimic3_dir / f"{name}.csv", infer_schema=False)


def test_default_acceptance_counts(mimic3_corpus, mimic3_dir):
    got = counts(mimic3_corpus)
    assert got == (100, 129, 1761, 581)  # every diagnosis row is a distinct (admission, code) pair
    summary = mimic3_corpus.describe()
    assert summary["codes_by_system"] == {"ICD9CM": 581}
    stats = mimic3_corpus.stats
    assert (stats["input_rows"], stats["duplicate_events"], stats["empty_visits"]) == (1761, 0, 0)
    assert stats["code_rows_without_admission"] == 0
    assert int(mimic3_corpus.vocab.counts.sum()) == 1761
    raw = _raw(mimic3_dir, "DIAGNOSES_ICD")
    assert raw.height == 1761 and raw["icd9_code"].n_unique() == 581


def test_visits_ordered_in_time(mimic3_corpus):
    c = mimic3_corpus
    histogram = np.bincount(c.visits_per_patient()).tolist()
    assert histogram[:4] == [0, 86, 11, 2] and len(histogram) == 16  # one patient has 15 admissions
    starts = c.visit_start.astype("int64")
    same_patient = c.visit_patient()[1:] == c.visit_patient()[:-1]
    backwards = int((np.diff(starts)[same_patient] < 0).sum())
    assert backwards == 0
    first_days = set(c.visit_days[c.visit_offsets[:-1]].tolist())
    assert first_days == {0.0}


def test_statics(mimic3_corpus, mimic3_dir):
    c = mimic3_corpus
    summary = c.describe()
    assert summary["sex"] == {"F": 55, "M": 45, "unknown": 0}
    raw = _raw(mimic3_dir, "PATIENTS")["gender"].value_counts()
    assert dict(zip(raw["gender"], raw["count"])) == {"F": 55, "M": 45}
    assert summary["labels"] == {"mortality": 40}
    deaths = np.bincount(c.death.astype(np.int64), minlength=2).tolist()
    assert deaths == [60, 40]
    admissions = _raw(mimic3_dir, "ADMISSIONS")
    died = admissions.filter(pl.col("hospital_expire_flag") == "1")["subject_id"].n_unique()
    assert died == 40
    # Birth years are date-shifted (MIMIC moves patients over 89 about 300 years back) but always known.
    birth_range = (int(c.birth_year.min()), int(c.birth_year.max()))
    assert birth_range == (1844, 2181)
    age_range = (float(c.age_at_first_visit.min()), float(c.age_at_first_visit.max()))
    assert 17.0 < age_range[0] < 18.0 and age_range[1] == 90.0
    capped = int((c.age_at_first_visit == 90).sum())
    assert capped == 8  # the over-89s, reported as 90


def test_split_sizes(mimic3_dir):
    c = _read_mimic3(mimic3_dir)
    sizes = np.bincount(c.split, minlength=3).tolist()
    assert sizes == [72, 8, 20]
    parts = [counts(c.part(name)) for name in ("train", "val", "test")]
    assert [p[0] for p in parts] == [72, 8, 20]
    assert sum(p[1] for p in parts) == 129 and sum(p[2] for p in parts) == 1761 - 151  # less val/test-only codes
    other = read_mimic3(mimic3_dir, options=BuildOptions(split=(0.5, 0.25, 0.25), seed=3))
    sizes = np.bincount(other.split, minlength=3).tolist()
    assert sizes == [50, 25, 25]
    again = read_mimic3(mimic3_dir, options=BuildOptions(split=(0.5, 0.25, 0.25), seed=3))
    same = bool(np.array_equal(other.split, again.split))
    assert same


def test_procedures_and_prescriptions(mimic3_dir):
    c = read_mimic3(mimic3_dir, tables=("diagnoses", "procedures", "prescriptions"))
    systems = c.vocab.systems()
    assert systems == {"NDC": 995, "ICD9CM": 581, "ICD9PROC": 164}
    got = counts(c)
    assert got == (100, 129, 7063, 995 + 581 + 164)
    stats = c.stats
    assert stats["duplicate_events"] == 4124  # mostly the same NDC prescribed again in one admission
    prescriptions = _raw(mimic3_dir, "PRESCRIPTIONS")
    ndc = prescriptions["ndc"].str.strip_chars()
    usable = prescriptions.filter(ndc.is_not_null() & (ndc != "") & (ndc != "0"))
    assert usable["ndc"].n_unique() == 995
    assert stats["input_rows"] == 1761 + 506 + usable.height
    systems = read_mimic3(mimic3_dir, tables=("procedures",)).vocab.systems()
    assert systems == {"ICD9PROC": 164}


def test_upper_case_columns(mimic3_dir, tmp_path, mimic3_corpus):
    """The full release writes UPPER-case headers; the demo lower case. Both must read the same."""
    for name in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD"):
        frame = _raw(mimic3_dir, name)
        frame.rename({col: col.upper() for col in frame.columns}).write_csv(tmp_path / f"{name}.csv")
    c = read_mimic3(tmp_path)
    got = counts(c)
    assert got == (100, 129, 1761, 581)
    same = c.equals(mimic3_corpus)
    assert same


def test_lower_case_file_names_gzip_and_parquet(mimic3_dir, tmp_path, mimic3_corpus):
    shutil.copy(mimic3_dir / "DIAGNOSES_ICD.csv", tmp_path / "diagnoses_icd.csv")
    with open(mimic3_dir / "ADMISSIONS.csv", "rb") as src, gzip.open(tmp_path / "admissions.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    pl.read_csv(mimic3_dir / "PATIENTS.csv", infer_schema=False).write_parquet(tmp_path / "patients.parquet")
    same = read_mimic3(tmp_path).equals(mimic3_corpus)
    assert same


@pytest.mark.parametrize(("keep", "codes", "vocab"), [("last", 1314, 528), ("first", 1302, 523)])
def test_max_visits_one(mimic3_dir, keep, codes, vocab):
    c = read_mimic3(mimic3_dir, options=BuildOptions(max_visits=1, keep_visits=keep))
    got = counts(c)
    assert got == (100, 100, codes, vocab)
    stats = c.stats
    assert stats["visits_over_cap"] == 29  # 129 admissions - one kept per patient
    assert stats["patients_truncated"] == 14
    # The kept admission is each patient's latest (or earliest) one in ADMISSIONS.
    admissions = _raw(mimic3_dir, "ADMISSIONS").select(
        pl.col("subject_id"), pl.col("admittime").str.to_datetime("%Y-%m-%d %H:%M:%S")
    )
    pick = pl.col("admittime").max() if keep == "last" else pl.col("admittime").min()
    expected = admissions.group_by("subject_id").agg(pick)
    got = pl.DataFrame({"subject_id": c.patient_ids.astype(str), "admittime": c.visit_start.astype("datetime64[us]")})
    joined = got.join(expected, on="subject_id", suffix="_expected")
    matched, wrong = joined.height, joined.filter(pl.col("admittime") != pl.col("admittime_expected")).height
    assert (matched, wrong) == (100, 0)


@pytest.mark.parametrize("keep", ["last", "first"])
def test_max_visits_two_keeps_short_histories(mimic3_dir, keep):
    """Patients with fewer visits than the cap must be untouched: 86 one-visit patients keep their visit."""
    c = read_mimic3(mimic3_dir, options=BuildOptions(max_visits=2, keep_visits=keep))
    stats = c.stats
    assert stats["visits_over_cap"] == 15  # 1 + 1 + 13 beyond the cap
    assert stats["patients_truncated"] == 3
    histogram = np.bincount(c.visits_per_patient()).tolist()
    assert histogram == [0, 86, 14]
    got = counts(c)[:2]
    assert got == (100, 86 + 2 * 14)


def test_max_codes_per_visit(mimic3_dir):
    c = read_mimic3(mimic3_dir, options=BuildOptions(max_codes_per_visit=5))
    per_visit = _raw(mimic3_dir, "DIAGNOSES_ICD").group_by("hadm_id").len()["len"].cast(pl.Int64)
    dropped = int((per_visit - 5).clip(lower_bound=0).sum())
    assert dropped == 1121
    stats = c.stats
    assert stats["codes_over_visit_cap"] == 1121
    got = counts(c)
    assert got == (100, 129, 1761 - 1121, 272)
    longest = int(c.codes_per_visit().max())
    assert longest == 5
    # Caps keep the first codes by seq_num: the primary diagnosis (seq_num 1) of every admission survives.
    primary = _raw(mimic3_dir, "DIAGNOSES_ICD").filter(pl.col("seq_num") == "1")
    assert primary.height == 129
    kept = {
        (pid, code)
        for pid, visit_codes in ((c.patient_ids[p], c.patient_codes(p)) for p in range(c.n_patients))
        for codes in visit_codes for code in codes
    }
    lost = sum((s, "ICD9CM/" + code) not in kept for s, code in zip(primary["subject_id"], primary["icd9_code"]))
    assert lost == 0


def test_min_count(mimic3_dir):
    c = read_mimic3(mimic3_dir, options=BuildOptions(min_count=2))
    # 322 of the 581 codes occur in a single admission.
    visits_per_code = _raw(mimic3_dir, "DIAGNOSES_ICD").group_by("icd9_code").agg(pl.col("hadm_id").n_unique())
    assert visits_per_code.filter(pl.col("hadm_id") < 2).height == 322
    stats = c.stats
    assert (stats["codes_below_min_count"], stats["events_below_min_count"]) == (322, 322)
    got = counts(c)
    assert got == (100, 129, 1761 - 322, 581 - 322)
    rarest = int(c.vocab.counts.min())
    assert rarest == 2


def test_icd9_rollup(mimic3_dir):
    c = read_mimic3(mimic3_dir, options=BuildOptions(icd9_rollup=True))
    raw = _raw(mimic3_dir, "DIAGNOSES_ICD")
    value = raw["icd9_code"]
    rolled = pl.select(
        pl.when(value.str.starts_with("E")).then(value.str.slice(0, 4)).otherwise(value.str.slice(0, 3))
    ).to_series()
    assert rolled.n_unique() == 275
    got = counts(c)
    assert got == (100, 129, 1624, 275)
    stats = c.stats
    assert stats["duplicate_events"] == 1761 - 1624  # codes of one category merged within an admission
    e_codes = [code for code in c.vocab.codes if code.startswith("ICD9CM/E")]
    assert len(e_codes) == 22
    assert all(len(code) == len("ICD9CM/") + 4 for code in e_codes)
    assert "ICD9CM/E885" in e_codes  # e.g. E8859 (fall from slipping) rolls to E885
    assert all(len(code) == len("ICD9CM/") + 3 for code in c.vocab.codes if code not in e_codes)


@pytest.mark.parametrize(("empty", "patients", "visits"), [("drop", 88, 113), ("keep", 100, 129)])
def test_empty_visits_keep_or_drop(mimic3_dir, empty, patients, visits):
    """16 admissions (of 12 patients) have no procedure: dropped or kept as empty visits, counted both ways."""
    admissions = _raw(mimic3_dir, "ADMISSIONS")
    procedures = _raw(mimic3_dir, "PROCEDURES_ICD")
    assert admissions.join(procedures, on="hadm_id", how="anti").height == 16
    c = read_mimic3(mimic3_dir, tables=("procedures",), options=BuildOptions(empty=empty))
    got = counts(c)
    assert got == (patients, visits, 486, 164)
    stats = c.stats
    assert stats["empty_visits"] == 16
    assert stats["duplicate_events"] == 20  # the same procedure coded twice in one admission
    empty_in_corpus = int((c.codes_per_visit() == 0).sum())
    assert empty_in_corpus == (16 if empty == "keep" else 0)
    assert stats["patients_without_codes"] == 12  # counted whether they are kept or dropped


def test_systems_filter_counts_other_systems(mimic3_dir):
    c = read_mimic3(mimic3_dir, tables=("diagnoses", "procedures"), options=BuildOptions(systems=("ICD9PROC",)))
    systems = c.vocab.systems()
    assert systems == {"ICD9PROC": 164}
    stats = c.stats
    assert stats["events_other_systems"] == 1761
    got = counts(c)
    assert got == (88, 113, 486, 164)
