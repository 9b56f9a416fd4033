"""Model registry: every model takes [0, 1] images and holds its normalisation inside."""

import functools
from collections.abc import Callable, Sequence

from torch import nn

from backsmooth.errors import ConfigError
from backsmooth.models.normalize import Normalize, NormalizedClassifier
from backsmooth.models.preact_resnet import PreActResNet18
from backsmooth.models.resnet import ResNet18
from backsmooth.models.small_cnn import SmallCNN
from backsmooth.models.wide_resnet import WideResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_cnn_gn": functools.partial(SmallCNN, norm="group"),
    "resnet18": ResNet18,
    "preact_resnet18": PreActResNet18,
    "wrn34_10": WideResNet,
}


def names() -> tuple[str, ...]:
    """The architecture names `build` accepts."""
    return tuple(_REGISTRY)


def build(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: int,
) -> NormalizedClassifier:
    """Build architecture `name` wrapped with its Normalize layer (identity when mean/std are omitted).

    Extra keyword arguments go to the architecture (for example `depth` and `width` for `wrn34_10`).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}; choose one of: {', '.join(_REGISTRY)}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values (one per input channel)")
    net = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    return NormalizedClassifier(net, mean, std)


__all__ = ["build", "names", "Normalize", "NormalizedClassifier"]
