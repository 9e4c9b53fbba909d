"""The shared loop under torchrun (2 CPU processes, gloo): same losses as one process, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

EHRDIFF_TINY = {"hidden_dims": [64, 64], "time_dim": 32, "fourier_dim": 32}
HALO_TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32}
TIMELINE_TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_ctx": 128}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, mimic3_corpus):
    return mimic3_corpus.save(tmp_path_factory.mktemp("ddp") / "corpus")


def _train(corpus_dir, out, model, model_options, *, nproc, steps, extra=(), background=False, flag=False):
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps({"model": model_options, "training": {
        "log_every": 1, "checkpoint_every": 5, "eval_every": 1000, "device": "cpu"}}))
    args = ["train", model, "--data", str(corpus_dir), "--out", str(out), "--config", str(config),
            "--max-steps", str(steps), "--batch-size", "16", "--lr", "1e-3", "--seed", "0", *extra]
    if nproc == 1 or flag:  # --nproc N: the CLI relaunches itself under torchrun
        command = [sys.executable, "-m", "ehrsynth.cli", "--threads", "1", *args, "--nproc", str(nproc)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "ehrsynth.cli", "--threads", "1", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if background:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)  # never hang CI
    assert done.returncode == 0, done.stderr[-3000:]
    return [r["train_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]


@pytest.mark.parametrize("model, options", [("halo", HALO_TINY), ("timeline", TIMELINE_TINY)])
def test_two_processes_follow_the_single_process_trajectory(corpus_dir, tmp_path, model, options):
    single = _train(corpus_dir, tmp_path / "one", model, options, nproc=1, steps=12)
    double = _train(corpus_dir, tmp_path / "two", model, options, nproc=2, steps=12, flag=True)
    assert len(single) == len(double) == 12
    # Each process averages over its own scored tokens and DDP averages the two gradients, while one process
    # averages over all tokens of the batch: equal when both halves hold as many tokens, close otherwise (the
    # halves of these 12-patient batches differ by up to ~20% in tokens; measured deviation at most 0.09).
    relative = np.abs(np.array(single) - np.array(double)) / np.array(single)
    assert relative.max() < 0.15, relative
    assert np.median(relative) < 0.03, relative
    assert double[-1] < double[0]


def test_ehrdiff_two_processes_match_on_average(corpus_dir, tmp_path):
    single = _train(corpus_dir, tmp_path / "one", "ehrdiff", EHRDIFF_TINY, nproc=1, steps=12)
    double = _train(corpus_dir, tmp_path / "two", "ehrdiff", EHRDIFF_TINY, nproc=2, steps=12)
    # EHRDiff draws a noise level per patient from each process's own RNG stream, so single steps differ by
    # sampling noise; the mean over the run must agree.
    assert abs(np.mean(single) - np.mean(double)) / np.mean(single) < 0.15


def test_resume_under_two_processes_is_exact(corpus_dir, tmp_path):
    steps = 300
    _train(corpus_dir, tmp_path / "straight", "halo", HALO_TINY, nproc=2, steps=steps)
    run = tmp_path / "killed"
    process = _train(corpus_dir, run, "halo", HALO_TINY, nproc=2, steps=steps, background=True)
    loop_state = run / "checkpoint" / "loop.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if loop_state.is_file() and json.loads(loop_state.read_text())["step"] >= 20:
            break
        time.sleep(0.02)
    # kill the launcher and every worker at once, as a crash or a scheduler would (torchrun's workers may sit
    # in sessions of their own, so match them by their run directory)
    os.killpg(process.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-f", str(run)], check=False)
    process.wait()
    for _ in range(200):
        if subprocess.run(["pgrep", "-f", str(run)], capture_output=True).returncode != 0:
            break
        time.sleep(0.05)
    killed_at = json.loads(loop_state.read_text())["step"]
    assert 20 <= killed_at < steps
    _train(corpus_dir, run, "halo", HALO_TINY, nproc=2, steps=steps, extra=("--resume",))
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "state.safetensors"))
    b = load_file(str(run / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and {"rng.torch_cpu.0", "rng.torch_cpu.1"} <= a.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sharded_generation_is_deterministic_without_duplicates(corpus_dir, tmp_path):
    from ehrsynth.data.corpus import PatientCorpus

    _train(corpus_dir, tmp_path / "run", "halo", HALO_TINY, nproc=1, steps=30)
    outputs = []
    for name in ("a", "b"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                   "ehrsynth.cli", "--threads", "1", "generate", str(tmp_path / "run"), "-n", "51", "--out",
                   str(tmp_path / name), "--seed", "4"]
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(PatientCorpus.load(tmp_path / name))
    a, b = outputs
    assert a.n_patients == 51 and a.equals(b)  # same seed and world size: the same patients
    assert sorted(a.patient_ids.astype(int).tolist()) == list(range(51))
    assert not list(tmp_path.glob(".*shards"))
    # rank r sampled its share (26, then 25 patients) from SeedSequence([seed, r]): exactly that recipe
    from ehrsynth.pipeline import generate_corpus

    for rank, (start, size) in enumerate([(0, 26), (26, 25)]):
        rank_seed = int(np.random.SeedSequence([4, rank]).generate_state(1)[0])
        alone = generate_corpus(tmp_path / "run", size, seed=rank_seed, progress=False)
        assert [alone.patient_codes(i) for i in range(size)] == [a.patient_codes(start + i) for i in range(size)]
    # different streams, so the shares are not copies of each other
    first, second = [a.patient_codes(i) for i in range(25)], [a.patient_codes(i) for i in range(26, 51)]
    assert sum(x == y for x, y in zip(first, second)) < 12
