"""The one perturbation engine: initialiser x loss x step rule x projection, run for K steps.

Every attack in training and evaluation (PGD, FGSM, TRADES' KL attack, CW, the backward-smoothing
step) is a `Perturbation` built from these parts. `attack_mode` owns the conventions of
docs/algorithms.md#conventions: the model runs in eval mode without parameter gradients, and its
previous state is restored afterwards.

The threat model is a norm and a radius (attacks/norms.py: L-inf, L2, L1). The step rule turns each input
gradient into the direction of the step, and may carry state from
one step to the next within a call: `rule.init(x)` gives the first state, `rule.step(grad, state)`
the direction and the next state. The default is the norm's steepest ascent (`SteepestStep`:
sign(grad) at L-inf, which `SignStep` also gives, for PGD and FGSM); `Momentum` is MI-FGSM's
accumulated gradient. Momentum or Adam-style attacks are then a `Perturbation` with another rule, not another loop.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks.norms import SteepestStep, project_onto, uniform_in_ball

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(logits, target) -> per-example loss of shape (m,); the attack ascends it."""


class Initializer(Protocol):
    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, eps: float,
                 generator: torch.Generator | None) -> Tensor: ...


# --------------------------------------------------------------------------- model state


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper, so attack passes never synchronise."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no parameter gradients; restores the previous mode and flags on exit."""
    model = unwrap(model)
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def predict_eval(model: nn.Module, x: Tensor) -> Tensor:
    """Logits in eval mode without building a graph (the clean target of TRADES-style methods)."""
    with attack_mode(model) as net, torch.no_grad():
        return net(x)


# --------------------------------------------------------------------------- losses


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def kl_loss(logits: Tensor, log_target: Tensor) -> Tensor:
    """Per-example KL(target || softmax(logits)), from log-probabilities on both sides."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_probs, log_target, reduction="none", log_target=True).sum(dim=1)


def cw_margin_loss(kappa: float = float("inf")) -> LossFn:
    """Ascent form of the CW margin loss (CW-inf at L-inf): min(max_{j != y} z_j - z_y, kappa)."""

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        logits = logits.float()
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
        return (other - true).clamp(max=kappa)

    return loss


# --------------------------------------------------------------------------- steps and projection


class StepRule(Protocol):
    """Input gradient -> step direction (scaled by the step size), with state carried across the steps of one call."""

    def init(self, x: Tensor) -> Any:
        """The state before the first step of an attack on the clean batch `x` (None for a stateless rule)."""
        ...

    def step(self, grad: Tensor, state: Any) -> tuple[Tensor, Any]:
        """(direction, next state) from the loss gradient at the current point."""
        ...


@dataclass(frozen=True)
class SignStep:
    """sign(grad): the L-inf steepest-ascent direction, stateless (PGD, FGSM, every built-in attack)."""

    def init(self, x: Tensor) -> None:
        """No state."""
        return None

    def step(self, grad: Tensor, state: None) -> tuple[Tensor, None]:
        """sign(grad)."""
        return grad.sign(), state


@dataclass(frozen=True)
class Momentum:
    """MI-FGSM's rule (Dong et al. 2018): g <- mu * g + grad / ||grad||_1 per example, direction sign(g).

    g starts at zero. An all-zero gradient adds nothing to g (instead of dividing by zero).
    """

    mu: float = 1.0

    def init(self, x: Tensor) -> Tensor:
        """The accumulated gradient g = 0."""
        return torch.zeros_like(x)

    def step(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """(sign(g'), g') with g' = mu * g + grad / ||grad||_1."""
        norm = grad.abs().flatten(1).sum(1).clamp(min=torch.finfo(grad.dtype).tiny)
        accumulated = self.mu * state + grad / norm.view(-1, *([1] * (grad.dim() - 1)))
        return accumulated.sign(), accumulated


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Onto the norm's ball of radius eps around x (L-inf unless told), then into the [0, 1] box (attacks/norms.py)."""
    return project_onto(x_adv, x, eps, norm)


# --------------------------------------------------------------------------- initialisers


def _rand(x: Tensor, generator: torch.Generator | None, normal: bool = False) -> Tensor:
    draw = torch.randn if normal else torch.rand
    return draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def zero_init(model: nn.Module, x: Tensor, target: Tensor, eps: float,
              generator: torch.Generator | None) -> Tensor:
    """Start at the clean input."""
    return x.clone()


def uniform_init(model: nn.Module, x: Tensor, target: Tensor, eps: float,
                 generator: torch.Generator | None) -> Tensor:
    """x + U(-eps, eps), projected (random start of PGD and FGSM-RS)."""
    return project(x + (2 * _rand(x, generator) - 1) * eps, x, eps)


def ball_init(norm: str) -> Initializer:
    """A start uniform in the norm's eps-ball, in the box (`uniform_init` for L-inf: the same draws)."""
    if norm == "linf":
        return uniform_init

    def init(model: nn.Module, x: Tensor, target: Tensor, eps: float,
             generator: torch.Generator | None) -> Tensor:
        return uniform_in_ball(x, eps, norm, generator)

    return init


def uniform_noise_init(radius: float, norm: str = "linf") -> Initializer:
    """A point uniform in the norm's ball of `radius` (x + U(-radius, radius) at L-inf), projected (N-FGSM's noise of
    2 eps inside a larger ball)."""

    def init(model: nn.Module, x: Tensor, target: Tensor, eps: float,
             generator: torch.Generator | None) -> Tensor:
        if norm != "linf":
            return project(uniform_in_ball(x, radius, norm, generator), x, eps, norm)
        return project(x + (2 * _rand(x, generator) - 1) * radius, x, eps)

    return init


def bernoulli_init(radius: float) -> Initializer:
    """x + radius * (+-1 per element, each with probability 1/2), projected (GAT's and NuAT's start)."""

    def init(model: nn.Module, x: Tensor, target: Tensor, eps: float,
             generator: torch.Generator | None) -> Tensor:
        return project(x + radius * torch.sign(0.5 - _rand(x, generator)), x, eps)

    return init


def gaussian_init(std: float, norm: str = "linf") -> Initializer:
    """x + std * N(0, I), projected onto the norm's ball (TRADES' start, with std = 0.001, at L-inf and L2)."""

    def init(model: nn.Module, x: Tensor, target: Tensor, eps: float,
             generator: torch.Generator | None) -> Tensor:
        return project(x + std * _rand(x, generator, normal=True), x, eps, norm)

    return init


# --------------------------------------------------------------------------- the engine


class AttackOutput(NamedTuple):
    x_adv: Tensor
    start_loss: Tensor | None
    """Per-example loss at the starting point (free: the first step computes it); None if steps = 0."""


@dataclass(frozen=True)
class Perturbation:
    """K steps of x <- B(x + step_size * direction) from init(x), where B projects onto the `norm` ball and the box
    and the step rule turns grad_x loss(f(x), target) into the direction (the norm's steepest ascent, sign(grad)
    for L-inf, unless told otherwise; see the module docstring).

    A negative step size descends the loss (the backward-smoothing step).
    """

    loss: LossFn
    init: Initializer
    eps: float
    step_size: float
    steps: int
    step_rule: StepRule | None = None  # None: the norm's steepest ascent (sign(grad) for L-inf)
    norm: str = "linf"  # the ball of the projection (attacks/norms.py)

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor,
                 generator: torch.Generator | None = None) -> AttackOutput:
        with attack_mode(model) as net:
            x = x.detach()
            x_adv = self.init(net, x, target, self.eps, generator).detach()
            start_loss = None
            rule = self.step_rule if self.step_rule is not None else SteepestStep(self.norm)
            state = rule.init(x)
            for step in range(self.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    losses = self.loss(net(x_adv), target)
                    (grad,) = torch.autograd.grad(losses.sum(), x_adv)
                if step == 0:
                    start_loss = losses.detach()
                direction, state = rule.step(grad, state)
                x_adv = project(x_adv.detach() + self.step_size * direction, x, self.eps, self.norm)
        return AttackOutput(x_adv.detach(), start_loss)
