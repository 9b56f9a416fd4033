"""FGSM-PGI (Jia et al., ECCV 2022; jiaxiaojunQAQ/FGSM-PGI, FGSM_MEP.py): FGSM from a prior-guided start.

Every training example remembers a perturbation d and a momentum m from its last visit:
  g  = grad_x' CE_s(f(x'), y) at x' = B(x + d)           (eval mode; CE_s: the authors' soft labels)
  m <- g / ||g||_1 + mu m                                 (||g||_1 over the whole batch), stored
  d <- B(x + d + alpha sign(m)) - x                        stored for the next visit
  x_adv = B(x + d + alpha sign(g))                         (d: the remembered one)
  loss = CE_s(f(x_adv), y) + lam * mean((f(x_adv) - f(x'))^2)   (train mode, both sides)
Every `reset` epochs (40 of the authors' 110) d is drawn afresh as alpha * (+-1) per element, clipped to
eps, and m is zeroed. The authors feed the model x + d unclipped (after a new crop it may leave [0, 1]);
we clip that forward's input into the box, as every input here.
The memory is per example (the loader hands over indices), saved in checkpoints, and identical on every
process under torchrun (each step's updates and the batch's L1 norm are shared), so a run equals a
single process with the same global batch. Cost: 2F (step) + 6F (two training forwards) = 8F.
"""

import dataclasses

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import attack_mode, project
from backsmooth.distributed import group_size
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register


def soft_cross_entropy(logits: Tensor, y: Tensor, smoothing: float, reduction: str = "mean") -> Tensor:
    """CE against labels with 1 - smoothing on the true class and smoothing / (C - 1) on each other."""
    classes = logits.shape[1]
    target = torch.full_like(logits, smoothing / (classes - 1), dtype=torch.float32)
    target.scatter_(1, y[:, None], 1 - smoothing)
    losses = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)
    return losses.mean() if reduction == "mean" else losses


def _gather_rows(*tensors: Tensor) -> list[Tensor]:
    """Every process's rows of each tensor, concatenated in rank order (the global batch)."""
    if group_size() == 1:
        return list(tensors)
    gathered = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(group_size())]
        torch_dist.all_gather(parts, tensor.contiguous())
        gathered.append(torch.cat(parts))
    return gathered


@register
@dataclasses.dataclass(frozen=True)
class FGSMPGI(TrainingMethod):
    name = "fgsm_pgi"
    image_state = True  # its memory has the image's shape
    summary = "FGSM-PGI: FGSM from each example's remembered perturbation + prior-guided regulariser"
    needs_index = True
    label_smoothing_applies = False  # the authors' soft labels (--smoothing) in the attack and the loss
    paper_settings = {"epochs": 110, "schedule": "piecewise:0=1,0.909=1,0.909=0.1,0.955=0.1,0.955=0.01,1=0.01"}
    eps: float = 8 / 255
    alpha: float | None = hyperparameter(None, "attack step size (default: the method's own)")
    momentum_decay: float = hyperparameter(0.3, "FGSM-PGI: decay mu of the remembered gradient momentum")
    pgi_weight: float = hyperparameter(10.0, "FGSM-PGI: weight of the prior-guided regulariser")
    reset: int = hyperparameter(40, "FGSM-PGI: epochs between re-initialisations of the memory")
    smoothing: float = hyperparameter(0.4, "FGSM-PGI: probability the authors' soft labels move off the class")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check(self.momentum_decay >= 0, "momentum_decay", ">= 0")
        self._check(self.pgi_weight >= 0, "pgi_weight", ">= 0")
        self._check(isinstance(self.reset, int) and self.reset >= 1, "reset", "an integer >= 1")
        self._check(0 <= self.smoothing < 1, "smoothing", "in [0, 1)")

    def floor_units(self) -> int:
        return 2 + 6  # one input-gradient step, two training forwards and their backward

    def setup(self, train_size: int, image_shape: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        """Zeroed memory for every training example; filled at the first step of each reset period."""
        self.state["delta"] = torch.zeros(train_size, *image_shape, device=device)
        self.state["momentum"] = torch.zeros(train_size, *image_shape, device=device)
        self.state["period"] = torch.tensor(-1)
        self.state["seed"] = torch.tensor(seed)

    def _reset_if_due(self, epoch: int) -> None:
        """Fresh +-eps corners at epochs 0, reset, 2 reset, ...; drawn from a generator seeded by the run seed
        and the period, the same on every process, so the memory stays identical across ranks."""
        period = epoch // self.reset
        if int(self.state["period"]) == period:
            return
        delta = self.state["delta"]
        draw = torch.Generator(delta.device).manual_seed(int(self.state["seed"]) * 1_000_003 + 7919 * (period + 1))
        noise = torch.rand(delta.shape, generator=draw, device=delta.device) - 0.5
        delta.copy_((self.alpha * noise.sign()).clamp(-self.eps, self.eps))
        self.state["momentum"].zero_()
        self.state["period"] = torch.tensor(period)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        if context is None or context.index is None:  # outside a training run (bench): a memory of zeros
            context = StepContext(index=torch.arange(len(x), device=x.device))
            if "delta" not in self.state or len(self.state["delta"]) < len(x):
                self.setup(len(x), tuple(x.shape[1:]), x.device)
        self._reset_if_due(context.epoch)
        index = context.index
        delta = self.state["delta"][index]
        x_start = project(x + delta, x, self.eps)  # the forwards' point, in the box (the authors' is not clipped)
        with attack_mode(model) as net, torch.enable_grad():
            x_in = x_start.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(soft_cross_entropy(net(x_in), y, self.smoothing), x_in)
        l1 = grad.abs().sum()
        if group_size() > 1:
            torch_dist.all_reduce(l1)  # the norm of the global batch's gradient, as one process computes it
        momentum = grad / l1 + self.momentum_decay * self.state["momentum"][index]
        next_delta = project(x + delta + self.alpha * momentum.sign(), x, self.eps) - x
        x_adv = project(x + delta + self.alpha * grad.sign(), x, self.eps)
        all_index, all_delta, all_momentum = _gather_rows(index, next_delta, momentum)
        self.state["delta"][all_index] = all_delta
        self.state["momentum"][all_index] = all_momentum
        adversarial, start = model(x_adv), model(x_start)
        ce = soft_cross_entropy(adversarial, y, self.smoothing)
        prior = F.mse_loss(adversarial.float(), start.float())
        record(stats, ce=ce, prior=prior, adv_accuracy=(adversarial.argmax(1) == y).float())
        return ce + self.pgi_weight * prior
