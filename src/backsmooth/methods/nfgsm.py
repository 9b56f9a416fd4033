"""N-FGSM (de Jorge et al., NeurIPS 2022; pdejorge/N-FGSM, train.py): noise U(-k eps, k eps) around x,
one CE sign step of alpha from the noisy point, no projection back to the eps-ball (only into the
[0, 1] box), CE training loss on that point. Defaults: k = 2, alpha = eps, so inputs lie within
(k + 1) eps = 3 eps of x. Cost: 2F (one input-gradient step) + 3F (training) = 5F.
"""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.attacks import Perturbation, ce_loss, uniform_noise_init
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, ce_training_loss, hyperparameter, record
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class NFGSM(TrainingMethod):
    name = "n_fgsm"
    paper_settings = {"epochs": 30, "lr": 0.2, "schedule": "piecewise:0=0,0.5=1,1=0"}  # a triangle, per iteration
    paper_arch = "preact_resnet18"
    summary = "N-FGSM: FGSM from a 2-eps noisy point without clipping to the eps-ball; FGSM's cost, no collapse"
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    noise: float = hyperparameter(2.0, "N-FGSM: noise radius as a multiple of eps (the authors' k)")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check(self.noise >= 0, "noise", ">= 0")

    @property
    def radius(self) -> float:
        """How far from x the inputs may go: the noise plus one step (3 eps at the defaults)."""
        return self.noise * self.eps + self.alpha

    def floor_units(self) -> int:
        return 2 + 3  # one input-gradient step, one training forward and backward

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        # the ball of radius noise + step never binds: only the [0, 1] box clips, as in the authors' code
        attack = Perturbation(ce_loss, uniform_noise_init(self.noise * self.eps, self.norm), self.radius, self.alpha, 1,
                              norm=self.norm)
        x_adv, start_loss = attack(model, x, y, generator)
        record(stats, attack_start_ce=start_loss)
        return ce_training_loss(self, model, x_adv, y, stats)
