"""The one training loop every ehrsynth model shares (HALO, EHRDiff, and any later model).

A model only has to meet :class:`~ehrsynth.models.base.GenerativeModel`: ``collate(corpus, patients)`` makes a
batch and ``forward(batch)`` returns its mean loss. The loop owns everything else: seeded epoch order,
optimizer and learning-rate schedule, EMA, validation on a schedule that always fires, best-model keeping,
early stopping, a wall-time budget, gradient clipping, bf16 autocast on CUDA, DDP under ``torchrun``, a tqdm
bar, a JSON-lines metrics log, and atomic checkpoints (on a step and a time schedule) that let ``resume=True``
continue exactly where a killed run stopped.

Validation, early stopping and the best model use :meth:`GenerativeModel.validation_loss`: HALO's exact
negative log-likelihood per code, EHRDiff's EDM loss at fixed seeded noise. Randomness comes from a
``torch.Generator`` per process that the loop passes in ``batch["generator"]`` and saves in its checkpoints;
torch's global stream, which module dropout still reads, is forked and seeded inside :func:`train`, so a
caller's own stream is never drawn from.

Run directory layout::

    RUN/config.json        resolved model + training config
    RUN/model/             best model so far (safetensors + JSON; EMA weights when EMA is on), finished by the
                           model's ``after_training`` when the run ends (EHRDiff's binarisation thresholds)
    RUN/checkpoint/        last checkpoint: weights, EMA, optimizer, RNG and loop state
    RUN/metrics.jsonl      one JSON object per log/validation event
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError, InputError
from ehrsynth.models.base import GenerativeModel
from ehrsynth.models.io import atomic_write_text, config_to_dict
from ehrsynth.training import distributed as dist
from ehrsynth.training import dp
from ehrsynth.training.checkpoint import cut_metrics, latest_step, load_checkpoint, save_checkpoint
from ehrsynth.training.validation import (append_jsonl, evaluate_loss, finish_best_model, to_device,
                                         validate_and_keep_best)

MIN_EVAL_EVERY = 100  # default validation interval in steps, when an epoch is shorter ...
MAX_EVAL_EPOCHS = 8  # ... but at least every 8 epochs: a 72-patient corpus overfits within 100 steps (33 epochs)
_clock = time.monotonic  # the loop's clock for time-based checkpoints and --max-time (tests replace it)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings, separate from the architecture (which lives in each model's config).

    Attributes:
        optimizer: ``'adam'`` (HALO paper) or ``'adamw'`` (EHRDiff paper).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (adamw) or L2 (adam).
        batch_size: global batch size (split across processes under torchrun).
        max_epochs: upper bound on passes over the training patients: a generous cap, early stopping is what
            normally ends a run.
        max_steps: upper bound on optimizer steps (None: only epochs bound the run).
        lr_schedule: ``'constant'`` or ``'cosine'`` (decays to ``min_lr_ratio * lr``).
        warmup_fraction: linear warm-up over this share of the planned steps -- scaled to the run, unlike the
            EHRDiff reference's fixed 20,000 steps that a short run never leaves.
        min_lr_ratio: floor of the cosine schedule, as a fraction of ``lr``.
        ema_decay: keep an exponential moving average of the weights (EHRDiff: 0.999); the EMA weights are the
            ones saved as the model. The decay ramps up as min(ema_decay, (1 + t) / (10 + t)) at step t, so a
            short run is not dominated by its initial weights. None disables it.
        grad_clip: clip the global gradient norm to this value; None disables clipping.
        eval_every: validate every this many steps; None means once per epoch, or every 100 steps when epochs
            are shorter (a small corpus at a large batch has epochs of a step or two: validating each would
            cost more than training and make ``patience`` count steps) but at least every 8 epochs (a
            72-patient corpus overfits well within 100 steps). The end of a run always validates.
        patience: stop after this many validations in a row without a new best validation value; None disables
            early stopping.
        checkpoint_every: write the resumable checkpoint every this many steps (and always at the end).
        checkpoint_minutes: also write it when this many minutes passed since the last one, so a kill loses at
            most that much work; None: steps only. Checked at log steps.
        max_time: wall-clock budget of this invocation in seconds: at the first log step past it the run
            validates, checkpoints and stops; ``resume`` continues it. None: no budget.
        log_every: log the running training loss every this many steps.
        seed: seed of the epoch order, initialisation and any noise the model draws.
        device: ``'auto'`` (CUDA when available), ``'cpu'`` or ``'cuda'``.
        compile: wrap the model in ``torch.compile``.
        dp_epsilon, dp_delta, dp_max_grad_norm: DP-SGD with the patient as privacy unit (None: off; see
            :mod:`ehrsynth.training.dp`); delta None is 1 / N^1.1.
    """

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 48
    max_epochs: int = 400
    max_steps: int | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    ema_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int | None = None
    patience: int | None = 10
    checkpoint_every: int = 200
    checkpoint_minutes: float | None = 10.0
    max_time: float | None = None
    log_every: int = 10
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in ("adam", "adamw"), "optimizer must be 'adam' or 'adamw'", self.optimizer),
            (self.lr > 0, "lr must be > 0", self.lr),
            (self.batch_size >= 1, "batch_size must be >= 1", self.batch_size),
            (self.max_epochs >= 1, "max_epochs must be >= 1", self.max_epochs),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1", self.max_steps),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'",
             self.lr_schedule),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)", self.warmup_fraction),
            (self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay must be in (0, 1)", self.ema_decay),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0", self.grad_clip),
            (self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1", self.eval_every),
            (self.patience is None or self.patience >= 1, "patience must be >= 1", self.patience),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1", self.checkpoint_every),
            (self.checkpoint_minutes is None or self.checkpoint_minutes > 0, "checkpoint_minutes must be > 0",
             self.checkpoint_minutes),
            (self.max_time is None or self.max_time > 0, "max_time must be > 0 seconds", self.max_time),
            (self.log_every >= 1, "log_every must be >= 1", self.log_every),
            (self.device in ("auto", "cpu", "cuda"), "device must be 'auto', 'cpu' or 'cuda'", self.device),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message}, got {value!r}")


@dataclass
class TrainResult:
    """What a training run did."""

    run_dir: Path
    steps: int
    epochs_completed: int
    best_val_loss: float | None
    last_train_loss: float | None
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    out_of_time: bool = False  # stopped by ``max_time``; ``resume`` continues the run
    best_step: int | None = None  # the step of the best validation (the model in ``run_dir/model``)


def learning_rate(step: int, planned_steps: int, config: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    warmup = int(config.warmup_fraction * planned_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - warmup) / max(1, planned_steps - warmup))
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n_patients: int, epoch: int, seed: int) -> np.ndarray:
    """The patient order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_patients)


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    try:  # the fused kernel is 3-10x faster at the paper configs, on CPU as on CUDA
        return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train(
    model: GenerativeModel,
    train_corpus: PatientCorpus | CorpusView,
    val_corpus: PatientCorpus | CorpusView | None,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_corpus``, validating on ``val_corpus``, writing into ``run_dir``.

    Args:
        model: an untrained (or loaded) model, on the CPU; the loop moves it to the chosen device.
        train_corpus: training patients: a corpus, or a :class:`~ehrsynth.data.view.CorpusView` of one (what
            ``train_model`` passes, so a memory-mapped corpus is read in place, never copied).
        val_corpus: validation patients, likewise (None or empty: the last weights count as best).
        config: optimisation settings.
        run_dir: the run directory (created). Without ``resume`` an existing checkpoint there is an error,
            never silently reused.
        resume: continue from ``run_dir/checkpoint``; when there is none yet (a kill before the first one) the
            run starts from step 0 with a one-line notice. ``metrics.jsonl`` is cut back to the checkpoint.
        progress: show a progress bar (rank 0 only) with the training loss and the last validation value.
        on_step: called with the step number after each optimizer step (for callers' own hooks).

    Returns:
        A :class:`TrainResult`; the best model is in ``run_dir/model``.

    Raises:
        ConfigError: for a checkpoint in the way (without ``resume``).
    """
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoint"
    if checkpoint_dir.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose "
                          f"another --out")
    if train_corpus.n_patients == 0:
        raise InputError("the training corpus has no patients")
    world = dist.setup()
    if resume and not checkpoint_dir.exists():
        if world.rank == 0:
            print(f"no checkpoint in {run_dir} yet: starting from step 0", file=sys.stderr)
        resume = False
    device = _device(config)
    seed = rank_seed(config.seed, world.rank)  # each process draws its own noise (EHRDiff sigmas, dropout)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # module dropout reads the global stream: forked, so the caller's is untouched
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return _train(model, CorpusView.of(train_corpus), val_corpus, config, run_dir, resume, progress, on_step,
                      world, device, generator)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random streams: distinct for every (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def _train(model, train_view, val_corpus, config, run_dir, resume, progress, on_step, world, device, generator):
    is_main = world.rank == 0
    checkpoint_dir = run_dir / "checkpoint"
    model = model.to(device)
    ema = [p.detach().clone() for p in model.parameters()] if config.ema_decay else None
    optimizer = _make_optimizer(model, config)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": None, "best_step": None, "bad_evals": 0,
             "stopped_early": False}
    if resume:
        state, streams = load_checkpoint(checkpoint_dir, model, ema, optimizer, world.rank)
        _restore_streams(streams, generator)
        if is_main:
            cut_metrics(run_dir / "metrics.jsonl", state["step"])
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"family": model.family, "model": config_to_dict(model.config), "training": asdict(config),
                    "train_patients": train_view.n_patients,
                    "val_patients": 0 if val_corpus is None else val_corpus.n_patients}
        atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2))
        cut_metrics(run_dir / "metrics.jsonl", -1)  # a fresh start: nothing of a killed earlier attempt stays
    if is_main:  # staging folders of checkpoints a kill interrupted
        for stale in run_dir.glob(".checkpoint.*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier(world)
    wrapped = dist.wrap(model, device)
    if config.compile:
        wrapped = torch.compile(wrapped)

    n_patients = train_view.n_patients
    local_batch = max(1, config.batch_size // world.size)
    steps_per_epoch = math.ceil(n_patients / config.batch_size)
    planned = steps_per_epoch * config.max_epochs
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    eval_every = config.eval_every or max(steps_per_epoch, min(MIN_EVAL_EVERY, MAX_EVAL_EPOCHS * steps_per_epoch))
    use_amp = device.type == "cuda"
    # ---- DP hook (training/dp.py): None unless config.dp_epsilon; the accountant's state lives in state["dp"]
    private = dp.start(config, n_patients, planned, state, world.size)
    history: list[dict[str, Any]] = []
    running = torch.zeros((), device=device)
    running_count = 0
    last_train_loss = None
    bar = _progress_bar(planned, state["step"], progress and is_main)
    started = last_checkpoint = _clock()
    out_of_time = False

    model.train()
    while state["step"] < planned and not state["stopped_early"] and not out_of_time:
        order = epoch_order(n_patients, state["epoch"], config.seed)
        while (state["batch_in_epoch"] < steps_per_epoch and state["step"] < planned
               and not state["stopped_early"] and not out_of_time):
            start = state["batch_in_epoch"] * config.batch_size
            global_batch = order[start:start + config.batch_size]
            # each process takes an interleaved share of the global batch (DistributedSampler style)
            patients = global_batch[world.rank::world.size][:local_batch]
            if len(patients) == 0:  # a final batch smaller than the world: every rank must still step
                patients = global_batch[-1:]
            batch = to_device(model.collate(train_view.corpus, train_view.patients[patients]), device)
            batch["generator"] = generator
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"], planned, config)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            if private is not None:  # ---- DP hook: a per-patient clipped, noised gradient replaces backward()
                if not dp.private_backward(private, model, train_view, state):
                    state["stopped_early"] = True  # the next step would spend more than --dp-epsilon
                    break
            else:
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:  # EDM-style ramp: a short run does not keep mostly its initial weights
                decay = min(config.ema_decay, (1 + state["step"]) / (10 + state["step"]))
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - decay)
            running += loss.detach()
            running_count += 1
            state["step"] += 1
            state["batch_in_epoch"] += 1
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(state["step"])

            end_of_run = state["step"] >= planned
            timed_checkpoint = False
            if state["step"] % config.log_every == 0 or end_of_run:
                last_train_loss = dist.mean_across(running, world) / running_count  # the only host sync
                running.zero_()
                running_count = 0
                now = _clock()
                record = {"step": state["step"], "epoch": state["epoch"], "train_loss": round(last_train_loss, 6),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(now - started, 3)}
                history.append(record)
                if bar is not None:
                    bar.set_postfix(_bar_values(model, last_train_loss, state, history), refresh=False)
                if is_main:
                    append_jsonl(run_dir / "metrics.jsonl", record)
                timed_checkpoint, out_of_time = dist.any_across([
                    config.checkpoint_minutes is not None and now - last_checkpoint >= 60 * config.checkpoint_minutes,
                    config.max_time is not None and now - started >= config.max_time], world)
                end_of_run = end_of_run or out_of_time
            if state["step"] % eval_every == 0 or end_of_run:
                validate_and_keep_best(model, ema, val_corpus, config, state, run_dir, history, is_main, world)
                if bar is not None:
                    bar.set_postfix(_bar_values(model, last_train_loss, state, history))
            if state["batch_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if (state["step"] % config.checkpoint_every == 0 or end_of_run or state["stopped_early"]
                    or timed_checkpoint):
                rng_states = dist.gather_rng_states(world, generator)
                if is_main:
                    save_checkpoint(checkpoint_dir, model, ema, optimizer, state, rng_states)
                dist.barrier(world)
                last_checkpoint = _clock()
            if state["batch_in_epoch"] == 0:
                break  # new epoch: new order
    if bar is not None:
        bar.close()
    if out_of_time and is_main:
        print(f"time budget of {config.max_time:g} s used: stopped at step {state['step']}; the best model so far is "
              f"in {run_dir / 'model'}; resume to continue", file=sys.stderr)
    dist.teardown(world)
    if is_main:
        finish_best_model(model, run_dir, device, progress=progress)
    return TrainResult(run_dir=run_dir, steps=state["step"], epochs_completed=state["epoch"],
                       best_val_loss=state["best_val_loss"], last_train_loss=last_train_loss,
                       stopped_early=state["stopped_early"], history=history, out_of_time=out_of_time,
                       best_step=state.get("best_step"))


def _restore_streams(streams: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    if "torch_cpu" in streams:
        torch.set_rng_state(streams["torch_cpu"])
    if "generator" in streams:  # absent from checkpoints older than the loop's generator: it stays seeded
        generator.set_state(streams["generator"])
    if "torch_cuda" in streams and generator.device.type == "cuda":
        torch.cuda.set_rng_state(streams["torch_cuda"], generator.device)


def _bar_values(model: GenerativeModel, train_loss: float | None, state: dict[str, Any],
                history: list[dict[str, Any]]) -> dict[str, str]:
    """Training loss, the last validation value (HALO: NLL per code) and the best one."""
    values = {} if train_loss is None else {"loss": f"{train_loss:.4f}"}
    last = next((r["val_loss"] for r in reversed(history) if r.get("val_loss") is not None), None)
    if last is not None:
        values[f"val/{model.validation_unit}"] = f"{last:.4f}"
        values["best"] = f"{state['best_val_loss']:.4f}"
    return values


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)




__all__ = ["TrainConfig", "TrainResult", "evaluate_loss", "learning_rate", "epoch_order", "train", "latest_step",
           "rank_seed"]
