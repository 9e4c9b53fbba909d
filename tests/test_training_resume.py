"""Resume that always works, training that stops by itself, and no global random stream: the shared loop on
the MIMIC-III demo with tiny HALO and EHRDiff networks."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ehrsynth.models.ehrdiff import EHRDiffConfig, EHRDiffModel
from ehrsynth.models.halo import HaloConfig, HaloModel
from ehrsynth.models.io import load_model
from ehrsynth import pipeline
from ehrsynth.pipeline import train_model
from ehrsynth.training import checkpoint, loop
from ehrsynth.training.loop import TrainConfig, evaluate_loss, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"halo": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_ctx": 24},
        "ehrdiff": {"hidden_dims": [64, 64], "time_dim": 32, "fourier_dim": 32, "conditional": True}}
STEPS, EVERY = 20, 8  # checkpoints at steps 8, 16 and 20
TRAINING = {"batch_size": 16, "lr": 1e-3, "max_steps": STEPS, "checkpoint_every": EVERY, "log_every": 1,
            "eval_every": 5, "device": "cpu", "seed": 2, "patience": None}


def _killed_run(family, corpus, run, k, where):
    """Train in a forked child that SIGKILLs itself, as a crash or a scheduler would: right after optimizer
    step ``k`` ("step"), or while writing the checkpoint of step ``k``, staging written, not renamed ("save").
    A fork, not a new interpreter: the child starts in milliseconds, and dies without any clean-up of its own.
    (It must not read files through polars, whose thread pool does not survive a fork: it gets the corpus.)"""
    pid = os.fork()
    if pid == 0:  # the child never returns to pytest
        try:
            def die(*args):
                os.kill(os.getpid(), signal.SIGKILL)

            if where == "save":
                real_save = checkpoint.save_checkpoint

                def save(directory, model, ema, optimizer, state, rng):
                    if state["step"] == k:
                        checkpoint.replace_directory = die
                    real_save(directory, model, ema, optimizer, state, rng)

                loop.save_checkpoint = save
            loop_train = loop.train
            pipeline.train = lambda *a, **kw: loop_train(*a, **kw, on_step=lambda s: s == k and where == "step"
                                                         and die())
            _train(family, corpus, run)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the killed run hung")


def _train(family, corpus, run, **kwargs):
    return train_model(family, corpus, run, model_options=TINY[family], training_options=TRAINING,
                       progress=False, **kwargs)


def _metric_steps(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r["step"] for r in records if "train_loss" in r], [r["step"] for r in records if "val_loss" in r])


@pytest.mark.parametrize("family", ["halo", "ehrdiff"])
def test_killed_runs_resume_to_bit_identical_weights(family, mimic3_corpus, tmp_path):
    straight = tmp_path / "straight"
    _train(family, mimic3_corpus, straight)
    reference = load_file(str(straight / "checkpoint" / "state.safetensors"))
    best = load_file(str(straight / "model" / "model.safetensors"))
    kills = [(EVERY if family == "halo" else 2 * EVERY, "save")]
    for seed in (0, 1):  # seeded random kill points: for each seed one before the first checkpoint, one after
        rng = np.random.default_rng([seed, len(family)])
        kills += [(int(rng.integers(1, EVERY)), "step"), (int(rng.integers(EVERY + 1, STEPS)), "step")]
    for i, (k, where) in enumerate(kills):
        run = tmp_path / f"killed-{i}-{where}-{k}"
        status = _killed_run(family, mimic3_corpus, run, k, where)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, where, status)
        result = _train(family, mimic3_corpus, run, resume=True)
        assert result.steps == STEPS
        resumed = load_file(str(run / "checkpoint" / "state.safetensors"))
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[key], reference[key]) for key in reference), (k, where)
        model = load_file(str(run / "model" / "model.safetensors"))
        assert all(torch.equal(model[key], best[key]) for key in best), (k, where)
        train_steps, val_steps = _metric_steps(run)
        assert train_steps == list(range(1, STEPS + 1)) and val_steps == [5, 10, 15, 20], (k, where)
        assert not list(run.glob(".checkpoint.*"))  # the killed staging folder is cleaned


def test_resume_without_checkpoint_starts_from_step_zero(mimic3_corpus, tmp_path, capsys):
    class Killed(Exception):
        pass

    def kill_at_3(step):
        if step == 3:
            raise Killed

    config = TrainConfig(**{**TRAINING, "checkpoint_every": 100})
    for name in ("a", "b"):
        torch.manual_seed(0)
        model = HaloModel.from_corpus(mimic3_corpus.part("train"), HaloConfig(**TINY["halo"]))
        if name == "b":
            with pytest.raises(Killed):
                train(model, mimic3_corpus.part("train"), mimic3_corpus.part("val"), config, tmp_path / name,
                      on_step=kill_at_3)
            assert not (tmp_path / name / "checkpoint").exists()
        result = train(model if name == "a" else HaloModel.from_corpus(
            mimic3_corpus.part("train"), HaloConfig(**TINY["halo"])), mimic3_corpus.part("train"),
            mimic3_corpus.part("val"), config, tmp_path / name, resume=name == "b")
        assert result.steps == STEPS
    assert "no checkpoint" in capsys.readouterr().err
    assert _metric_steps(tmp_path / "b") == _metric_steps(tmp_path / "a")  # the killed attempt's lines are gone


class FakeClock:
    """The loop's clock, advanced one minute per optimizer step (no wall-clock flakiness)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def tick(self, step):
        self.now += 60.0


def test_time_schedule_checkpoints_and_max_time_stops_resumably(mimic3_corpus, tmp_path, monkeypatch):
    clock, saved = FakeClock(), []
    monkeypatch.setattr(loop, "_clock", clock)
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda d, m, e, o, state, r: (saved.append(state["step"]),
                                                                               real_save(d, m, e, o, state, r)))
    train_part, val_part = mimic3_corpus.part("train"), mimic3_corpus.part("val")

    def fit(run, resume=False, **options):
        torch.manual_seed(0)
        model = EHRDiffModel.from_corpus(train_part, EHRDiffConfig(**TINY["ehrdiff"]))
        config = TrainConfig(**{**TRAINING, "checkpoint_every": 10**6, **options})
        return train(model, train_part, val_part, config, run, resume=resume, on_step=clock.tick)

    fit(tmp_path / "timed", checkpoint_minutes=3)
    assert saved == [3, 6, 9, 12, 15, 18, 20]  # every 3 minutes, and at the end
    saved.clear()
    stopped = fit(tmp_path / "budget", max_time=7.5 * 60)
    assert (stopped.steps, stopped.out_of_time, saved) == (8, True, [8])
    assert (tmp_path / "budget" / "model" / "model.safetensors").is_file()
    resumed = fit(tmp_path / "budget", resume=True)
    assert resumed.steps == STEPS and not resumed.out_of_time
    a = load_file(str(tmp_path / "timed" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "budget" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops_on_validation_likelihood_and_keeps_the_best(mimic3_corpus, tmp_path, capsys):
    train_part, val_part = mimic3_corpus.part("train"), mimic3_corpus.part("val")
    torch.manual_seed(0)
    model = HaloModel.from_corpus(train_part, HaloConfig(**TINY["halo"]))
    config = TrainConfig(batch_size=12, lr=1e-2, max_epochs=200, eval_every=6, patience=3, checkpoint_every=10**6,
                         device="cpu", seed=0)
    result = train(model, train_part, val_part, config, tmp_path / "run", progress=True)
    assert "val/token=" in capsys.readouterr().err  # the bar shows the validation NLL per scored token
    vals = [(r["step"], r["val_loss"]) for r in result.history if "val_loss" in r]
    best_index = int(np.argmin([v for _, v in vals]))
    assert result.stopped_early and len(vals) == best_index + 1 + 3  # three validations without a new best
    assert result.steps == vals[-1][0] == STOP_STEP and result.best_step == vals[best_index][0]
    assert result.best_val_loss == pytest.approx(vals[best_index][1], abs=1e-6)
    best = load_model(tmp_path / "run")  # the best model is the one saved, scored again: the same likelihood
    assert evaluate_loss(best, val_part, batch_size=12) == pytest.approx(result.best_val_loss, rel=1e-9)


STOP_STEP = 60  # seed 0 on this data: the best of the validations at 6, 12, ... is at step 42


def test_no_library_draw_from_the_global_streams(mimic3_corpus, tmp_path):
    train_part = mimic3_corpus.part("train")
    torch.manual_seed(0)
    model = EHRDiffModel.from_corpus(train_part, EHRDiffConfig(**TINY["ehrdiff"])).train()
    batch = model.collate(mimic3_corpus, np.arange(16))
    torch.manual_seed(7)
    np.random.seed(7)
    losses = [model({**batch, "generator": torch.Generator().manual_seed(5)}) for _ in range(2)]
    assert torch.equal(losses[0], losses[1])  # noise levels, noise and label dropout: all from the generator
    after = torch.rand(3), np.random.rand(3)
    torch.manual_seed(7)
    np.random.seed(7)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))
    torch.manual_seed(7)
    np.random.seed(7)
    train(model, train_part, mimic3_corpus.part("val"), TrainConfig(**{**TRAINING, "max_steps": 6}), tmp_path)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))


def test_train_command_budget_flags_and_resume_without_checkpoint(mimic3_corpus, tmp_path):
    from click.testing import CliRunner

    from ehrsynth.cli import cli

    corpus, run = str(mimic3_corpus.save(tmp_path / "corpus")), str(tmp_path / "run")
    base = ["train", "halo", "--data", corpus, "--out", run, "--preset", "small"]
    shown = CliRunner().invoke(cli, [*base, "--max-time", "90s", "--patience", "0", "--checkpoint-minutes", "2",
                                     "--dry-run"])
    training = json.loads(shown.output)["training"]
    assert (training["max_time"], training["patience"], training["checkpoint_minutes"]) == (90.0, None, 2.0)
    assert json.loads(CliRunner().invoke(cli, [*base, "--max-time", "1.5", "--dry-run"]).output)[
        "training"]["max_time"] == 90.0  # a bare number is minutes
    small = json.loads(CliRunner().invoke(cli, [*base, "--dry-run"]).output)
    assert small["model"]["n_embd"] == 128  # the small preset's network ...
    assert (small["training"]["lr"], small["training"]["batch_size"], small["training"]["patience"],
            small["training"]["ema_decay"]) == (2e-3, 32, 5, 0.99)
    paper = json.loads(CliRunner().invoke(cli, [*base[:-2], "--lr", "3e-4", "--dry-run"]).output)["training"]
    assert (paper["lr"], paper["batch_size"], paper["patience"], paper["ema_decay"]) == (3e-4, 48, 10, None)
    # ... the paper's (no weight averaging); flags win
    bad = CliRunner().invoke(cli, [*base, "--max-time", "soon"])
    assert bad.exit_code == 2 and "--max-time" in bad.output
    done = CliRunner().invoke(cli, [*base, "--resume", "--max-steps", "3", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "no checkpoint" in done.output and "trained 3 steps" in done.output
