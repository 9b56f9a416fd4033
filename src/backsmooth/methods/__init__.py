"""Training methods, each a short composition over the perturbation engine, registered by name.

    loss_fn = backsmooth.methods.build("backward_smoothing", eps=8/255, beta=10.0, gamma=1.0)
    loss = loss_fn(model, x, y, generator=g)   # model in train mode
    loss.backward()

A new method is one file (a `TrainingMethod` dataclass decorated with `@register`) plus its import
below; see docs/extending.md.
"""
# ruff: noqa: I001  (importing a method module registers it: the import order is the order of tables and help)

from backsmooth.methods.base import Option, Stats, StepContext, TrainingMethod, hyperparameter
from backsmooth.methods.registry import build, method_class, names, options, register, takers

from backsmooth.methods.backward_smoothing import BackwardSmoothing
from backsmooth.methods.trades import TRADES, FastTRADES
from backsmooth.methods.pgd_at import PGDAT
from backsmooth.methods.fgsm_rs import FGSMRS
from backsmooth.methods.gradalign import GradAlign
from backsmooth.methods.natural import Natural
from backsmooth.methods.nfgsm import NFGSM
from backsmooth.methods.guided import GAT, NuAT
from backsmooth.methods.fgsm_pgi import FGSMPGI
from backsmooth.methods.elle import ELLE, ELLEA
from backsmooth.methods.free_at import FreeAT
from backsmooth.methods.mart import MART
from backsmooth.methods.liet import LIET
from backsmooth.methods.fgsm_rs_cs import FGSMRSCS

__all__ = ["build", "names", "method_class", "options", "register", "takers", "hyperparameter", "Option", "Stats",
           "StepContext",
           "TrainingMethod", "BackwardSmoothing", "TRADES", "FastTRADES", "PGDAT", "FGSMRS", "GradAlign", "Natural",
           "NFGSM", "GAT", "NuAT", "FGSMPGI", "ELLE", "ELLEA", "FreeAT", "MART", "LIET", "FGSMRSCS"]
