"""Fast AT / FGSM-RS (Wong et al. 2020): one CE step of 1.25 eps from a uniform random start."""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.attacks import pgd
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, ce_training_loss, hyperparameter, record
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FGSMRS(TrainingMethod):
    name = "fgsm_rs"
    paper_settings = {"schedule": "cyclic", "lr": 0.1}  # Fast AT: cyclic, peaking at 0.2
    paper_arch = "preact_resnet18"
    summary = "Fast AT: single-step FGSM from a random start; cheapest robust method, can collapse"
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")

    def __post_init__(self) -> None:
        self._check_eps_alpha(default_multiple=1.25)

    def floor_units(self) -> int:
        return 2 + 3  # one input-gradient step, one training forward and backward

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        x_adv, start_loss = pgd(self.eps, self.alpha, 1, random_start=True, norm=self.norm)(model, x, y, generator)
        record(stats, attack_start_ce=start_loss)
        return ce_training_loss(self, model, x_adv, y, stats)
