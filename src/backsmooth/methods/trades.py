"""TRADES (Zhang et al. 2019) and its one-step variant Fast TRADES.

TRADES: K sign steps on KL(s(z) || s(f(x'))) from x + 0.001 N(0, I), z = f(x) in eval mode;
loss = CE(f(x), y) + beta KL(s(f(x)) || s(f(x_K))). Fast TRADES: K = 1 from U(-eps, eps), alpha = eps.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import Initializer, Perturbation, gaussian_init, kl_loss, predict_eval, uniform_init
from backsmooth.methods.base import Stats, TrainingMethod, record, trades_loss


def trades_step(model: nn.Module, x: Tensor, y: Tensor, init: Initializer, eps: float, alpha: float,
                steps: int, beta: float, generator: torch.Generator | None, stats: Stats | None) -> Tensor:
    """One no-grad clean forward, K KL ascent steps from `init`, then the TRADES loss."""
    clean_log_probs = F.log_softmax(predict_eval(model, x).float(), dim=1)
    attack = Perturbation(kl_loss, init, eps, alpha, steps)
    x_adv, start_kl = attack(model, x, clean_log_probs, generator)
    record(stats, attack_start_kl=start_kl)
    return trades_loss(model, x, x_adv, y, beta, stats)


@dataclasses.dataclass(frozen=True)
class TRADES(TrainingMethod):
    name = "trades"
    summary = "TRADES-K: the accuracy/robustness trade-off loss with a K-step KL attack; the quality reference"
    eps: float = 8 / 255
    alpha: float = 0.007
    steps: int = 10
    beta: float = 6.0

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check_steps()
        self._check(self.beta >= 0, "beta", ">= 0")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None) -> Tensor:
        return trades_step(model, x, y, gaussian_init(0.001), self.eps, self.alpha, self.steps, self.beta,
                           generator, stats)


@dataclasses.dataclass(frozen=True)
class FastTRADES(TrainingMethod):
    name = "fast_trades"
    summary = "TRADES with one KL step from a uniform random start; fast, less stable than Backward Smoothing"
    eps: float = 8 / 255
    alpha: float | None = None  # defaults to eps
    beta: float = 6.0

    def __post_init__(self) -> None:
        if self.alpha is None:
            self._set("alpha", self.eps)
        self._check_eps_alpha()
        self._check(self.beta >= 0, "beta", ">= 0")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None) -> Tensor:
        return trades_step(model, x, y, uniform_init, self.eps, self.alpha, 1, self.beta, generator, stats)
