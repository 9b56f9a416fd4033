"""Backward Smoothing (Chen et al., AAAI 2022): the TRADES loss with a backward-smoothing start.

z = f(x) in eval mode; x0 = B(x - alpha sign grad KL(s(z + gamma xi) || s(f(x')))) at x' = x,
xi ~ U(-1, 1) per sample and class; K KL ascent steps from x0 towards s(z); the TRADES loss.
Cost: 1 no-grad forward, K + 1 input-gradient steps, 2 forwards + 1 full backward (11F at K = 1).
"""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.attacks import backward_smoothing_init
from backsmooth.methods.base import Stats, TrainingMethod, hyperparameter, trades_step
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class BackwardSmoothing(TrainingMethod):
    name = "backward_smoothing"
    summary = "the paper's method: TRADES robustness at about 0.4 of TRADES-10's cost; start here"
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    steps: int = hyperparameter(1, "attack steps K")
    beta: float = hyperparameter(10.0, "weight of the KL term")
    gamma: float = hyperparameter(1.0, "output-noise scale of the backward-smoothing start (> 0)")

    def __post_init__(self) -> None:
        if self.alpha is None:
            self._set("alpha", self.eps)
        self._check_eps_alpha()
        self._check_steps()
        self._check(self.beta >= 0, "beta", ">= 0")
        self._check(self.gamma > 0, "gamma", "> 0 (gamma = 0 makes the backward step vanish: x_adv = x)")

    def floor_units(self) -> int:
        return 1 + 2 * (self.steps + 1) + 6  # clean forward, K + 1 input-gradient steps, the TRADES loss

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None) -> Tensor:
        init = backward_smoothing_init(self.gamma, self.alpha)
        return trades_step(model, x, y, init, self.eps, self.alpha, self.steps, self.beta, generator, stats)
