"""Free adversarial training (Shafahi et al., NeurIPS 2019; mahyarnajibi/FreeAdversarialTraining,
main_free.py; ashafahi/free_adv_train for CIFAR-10): each batch is replayed m times; every replay
is one train-mode forward and backward on clip(x + d, 0, 1) that gives both the weight gradient (one
optimiser step) and the input gradient, with which d <- clip(d + eps sign(grad_d), -eps, eps). d starts
at zero once and is carried across replays, batches and epochs (per process, one row per batch slot).
Train for epochs / m epochs so the number of optimiser steps matches. Cost per optimiser step: 3F.

Unlike every other method here, the perturbation's gradient comes from the train-mode training pass
itself: that reuse is what makes it free, so Free-AT has no eval-mode attack.
"""

import dataclasses

import torch
from torch import Tensor, nn

from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FreeAT(TrainingMethod):
    name = "free_at"
    image_state = True  # its memory has the image's shape
    summary = "Free-AT: m replays of each batch, the perturbation updated from the training backward itself"
    shared_state = False  # each process carries the perturbation of its own batch rows
    # the authors' CIFAR-10 run: 80k optimiser steps at batch 128 (26 epochs of 8 replays), lr /10 at 50% and 75%
    paper_settings = {"epochs": 26, "weight_decay": 2e-4}
    eps: float = 8 / 255
    replay: int = hyperparameter(8, "Free-AT: replays m of each batch (train for epochs / m epochs)")

    def __post_init__(self) -> None:
        self._check(0 < self.eps <= 1, "eps", "in (0, 1] (pixel units: 8/255 = 0.0314)")
        self._check(isinstance(self.replay, int) and self.replay >= 1, "replay", "an integer >= 1")

    @property
    def replays(self) -> int:
        return self.replay

    def floor_units(self) -> int:
        return 3  # per optimiser step: one training forward and backward (m of them per batch)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        delta = self.state.get("delta")
        if delta is None or delta.shape[1:] != x.shape[1:] or len(delta) < len(x) or delta.device != x.device:
            delta = self.state["delta"] = torch.zeros(len(x), *x.shape[1:], device=x.device)
        rows = delta[:len(x)].clone().requires_grad_(True)
        self.state["rows"] = rows  # after_backward reads its gradient
        logits = model((x + rows).clamp(0, 1))
        loss = self.cross_entropy(logits, y)
        record(stats, ce=loss, adv_accuracy=(logits.argmax(1) == y).float())
        return loss

    def after_backward(self) -> None:
        """d <- clip(d + eps sign(grad_d), -eps, eps), from the backward the trainer just ran."""
        rows = self.state.pop("rows", None)
        if rows is None or rows.grad is None:
            return
        delta = self.state["delta"]
        delta[:len(rows)] = (rows.detach() + self.eps * rows.grad.sign()).clamp(-self.eps, self.eps)
