"""Synthea reader on the real 111-patient export: exact counts, statics, optional tables, encounter fallback."""

from __future__ import annotations

import re
import shutil

import numpy as np
import polars as pl
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.readers.synthea import read_synthea as _read_synthea
from ehrsynth.errors import ConfigError, MissingColumnError, MissingFileError

from conftest import all_train

read_synthea = all_train(_read_synthea)  # source facts: every patient in train


def counts(corpus) -> tuple[int, int, int, int]:
    """(patients, visits, code occurrences, vocabulary size): assert on these, never on the corpus repr."""
    return corpus.n_patients, corpus.n_visits, corpus.n_codes, corpus.vocab_size


@pytest.fixture(scope="module")
def synthea_dir(data_dir):
    return data_dir / "synthea-111"


@pytest.fixture(scope="module")
def synthea_corpus(synthea_dir):
    return read_synthea(synthea_dir)


def _raw(directory, name: str) -> pl.DataFrame:
    return pl.read_csv(directory / f"{name}.csv", infer_schema=False)


def _copy(synthea_dir, tmp_path, names=("patients", "encounters", "conditions")):
    for name in names:
        shutil.copy(synthea_dir / f"{name}.csv", tmp_path / f"{name}.csv")
    return tmp_path


def test_default_acceptance_counts(synthea_corpus, synthea_dir):
    got = counts(synthea_corpus)
    assert got == (111, 3116, 4428, 165)  # 4,428 condition rows on 3,116 encounters
    systems = synthea_corpus.vocab.systems()
    assert systems == {"SNOMED": 165}
    conditions = _raw(synthea_dir, "conditions")
    assert (conditions["CODE"].n_unique(), conditions["ENCOUNTER"].n_unique()) == (165, 3116)
    stats = synthea_corpus.stats
    assert stats["empty_visits"] == 7584 - 3116  # every encounter is a visit; those without a condition
    assert (stats["duplicate_events"], stats["events_without_encounter"], stats["missing_tables"]) == (0, 0, 0)


def test_statics(synthea_corpus, synthea_dir):
    c = synthea_corpus
    summary = c.describe()
    assert summary["sex"] == {"F": 69, "M": 42, "unknown": 0}
    assert summary["labels"] == {}
    assert summary["split"] == {"train": 111, "val": 0, "test": 0}  # all_train
    assert np.bincount(_read_synthea(synthea_dir).split, minlength=3).tolist() == [80, 9, 22]
    deaths = np.bincount(c.death.astype(np.int64), minlength=2).tolist()
    assert deaths == [100, 11]  # 11 patients have a DEATHDATE
    patients = _raw(synthea_dir, "patients").select(
        pl.col("Id"), pl.col("BIRTHDATE").str.slice(0, 4).cast(pl.Int64).alias("birth_year")
    )
    got = pl.DataFrame({"Id": c.patient_ids.astype(str), "got": c.birth_year.astype(np.int64)})
    joined = got.join(patients, on="Id")
    wrong = (joined.height, joined.filter(pl.col("got") != pl.col("birth_year")).height)
    assert wrong == (111, 0)
    # Age at the first visit with a condition, from the birth date: never negative, at most a long life.
    age_range = (float(c.age_at_first_visit.min()), float(c.age_at_first_visit.max()))
    assert 0.0 <= age_range[0] and age_range[1] < 110.0


def test_all_tables(synthea_dir):
    c = read_synthea(synthea_dir, tables=("conditions", "procedures", "medications"))
    systems = c.vocab.systems()
    assert systems == {"SNOMED": 165 + 182, "RXNORM": 128}
    got = counts(c)
    assert got == (111, 7020, 21414, 475)
    stats = c.stats
    assert stats["input_rows"] == 4428 + 11742 + 6124 + 7584
    assert stats["duplicate_events"] == 880
    medications = read_synthea(synthea_dir, tables=("medications",))
    got = counts(medications)
    assert got == (104, got[1], got[2], 128)  # 7 patients never had a medication


def test_unknown_table_is_refused(synthea_dir):
    with pytest.raises(ConfigError, match=re.escape("'allergies'")):
        read_synthea(synthea_dir, tables=("conditions", "allergies"))


def test_missing_optional_table_is_counted(synthea_dir, tmp_path, synthea_corpus):
    directory = _copy(synthea_dir, tmp_path)
    c = read_synthea(directory, tables=("conditions", "medications"))
    stats = c.stats
    assert (stats["missing_tables"], stats["missing_table_names"]) == (1, ["medications"])
    got = counts(c)
    assert got == (111, 3116, 4428, 165)


def test_only_requested_table_missing_is_an_error(synthea_dir, tmp_path):
    directory = _copy(synthea_dir, tmp_path)
    with pytest.raises(MissingFileError, match=re.escape(f"{directory}: required table 'medications'")):
        read_synthea(directory, tables=("medications",))


def test_missing_encounters_column(synthea_dir, tmp_path):
    directory = _copy(synthea_dir, tmp_path, names=("patients", "conditions"))
    _raw(synthea_dir, "encounters").drop("START").write_csv(directory / "encounters.csv")
    pattern = re.escape(f"{directory / 'encounters.csv'}, column 'start': required column missing")
    with pytest.raises(MissingColumnError, match=pattern):
        read_synthea(directory)


def test_unknown_encounter_falls_back_to_event_date(synthea_dir, tmp_path):
    """Rows whose ENCOUNTER is unknown or blank become visits keyed by (patient, START date), and are counted."""
    directory = _copy(synthea_dir, tmp_path, names=("patients", "encounters"))
    conditions = _raw(synthea_dir, "conditions")
    broken = conditions.with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("no-such-encounter")).otherwise(pl.lit(None))
        .alias("ENCOUNTER")
    )
    broken.write_csv(directory / "conditions.csv")
    c = read_synthea(directory)
    stats = c.stats
    assert (stats["events_without_encounter"], stats["events_without_visit"]) == (4428, 0)
    # Independently: one visit per distinct (patient, day), one code occurrence per distinct (patient, day, code).
    days = conditions.select("PATIENT", pl.col("START").str.slice(0, 10).alias("day"), "CODE")
    expected = (111, days.select("PATIENT", "day").unique().height, days.unique().height, 165)
    got = counts(c)
    assert got == expected
    assert got == (111, 3115, 4428, 165)  # two of the 3,116 coded encounters share a patient and a day
    assert stats["duplicate_events"] == 0
    assert stats["empty_visits"] == 7584  # no encounter holds a code any more


def test_upper_case_file_names(synthea_dir, tmp_path, synthea_corpus):
    for name in ("patients", "encounters", "conditions"):
        shutil.copy(synthea_dir / f"{name}.csv", tmp_path / f"{name.upper()}.CSV")
    same = read_synthea(tmp_path).equals(synthea_corpus)
    assert same


def test_caps_and_min_count(synthea_dir):
    """min_count applies before the visit cap; the cap then counts exactly what it cut."""
    frequent = read_synthea(synthea_dir, options=BuildOptions(min_count=5))
    stats = frequent.stats
    assert (stats["codes_below_min_count"], stats["events_below_min_count"]) == (92, 202)
    got = counts(frequent)
    assert got == (111, 3023, 4428 - 202, 165 - 92)
    per_patient = frequent.visits_per_patient()
    c = read_synthea(synthea_dir, options=BuildOptions(max_visits=10, keep_visits="first", min_count=5))
    stats = c.stats
    expected_cut = (int(np.maximum(per_patient - 10, 0).sum()), int((per_patient > 10).sum()))
    assert (stats["visits_over_cap"], stats["patients_truncated"]) == expected_cut == (1967, 92)
    got = counts(c)
    assert got == (111, int(np.minimum(per_patient, 10).sum()), 1189, 66)
    assert got[1] == 1056
