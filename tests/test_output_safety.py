"""Outputs never destroy what is not theirs: every command refuses foreign, other-kind and overlapping output
paths (exit 2, contents intact), replaces its own kind only with --overwrite, leaves no staging or ``.old``
copies, cleans staging of killed runs, and follows the umask (a prepared corpus stays private)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ehrsynth.cli import cli
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import OutputError
from ehrsynth.outputs import MARKER, output_kind, replace_directory, staged_output

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = ("--preset", "small", "--max-steps", 2, "--batch-size", 12)


def ehrsynth(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result, *words):
    """Exit 2 with one line naming ``words`` (the flag and the path)."""
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and len(message) < 300, message
    for word in words:
        assert str(word) in message, message
    return message


def snapshot(path: Path) -> dict:
    """Every file and folder under ``path`` (or the file itself) with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".old" in p.name or p.name.startswith(".ehrsynth-staging")]


def foreign_dir(path: Path) -> Path:
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "a.txt").write_text("mine")
    (path / "corpus.json").write_text("{}")  # looks a bit like ours, but is not
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("safety")
    assert ehrsynth("prepare", "--source", "mimic3", "--input", data_dir / "mimic-iii-demo",
                    "--output", root / "corpus").exit_code == 0
    assert ehrsynth("train", "halo", "--data", root / "corpus", "--out", root / "run", *TINY_TRAIN).exit_code == 0
    assert ehrsynth("generate", root / "run", "-n", 20, "--out", root / "synthetic").exit_code == 0
    return root


@pytest.fixture
def work(base, tmp_path):
    """A private copy of the fixture outputs per test."""
    for name in ("corpus", "run", "synthetic"):
        shutil.copytree(base / name, tmp_path / name)
    return tmp_path


# ---- prepare ------------------------------------------------------------------------------------------------
def test_prepare_refuses_foreign_paths_and_overlapping_inputs(work, data_dir):
    mimic = data_dir / "mimic-iii-demo"
    target = foreign_dir(work / "mine")
    before = snapshot(target)
    for flags in ((), ("--overwrite",)):
        refused(ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", target, *flags),
                "--output", target, "not written by ehrsynth")
    assert snapshot(target) == before
    note = work / "note.txt"
    note.write_text("keep me")
    refused(ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", note, "--overwrite"), note)
    assert note.read_text() == "keep me" and not leftovers(work)
    refused(ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", note / "corpus"),
            "--output", "is a file")
    refused(ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", work / "run", "--overwrite"),
            "holds an ehrsynth run output")
    # the input itself, a folder inside it, a folder holding it: refused even with --overwrite
    raw = work / "raw" / "mimic"
    shutil.copytree(mimic, raw)
    raw_before = snapshot(work / "raw")
    for output, relation in ((raw, "is the same path as"), (raw / "corpus", "is inside"),
                             (work / "raw", "contains")):
        refused(ehrsynth("prepare", "--source", "mimic3", "--input", raw, "--output", output, "--overwrite"),
                "--output", relation, "--input")
    link = work / "link"  # paths are compared after resolving links, both ways
    link.symlink_to(raw)
    refused(ehrsynth("prepare", "--source", "mimic3", "--input", link, "--output", raw, "--overwrite"),
            "is the same path as")
    refused(ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", link, "--overwrite"),
            "symbolic link")
    assert snapshot(work / "raw") == raw_before and link.resolve() == raw


def test_prepare_overwrites_its_own_corpus_privately(work, data_dir):
    mimic = data_dir / "mimic-iii-demo"
    refused(ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", work / "corpus"), "--overwrite")
    (work / "corpus" / MARKER).unlink()  # a corpus saved before markers is still recognised
    assert output_kind(work / "corpus") == "corpus"
    previous = os.umask(0o022)
    try:
        result = ehrsynth("prepare", "--source", "mimic3", "--input", mimic, "--output", work / "corpus",
                          "--max-visits", 1, "--profile", "research", "--overwrite")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    corpus = PatientCorpus.load(work / "corpus")
    assert corpus.n_patients == 100 and corpus.n_visits == 100  # the new corpus, not the old (129 visits)
    assert output_kind(work / "corpus") == "corpus" and not leftovers(work)
    assert (work / "corpus").stat().st_mode & 0o777 == 0o700  # real patients stay private
    assert {p.stat().st_mode & 0o777 for p in (work / "corpus").iterdir()} == {0o600}


# ---- train --------------------------------------------------------------------------------------------------
def test_train_refuses_foreign_other_kind_and_its_own_data(work):
    target = foreign_dir(work / "mine")
    before = snapshot(target)
    refused(ehrsynth("train", "halo", "--data", work / "corpus", "--out", target, "--overwrite", *TINY_TRAIN),
            "--out", target)
    refused(ehrsynth("train", "halo", "--data", work / "corpus", "--out", target, "--resume", *TINY_TRAIN), target)
    assert snapshot(target) == before
    corpus_before = snapshot(work / "corpus")
    for out, relation in ((work / "corpus", "is the same path as"), (work / "corpus" / "run", "is inside")):
        refused(ehrsynth("train", "halo", "--data", work / "corpus", "--out", out, "--overwrite", *TINY_TRAIN),
                relation, "--data")
    refused(ehrsynth("train", "halo", "--data", work / "corpus", "--out", work / "synthetic", "--overwrite",
                     *TINY_TRAIN), "holds an ehrsynth synthetic output")
    assert snapshot(work / "corpus") == corpus_before
    refused(ehrsynth("train", "halo", "--data", work / "corpus", "--out", work / "run", *TINY_TRAIN),
            "--resume", "--overwrite")


def test_train_overwrite_replaces_a_run_and_follows_the_umask(work):
    (work / "run" / MARKER).unlink()  # a run saved before markers is still recognised
    previous = os.umask(0o027)
    try:
        result = ehrsynth("train", "halo", "--data", work / "corpus", "--out", work / "run", "--overwrite",
                          "--preset", "small", "--max-steps", 3, "--batch-size", 12, "--seed", 7)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert json.loads((work / "run" / "config.json").read_text())["training"]["seed"] == 7
    assert output_kind(work / "run") == "run" and output_kind(work / "run" / "model") == "model"
    folders = [work / "run", work / "run" / "model", work / "run" / "checkpoint"]
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o750}
    files = [p for p in (work / "run").rglob("*") if p.is_file()]
    assert len(files) >= 6 and {p.stat().st_mode & 0o777 for p in files} == {0o640}
    assert not leftovers(work) and not leftovers(work / "run")


# ---- generate -----------------------------------------------------------------------------------------------
def test_generate_never_writes_over_its_run_or_foreign_paths(work):
    run_before = snapshot(work / "run")
    for out, relation in ((work / "run", "is the same path as"), (work / "run" / "model", "is inside")):
        refused(ehrsynth("generate", work / "run", "-n", 5, "--out", out, "--overwrite"), relation, "RUN")
    assert snapshot(work / "run") == run_before
    target = foreign_dir(work / "mine")
    before = snapshot(target)
    refused(ehrsynth("generate", work / "run", "-n", 5, "--out", target, "--overwrite"), target)
    refused(ehrsynth("generate", work / "run", "-n", 5, "--out", work / "corpus", "--overwrite"),
            "holds an ehrsynth corpus output")
    note = work / "synthetic.parquet"
    note.write_text("not ours")
    refused(ehrsynth("generate", work / "run", "-n", 5, "--out", note, "--format", "long", "--overwrite"), note)
    refused(ehrsynth("generate", work / "run", "-n", 5, "--out", note / "x"), "is a file")
    assert snapshot(target) == before and note.read_text() == "not ours" and not leftovers(work)


@pytest.mark.parametrize("fmt, out", [("corpus", "synthetic"), ("omop", "omop"), ("long", "s.csv")])
def test_generate_overwrite_replaces_its_own_output(work, fmt, out):
    out = work / out
    assert ehrsynth("generate", work / "run", "-n", 10, "--out", out, "--format", fmt, "--overwrite").exit_code == 0
    refused(ehrsynth("generate", work / "run", "-n", 12, "--out", out, "--format", fmt), "--overwrite")
    result = ehrsynth("generate", work / "run", "-n", 12, "--out", out, "--format", fmt, "--overwrite")
    assert result.exit_code == 0, result.output
    assert "wrote 12 patients" in result.output and output_kind(out) == "synthetic" and not leftovers(work)


def test_stale_staging_of_killed_runs_is_cleaned(work):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    stale = work / f".ehrsynth-staging-synthetic-{int(dead.stdout)}@{host}.abc123"
    (stale / "corpus").mkdir(parents=True)
    (stale / "corpus" / "codes.npy").write_bytes(b"x" * 1000)
    stale_file = work / f".ehrsynth-staging-file-{int(dead.stdout)}@{host}.xyz"
    stale_file.write_bytes(b"y")
    live = work / f".ehrsynth-staging-synthetic-1@{host}.live"  # pid 1 is alive: its staging is not touched
    live.mkdir()
    other_host = work / f".ehrsynth-staging-synthetic-{int(dead.stdout)}@elsewhere.abc"  # maybe alive there
    other_host.mkdir()
    assert ehrsynth("generate", work / "run", "-n", 5, "--out", work / "new", "--format", "meds").exit_code == 0
    assert not stale.exists() and not stale_file.exists() and live.is_dir() and other_host.is_dir()


def test_a_failing_write_leaves_the_previous_output_and_no_staging(work, monkeypatch):
    import polars as pl

    from ehrsynth.pipeline import generate_to

    before = snapshot(work / "synthetic")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", disk_full)
    with pytest.raises(OSError, match="No space"):
        generate_to(work / "run", 5, work / "synthetic", overwrite=True, progress=False)
    with pytest.raises(OSError, match="No space"):
        generate_to(work / "run", 5, work / "deep" / "er" / "out", "long", progress=False)
    assert snapshot(work / "synthetic") == before and not leftovers(work) and not (work / "deep").exists()


def test_generate_follows_the_umask(work):
    previous = os.umask(0o027)
    try:
        assert ehrsynth("generate", work / "run", "-n", 5, "--out", work / "g", "--format", "meds").exit_code == 0
    finally:
        os.umask(previous)
    paths = [work / "g", *(work / "g").rglob("*")]
    assert {p.stat().st_mode & 0o777 for p in paths if p.is_dir()} == {0o750}
    assert {p.stat().st_mode & 0o777 for p in paths if p.is_file()} == {0o640}


# ---- evaluate -----------------------------------------------------------------------------------------------
def test_evaluate_checks_its_output_before_any_work(work, monkeypatch):
    import ehrsynth.evaluation.report as report

    def never(*args, **kwargs):
        raise AssertionError("evaluation ran before the output check")

    monkeypatch.setattr(report, "evaluate", never)
    inputs = ("--train", work / "corpus", "--test", work / "corpus", "--synthetic", work / "synthetic",
              "--model", work / "run", "--privacy-n", 10)
    note = work / "report.html"
    note.write_text("keep")
    refused(ehrsynth("evaluate", *inputs, "--out", note, "--overwrite"), "--out", note)
    refused(ehrsynth("evaluate", *inputs, "--out", note / "r"), "is a file")
    for out, flag in ((work / "synthetic", "--synthetic"), (work / "corpus" / "r", "--train"),
                      (work / "run", "--model")):
        refused(ehrsynth("evaluate", *inputs, "--out", out, "--overwrite"), "--out", flag)
    target = foreign_dir(work / "mine")
    before = snapshot(target)
    refused(ehrsynth("evaluate", *inputs, "--out", target, "--overwrite"), target)
    assert snapshot(target) == before and note.read_text() == "keep"


def test_evaluate_overwrites_only_a_report(work, monkeypatch):
    import ehrsynth.evaluation.report as report

    monkeypatch.setattr(report, "_figures", lambda *args: {})  # plots are tested in test_eval_report; slow here
    inputs = ("--train", work / "corpus", "--test", work / "corpus", "--synthetic", work / "synthetic",
              "--privacy-n", 10)
    (work / "report").mkdir()  # an empty folder is fine to fill
    assert ehrsynth("evaluate", *inputs, "--out", work / "report").exit_code == 0
    refused(ehrsynth("evaluate", *inputs, "--out", work / "report"), "--overwrite")
    assert ehrsynth("evaluate", *inputs, "--out", work / "report", "--seed", 1, "--overwrite").exit_code == 0
    assert json.loads((work / "report" / "metrics.json").read_text())["_meta"]["seed"] == 1
    assert sorted(p.name for p in (work / "report").iterdir()) == [MARKER, "metrics.json", "report.html"]
    refused(ehrsynth("train", "halo", "--data", work / "corpus", "--out", work / "report", "--overwrite",
                     *TINY_TRAIN), "holds an ehrsynth report output")
    assert not leftovers(work)


# ---- demo ---------------------------------------------------------------------------------------------------
def _fake_demo_steps(family, out, **kwargs):
    """The demo's layout without its minutes of work: the policy around it is what is tested here."""
    (out / "report").mkdir()
    (out / "report" / "report.html").write_text(f"demo {kwargs['seed']}")
    return [("fidelity", "x", 1.0, "ok")]


def test_demo_replaces_only_a_previous_demo(tmp_path, monkeypatch):
    import ehrsynth.pipeline as pipeline
    from ehrsynth.demo_data import demo_directory

    monkeypatch.setattr(pipeline, "_demo_steps", _fake_demo_steps)
    target = foreign_dir(tmp_path / "mine")
    before = snapshot(target)
    refused(ehrsynth("demo", "--out", target, "--overwrite"), "--out", target)
    assert snapshot(target) == before
    note = tmp_path / "note"
    note.write_text("keep")
    refused(ehrsynth("demo", "--out", note, "--overwrite"), note)
    refused(ehrsynth("demo", "--out", demo_directory() / "out"), "is inside", "demo data")
    demo = tmp_path / "demo"
    assert ehrsynth("demo", "--out", demo).exit_code == 0
    refused(ehrsynth("demo", "--out", demo), "--overwrite")
    assert ehrsynth("demo", "--out", demo, "--seed", 3, "--overwrite").exit_code == 0
    assert (demo / "report" / "report.html").read_text() == "demo 3" and output_kind(demo) == "demo"

    def crash(family, out, **kwargs):
        _fake_demo_steps(family, out, **kwargs)
        raise OSError("killed half way")

    monkeypatch.setattr(pipeline, "_demo_steps", crash)
    with pytest.raises(OSError):
        pipeline.run_demo("halo", demo, overwrite=True, say=lambda line: None)
    assert (demo / "report" / "report.html").read_text() == "demo 3" and not leftovers(tmp_path)
    refused(ehrsynth("prepare", "--source", "omop", "--input", demo_directory(), "--output", demo, "--overwrite"),
            "holds an ehrsynth demo output")


# ---- the primitives -----------------------------------------------------------------------------------------
def test_save_model_is_one_rename_and_a_failed_save_changes_nothing(work, monkeypatch):
    import ehrsynth.models.io as io
    from ehrsynth.models.io import load_model, save_model

    model_dir = work / "run" / "model"
    model = load_model(work / "run")
    save_model(model, model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == [MARKER, "model.json", "model.safetensors"]
    before = snapshot(model_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights were written, before model.json

    monkeypatch.setattr(io.json, "dumps", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, model_dir)
    assert snapshot(model_dir) == before and not leftovers(work / "run")


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_keeps_no_old_copy(tmp_path, monkeypatch, exchange):
    import ehrsynth.outputs as outputs

    if not exchange:  # the portable path: moved aside for an instant, deleted right after
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    for version in ("one", "two", "three"):
        with staged_output(tmp_path / "out", "report") as staging:
            (staging / "v.txt").write_text(version)
    assert (tmp_path / "out" / "v.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    staging = tmp_path / ".ehrsynth-staging-x"
    staging.mkdir()
    foreign = foreign_dir(tmp_path / "theirs")
    replace_directory(staging, tmp_path / "out")  # the raw swap: used by the loop for checkpoints
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "theirs"]
    with pytest.raises(OutputError, match="not written by ehrsynth"):
        with staged_output(foreign, "report"):
            pass
    assert (foreign / "notes" / "a.txt").read_text() == "mine"
