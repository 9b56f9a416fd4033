"""backsmooth: efficient adversarially robust training (Backward Smoothing and baselines).

    loss_fn = backsmooth.methods.build("backward_smoothing", eps=8/255)   # a drop-in training loss
    result = backsmooth.evaluate(model, x, y, eps=8/255, attacks=("pgd20", "cw20"))
"""

from backsmooth import attacks, methods, models
from backsmooth.config import RunConfig
from backsmooth.evaluation import evaluate

__version__ = "0.1.0"

__all__ = ["RunConfig", "attacks", "evaluate", "methods", "models", "__version__"]
