"""LIET (ICCV 2025), as the 2026 FastAT benchmark's code runs it (fzjcdt/FastAT_Benchmark, fast_at/liet.py).

Every `li_update` steps of an epoch, in eval mode, a label-informed perturbation LI[c] = eps sign(grad_x CE_r(f(0.5),
c)) is computed for every class c on a constant grey image. Then for each batch:
  delta = LI[y], with a random fraction r ~ U(0.1, 0.5) of its entries replaced by U(-eps, eps) noise
  x_0 = clamp(x - delta) or clamp(x + delta), one coin for the batch
  x_1 = B(x_0 + eps sign(grad CE_r(f_train(x_0), y)))               (the input gradient of a train-mode forward)
  loss = CE_r(f_train(x_1), y) + lam_e JS(s(f_train(x_0)) , s(f_train(x_1)))     (both sides differentiated)
with CE_r the benchmark's randomly smoothed labels (1 - 0.6 on the class, 0.6 spread at random over the others),
JS the Jensen-Shannon divergence and lam_e = lam (e + 1) / E rising linearly over the epochs. Above eps = 8/255 the
noise is U(-2 eps, 2 eps) and x_1 is clipped to the box only, as theirs.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import attack_mode, project
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register


def random_smoothed_cross_entropy(logits: Tensor, y: Tensor, smoothing: float, draw: Tensor) -> Tensor:
    """The benchmark's CustomCrossEntropyLoss: 1 - smoothing on the class, and `smoothing` spread over the other
    classes in proportion to `draw` (U(0, 1) of the logits' shape); averaged over the batch."""
    target = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, y.unsqueeze(1), 1.0)
    if smoothing > 0:
        target = target * (1 - smoothing)
        spread = (draw * smoothing).masked_fill_(target.bool(), 0)
        target = target + spread / spread.sum(dim=1, keepdim=True) * smoothing
    return (-target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


@register
@dataclasses.dataclass(frozen=True)
class LIET(TrainingMethod):
    name = "liet"
    image_state = True  # its memory has the image's shape
    summary = "LIET: FGSM from a label-informed start (a class-wise universal perturbation) + a JS consistency term"
    label_smoothing_applies = False  # the benchmark's randomly smoothed labels (--smoothing) in attack and loss
    # the benchmark's CIFAR-10 run (configs/cifar10/liet.yaml): 100 epochs, one-cycle lr 0.1, weight averaging 0.9995
    paper_settings = {"schedule": "onecycle", "weight_averaging": 0.9995}
    eps: float = 8 / 255
    weight: float = hyperparameter(100.0, "LIET: final weight lambda of the JS term (rises linearly over the epochs)")
    min_mask: float = hyperparameter(0.1, "LIET: smallest fraction of the start replaced by uniform noise")
    max_mask: float = hyperparameter(0.5, "LIET: largest fraction of the start replaced by uniform noise")
    li_update: int = hyperparameter(20, "LIET: steps between updates of the label-informed perturbation")
    smoothing: float = hyperparameter(0.6, "LIET: label mass spread at random over the other classes")

    def __post_init__(self) -> None:
        self._check(self.eps > 0, "eps", "> 0")
        self._check(self.weight >= 0, "weight", ">= 0")
        self._check(0 <= self.min_mask <= self.max_mask <= 1, "min_mask", "<= max_mask, both in [0, 1]")
        self._check(isinstance(self.li_update, int) and self.li_update >= 1, "li_update", "an integer >= 1")
        self._check(0 <= self.smoothing < 1, "smoothing", "in [0, 1)")

    @property
    def radius(self) -> float:
        """Inputs stay within eps of x; above 8/255 the start's noise reaches 2 eps and the step is not projected."""
        return 3 * self.eps if self.eps > 8 / 255 else self.eps

    def floor_units(self) -> None:
        """None: the step's cost varies. Two train-mode forwards and their backward (6F), plus the backward to x_0
        through the first forward's graph (about 1F, which the pass count does not see), and every `li_update`
        steps the perturbation LI (an eval-mode forward and input gradient of one grey image per class)."""
        return None

    def _label_informed(self, model: nn.Module, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """LI: eps sign(grad) of the smoothed CE at a grey image, one row per class (eval mode)."""
        with attack_mode(model) as net, torch.enable_grad():
            classes = net(torch.full_like(x[:1], 0.5)).shape[1]
            grey = torch.full((classes, *x.shape[1:]), 0.5, device=x.device, dtype=x.dtype, requires_grad=True)
            logits = net(grey)
            draw = torch.rand(logits.shape, generator=generator, device=x.device)
            loss = random_smoothed_cross_entropy(logits, torch.arange(classes, device=x.device), self.smoothing, draw)
            (grad,) = torch.autograd.grad(loss, grey)
        return self.eps * grad.sign()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        context = context if context is not None else StepContext()
        shared = context.batch_generator if context.batch_generator is not None else generator  # same on every rank
        if context.step_in_epoch % self.li_update == 0 or "li" not in self.state:
            self.state["li"] = self._label_informed(model, x, shared)
        delta = self.state["li"][y].clone()
        mask_draw = context.global_rand(tuple(x.shape), x, generator)
        spread = 2 * self.eps if self.eps > 8 / 255 else self.eps
        noise = context.global_rand(tuple(x.shape), x, generator) * (2 * spread) - spread  # U(-spread, spread)
        ratio = torch.rand(1, generator=shared).item() * (self.max_mask - self.min_mask) + self.min_mask
        replaced = mask_draw < ratio
        delta[replaced] = noise[replaced]
        sign = -1.0 if torch.rand(1, generator=shared) < 0.5 else 1.0
        x_start = torch.clamp(x + sign * delta, 0, 1).detach().requires_grad_(True)
        start_logits = model(x_start)
        start_loss = random_smoothed_cross_entropy(start_logits, y, self.smoothing,
                                                   context.global_rand(tuple(start_logits.shape), x, generator))
        (grad,) = torch.autograd.grad(start_loss, x_start, retain_graph=True)
        x_step = x_start.detach() + self.eps * grad.sign()
        x_adv = x_step.clamp(0, 1) if self.eps > 8 / 255 else project(x_step, x, self.eps)
        logits = model(x_adv)
        ce = random_smoothed_cross_entropy(logits, y, self.smoothing,
                                           context.global_rand(tuple(logits.shape), x, generator))
        p, q = F.softmax(start_logits.float(), dim=1), F.softmax(logits.float(), dim=1)
        middle = torch.clamp((p + q) / 2.0, 0, 1).log()
        js = (F.kl_div(middle, p, reduction="batchmean") + F.kl_div(middle, q, reduction="batchmean")) / 2
        weight = self.weight * (context.epoch + 1) / context.epochs
        record(stats, ce=ce, js=js, adv_accuracy=(logits.argmax(1) == y).float())
        return ce + weight * js
