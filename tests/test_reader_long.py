"""Long reader: a table written from the MIMIC-III corpus (patient, visit, code, time and statics) reads back to
the same counts, vocabulary and statics, whether the visit is an id with a time column or the time itself.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.long import read_long as _read_long

from conftest import all_train

read_long = all_train(_read_long)  # source facts: every patient in train


def counts(corpus) -> tuple[int, int, int, int]:
    """(patients, visits, code occurrences, vocabulary size): assert on these, never on the corpus repr."""
    return corpus.n_patients, corpus.n_visits, corpus.n_codes, corpus.vocab_size


def long_table(corpus) -> pl.DataFrame:
    """One row per code occurrence of ``corpus``, with its patient's statics repeated on each row."""
    visit = corpus.code_visit()  # (N,) visit of each occurrence
    patient = corpus.visit_patient()[visit]  # (N,) patient of each occurrence
    return pl.DataFrame({
        "patient": corpus.patient_ids.astype(str)[patient],
        "visit": visit.astype(str),
        "time": corpus.visit_start[visit].astype("datetime64[us]"),
        "code": np.asarray(corpus.vocab.codes, dtype=object)[corpus.codes],
        "sex": np.array(["F", "M"])[corpus.sex[patient]],
        "birth_year": corpus.birth_year[patient],
        "death": corpus.death[patient],
        "label:mortality": corpus.labels[patient, 0],
    }).with_columns(pl.col("time").dt.strftime("%Y-%m-%d %H:%M:%S"))


@pytest.fixture(scope="module")
def mimic3_corpus(data_dir):
    from ehrsynth.data.readers.mimic3 import read_mimic3

    return all_train(read_mimic3)(data_dir / "mimic-iii-demo")


@pytest.fixture(scope="module")
def mimic3_long(mimic3_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "mimic3_long.csv"
    long_table(mimic3_corpus).write_csv(path)
    return path


def test_table_from_mimic3_reads_back_the_same(mimic3_corpus, mimic3_long):
    c = read_long(mimic3_long, time="time")
    got = counts(c)
    assert got == (100, 129, 1761, 581)
    stats = c.stats
    assert (stats["input_rows"], stats["duplicate_events"], stats["empty_visits"]) == (1761, 0, 0)
    same_vocab = c.vocab == mimic3_corpus.vocab
    assert same_vocab
    summary = c.describe()
    assert summary["sex"] == {"F": 55, "M": 45, "unknown": 0}
    assert summary["labels"] == {"mortality": 40}
    assert summary["split"] == {"train": 100, "val": 0, "test": 0}
    same = {name: bool(np.array_equal(getattr(c, name), getattr(mimic3_corpus, name)))
            for name in ("visit_offsets", "code_offsets", "codes", "visit_start", "birth_year", "death", "sex")}
    assert same == dict.fromkeys(same, True)


def test_time_as_visit_key(mimic3_corpus, mimic3_long, tmp_path):
    """With the admission time as the visit key (no visit id), admissions of one patient stay apart."""
    path = tmp_path / "by_time.parquet"
    pl.read_csv(mimic3_long, infer_schema=False).drop("visit").rename({"time": "visit"}).write_parquet(path)
    c = read_long(path)
    got = counts(c)
    assert got == (100, 129, 1761, 581)
    same_days = bool(np.array_equal(c.visit_days, mimic3_corpus.visit_days))
    assert same_days


def test_code_system_prefix(mimic3_long, tmp_path):
    path = tmp_path / "bare.csv"
    frame = pl.read_csv(mimic3_long, infer_schema=False)
    frame.with_columns(pl.col("code").str.strip_prefix("ICD9CM/")).write_csv(path)
    c = read_long(path, time="time", code_system="ICD9CM")
    systems = c.vocab.systems()
    assert systems == {"ICD9CM": 581}


def test_custom_column_names_and_options(mimic3_long, tmp_path):
    path = tmp_path / "renamed.csv"
    frame = pl.read_csv(mimic3_long, infer_schema=False)
    frame.rename({"patient": "SUBJECT", "visit": "Admission", "code": "DX", "time": "When"}).write_csv(path)
    c = read_long(path, patient="SUBJECT", visit="Admission", code="DX", time="When",
                  options=BuildOptions(min_count=2, max_codes_per_visit=5))
    stats = c.stats
    assert (stats["codes_below_min_count"], stats["codes_over_visit_cap"]) == (322, 818)
    got = counts(c)
    assert got == (100, 129, 1761 - 322 - 818, 101)
    # Row order is code-id order (most frequent first), so the cap keeps each visit's 5 most frequent codes.
    longest = int(c.codes_per_visit().max())
    assert longest == 5
