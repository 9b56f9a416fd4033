"""Checkpoints and model files: atomic saving (atomic.py), safe (weights-only) loading, and loading a
trained model with its metadata, from a run directory, a model file or an exported folder (model.safetensors
and config.json, written by `backsmooth export`)."""

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from backsmooth import models
from backsmooth.atomic import atomic_write_bytes, atomic_write_text
from backsmooth.errors import CheckpointError


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite a whole JSON-lines file atomically (metrics files are small)."""
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def save(path: str | Path, obj: dict[str, Any]) -> None:
    """torch.save, atomically; `obj` must hold only tensors and plain Python values."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`: a file that would need arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(f"refusing {path}: it needs arbitrary code to unpickle "
                                  f"(not a weights-only checkpoint); load only files you trust") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first_line(exc)})") from None
    except Exception as exc:  # torch raises many types for damaged files (RuntimeError, EOFError, IndexError...)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type name when it has no text), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def model_state(obj: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict stored under "model" (or the dict itself if it is a bare state_dict)."""
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no model state_dict under the key 'model'")
    return state


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a readable message for architecture or class-count mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this architecture: {len(missing)} missing keys (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}); check --arch"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source} does not fit: {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[key].shape)} (different number of classes or width?)"
            )
    model.load_state_dict(state)


EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_FORMAT = "model.safetensors", "config.json", 1


def is_exported(path: str | Path) -> bool:
    """Whether `path` is a folder written by `backsmooth export` (it holds model.safetensors)."""
    return (Path(path) / EXPORT_WEIGHTS).is_file()


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained model from a run directory (its best.pt, else last.pt), a model file or an exported folder, with
    its metadata (arch, num_classes, in_channels, dataset, method, norm, eps, ..., and `path`, the file read)."""
    path = Path(path)
    if is_exported(path):
        return _load_exported(path, device)
    if path.is_dir():
        candidates = [path / "best.pt", path / "last.pt"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise CheckpointError(f"{path} holds no best.pt or last.pt; is it a run directory of `backsmooth train`?")
        path = found[0]
    saved = load(path)
    meta = saved.get("meta")
    if not isinstance(meta, dict) or not {"arch", "num_classes", "in_channels"} <= set(meta):
        raise CheckpointError(f"{path} has no 'meta' with arch, num_classes and in_channels; "
                              f"it was not written by `backsmooth train`")
    model = models.build(meta["arch"], meta["num_classes"], in_channels=meta["in_channels"])
    load_state_into(model, model_state(saved, path), str(path))
    return model.to(device).eval(), dict(meta, path=str(path))


def _load_exported(folder: Path, device: torch.device | str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of an exported folder: the architecture its config.json names, the weights of model.safetensors
    (the normalisation is part of them), and the checkpoint metadata the config carries."""
    weights = folder / EXPORT_WEIGHTS
    try:
        config = json.loads((folder / EXPORT_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / EXPORT_CONFIG} is missing or not JSON ({first_line(exc)}); "
                              f"export the run again") from None
    if not isinstance(config, dict) or config.get("library") != "backsmooth" or "checkpoint" not in config:
        raise CheckpointError(f"{folder / EXPORT_CONFIG} was not written by `backsmooth export`")
    if config.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{folder} has export format {config.get('format')!r}; this backsmooth reads format "
                              f"{EXPORT_FORMAT} (upgrade backsmooth)")
    try:
        state = load_file(weights)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({first_line(exc)})") from None
    meta = dict(config["checkpoint"])
    model = models.build(meta["arch"], meta["num_classes"], in_channels=meta["in_channels"])
    load_state_into(model, state, str(weights))
    return model.to(device).eval(), dict(meta, path=str(weights))
