"""TRADES (Zhang et al. 2019) and its one-step variant Fast TRADES.

TRADES: K sign steps on KL(s(z) || s(f(x'))) from x + 0.001 N(0, I), z = f(x) in eval mode;
loss = CE(f(x), y) + beta KL(s(f(x)) || s(f(x_K))). Fast TRADES: K = 1 from U(-eps, eps), alpha = eps.
"""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.attacks import ball_init, gaussian_init
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, trades_attack, trades_loss
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class TRADES(TrainingMethod):
    name = "trades"
    summary = "TRADES-K: the accuracy/robustness trade-off loss with a K-step KL attack; the quality reference"
    loss_forwards = 2  # the clean and the adversarial forward of its loss
    single_step_attack = False  # KL steps (the collapse guard logs, does not decide)
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    steps: int = hyperparameter(10, "attack steps K")
    beta: float = hyperparameter(6.0, "weight of the KL term")

    def __post_init__(self) -> None:
        if self.alpha is None:  # the authors' 0.007 at L-inf; at L2 their optimiser's step of 2 eps / K
            self._set("alpha", 0.007 if self.norm == "linf" else 2 * self.eps / self.steps)
        self._check_eps_alpha()
        self._check_steps()
        self._check(self.beta >= 0, "beta", ">= 0")

    def floor_units(self) -> int:
        return 1 + 2 * self.steps + 6  # clean forward, K input-gradient steps, the TRADES loss

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                stats: Stats | None = None) -> Tensor:
        return trades_attack(self, model, x, gaussian_init(0.001, self.norm), self.alpha, self.steps, generator, stats)

    def loss_on(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, stats: Stats | None = None) -> Tensor:
        return trades_loss(self, model, x, x_adv, y, self.beta, stats)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        return self.loss_on(model, x, self.perturb(model, x, y, generator, stats), y, stats)


@register
@dataclasses.dataclass(frozen=True)
class FastTRADES(TrainingMethod):
    name = "fast_trades"
    summary = "TRADES with one KL step from a uniform random start; fast, less stable than Backward Smoothing"
    loss_forwards = 2  # the clean and the adversarial forward of its loss
    single_step_attack = False  # a KL step (the collapse guard logs, does not decide)
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    beta: float = hyperparameter(6.0, "weight of the KL term")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check(self.beta >= 0, "beta", ">= 0")

    def floor_units(self) -> int:
        return 1 + 2 + 6  # clean forward, one input-gradient step, the TRADES loss

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                stats: Stats | None = None) -> Tensor:
        return trades_attack(self, model, x, ball_init(self.norm), self.alpha, 1, generator, stats)

    def loss_on(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, stats: Stats | None = None) -> Tensor:
        return trades_loss(self, model, x, x_adv, y, self.beta, stats)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        return self.loss_on(model, x, self.perturb(model, x, y, generator, stats), y, stats)
