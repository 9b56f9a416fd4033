"""ELLE and ELLE-A (Abad Rocamora et al., ICLR 2024; LIONS-EPFL/ELLE, core/utils/train.py): FGSM plus the
local linearity error of the loss, measured at two random points of the eps-ball and a point between.

  x_adv = B(x + eps sign grad_x CE(f(x), y))                      (FGSM from x, step eps, eval mode)
  x_a, x_b ~ U(x - eps, x + eps) (in the box), t ~ U(0, 1) per example, x_c = (1 - t) x_a + t x_b
  E = mean over the batch of (CE(x_c) - (1 - t) CE(x_a) - t CE(x_b))^2   (one train-mode forward of 3B)
  loss = CE(f(x_adv), y) + lam E
ELLE: lam = 1000 (the authors' value up to eps = 8/255). ELLE-A: lam starts at 0; after each step it
is set to lam_max = 4000 when E exceeds the mean + 2 std of every E so far (population std), else
multiplied by 0.99; the statistics are the run's state (saved in checkpoints; E is averaged over
processes, so every rank takes the same decision). The authors' script calls optimizer.step() twice
per iteration with the same gradient; we step once. Cost: 2F + 3F + 9F (three training forwards) = 14F.
"""

import dataclasses

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import pgd, project
from backsmooth.distributed import group_size
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register


def linearity_error(model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator | None,
                    context: StepContext | None = None) -> Tensor:
    """ELLE's squared local linearity error of the per-example CE, averaged over the batch. Within a training
    run the points are drawn for the global batch (context.global_rand), so any number of processes agree."""
    context = context or StepContext()

    def uniform(shape: torch.Size) -> Tensor:
        return context.global_rand(tuple(shape), x, generator)

    x_a = project(x + eps * (2 * uniform(x.shape) - 1), x, eps)
    x_b = project(x + eps * (2 * uniform(x.shape) - 1), x, eps)
    t = uniform(torch.Size([len(x), *([1] * (x.dim() - 1))]))
    x_c = (1 - t) * x_a + t * x_b
    losses = F.cross_entropy(model(torch.cat([x_a, x_b, x_c])).float(), y.repeat(3), reduction="none")
    loss_a, loss_b, loss_c = losses.chunk(3)
    t = t.flatten()
    return (loss_c - (1 - t) * loss_a - t * loss_b).pow(2).mean()


@register
@dataclasses.dataclass(frozen=True)
class ELLE(TrainingMethod):
    name = "elle"
    paper_settings = {"epochs": 30, "lr": 0.2, "schedule": "piecewise:0=0,0.5=1,1=0"}  # the GradAlign triangle
    paper_arch = "preact_resnet18"
    summary = "ELLE: FGSM + local-linearity regulariser at random points; avoids catastrophic overfitting"
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    elle_weight: float = hyperparameter(1000.0, "ELLE: weight lam of the linearity error (ELLE-A: its maximum)")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check(self.elle_weight >= 0, "elle_weight", ">= 0")

    def floor_units(self) -> int:
        return 2 + 3 + 9  # FGSM step, training forward, one forward of the three regulariser points

    def weight(self) -> float:
        return self.elle_weight

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        x_adv = pgd(self.eps, self.alpha, 1, random_start=False)(model, x, y, generator).x_adv
        logits = model(x_adv)
        ce = self.cross_entropy(logits, y)
        error = linearity_error(model, x, y, self.eps, generator, context)
        weight = self.weight()
        self.observe(error.detach())
        record(stats, ce=ce, linearity_error=error, weight=torch.tensor(weight),
               adv_accuracy=(logits.argmax(1) == y).float())
        return ce + weight * error

    def observe(self, error: Tensor) -> None:
        """ELLE keeps no statistics."""


@register
@dataclasses.dataclass(frozen=True)
class ELLEA(ELLE):
    name = "elle_a"
    summary = "ELLE-A: ELLE whose weight switches on only when the linearity error jumps; cheaper in effect"
    elle_weight: float = hyperparameter(4000.0, "ELLE: weight lam of the linearity error (ELLE-A: its maximum)")
    # at the digits' coarse eps = 0.1, lam = 4000 pushes the model to a constant (a perfectly linear loss):
    # the CPU presets use ELLE's 1000 as the maximum
    small_scale_options = {"elle_weight": 1000.0}
    sensitivity: float = hyperparameter(2.0, "ELLE-A: switch on above mean + sensitivity * std of past errors")
    decay: float = hyperparameter(0.99, "ELLE-A: factor on the weight at each step without a jump")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check(self.sensitivity >= 0, "sensitivity", ">= 0")
        self._check(0 <= self.decay <= 1, "decay", "in [0, 1]")

    def setup(self, train_size: int, image_shape: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        # count, mean and sum of squared deviations of every error so far (Welford), and the current weight
        self.state.update(count=torch.tensor(0), mean=torch.tensor(0.0, dtype=torch.float64),
                          m2=torch.tensor(0.0, dtype=torch.float64), weight=torch.tensor(0.0, dtype=torch.float64))

    def weight(self) -> float:
        if "weight" not in self.state:
            self.setup(0, (), torch.device("cpu"))
        return float(self.state["weight"])

    def observe(self, error: Tensor) -> None:
        """The authors' rule, applied after the step, so the new weight counts from the next one."""
        if group_size() > 1:
            error = error.clone()
            torch_dist.all_reduce(error)
            error /= group_size()
        value = float(error)
        count, mean, m2 = int(self.state["count"]), float(self.state["mean"]), float(self.state["m2"])
        jump = count > 2 and value > mean + self.sensitivity * (m2 / count) ** 0.5
        weight = self.elle_weight if jump else float(self.state["weight"]) * self.decay
        count += 1
        delta = value - mean
        mean += delta / count
        m2 += delta * (value - mean)
        self.state.update(count=torch.tensor(count), mean=torch.tensor(mean, dtype=torch.float64),
                          m2=torch.tensor(m2, dtype=torch.float64), weight=torch.tensor(weight, dtype=torch.float64))
