"""Backbones of timm and torchvision: `--arch timm:NAME` and `--arch torchvision:NAME`.

The network is built by its library with the dataset's number of classes (and, for timm, of input channels); its
input normalisation is the one of its pretrained configuration, kept inside the model by `models.build` as for
our own architectures. Pretrained weights (`--pretrained`, downloaded by the library, or `--weights PATH`, a
local state dict of the library's model) are copied in by the trainer, not here, so that a saved run is rebuilt
without downloading anything. Both libraries are an optional extra: pip install 'backsmooth[timm]'.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from backsmooth.errors import ConfigError

LIBRARIES = ("timm", "torchvision")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def is_backbone(name: str) -> bool:
    """Whether architecture `name` is LIBRARY:MODEL of a supported library."""
    return name.partition(":")[0] in LIBRARIES and bool(name.partition(":")[2])


def backbone_factory(name: str) -> Callable[..., nn.Module]:
    """The factory `(num_classes=, in_channels=) -> module` of architecture LIBRARY:MODEL; a name its library does
    not know is a one-line ConfigError here, before a run writes anything."""
    library, _, model = name.partition(":")
    known = (_library("timm").is_model(model) if library == "timm"
             else model in _library("torchvision").models.list_models())
    if not known:
        listing = (f"timm; print(timm.list_models('*{model[:6]}*'))" if library == "timm"
                   else "torchvision; print(torchvision.models.list_models())")
        raise ConfigError(f"{library} does not know the model {model!r}; list its names with "
                          f"python -c \"import {listing}\"")
    return functools.partial(_timm_model if library == "timm" else _torchvision_model, model)


def _library(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"--arch {name}:... needs {name}: pip install 'backsmooth[timm]' (timm with torchvision; "
                          f"see the README for the torch release they need)") from None


def _timm_model(model: str, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    net = _library("timm").create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    config = getattr(net, "pretrained_cfg", None) or {}
    _keep_normalization(net, config.get("mean"), config.get("std"), in_channels)
    return net


def _torchvision_model(model: str, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    models = _library("torchvision").models
    if in_channels != 3:
        raise ConfigError(f"torchvision's {model} takes RGB images, not {in_channels} channel(s); use a timm model "
                          f"(in_chans adapts) or a dataset of colour images")
    net = models.get_model(model, weights=None, num_classes=num_classes)
    mean, std = IMAGENET_STATS
    default = _default_weights(models, model)
    if default is not None:  # the normalisation its pretrained weights expect (metadata only; nothing downloaded)
        transform = default.transforms()
        mean, std = getattr(transform, "mean", mean), getattr(transform, "std", std)
    _keep_normalization(net, mean, std, in_channels)
    return net


def _default_weights(models: ModuleType, model: str) -> Any:
    """torchvision's DEFAULT weights entry of `model` (metadata), or None when it has none."""
    try:
        return models.get_model_weights(model).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def _keep_normalization(net: nn.Module, mean: Any, std: Any, in_channels: int) -> None:
    """Record the model's own (mean, std) for models.build; none when it has no RGB statistics for these channels."""
    if mean is not None and std is not None and len(mean) == len(std) == in_channels:
        net.input_normalization = (tuple(float(m) for m in mean), tuple(float(s) for s in std))


def pretrained_state(arch: str, num_classes: int, in_channels: int, weights: str | None) -> dict[str, torch.Tensor]:
    """The state dict to start from: the local file `weights`, else the library's pretrained weights (downloaded by
    it, with the dataset's classes and channels so that timm adapts the head and the first layer itself)."""
    library, _, model = arch.partition(":")
    if weights:
        return _state_file(Path(weights))
    try:
        if library == "timm":
            net = _library("timm").create_model(model, pretrained=True, num_classes=num_classes, in_chans=in_channels)
        else:
            net = _library("torchvision").models.get_model(model, weights="DEFAULT")
    except ConfigError:
        raise
    except Exception as error:  # the libraries' download and cache errors have no common type
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--pretrained: {library} could not get the weights of {model} ({first[:160]}); where there "
                          f"is a network, save them with torch.save(model.state_dict(), PATH) and pass --weights PATH"
                          ) from None
    return net.state_dict()


def _state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (a bare state dict, or one under 'state_dict'/'model')."""
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load and safetensors raise many types for a file that is not theirs
        raise ConfigError(f"--weights {path} is not a readable state dict ({type(error).__name__}); save one with "
                          f"torch.save(model.state_dict(), PATH)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--weights {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def head_names(net: nn.Module) -> set[str]:
    """The state-dict keys of the classifier head: timm's get_classifier(), else the last Linear layer."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        head = next((m for m in reversed(list(net.modules())) if isinstance(m, nn.Linear)), None)
    prefix = next((name for name, module in net.named_modules() if module is head), None)
    if prefix is None:
        return set()
    return {f"{prefix}.{key}" for key in head.state_dict()}


def load_backbone(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state` into the library's network `net`; a head of another number of classes stays new (its keys are
    returned). Any other key whose shape differs, or that is missing, is a one-line ConfigError."""
    own, head = net.state_dict(), head_names(net)
    for key, value in own.items():
        if key not in state and key not in head:
            raise ConfigError(f"{source} lacks {key} of this architecture; give weights of the same model")
        if key in state and state[key].shape != value.shape and key not in head:
            raise ConfigError(f"{source}: {key} has shape {tuple(state[key].shape)} but this architecture's has "
                              f"{tuple(value.shape)}; give weights of the same model")
    fresh = sorted(key for key in head if key not in state or state[key].shape != own[key].shape)
    net.load_state_dict({k: v for k, v in state.items() if k in own and k not in fresh}, strict=False)
    return fresh
