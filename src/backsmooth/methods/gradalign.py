"""Fast AT + GradAlign (Andriushchenko & Flammarion 2020).

FGSM training plus lambda * (1 - cos(grad_x CE(f(x), y), grad_x CE(f(x + eta), y))), eta ~ U(-eps, eps),
differentiated through both input gradients (double backpropagation). The authors pair it with
FGSM from the clean point and step alpha = eps; `random_start=True` gives FGSM-RS instead.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import ball_init, pgd
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, ce_training_loss, hyperparameter, record
from backsmooth.methods.registry import register


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """grad_x CE(f(x), y), kept in the graph so the regulariser can be differentiated through it."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    return grad


@register
@dataclasses.dataclass(frozen=True)
class GradAlign(TrainingMethod):
    name = "gradalign"
    double_backprop = True
    paper_arch = "preact_resnet18"
    summary = "FGSM + gradient-alignment regulariser; prevents catastrophic overfitting at ~3x FGSM's cost"
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    grad_align_lambda: float = hyperparameter(0.2, "weight of the GradAlign regulariser")
    random_start: bool = hyperparameter(False, "GradAlign: FGSM from a random start (FGSM-RS) instead of x")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check(self.grad_align_lambda >= 0, "grad_align_lambda", ">= 0")

    def floor_units(self) -> int:
        return 15  # FGSM step and training pass (5) plus two input gradients kept for double backprop (about 10)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        x_adv, _ = pgd(self.eps, self.alpha, 1, random_start=self.random_start, norm=self.norm)(model, x, y,
                                                                                                  generator)
        loss = ce_training_loss(self, model, x_adv, y, stats)
        grad_clean = _input_gradient(model, x, y)
        grad_noisy = _input_gradient(model, ball_init(self.norm)(model, x, y, self.eps, generator), y)
        cosine = F.cosine_similarity(grad_clean.flatten(1), grad_noisy.flatten(1), dim=1, eps=1e-12)
        regulariser = self.grad_align_lambda * (1.0 - cosine.mean())
        record(stats, grad_cosine=cosine)
        return loss + regulariser
