"""backsmooth: efficient adversarially robust training (Backward Smoothing and baselines)."""

from backsmooth import attacks, methods, models

__version__ = "0.1.0"

__all__ = ["attacks", "methods", "models", "__version__"]
