"""The shared training loop, driven by a tiny model on the MIMIC-III demo."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ehrsynth.errors import ConfigError
from ehrsynth.models import FAMILIES
from ehrsynth.models.base import GenerativeModel
from ehrsynth.models.io import load_model
from ehrsynth.training.loop import TrainConfig, learning_rate, train


@dataclass(frozen=True)
class TinyConfig:
    hidden: int = 16


class TinyModel(GenerativeModel):
    """A one-hidden-layer autoencoder over patient multi-hot vectors, with input dropout noise so the loss
    uses the torch RNG (resume must restore it)."""

    family = "tiny"
    config_class = TinyConfig

    def __init__(self, config, meta):
        super().__init__(config, meta)
        v = len(meta.codes)
        self.net = torch.nn.Sequential(torch.nn.Linear(v, config.hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(config.hidden, v))

    def collate(self, corpus, patients):
        return {"x": torch.from_numpy(corpus.patient_multi_hot(patients))}

    @classmethod
    def default_train_config(cls):
        return {}

    def forward(self, batch):
        x = batch["x"]
        keep = (torch.rand_like(x) > 0.1).float()
        return torch.nn.functional.binary_cross_entropy_with_logits(self.net(x * keep), x)


@pytest.fixture()
def tiny_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "tiny", (__name__, "TinyModel"))


def _fit(corpus, run_dir, config, **kwargs):
    torch.manual_seed(config.seed)  # the caller seeds initialisation; the loop seeds everything after it
    model = TinyModel.from_corpus(corpus, TinyConfig())
    return train(model, corpus.part("train"), corpus.part("val"), config, run_dir, **kwargs)


def test_loss_falls_and_run_dir_is_complete(mimic3_corpus, tmp_path, tiny_family):
    config = TrainConfig(lr=3e-2, batch_size=16, max_epochs=50, log_every=5, seed=1, patience=None)
    result = _fit(mimic3_corpus, tmp_path / "run", config)
    assert result.steps == 50 * 5  # 72 training patients, batch 16 -> 5 steps per epoch
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    # by default every 100 steps when epochs are shorter, but at least every 8 epochs (40 steps here): steps 40, 80,
    # ..., 240, and at the end: it always fires
    assert len(vals) == 7
    assert result.best_val_loss == pytest.approx(min(vals), abs=1e-6)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(result.history)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["family"] == "tiny" and resolved["training"]["batch_size"] == 16
    loaded = load_model(tmp_path / "run")
    assert isinstance(loaded, TinyModel)


def test_resume_after_kill_is_exact(mimic3_corpus, tmp_path, tiny_family):
    config = TrainConfig(lr=1e-2, batch_size=16, max_steps=23, checkpoint_every=4, log_every=1, seed=3,
                         lr_schedule="cosine", warmup_fraction=0.2, ema_decay=0.9)
    straight = _fit(mimic3_corpus, tmp_path / "a", config)

    class Killed(Exception):
        pass

    def kill_at_step_14(step):
        if step == 14:  # the last checkpoint was written at step 12: steps 13-14 are lost, as in a real kill
            raise Killed

    with pytest.raises(Killed):
        _fit(mimic3_corpus, tmp_path / "b", config, on_step=kill_at_step_14)
    assert json.loads((tmp_path / "b" / "checkpoint" / "loop.json").read_text())["step"] == 12
    with pytest.raises(ConfigError, match="--resume"):
        _fit(mimic3_corpus, tmp_path / "b", config)
    resumed = _fit(mimic3_corpus, tmp_path / "b", config, resume=True)
    assert resumed.steps == straight.steps == 23
    a = load_file(str(tmp_path / "a" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train_loss"] for r in straight.history if r["step"] > 12 and "train_loss" in r] == \
        [r["train_loss"] for r in resumed.history if "train_loss" in r]


def test_early_stopping_and_schedule(mimic3_corpus, tmp_path, tiny_family):
    config = TrainConfig(lr=0.5, batch_size=72, max_epochs=200, eval_every=1, patience=3, seed=0)
    result = _fit(mimic3_corpus, tmp_path / "run", config)
    assert result.stopped_early and result.steps < 200
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = np.array([learning_rate(s, 100, cosine) for s in range(100)])
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and np.all(np.diff(lrs[10:]) <= 1e-12)


def test_config_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_views_train_exactly_as_copies_and_nothing_is_copied(mimic3_corpus, tmp_path, tiny_family, monkeypatch):
    """Training on index views of a memory-mapped corpus (train_model's path) gives bit-identical weights to
    training on copied parts, and never copies a part out of the corpus."""
    from ehrsynth.data.corpus import PatientCorpus
    from ehrsynth.data.view import CorpusView
    from ehrsynth.pipeline import train_model

    config = TrainConfig(lr=3e-2, batch_size=16, max_steps=12, eval_every=4, seed=3)
    _fit(mimic3_corpus, tmp_path / "copies", config)
    mimic3_corpus.save(tmp_path / "corpus")
    mapped = PatientCorpus.load(tmp_path / "corpus")  # memory-mapped
    train_view = CorpusView.part(mapped, "train")
    assert np.array_equal(train_view.visits_per_patient(), mimic3_corpus.part("train").visits_per_patient())

    def no_copies(*args, **kwargs):
        raise AssertionError("training copied a part of the corpus")

    monkeypatch.setattr(PatientCorpus, "subset", no_copies)
    result = train_model("tiny", tmp_path / "corpus", tmp_path / "views", model_options={}, progress=False,
                         training_options={"lr": 3e-2, "batch_size": 16, "max_steps": 12, "eval_every": 4,
                                           "seed": 3, "optimizer": "adam"})
    assert result.steps == 12
    copies = load_file(str(tmp_path / "copies" / "model" / "model.safetensors"))
    views = load_file(str(tmp_path / "views" / "model" / "model.safetensors"))
    assert copies.keys() == views.keys()
    assert all(torch.equal(copies[k], views[k]) for k in copies)
    history = [json.loads(line) for line in (tmp_path / "views" / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (tmp_path / "copies" / "metrics.jsonl").read_text().splitlines()]
    assert [h.get("val_loss") for h in history] == [h.get("val_loss") for h in first]
