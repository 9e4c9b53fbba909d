"""Validation of the shared loop: the criterion (:meth:`GenerativeModel.validation_loss` summed over the
validation patients), the best-model keeping and early stopping it drives, on the EMA weights when EMA is on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.view import CorpusView
from ehrsynth.models.base import GenerativeModel
from ehrsynth.models.io import load_model, save_model
from ehrsynth.training import distributed as dist


@torch.no_grad()
def evaluate_loss(model: GenerativeModel, corpus: PatientCorpus | CorpusView, *, batch_size: int,
                  seed: int = 0) -> float:
    """The validation criterion on ``corpus``: the summed :meth:`~GenerativeModel.validation_loss` of its
    batches over their summed units (HALO: nats per scored token; default: the patient-weighted mean loss).

    Noise comes from a generator seeded with ``seed`` afresh at every call, so repeated validations of the same
    weights give the same value (EHRDiff: the same noise levels and noise for every patient each time).
    """
    view = CorpusView.of(corpus)
    was_training = model.training
    model.eval()
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=device)
    units = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for start in range(0, view.n_patients, batch_size):
            patients = view.patients[start:start + batch_size]
            batch = to_device(model.collate(view.corpus, patients), device)
            batch.update(generator=generator, n_patients=len(patients))
            loss_sum, count = model.validation_loss(batch)
            total += loss_sum.detach().double()
            units += torch.as_tensor(count, dtype=torch.float64, device=device)
    finally:
        model.train(was_training)
    return float(total / units.clamp_min(1.0))


def validate_and_keep_best(model, ema, val_corpus, config, state, run_dir, history, is_main, world):
    with _swapped_in(model, ema):
        if val_corpus is not None and val_corpus.n_patients > 0:
            val_loss = evaluate_loss(model, val_corpus, batch_size=config.batch_size, seed=config.seed)
        else:
            val_loss = None
        improved = val_loss is None or state["best_val_loss"] is None or val_loss < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = val_loss
            state["best_step"] = state["step"]
            state["bad_evals"] = 0
            if is_main:
                save_model(model, run_dir / "model")
        else:
            state["bad_evals"] += 1
            if config.patience is not None and state["bad_evals"] >= config.patience:
                state["stopped_early"] = True
    record = {"step": state["step"], "val_loss": None if val_loss is None else round(val_loss, 6),
              "best_val_loss": state["best_val_loss"], "improved": improved}
    history.append(record)
    if is_main:
        append_jsonl(run_dir / "metrics.jsonl", record)
    dist.barrier(world)


class _swapped_in:
    """Temporarily load the EMA weights into the model (validation and saving use them)."""

    def __init__(self, model: torch.nn.Module, ema: list[torch.Tensor] | None) -> None:
        self.model, self.ema = model, ema

    def __enter__(self) -> None:
        if self.ema is not None:
            self.saved = [p.detach().clone() for p in self.model.parameters()]
            with torch.no_grad():
                torch._foreach_copy_(list(self.model.parameters()), self.ema)

    def __exit__(self, *exc) -> None:
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(self.model.parameters()), self.saved)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors go to ``device`` through pinned memory (an asynchronous copy); host values such as sizes stay."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def finish_best_model(model: GenerativeModel, run_dir: Path, device: torch.device, *, progress: bool = False) -> None:
    """Fit into the saved best model (``run_dir/model``) what depends on its final weights, through the model's
    :meth:`~ehrsynth.models.base.GenerativeModel.after_training` (EHRDiff's binarisation thresholds). A no-op
    for a model class that does not override it, or a run that saved no model."""
    if type(model).after_training is GenerativeModel.after_training or not (run_dir / "model").is_dir():
        return
    best = load_model(run_dir / "model", device=device)
    if best.after_training(progress=progress):
        save_model(best, run_dir / "model")
