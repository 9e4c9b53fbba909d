"""The CLI end to end: prepare -> train -> generate (every format) -> perplexity, plus resume and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ehrsynth.data.build import BuildOptions
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.readers import read_source


def run(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", "ehrsynth.cli", *map(str, args)], capture_output=True, text=True)
    if ok:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("cli")
    run("prepare", "--source", "mimic3", "--input", data_dir / "mimic-iii-demo", "--output", root / "corpus",
        "--profile", "research")
    run("train", "halo", "--data", root / "corpus", "--out", root / "run", "--preset", "small",
        "--max-steps", 20, "--batch-size", 12, "--lr", 1e-3)
    return root


def test_prepare_and_describe(trained):
    out = run("describe", trained / "corpus", "--json")
    summary = json.loads(out.stdout)
    # split-first: the 151 diagnosis rows of the 128 codes that only val/test patients have are dropped
    assert (summary["patients"], summary["visits"], summary["code_occurrences"]) == (100, 129, 1761 - 151)
    assert (summary["build"]["codes_only_outside_train"], summary["build"]["events_only_outside_train"]) == (128, 151)
    text = run("describe", trained / "corpus").stdout
    assert "128 codes only in val/test dropped" in text and "profile research, min patients 1" in text


def test_model_vocabulary_holds_training_codes_only(trained, data_dir):
    """Nothing held out shapes the model: no code that only val/test patients have is in model.json."""
    whole = read_source("mimic3", data_dir / "mimic-iii-demo", options=BuildOptions(split=(1.0, 0.0, 0.0)))
    split = PatientCorpus.load(trained / "corpus").split  # the same patients, in the same order
    assert np.array_equal(whole.patient_ids.astype(str), PatientCorpus.load(trained / "corpus").patient_ids)
    train_codes = {c for p in np.flatnonzero(split == 0) for visit in whole.patient_codes(p) for c in visit}
    held_out_only = set(whole.vocab.codes) - train_codes
    assert len(held_out_only) == 128
    model_codes = set(json.loads((trained / "run" / "model" / "model.json").read_text())["meta"]["codes"])
    assert model_codes == train_codes and not model_codes & held_out_only


def test_train_writes_run_and_refuses_silent_reuse(trained):
    resolved = json.loads((trained / "run" / "config.json").read_text())
    assert resolved["model"]["n_embd"] == 128 and resolved["training"]["max_steps"] == 20
    assert len((trained / "run" / "metrics.jsonl").read_text().splitlines()) >= 2
    again = run("train", "halo", "--data", trained / "corpus", "--out", trained / "run", "--preset", "small",
                ok=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run("train", "halo", "--data", trained / "corpus", "--out", trained / "run", "--resume",
                  "--max-steps", 25)
    assert "trained 20 steps" in resumed.stdout  # the run keeps the settings it started with (max_steps 20)


@pytest.mark.parametrize("fmt", ["corpus", "long", "meds", "omop"])
def test_generate_every_format_reads_back(trained, fmt):
    out_dir = trained / f"synthetic_{fmt}"
    run("generate", trained / "run", "-n", 40, "--out", out_dir, "--format", fmt, "--seed", 3,
        "--condition", "label:mortality=1")
    from ehrsynth.pipeline import generate_corpus

    expected = generate_corpus(trained / "run", 40, seed=3, conditions={"label:mortality": "1"}, progress=False)
    with_codes = _patients_with_codes(expected)
    if fmt == "corpus":
        corpus = PatientCorpus.load(out_dir)
        assert corpus.equals(expected)
        assert corpus.label_names == ("mortality",) and int(corpus.labels.sum()) == 40
        return
    corpus = read_source(fmt, out_dir / "long.parquet" if fmt == "long" else out_dir,
                         options=BuildOptions(split=(1.0, 0.0, 0.0)))  # synthetic records: all kept
    # patients the model gave no code at all have no row to write; everyone else comes back
    assert corpus.n_patients == with_codes
    assert corpus.n_codes == expected.n_codes


def _patients_with_codes(corpus):
    codes_per_patient = np.add.reduceat(np.append(corpus.codes_per_visit(), 0), corpus.visit_offsets[:-1]) \
        * (corpus.visits_per_patient() > 0)
    return int((codes_per_patient > 0).sum())


def test_same_seed_same_patients(trained):
    run("generate", trained / "run", "-n", 30, "--out", trained / "a", "--seed", 5)
    run("generate", trained / "run", "-n", 30, "--out", trained / "b", "--seed", 5, "--batch-size", 7)
    assert PatientCorpus.load(trained / "a").equals(PatientCorpus.load(trained / "b"))


def test_perplexity(trained):
    out = run("perplexity", trained / "run", "--data", trained / "corpus", "--part", "test")
    result = json.loads(out.stdout)
    assert result["per_code_perplexity"] > 1 and result["per_visit_perplexity"] > 1
    assert result["patients"] == 20


def test_bad_input_exits_2_without_output(trained):
    bad = run("generate", trained / "nope", "-n", 5, "--out", trained / "never", ok=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (trained / "never").exists()
    bad = run("generate", trained / "run", "-n", 5, "--out", trained / "never", "--condition", "oops", ok=False)
    assert bad.returncode == 2 and "--condition" in bad.stderr


def test_family_specific_flags_are_refused_by_name(trained):
    bad = run("generate", trained / "run", "-n", 5, "--out", trained / "never2", "--steps", 8, ok=False)
    assert bad.returncode == 2 and "--steps/--guidance apply to EHRDiff" in bad.stderr
    assert not (trained / "never2").exists()
