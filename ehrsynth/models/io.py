"""One model-agnostic save/load: safetensors weights plus a JSON config, never pickle.

A saved model is a directory holding ``model.safetensors`` and ``model.json``; ``model.json`` names the model
family, its config and its :class:`~ehrsynth.models.base.CorpusMeta`. Both files are written to temporary names
and renamed, so a killed run never leaves a corrupt model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ehrsynth.errors import ConfigError, InputError, MissingFileError
from ehrsynth.models.base import CorpusMeta, GenerativeModel

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(config_class: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass, turning lists back into tuples and naming unknown keys.

    Raises:
        ConfigError: for a key the config class does not have.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {config_class.__name__} option(s): {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return config_class(**values)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_model(model: GenerativeModel, directory: str | Path) -> Path:
    """Save ``model`` (weights + config + meta) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _unwrap(model).state_dict()
    atomic_save_tensors(state, directory / WEIGHTS)
    header = {
        "family": model.family,
        "config": config_to_dict(model.config),
        "meta": model.meta.to_dict(),
    }
    atomic_write_text(directory / CONFIG, json.dumps(header, indent=2))
    return directory


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> GenerativeModel:
    """Load a model saved by :func:`save_model` (or a run directory holding one under ``model/``).

    Raises:
        MissingFileError: when no saved model is there.
        InputError: when the files are unreadable or name an unknown family.
    """
    from ehrsynth.models import model_class  # late import: the registry imports every family

    directory = Path(directory)
    if not (directory / CONFIG).is_file() and (directory / "model" / CONFIG).is_file():
        directory = directory / "model"
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise MissingFileError(f"no saved model ({CONFIG} + {WEIGHTS}); train one with `ehrsynth train`",
                               file=directory)
    try:
        header = json.loads((directory / CONFIG).read_text())
        cls = model_class(header["family"])
        config = cls.config_from_saved(header["config"])
        model = cls(config, CorpusMeta.from_dict(header["meta"]))
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (json.JSONDecodeError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load model: {str(exc).splitlines()[0]}", file=directory) from None
    return model.to(device).eval()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
