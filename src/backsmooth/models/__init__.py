"""Model registry: every model takes [0, 1] images and holds its normalisation inside.

An architecture is a factory called as `factory(num_classes=..., in_channels=...)` that returns a
module on normalised inputs; `build` wraps it in the dataset's normalisation. Register one with
`register(name, factory)`, or name your own as MODULE:FUNCTION (docs/extending.md).
"""

import functools
from collections.abc import Callable, Sequence

from torch import nn

from backsmooth.errors import ConfigError
from backsmooth.models.backbones import backbone_factory, is_backbone
from backsmooth.models.normalize import Normalize, NormalizedClassifier
from backsmooth.models.preact_resnet import PreActResNet18
from backsmooth.models.resnet import ResNet18
from backsmooth.models.small_cnn import SmallCNN
from backsmooth.models.wide_resnet import WideResNet
from backsmooth.plugins import import_object, is_import_path

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_cnn_gn": functools.partial(SmallCNN, norm="group"),
    "resnet18": ResNet18,
    "preact_resnet18": PreActResNet18,
    "wrn34_10": WideResNet,
}


def register(name: str, factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Add architecture `name`: `factory(num_classes=..., in_channels=..., **kwargs)` -> module."""
    if not callable(factory):
        raise ConfigError(f"the factory of architecture {name!r} is not callable")
    if not name or is_import_path(name):
        raise ConfigError(f"architecture name {name!r} must be non-empty and without ':'")
    _REGISTRY[name] = factory
    return factory


def names() -> tuple[str, ...]:
    """The registered architecture names `build` accepts (besides MODULE:FUNCTION)."""
    return tuple(_REGISTRY)


def factory(name: str) -> Callable[..., nn.Module]:
    """The factory of a registered architecture, a timm:NAME or torchvision:NAME backbone, or the callable named
    by MODULE:FUNCTION."""
    if is_backbone(name):
        return backbone_factory(name)
    if is_import_path(name):
        found = import_object(name, "architecture")
        if not callable(found):
            raise ConfigError(f"architecture {name!r} is not callable; name a function or class that builds a model")
        return found
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(_REGISTRY)} "
                          f"(or timm:NAME, torchvision:NAME, MODULE:FUNCTION)")
    return _REGISTRY[name]


def build(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: int,
) -> NormalizedClassifier:
    """Build architecture `name` wrapped with its Normalize layer (identity when mean/std are omitted; a timm or
    torchvision backbone brings the mean/std of its pretrained configuration instead of the dataset's).

    Extra keyword arguments go to the architecture (for example `depth` and `width` for `wrn34_10`).
    """
    make = factory(name)
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values (one per input channel)")
    try:
        net = make(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as error:
        if is_import_path(name):
            raise ConfigError(f"architecture {name!r} must accept num_classes= and in_channels= ({error})") from None
        raise
    if not isinstance(net, nn.Module):
        raise ConfigError(f"architecture {name!r} returned {type(net).__name__}, not a torch.nn.Module")
    mean, std = getattr(net, "input_normalization", (mean, std))  # a pretrained backbone's own statistics
    return NormalizedClassifier(net, mean, std)


__all__ = ["build", "factory", "is_backbone", "names", "register", "Normalize", "NormalizedClassifier"]
