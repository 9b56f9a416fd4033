"""GAT and NuAT (Sriramanan et al., NeurIPS 2020 and 2021; val-iisc/GAMA-GAT CIFAR10/GAT_cifar10.py,
val-iisc/NuAT CIFAR10/NuAT_cifar10.py): one guided step and a training loss on clean CE plus the same
regulariser between clean and adversarial outputs.

Both: start x0 = B(x + (eps/2) * (+-1)), one sign step of eps on CE(f(x0), y) + [odd steps only] w R,
then the training loss CE(f(x), y) + w R(f(x), f(x_adv)) in train mode, gradients through both sides.
GAT: R = squared L2 distance of the softmax outputs (summed over classes, batch mean), w = 10, times 4
for the last 14% of epochs. NuAT: R = nuclear norm of the batch of logit differences / batch size,
w ramps linearly from 0 to 4.5 over the first 90% of epochs. The clean target of the step comes from
an eval-mode no-grad forward (our convention; the authors take it from an extra train-mode forward).
Cost: 1F (target) + 2F (step) + 6F (two training forwards, one backward) = 9F.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import Perturbation, bernoulli_init, predict_eval
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register

Regulariser = Callable[[Tensor, Tensor], Tensor]
"""(clean logits, adversarial logits) -> a scalar distance."""


def softmax_distance(clean: Tensor, adversarial: Tensor) -> Tensor:
    """GAT: sum over classes of (s(clean) - s(adversarial))^2, averaged over the batch."""
    return (clean.float().softmax(1) - adversarial.float().softmax(1)).pow(2).sum(1).mean()


def nuclear_distance(clean: Tensor, adversarial: Tensor) -> Tensor:
    """NuAT: nuclear norm of the (batch x classes) matrix of logit differences, divided by the batch size."""
    return torch.linalg.matrix_norm(clean.float() - adversarial.float(), ord="nuc") / len(clean)


def guided_step(model: nn.Module, x: Tensor, y: Tensor, eps: float, start: float, weight: float,
                regulariser: Regulariser, generator: torch.Generator | None) -> Tensor:
    """One sign step of eps from a +-`start` Bernoulli point on CE + weight * regulariser (eval mode)."""
    clean = predict_eval(model, x).float()

    def loss(logits: Tensor, labels: Tensor) -> Tensor:  # per-example CE plus the batch term, shared out
        return F.cross_entropy(logits.float(), labels, reduction="none") + weight * regulariser(clean, logits)

    return Perturbation(loss, bernoulli_init(start), eps, eps, 1)(model, x, y, generator).x_adv


@dataclasses.dataclass(frozen=True)
class _Guided(TrainingMethod):
    """What GAT and NuAT share; subclasses give the regulariser and its weight schedule."""

    eps: float = 8 / 255
    start: float = hyperparameter(0.5, "GAT/NuAT: Bernoulli start radius as a multiple of eps")

    def __post_init__(self) -> None:
        self._check(0 < self.eps <= 1, "eps", "in (0, 1] (pixel units: 8/255 = 0.0314)")
        self._check(0 <= self.start <= 1, "start", "in [0, 1]")

    def regulariser(self, clean: Tensor, adversarial: Tensor) -> Tensor:
        raise NotImplementedError

    def weight(self, context: StepContext | None) -> float:
        raise NotImplementedError

    def floor_units(self) -> int:
        return 1 + 2 + 6  # clean target, one input-gradient step, two training forwards and their backward

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        weight = self.weight(context)
        guided = context is None or context.step_in_epoch % 2 == 1  # the authors guide every other step
        x_adv = guided_step(model, x, y, self.eps, self.start * self.eps, weight if guided else 0.0,
                            self.regulariser, generator)
        clean, adversarial = model(x), model(x_adv)
        ce = self.cross_entropy(clean, y)
        distance = self.regulariser(clean, adversarial)
        record(stats, ce=ce, regulariser=distance, weight=torch.tensor(weight),
               accuracy=(clean.argmax(1) == y).float(), adv_accuracy=(adversarial.argmax(1) == y).float())
        return ce + weight * distance


@register
@dataclasses.dataclass(frozen=True)
class GAT(_Guided):
    name = "gat"
    paper_settings = {"batch_size": 64, "schedule": "piecewise:0=1,0.71=1,0.71=0.1,0.86=0.1,0.86=0.01,1=0.01"}
    summary = "GAT: one guided step, clean CE + softmax-distance regulariser; ~50% AutoAttack at 1.4x FGSM"
    gat_weight: float = hyperparameter(10.0, "GAT: weight of the squared softmax distance")
    boost: float = hyperparameter(4.0, "GAT: factor on the weight for the last 14% of epochs")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.gat_weight >= 0, "gat_weight", ">= 0")
        self._check(self.boost >= 0, "boost", ">= 0")

    def regulariser(self, clean: Tensor, adversarial: Tensor) -> Tensor:
        return softmax_distance(clean, adversarial)

    def weight(self, context: StepContext | None) -> float:
        """10 until 86% of the epochs (epoch 86 of 100), then 40, as the authors' schedule."""
        late = context is not None and context.epoch >= int(0.86 * context.epochs)
        return self.gat_weight * (self.boost if late else 1.0)


@register
@dataclasses.dataclass(frozen=True)
class NuAT(_Guided):
    name = "nuat"
    # up to 0.1 at 40%, down towards 0 but frozen at 0.02 from 80%, then /10 at 86% and 91% (the authors' code)
    paper_settings = {"batch_size": 64,
                      "schedule": "piecewise:0=0,0.4=1,0.8=0.2,0.86=0.2,0.86=0.02,0.91=0.02,0.91=0.002,1=0.002"}
    summary = "NuAT: one guided step, clean CE + nuclear-norm regulariser ramped up; ~50% AutoAttack"
    nuclear_weight: float = hyperparameter(4.5, "NuAT: final weight of the nuclear-norm regulariser")
    ramp: float = hyperparameter(0.9, "NuAT: fraction of the epochs over which the weight rises from 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.nuclear_weight >= 0, "nuclear_weight", ">= 0")
        self._check(0 < self.ramp <= 1, "ramp", "in (0, 1]")

    def regulariser(self, clean: Tensor, adversarial: Tensor) -> Tensor:
        return nuclear_distance(clean, adversarial)

    def weight(self, context: StepContext | None) -> float:
        """nuclear_weight * epoch / (ramp * epochs), at most nuclear_weight (0.05 per epoch over 100 epochs)."""
        if context is None:
            return self.nuclear_weight
        return self.nuclear_weight * min(context.epoch / max(self.ramp * context.epochs, 1e-9), 1.0)
