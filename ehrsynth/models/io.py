"""One model-agnostic save/load: safetensors weights plus a JSON config, never pickle.

A saved model is a directory holding ``model.safetensors`` and ``model.json``; ``model.json`` names the model
family, its config and its :class:`~ehrsynth.models.base.CorpusMeta`. Both are written into one staging
directory renamed into place once, so a killed run never leaves a corrupt or mixed model.
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
from ehrsynth.outputs import current_umask, staged_output

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
    os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates 0600; outputs follow the umask
    os.replace(tmp, path)


def save_model(model: GenerativeModel, directory: str | Path) -> Path:
    """Save ``model`` (weights + config + meta) into ``directory``.

    Both files are written into one staging directory that replaces ``directory`` in a single rename, so a
    kill can never leave weights of one version beside the JSON of another.
    """
    header = {
        "family": model.family,
        "config": config_to_dict(model.config),
        "meta": model.meta.to_dict(),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    with staged_output(directory, "model") as staging:
        save_file(state, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(header, indent=2))
    return Path(directory)


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
        config = config_from_dict(cls.config_class, header["config"])
        model = cls(config, CorpusMeta.from_dict(header["meta"]))
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (json.JSONDecodeError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load model: {str(exc).splitlines()[0]}", file=directory) from None
    return model.to(device).eval()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
