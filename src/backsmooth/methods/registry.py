"""The registry of training methods: names, classes, and their options, for config, CLI and bench.

A method registers itself with the `register` class decorator; users' classes named `MODULE:CLASS`
on the command line are imported and checked on first use.
"""

from typing import Any

from backsmooth.errors import ConfigError
from backsmooth.methods.base import Option, TrainingMethod
from backsmooth.plugins import import_object, is_import_path

_REGISTRY: dict[str, type[TrainingMethod]] = {}


def register(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Add a `TrainingMethod` subclass under its `name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
        raise ConfigError(f"{cls!r} is not a TrainingMethod subclass")
    for attribute in ("name", "summary"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise ConfigError(f"method class {cls.__name__} must declare a string `{attribute}`")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ConfigError(f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[TrainingMethod]:
    """The class of a registered name, or of `MODULE:CLASS` (imported and registered on first use)."""
    if is_import_path(name):
        cls = import_object(name, "method")
        if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
            raise ConfigError(f"method {name!r} is not a subclass of backsmooth.methods.TrainingMethod")
        return register(cls)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(_REGISTRY)} (or MODULE:CLASS)")
    return _REGISTRY[name]


def options() -> dict[str, Option]:
    """Every option of every registered method by name; a name two methods share is one option."""
    found: dict[str, Option] = {}
    for cls in _REGISTRY.values():
        for option in cls.options():
            if option.name in found and found[option.name].kind is not option.kind:
                raise ConfigError(f"option {option.name!r} has type {option.kind.__name__} in {cls.name} but "
                                  f"{found[option.name].kind.__name__} elsewhere; rename one")
            found.setdefault(option.name, option)
    return found


def takers(option: str) -> tuple[str, ...]:
    """The registered methods that take `option`."""
    return tuple(name for name, cls in _REGISTRY.items() if option in cls.hyperparameter_names())


def build(name: str, **hyperparameters: Any) -> TrainingMethod:
    """The training loss `name` with its authors' defaults, overridden by `hyperparameters`."""
    cls = method_class(name)
    unknown = sorted(set(hyperparameters) - set(cls.hyperparameter_names()))
    if unknown:
        accepted = ", ".join(o.name for o in cls.options()) or "none"
        raise ConfigError(f"{name} does not take {', '.join(unknown)} (it takes: {accepted})")
    return cls(**hyperparameters)
