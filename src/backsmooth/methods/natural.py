"""Natural training: loss = CE(f(x), y). The speed and accuracy baseline."""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.methods.base import Stats, StepContext, TrainingMethod, ce_training_loss
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class Natural(TrainingMethod):
    name = "natural"
    summary = "plain cross-entropy; no robustness, the speed and clean-accuracy baseline"
    adversarial = False
    norms = ("linf", "l2", "l1")  # no attack: any threat model (the run's validation and guard use it)

    def floor_units(self) -> int:
        return 3  # one training forward and backward

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        return ce_training_loss(self, model, x, y, stats)
