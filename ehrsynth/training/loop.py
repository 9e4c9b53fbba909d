"""The one training loop every ehrsynth model shares (HALO, EHRDiff, and any later model).

A model only has to meet :class:`~ehrsynth.models.base.GenerativeModel`: ``collate(corpus, patients)`` makes a
batch and ``forward(batch)`` returns its mean loss. The loop owns everything else: seeded epoch order,
optimizer and learning-rate schedule, EMA, validation on a schedule that always fires, best-model keeping,
early stopping, gradient clipping, bf16 autocast on CUDA, DDP under ``torchrun``, a tqdm bar, a JSON-lines
metrics log, and atomic checkpoints that let ``resume=True`` continue exactly where a killed run stopped.

Run directory layout::

    RUN/config.json        resolved model + training config
    RUN/model/             best model so far (safetensors + JSON; EMA weights when EMA is on)
    RUN/checkpoint/        last checkpoint: weights, EMA, optimizer, RNG and loop state
    RUN/metrics.jsonl      one JSON object per log/validation event
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file

from ehrsynth.data.corpus import PatientCorpus, replace_directory
from ehrsynth.data.view import CorpusView
from ehrsynth.errors import ConfigError, InputError
from ehrsynth.models.base import GenerativeModel
from ehrsynth.models.io import atomic_save_tensors, atomic_write_text, config_to_dict, save_model
from ehrsynth.training import distributed as dist
from ehrsynth.training import dp


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings, separate from the architecture (which lives in each model's config).

    Attributes:
        optimizer: ``'adam'`` (HALO paper) or ``'adamw'`` (EHRDiff paper).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (adamw) or L2 (adam).
        batch_size: global batch size (split across processes under torchrun).
        max_epochs: upper bound on passes over the training patients.
        max_steps: upper bound on optimizer steps (None: only epochs bound the run).
        lr_schedule: ``'constant'`` or ``'cosine'`` (decays to ``min_lr_ratio * lr``).
        warmup_fraction: linear warm-up over this share of the planned steps -- scaled to the run, unlike the
            EHRDiff reference's fixed 20,000 steps that a short run never leaves.
        min_lr_ratio: floor of the cosine schedule, as a fraction of ``lr``.
        ema_decay: keep an exponential moving average of the weights (EHRDiff: 0.999); the EMA weights are the
            ones saved as the model. The decay ramps up as min(ema_decay, (1 + t) / (10 + t)) at step t, so a
            short run is not dominated by its initial weights. None disables it.
        grad_clip: clip the global gradient norm to this value; None disables clipping.
        eval_every: validate every this many steps; None means once per epoch (so it always fires).
        patience: stop after this many validations without improvement; None disables early stopping.
        checkpoint_every: write the resumable checkpoint every this many steps (and always at the end).
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
    max_epochs: int = 50
    max_steps: int | None = None
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0
    ema_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int | None = None
    patience: int | None = None
    checkpoint_every: int = 200
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
        resume: continue from ``run_dir/checkpoint``.
        progress: show a progress bar (rank 0 only).
        on_step: called with the step number after each optimizer step (for callers' own hooks).

    Returns:
        A :class:`TrainResult`; the best model is in ``run_dir/model``.

    Raises:
        ConfigError: for a checkpoint in the way (without ``resume``) or none to resume from.
    """
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoint"
    if checkpoint_dir.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose "
                          f"another --out")
    if resume and not checkpoint_dir.exists():
        raise ConfigError(f"--resume given but {checkpoint_dir} does not exist")
    if train_corpus.n_patients == 0:
        raise InputError("the training corpus has no patients")
    train_view = CorpusView.of(train_corpus)

    world = dist.setup()
    is_main = world.rank == 0
    device = _device(config)
    torch.manual_seed(config.seed + world.rank)  # each process draws its own noise (EHRDiff sigmas, dropout)
    model = model.to(device)
    ema = [p.detach().clone() for p in model.parameters()] if config.ema_decay else None
    optimizer = _make_optimizer(model, config)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val_loss": None, "bad_evals": 0,
             "stopped_early": False}
    if resume:
        state = _load_checkpoint(checkpoint_dir, model, ema, optimizer, device)
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"family": model.family, "model": config_to_dict(model.config), "training": asdict(config),
                    "train_patients": train_corpus.n_patients,
                    "val_patients": 0 if val_corpus is None else val_corpus.n_patients}
        atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2))
    wrapped = dist.wrap(model, device)
    if config.compile:
        wrapped = torch.compile(wrapped)

    local_batch = max(1, config.batch_size // world.size)
    steps_per_epoch = math.ceil(train_corpus.n_patients / config.batch_size)
    planned = steps_per_epoch * config.max_epochs
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    eval_every = config.eval_every or steps_per_epoch
    use_amp = device.type == "cuda"
    # ---- DP hook (training/dp.py): None unless config.dp_epsilon; the accountant's state lives in state["dp"]
    private = dp.start(config, train_corpus.n_patients, planned, state, world.size)
    history: list[dict[str, Any]] = []
    running = torch.zeros((), device=device)
    running_count = 0
    last_train_loss = None
    bar = _progress_bar(planned, state["step"], progress and is_main)
    started = time.perf_counter()

    model.train()
    while state["step"] < planned and not state["stopped_early"]:
        order = epoch_order(train_corpus.n_patients, state["epoch"], config.seed)
        while (state["batch_in_epoch"] < steps_per_epoch and state["step"] < planned
               and not state["stopped_early"]):
            start = state["batch_in_epoch"] * config.batch_size
            global_batch = order[start:start + config.batch_size]
            # each process takes an interleaved share of the global batch (DistributedSampler style)
            patients = global_batch[world.rank::world.size][:local_batch]
            if len(patients) == 0:  # a final batch smaller than the world: every rank must still step
                patients = global_batch[-1:]
            batch = _to_device(model.collate(train_view.corpus, train_view.patients[patients]), device)
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
            if state["step"] % config.log_every == 0 or end_of_run:
                last_train_loss = dist.mean_across(running, world) / running_count  # the only host sync
                running.zero_()
                running_count = 0
                record = {"step": state["step"], "epoch": state["epoch"], "train_loss": round(last_train_loss, 6),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3)}
                history.append(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_train_loss:.4f}")
                if is_main:
                    _append_jsonl(run_dir / "metrics.jsonl", record)
            if state["step"] % eval_every == 0 or end_of_run:
                _validate_and_keep_best(model, ema, val_corpus, config, state, run_dir, history, is_main, world)
            if state["batch_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if state["step"] % config.checkpoint_every == 0 or end_of_run or state["stopped_early"]:
                rng_states = dist.gather_rng_states(world)
                if is_main:
                    _save_checkpoint(checkpoint_dir, model, ema, optimizer, state, rng_states)
                dist.barrier(world)
            if state["batch_in_epoch"] == 0:
                break  # new epoch: new order
    if bar is not None:
        bar.close()
    dist.teardown(world)
    return TrainResult(run_dir=run_dir, steps=state["step"], epochs_completed=state["epoch"],
                       best_val_loss=state["best_val_loss"], last_train_loss=last_train_loss,
                       stopped_early=state["stopped_early"], history=history)


@torch.no_grad()
def evaluate_loss(model: GenerativeModel, corpus: PatientCorpus | CorpusView, *, batch_size: int,
                  seed: int = 0) -> float:
    """Mean loss over every patient of ``corpus``, patient-weighted, with fixed noise for noisy losses."""
    view = CorpusView.of(corpus)
    was_training = model.training
    model.eval()
    device = model.device
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, view.n_patients, batch_size):
            patients = view.patients[start:start + batch_size]
            loss = model(_to_device(model.collate(view.corpus, patients), device))
            total += float(loss) * len(patients)
            count += len(patients)
    model.train(was_training)
    return total / max(count, 1)


def _validate_and_keep_best(model, ema, val_corpus, config, state, run_dir, history, is_main, world):
    with _swapped_in(model, ema):
        if val_corpus is not None and val_corpus.n_patients > 0:
            val_loss = evaluate_loss(model, val_corpus, batch_size=config.batch_size, seed=config.seed)
        else:
            val_loss = None
        improved = val_loss is None or state["best_val_loss"] is None or val_loss < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = val_loss
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
        _append_jsonl(run_dir / "metrics.jsonl", record)
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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors go to ``device`` through pinned memory (an asynchronous copy); host values such as sizes stay."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _save_checkpoint(directory: Path, model, ema, optimizer, state, rng_states) -> None:
    """Write weights, EMA, optimizer tensors, RNG and loop state into a staging dir, then rename it in."""
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=directory.parent))
    try:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{i}": t for i, t in enumerate(ema)})
        opt_state = optimizer.state_dict()
        for index, slots in opt_state["state"].items():
            for name, value in slots.items():
                tensors[f"opt.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        for rank, rng in enumerate(rng_states):  # one stream per process, so a resumed DDP run is exact
            tensors[f"rng.torch_cpu.{rank}"] = rng
        if torch.cuda.is_available():
            tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
        atomic_save_tensors(tensors, staging / "state.safetensors")
        loop_state = dict(state, param_groups=opt_state["param_groups"])
        (staging / "loop.json").write_text(json.dumps(loop_state, indent=2))
        replace_directory(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _load_checkpoint(directory: Path, model, ema, optimizer, device) -> dict[str, Any]:
    try:
        tensors = load_file(str(directory / "state.safetensors"))
        loop_state = json.loads((directory / "loop.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read checkpoint: {exc}", file=directory) from None
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        for i, t in enumerate(ema):
            t.copy_(tensors[f"ema.{i}"])
    opt_state: dict[str, Any] = {"state": {}, "param_groups": loop_state.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    rank = dist.World().rank if not torch.distributed.is_initialized() else torch.distributed.get_rank()
    torch.set_rng_state(tensors.get(f"rng.torch_cpu.{rank}", tensors["rng.torch_cpu.0"]))
    if "rng.torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    return loop_state


def latest_step(run_dir: str | Path) -> int | None:
    """The step of the run's last checkpoint, or None if there is none."""
    path = Path(run_dir) / "checkpoint" / "loop.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None


__all__ = ["TrainConfig", "TrainResult", "evaluate_loss", "learning_rate", "epoch_order", "train", "latest_step"]
