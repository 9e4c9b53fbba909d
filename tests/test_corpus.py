"""PatientCorpus: CSR invariants, selection, dense views, save/load round trip."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ehrsynth.data.corpus import PatientCorpus, concat_corpora, ragged_indices
from ehrsynth.errors import ConfigError, InputError, MissingFileError


def test_ragged_indices():
    assert ragged_indices(np.array([3, 0, 7]), np.array([5, 0, 9])).tolist() == [3, 4, 7, 8]


def test_save_load_round_trip_is_exact(mimic3_corpus, tmp_path):
    path = mimic3_corpus.save(tmp_path / "c")
    loaded = PatientCorpus.load(path)
    assert loaded.equals(mimic3_corpus)
    assert loaded.vocab == mimic3_corpus.vocab
    assert loaded.stats == mimic3_corpus.stats
    assert isinstance(loaded.codes, np.memmap)  # memory-mapped, not read
    assert isinstance(loaded.patient_ids, np.memmap)  # identifiers too: nothing grows with the patient count
    assert not list(tmp_path.glob(".c.*"))  # no staging directory left behind
    # saving over an existing corpus replaces it whole
    mimic3_corpus.part("test").save(path)
    assert PatientCorpus.load(path).n_patients == 20


def test_corpus_saved_with_parquet_identifiers_still_loads(mimic3_corpus, tmp_path):
    import polars as pl

    path = mimic3_corpus.save(tmp_path / "c")
    ids = np.load(path / "patient_ids.npy")
    pl.DataFrame({"patient_id": ids}).write_parquet(path / "patients.parquet")  # format version 1
    (path / "patient_ids.npy").unlink()
    header = json.loads((path / "corpus.json").read_text())
    (path / "corpus.json").write_text(json.dumps({**header, "version": 1}))
    assert PatientCorpus.load(path).equals(mimic3_corpus)
    (path / "corpus.json").write_text(json.dumps({**header, "version": 3}))
    with pytest.raises(InputError, match="unsupported corpus format"):
        PatientCorpus.load(path)
    (path / "corpus.json").write_text(json.dumps(header))
    (path / "patients.parquet").unlink()
    with pytest.raises(MissingFileError, match="patient identifiers"):
        PatientCorpus.load(path)


def test_load_errors_name_the_directory(tmp_path):
    with pytest.raises(MissingFileError, match="no corpus.json"):
        PatientCorpus.load(tmp_path)


def test_parts_subset_and_concat(mimic3_corpus):
    parts = [mimic3_corpus.part(name) for name in ("train", "val", "test")]
    assert [p.n_patients for p in parts] == [72, 8, 20]
    assert sum(p.n_codes for p in parts) == 1610  # 1,761 rows less 151 of codes only val/test patients have
    assert sum(p.n_visits for p in parts) == 129
    ids = np.concatenate([p.patient_ids for p in parts])
    assert len(set(ids)) == 100
    order = np.argsort(mimic3_corpus.split, kind="stable")
    stacked = concat_corpora(parts)
    assert stacked.equals(mimic3_corpus.subset(order))
    assert np.array_equal(stacked.vocab.counts, mimic3_corpus.vocab.counts)  # recounted: every patient is back
    with pytest.raises(ConfigError, match="split part"):
        mimic3_corpus.part("holdout")


def test_split_is_seeded(mimic3_corpus):
    a = mimic3_corpus.with_split(seed=1).split
    assert np.array_equal(a, mimic3_corpus.with_split(seed=1).split)
    assert not np.array_equal(a, mimic3_corpus.with_split(seed=2).split)
    with pytest.raises(ConfigError, match="fractions"):
        mimic3_corpus.with_split((0.5, 0.5, 0.5))


def test_multi_hot_matches_code_lists(mimic3_corpus):
    patients = np.array([5, 0, 42])
    dense = mimic3_corpus.patient_multi_hot(patients)
    assert dense.shape == (3, 453)  # the 581 diagnoses less 128 only val/test patients have
    index = mimic3_corpus.vocab.index()
    for row, p in enumerate(patients):
        expected = {index[c] for visit in mimic3_corpus.patient_codes(p) for c in visit}
        assert set(np.flatnonzero(dense[row])) == expected


def test_codes_sorted_by_frequency_within_visits(mimic3_corpus):
    counts = mimic3_corpus.vocab.counts
    assert np.all(np.diff(counts) <= 0)
    cpv = mimic3_corpus.codes_per_visit()
    starts = np.repeat(mimic3_corpus.code_offsets[:-1], cpv)
    within = np.arange(mimic3_corpus.n_codes) - starts
    codes = np.asarray(mimic3_corpus.codes)
    assert np.all(codes[1:][within[1:] > 0] > codes[:-1][within[1:] > 0])  # strictly ascending ids per visit


def test_describe_is_aggregate_only(mimic3_corpus):
    summary = mimic3_corpus.describe()
    assert summary["patients"] == 100 and summary["visits"] == 129 and summary["code_occurrences"] == 1610
    assert summary["visits_per_patient"]["max"] == 15
    assert summary["codes_per_visit"]["mean"] == pytest.approx(1610 / 129, abs=1e-4)
    assert summary["labels"] == {"mortality": 40}
    text = repr(summary)
    assert not any(str(pid) in text for pid in mimic3_corpus.patient_ids[:20])


def test_flatten_visits_keeps_every_code_once(mimic3_corpus):
    flat = mimic3_corpus.flatten_visits()
    assert flat.n_patients == 100 and flat.n_visits == 100
    assert np.array_equal(flat.patient_multi_hot(np.arange(100)), mimic3_corpus.patient_multi_hot(np.arange(100)))
    assert flat.n_codes == int(mimic3_corpus.patient_multi_hot(np.arange(100)).sum())  # 1,741 < 1,761 occurrences
    assert np.all(flat.visit_days == 0)


def test_save_stream_merges_chunks_exactly(mimic3_corpus, tmp_path):
    from ehrsynth.data.stream import save_stream

    parts = [mimic3_corpus.subset(np.arange(start, min(start + 30, 100))) for start in range(0, 100, 30)]
    parts[1] = dataclasses.replace(parts[1], patient_ids=np.array([f"long-identifier-{i}" for i in range(30)]))
    merged = save_stream(iter(parts), tmp_path / "merged")
    assert merged.patient_ids[35] == "long-identifier-5"  # chunks of different identifier widths
    parts[1] = mimic3_corpus.subset(np.arange(30, 60))
    merged = save_stream(iter(parts), tmp_path / "merged")
    assert isinstance(merged.codes, np.memmap)
    assert merged.equals(concat_corpora(parts)) and merged.equals(mimic3_corpus)
    assert np.array_equal(merged.vocab.counts, mimic3_corpus.vocab.counts)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging left behind
    with pytest.raises(ConfigError, match="no chunk"):
        save_stream(iter([]), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
