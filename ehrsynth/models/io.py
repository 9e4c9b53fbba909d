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

from ehrsynth.errors import ConfigError, InputError, MissingFileError, short
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
    header = _read_header(directory / CONFIG)
    try:
        cls = model_class(header["family"])
        config = config_from_dict(cls.config_class, header["config"])
        model = cls(config, CorpusMeta.from_dict(header["meta"]))
    except ConfigError as exc:
        raise InputError(str(exc), file=directory / CONFIG) from None
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError, OverflowError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"config does not build a {header['family']} model ({type(exc).__name__}: "
                         f"{detail[:120]})", file=directory / CONFIG) from None
    try:
        weights = load_file(str(directory / WEIGHTS))
    except Exception:  # noqa: BLE001 -- safetensors raises its own error types for a damaged file
        raise InputError("damaged or truncated weights file (copy it again or retrain)",
                         file=directory / WEIGHTS) from None
    _check_weights_match(model, weights, directory, len(header["meta"]["codes"]))
    model.load_state_dict(weights)
    return model.to(device).eval()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _read_header(path: Path) -> dict[str, Any]:
    """``model.json`` as a dict whose family, config and meta have the shapes :func:`load_model` needs.

    Raises:
        InputError: naming the file and what is wrong (not UTF-8, not JSON, a list, null or repeated codes).
    """
    try:
        header = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start})",
                         file=path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=path) from None
    except OSError as exc:
        raise InputError(f"cannot read ({type(exc).__name__})", file=path) from None
    if not isinstance(header, dict):
        raise InputError(f"expected a JSON object with family, config and meta, got a {type(header).__name__}",
                         file=path)
    for key, kind in (("family", str), ("config", dict), ("meta", dict)):
        if not isinstance(header.get(key), kind):
            raise InputError(f"{key!r} must be a {kind.__name__}, got {short(header.get(key))}", file=path)
    meta = header["meta"]
    for key, kind in (("codes", list), ("label_names", list), ("extra", dict)):
        if not isinstance(meta.get(key), kind):
            raise InputError(f"meta {key!r} must be a {kind.__name__}, got {short(meta.get(key))}", file=path)
    for key in ("codes", "label_names"):
        values = meta[key]
        wrong = [i for i, v in enumerate(values) if not isinstance(v, str) or not v]
        if wrong:
            raise InputError(f"meta {key!r} entry {wrong[0]} must be a non-empty string, got "
                             f"{short(values[wrong[0]])}", file=path)
        seen: set[str] = set()
        for i, value in enumerate(values):
            if value in seen:
                raise InputError(f"meta {key!r} entry {i} repeats {short(value)}", file=path)
            seen.add(value)
    return header


def _check_weights_match(model: torch.nn.Module, weights: dict[str, torch.Tensor], directory: Path,
                         n_codes: int) -> None:
    """Name the first tensor whose presence or shape differs between the weights file and ``model.json``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        where = "missing from" if missing else "not expected in"
        raise InputError(f"weights do not match model.json: tensor {name!r} {where} {WEIGHTS} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)", file=directory)
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise InputError(f"weights do not match model.json: {name!r} is {tuple(weights[name].shape)} in "
                             f"{WEIGHTS} but {tuple(tensor.shape)} for the config and {n_codes}-code vocabulary "
                             f"in {CONFIG}", file=directory)
