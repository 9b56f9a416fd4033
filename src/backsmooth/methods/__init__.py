"""Training methods, each a short composition over the perturbation engine.

    loss_fn = backsmooth.methods.build("backward_smoothing", eps=8/255, beta=10.0, gamma=1.0)
    loss = loss_fn(model, x, y, generator=g)   # model in train mode
    loss.backward()
"""

from typing import Any

from backsmooth.errors import ConfigError
from backsmooth.methods.backward_smoothing import BackwardSmoothing
from backsmooth.methods.base import Stats, TrainingMethod
from backsmooth.methods.fgsm_rs import FGSMRS
from backsmooth.methods.gradalign import GradAlign
from backsmooth.methods.natural import Natural
from backsmooth.methods.pgd_at import PGDAT
from backsmooth.methods.trades import TRADES, FastTRADES

_REGISTRY: dict[str, type[TrainingMethod]] = {
    cls.name: cls for cls in (BackwardSmoothing, TRADES, FastTRADES, PGDAT, FGSMRS, GradAlign, Natural)
}


def names() -> tuple[str, ...]:
    """The method names `build` accepts."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[TrainingMethod]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build(name: str, **hyperparameters: Any) -> TrainingMethod:
    """The training loss `name` with the paper's defaults, overridden by `hyperparameters`."""
    cls = method_class(name)
    unknown = sorted(set(hyperparameters) - set(cls.hyperparameter_names()))
    if unknown:
        accepted = ", ".join(cls.hyperparameter_names()) or "none"
        raise ConfigError(f"{name} does not take {', '.join(unknown)} (it takes: {accepted})")
    return cls(**hyperparameters)


__all__ = ["build", "names", "method_class", "Stats", "TrainingMethod", "BackwardSmoothing", "TRADES", "FastTRADES",
           "PGDAT", "FGSMRS", "GradAlign", "Natural"]
