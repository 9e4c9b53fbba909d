"""The loop's resumable checkpoint: weights, EMA, optimizer tensors, every process's random streams and the loop
state, written into a staging directory that is renamed in whole (a kill never leaves half a checkpoint).

Files: ``state.safetensors`` (tensors) and ``loop.json`` (step, epoch, best validation value, ...). Random
streams are kept per rank as ``rng.<stream>.<rank>``: ``torch_cpu`` (torch's global CPU stream, which the loop
forks and seeds, for module dropout), ``generator`` (the loop's own generator that models draw their noise from)
and ``torch_cuda`` (the global stream of the rank's GPU, when training on CUDA).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ehrsynth.data.corpus import replace_directory
from ehrsynth.errors import InputError
from ehrsynth.models.io import atomic_save_tensors, atomic_write_text


def save_checkpoint(directory: Path, model, ema, optimizer, state: dict[str, Any],
                    rng_states: list[dict[str, torch.Tensor]]) -> None:
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
        for rank, streams in enumerate(rng_states):  # one set per process, so a resumed DDP run is exact
            tensors.update({f"rng.{name}.{rank}": value for name, value in streams.items()})
        atomic_save_tensors(tensors, staging / "state.safetensors")
        loop_state = dict(state, param_groups=opt_state["param_groups"])
        (staging / "loop.json").write_text(json.dumps(loop_state, indent=2))
        replace_directory(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(directory: Path, model, ema, optimizer, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights, EMA and optimizer in place; return the loop state and this rank's random streams
    (rank 0's when the checkpoint has fewer ranks)."""
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
    streams = {}
    for name in ("torch_cpu", "generator", "torch_cuda"):
        value = tensors.get(f"rng.{name}.{rank}", tensors.get(f"rng.{name}.0"))
        if value is not None:
            streams[name] = value
    return loop_state, streams


def cut_metrics(path: Path, step: int) -> None:
    """Keep only the records of ``metrics.jsonl`` up to ``step`` (the checkpoint a resumed run restarts from),
    so the steps a killed run logged after it are not repeated; a line torn by the kill is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def latest_step(run_dir: str | Path) -> int | None:
    """The step of the run's last checkpoint, or None if there is none."""
    path = Path(run_dir) / "checkpoint" / "loop.json"
    return json.loads(path.read_text())["step"] if path.is_file() else None
