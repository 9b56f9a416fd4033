"""Backward Smoothing (Chen et al., AAAI 2022): the TRADES loss with a backward-smoothing start.

One eval-mode forward at x gives the clean logits z and the gradient of the backward step:
x0 = B(x - alpha sign grad_x KL(s(z + gamma xi) || s(f(x)))), xi ~ U(-1, 1) per sample and class;
then K KL ascent steps from x0 towards s(z) (z detached), then the TRADES loss. Using that one
forward for both the clean target and the backward step saves the separate no-grad forward:
cost 2 (backward step) + 2K (ascent) + 6 (loss) = 10F at K = 1.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import Perturbation, attack_mode, kl_loss, project, steepest_direction
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record, trades_loss
from backsmooth.methods.registry import register


def backward_smoothing_start(model: nn.Module, x: Tensor, gamma: float, alpha: float, eps: float,
                             generator: torch.Generator | None, norm: str = "linf") -> tuple[Tensor, Tensor]:
    """(x0, log s(z)): the backward-smoothing start and the clean target, from one input-gradient pass; the
    backward step descends along the norm's steepest direction (sign at L-inf)."""
    with attack_mode(model) as net, torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = net(x_in).float()
        clean = logits.detach()
        xi = 2 * torch.rand(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype) - 1
        noisy_target = F.log_softmax(clean + gamma * xi, dim=1)
        (grad,) = torch.autograd.grad(kl_loss(logits, noisy_target).sum(), x_in)
    x0 = project(x.detach() - alpha * steepest_direction(grad, norm), x.detach(), eps, norm)
    return x0, F.log_softmax(clean, dim=1)


@register
@dataclasses.dataclass(frozen=True)
class BackwardSmoothing(TrainingMethod):
    name = "backward_smoothing"
    summary = "the paper's method: TRADES robustness at about 0.4 of TRADES-10's cost; start here"
    loss_forwards = 2  # the clean and the adversarial forward of its loss
    single_step_attack = False  # a KL step (the collapse guard logs, does not decide)
    norms = ("linf", "l2")  # the L2 form: the norm's step, start and projection (docs/algorithms.md)
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    steps: int = hyperparameter(1, "attack steps K")
    beta: float = hyperparameter(10.0, "weight of the KL term")
    gamma: float = hyperparameter(1.0, "output-noise scale of the backward-smoothing start (> 0)")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check_steps()
        self._check(self.beta >= 0, "beta", ">= 0")
        self._check(self.gamma > 0, "gamma", "> 0 (gamma = 0 makes the backward step vanish: x_adv = x)")

    def floor_units(self) -> int:
        return 2 + 2 * self.steps + 6  # the backward step (which also gives the clean target), K steps, the loss

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                stats: Stats | None = None) -> Tensor:
        x0, clean_log_probs = backward_smoothing_start(model, x, self.gamma, self.alpha, self.eps, generator, self.norm)
        attack = Perturbation(kl_loss, lambda *_: x0, self.eps, self.alpha, self.steps, norm=self.norm)
        x_adv, start_kl = attack(model, x, clean_log_probs, generator)
        record(stats, attack_start_kl=start_kl)
        return x_adv

    def loss_on(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, stats: Stats | None = None) -> Tensor:
        return trades_loss(self, model, x, x_adv, y, self.beta, stats)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        return self.loss_on(model, x, self.perturb(model, x, y, generator, stats), y, stats)
