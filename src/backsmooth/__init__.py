"""backsmooth: efficient adversarially robust training (Backward Smoothing and baselines).

    loss_fn = backsmooth.methods.build("backward_smoothing", eps=8/255)   # a drop-in training loss
    result = backsmooth.evaluate(model, x, y, eps=8/255, attacks=("pgd20", "cw20"))
    model, meta = backsmooth.load_model("runs/latest")                   # a trained model, in eval mode
    model = backsmooth.load("exported/folder")                           # or a run, a .pt file, a Hub id

The names below load on first use, so torch-free parts (the report) import without torch.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"attacks": "backsmooth.attacks", "methods": "backsmooth.methods", "models": "backsmooth.models",
         "RunConfig": "backsmooth.config", "evaluate": "backsmooth.evaluation",
         "load_model": "backsmooth.checkpoint", "load": "backsmooth.publish"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'backsmooth' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__.endswith(f".{name}") else getattr(module, name)


__all__ = ["RunConfig", "attacks", "evaluate", "load", "load_model", "methods", "models", "__version__"]
