"""What every training method shares: the call signature, hyperparameter checks, the TRADES loss."""

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.errors import ConfigError

Stats = dict[str, Tensor]


@dataclasses.dataclass(frozen=True)
class TrainingMethod:
    """A training loss: `loss = method(model, x, y, generator=g)`, model in train mode.

    Pass `stats={}` to receive detached per-batch statistics (no host synchronisation).
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None) -> Tensor:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def _set(self, field: str, value: float) -> None:
        """Resolve a default that depends on another field (frozen dataclass)."""
        object.__setattr__(self, field, value)

    def _check(self, ok: bool, field: str, requirement: str) -> None:
        if not ok:
            raise ConfigError(f"{self.name}: {field} must be {requirement}, got {getattr(self, field)!r}")

    def _check_eps_alpha(self) -> None:
        self._check(0 < self.eps <= 1, "eps", "in (0, 1] (pixel units: 8/255 = 0.0314)")
        self._check(self.alpha > 0, "alpha", "> 0")

    def _check_steps(self) -> None:
        self._check(isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1")


def record(stats: Stats | None, **values: Tensor) -> None:
    """Store detached scalar statistics if the caller asked for them."""
    if stats is not None:
        stats.update({k: v.detach().float().mean() for k, v in values.items()})


def trades_loss(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float,
                stats: Stats | None) -> Tensor:
    """CE(f(x), y) + beta * KL(s(f(x)) || s(f(x_adv))), train mode, gradients through both sides."""
    logits_nat = model(x)
    logits_adv = model(x_adv)
    ce = F.cross_entropy(logits_nat.float(), y)
    kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.log_softmax(logits_nat.float(), dim=1),
                  reduction="batchmean", log_target=True)
    record(stats, ce=ce, kl=kl, accuracy=(logits_nat.argmax(1) == y).float(),
           adv_accuracy=(logits_adv.argmax(1) == y).float())
    return ce + beta * kl


def ce_training_loss(model: nn.Module, x: Tensor, y: Tensor, stats: Stats | None) -> Tensor:
    """Cross-entropy on x in train mode (natural, PGD-AT, FGSM-RS)."""
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    record(stats, ce=loss, accuracy=(logits.argmax(1) == y).float())
    return loss
