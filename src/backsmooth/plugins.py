"""Users' own code named on the command line as `MODULE:NAME` (a method class, a model factory)."""

import importlib
from typing import Any

from backsmooth.errors import ConfigError


def is_import_path(name: str) -> bool:
    """`package.module:Name` rather than a registered name."""
    return ":" in name


def import_object(path: str, what: str) -> Any:
    """The object `NAME` of module `MODULE` for `path` = 'MODULE:NAME'; one-line errors naming `what`."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{what} {path!r} must be MODULE:NAME, e.g. mypackage.mymodule:MyClass")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure of the user's module is their input error
        raise ConfigError(f"cannot import {what} module {module_name!r} ({type(error).__name__}: {error}); "
                          f"check that it is on PYTHONPATH") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no {attribute!r} for {what} {path!r}")
        obj = getattr(obj, part)
    return obj
