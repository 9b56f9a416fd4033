"""PGD adversarial training (Madry et al. 2018): CE on a K-step PGD point with random start."""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.attacks import pgd
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, ce_training_loss, hyperparameter, record
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class PGDAT(TrainingMethod):
    name = "pgd_at"
    summary = "Madry's PGD-K adversarial training; strong but about 2K + 3 passes per step"
    single_step_attack = False  # multi-step (the collapse guard logs, does not decide)
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    steps: int = hyperparameter(10, "attack steps K")

    def __post_init__(self) -> None:
        if self.alpha is None:  # Madry's 2/255 at L-inf; eps / 4 at L2, as the L2 references use
            self._set("alpha", 2 / 255 if self.norm == "linf" else self.eps / 4)
        self._check_eps_alpha()
        self._check_steps()

    def floor_units(self) -> int:
        return 2 * self.steps + 3  # K input-gradient steps, one training forward and backward

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                stats: Stats | None = None) -> Tensor:
        attack = pgd(self.eps, self.alpha, self.steps, random_start=True, norm=self.norm)
        x_adv, start_loss = attack(model, x, y, generator)
        record(stats, attack_start_ce=start_loss)
        return x_adv

    def loss_on(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, stats: Stats | None = None) -> Tensor:
        return ce_training_loss(self, model, x_adv, y, stats)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        return self.loss_on(model, x, self.perturb(model, x, y, generator, stats), y, stats)
