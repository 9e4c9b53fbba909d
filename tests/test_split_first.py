"""Split-first corpora and rare-code protection on the MIMIC-III demo: the vocabulary, its counts and every
code filter come from training patients only; what held-out and rare codes cost is counted per part."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus, concat_corpora, held_out_only_codes
from ehrsynth.data.readers.mimic3 import read_mimic3
from ehrsynth.errors import ConfigError, InputError
from ehrsynth.pipeline import train_model

ALL_TRAIN = BuildOptions(split=(1.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def mimic3_dir(data_dir):
    return data_dir / "mimic-iii-demo"


@pytest.fixture(scope="module")
def whole(mimic3_dir):
    """Every patient in train: the source's own codes (581 diagnoses), in the same patient order."""
    return read_mimic3(mimic3_dir, options=ALL_TRAIN)


def _codes_by_patient(corpus, patients) -> list[set[str]]:
    return [{c for visit in corpus.patient_codes(p) for c in visit} for p in patients]


def test_vocabulary_and_counts_come_from_training_patients(mimic3_corpus, whole):
    assert np.array_equal(whole.patient_ids.astype(str), mimic3_corpus.patient_ids.astype(str))
    train = np.flatnonzero(mimic3_corpus.split == 0)
    train_codes = set().union(*_codes_by_patient(whole, train))
    assert set(mimic3_corpus.vocab.codes) == train_codes and len(train_codes) == 453
    stats = mimic3_corpus.stats
    assert (stats["codes_only_outside_train"], stats["events_only_outside_train"]) == (128, 151)
    assert stats["vocabulary_from"] == "train"
    # counts are training visits holding each code, not visits of every patient
    train_part = mimic3_corpus.part("train")
    assert np.array_equal(mimic3_corpus.vocab.counts, np.bincount(train_part.codes, minlength=453))
    assert int(mimic3_corpus.vocab.counts.sum()) == train_part.n_codes < mimic3_corpus.n_codes
    # held-out patients lose exactly their codes no training patient has
    held_out = np.flatnonzero(mimic3_corpus.split > 0)
    kept = _codes_by_patient(mimic3_corpus, held_out)
    assert kept == [codes & train_codes for codes in _codes_by_patient(whole, held_out)]


def test_min_patients_counts_distinct_training_patients(mimic3_corpus, mimic3_dir):
    c = read_mimic3(mimic3_dir, options=BuildOptions(min_patients=5))
    stats = c.stats
    assert (stats["codes_below_min_patients"], stats["events_below_min_patients"]) == (404, 816)
    assert c.vocab_size == 453 - 404
    train = c.part("train")
    patients_per_code = np.bincount(np.unique(train.visit_patient()[train.code_visit()] * c.vocab_size
                                              + train.codes) % c.vocab_size, minlength=c.vocab_size)
    assert int(patients_per_code.min()) >= 5
    # 2 training patients had only rarer codes: dropped under --empty drop, kept (with empty visits) under keep
    assert stats["patients_emptied_by_vocabulary"] == {"train": 2, "val": 0, "test": 0}
    assert np.bincount(c.split, minlength=3).tolist() == [70, 8, 20]
    kept = read_mimic3(mimic3_dir, options=BuildOptions(min_patients=5, empty="keep"))
    assert np.bincount(kept.split, minlength=3).tolist() == [72, 8, 20]
    assert int((kept.codes_per_visit() == 0).sum()) == 2
    with pytest.raises(ConfigError, match="min_patients"):
        BuildOptions(min_patients=0)


def test_min_count_counts_training_visits(mimic3_dir):
    c = read_mimic3(mimic3_dir, options=BuildOptions(min_count=2))
    assert (c.stats["codes_below_min_count"], c.stats["events_below_min_count"]) == (266, 334)
    assert c.vocab_size == 453 - 266 and int(c.vocab.counts.min()) == 2


def test_concat_and_stream_merge_count_training_patients(mimic3_corpus, tmp_path):
    from ehrsynth.data.stream import save_stream

    parts = [mimic3_corpus.subset(np.arange(s, min(s + 40, 100))) for s in range(0, 100, 40)]
    stacked = concat_corpora(parts)
    assert np.array_equal(stacked.vocab.counts, mimic3_corpus.vocab.counts)
    merged = save_stream(iter(parts), tmp_path / "merged")
    assert np.array_equal(merged.vocab.counts, mimic3_corpus.vocab.counts)
    assert merged.stats["vocabulary_from"] == "train" and len(held_out_only_codes(merged)) == 0


def test_older_corpora_load_and_are_scanned_before_training(mimic3_corpus, whole, tmp_path):
    """A corpus saved before split-first (no ``vocabulary_from``) still loads; training scans it and refuses
    when its vocabulary holds codes only val/test patients have."""
    # the old layout: vocabulary of all patients, split afterwards
    old = replace(whole, split=mimic3_corpus.split,
                  stats={k: v for k, v in whole.stats.items() if k != "vocabulary_from"})
    old.save(tmp_path / "old")
    header = json.loads((tmp_path / "old" / "corpus.json").read_text())
    assert header["version"] == 2 and "vocabulary_from" not in header["stats"]
    loaded = PatientCorpus.load(tmp_path / "old")
    assert loaded.equals(old) and len(held_out_only_codes(loaded)) == 128
    with pytest.raises(InputError, match="128 vocabulary codes occur only in val/test"):
        train_model("halo", tmp_path / "old", tmp_path / "run", model_options={"n_layer": 1, "n_embd": 16,
                                                                              "n_head": 2})
    assert not (tmp_path / "run").exists()
    scanned = dict(mimic3_corpus.stats)
    scanned.pop("vocabulary_from")
    assert len(held_out_only_codes(replace(mimic3_corpus, stats=scanned))) == 0  # a split-first corpus passes


def test_with_split_resplits_split_first(mimic3_corpus, whole):
    """Re-splitting rebuilds the vocabulary from the new training patients, exactly as prepare would."""
    again = whole.with_split(seed=0)  # the same seeded split of the same 100 patients
    assert again.equals(mimic3_corpus) and again.vocab == mimic3_corpus.vocab
    assert again.stats["codes_only_outside_train_at_resplit"] == 128
    other = mimic3_corpus.with_split((0.5, 0.25, 0.25), seed=3)
    assert len(held_out_only_codes(replace(other, stats={}))) == 0  # scanned: nothing held out remains
    assert other.n_codes < mimic3_corpus.n_codes and np.all(np.diff(other.vocab.counts) <= 0)
