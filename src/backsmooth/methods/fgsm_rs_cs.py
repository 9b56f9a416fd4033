"""FGSM-RS-CS, as the 2026 FastAT benchmark's code runs it (fzjcdt/FastAT_Benchmark, fast_at/fgsm_rs_cs.py, with
configs/cifar10/fgsm_rs_cs.yaml: both regularisers off, no initialisation from the clean loss).

  x_0 = clamp(x + U(-eps, eps))                       a random start (kept: the benign point below)
  x_1 = clamp(x_0 + eps sign(grad CE(f(x_0), y)))     one FGSM step, not projected back to the eps-ball (2 eps)
  loss = CE(f(x_1), t) (+ or -) w [|d| > band] CE(f(x_0), t),   d = CE(f(x_0), t) - L_prev

with t the soft target (`soft_factor` on the class, the rest spread evenly over the others), the run's label
smoothing on every CE, L_prev the mean benign loss CE(f(x_0), t) of the previous epoch, and band =
min(max(band_max / band_ratio, the change of that mean between the two previous epochs), band_max): when the
benign loss strays from last epoch's level by more than the band, its gradient pulls it back. The control acts
from the third epoch to the one before the last (the benchmark's decay_arr [0, 100] with stride 1 at 100 epochs).
Under torchrun the benign loss is averaged over the global batch, so every process decides as one process would.
"""

import dataclasses

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import Perturbation, uniform_noise_init
from backsmooth.distributed import group_size
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register


def soft_target(y: Tensor, classes: int, factor: float) -> Tensor:
    """`factor` on the class of each label and (1 - factor) / (classes - 1) on every other class."""
    one_hot = torch.nn.functional.one_hot(y, classes).float()
    return one_hot * factor + (1 - one_hot) * (1 - factor) / (classes - 1)


@register
@dataclasses.dataclass(frozen=True)
class FGSMRSCS(TrainingMethod):
    name = "fgsm_rs_cs"
    summary = "FGSM-RS-CS: FGSM from a random start on soft targets, the benign loss held near last epoch's level"
    # the benchmark's CIFAR-10 run: 100 epochs, one-cycle lr 0.1, label smoothing 0.4, weight averaging 0.9995
    paper_settings = {"schedule": "onecycle", "weight_averaging": 0.9995, "label_smoothing": 0.4}
    eps: float = 8 / 255
    soft_factor: float = hyperparameter(0.6, "FGSM-RS-CS: target mass on the true class (the rest spread evenly)")
    control_band: float = hyperparameter(0.03, "FGSM-RS-CS: largest change of the benign loss left alone (gamma)")
    band_ratio: float = hyperparameter(1.0, "FGSM-RS-CS: smallest band = control_band / band_ratio")
    control_weight: float = hyperparameter(1.0, "FGSM-RS-CS: weight of the benign loss added or subtracted (w2)")

    def __post_init__(self) -> None:
        self._check(self.eps > 0, "eps", "> 0")
        self._check(0 < self.soft_factor <= 1, "soft_factor", "in (0, 1]")
        self._check(self.control_band >= 0, "control_band", ">= 0")
        self._check(self.band_ratio >= 1, "band_ratio", ">= 1")
        self._check(self.control_weight >= 0, "control_weight", ">= 0")

    @property
    def radius(self) -> float:
        """The start's eps plus one unprojected step of eps."""
        return 2 * self.eps

    def floor_units(self) -> int:
        return 2 + 6  # one input-gradient step; two training forwards (x_1 and x_0) and their backward

    def setup(self, train_size: int, image_shape: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.state.update(epoch=-1, sum=zero.clone(), count=zero.clone(), previous=zero.clone(), change=zero.clone())

    def _new_epoch(self, epoch: int) -> None:
        """The benchmark's end-of-epoch update: L_prev and its change from the epoch just finished."""
        state = self.state
        if state["epoch"] >= 0 and float(state["count"]) > 0:
            mean = state["sum"] / state["count"]
            state["change"], state["previous"] = mean - state["previous"], mean
        state["sum"], state["count"] = torch.zeros_like(state["sum"]), torch.zeros_like(state["count"])
        state["epoch"] = epoch

    def _attack_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The FGSM step's per-example CE on the labels, with the run's label smoothing (the benchmark's criterion)."""
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing, reduction="none")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        context = context if context is not None else StepContext()
        if "sum" not in self.state:
            self.setup(0, (), x.device)
        if context.epoch != self.state["epoch"]:
            self._new_epoch(context.epoch)
        x_start = uniform_noise_init(self.eps)(model, x, y, self.radius, generator).detach()
        attack = Perturbation(self._attack_loss, lambda *_: x_start, self.radius, self.eps, 1)
        x_adv, start_loss = attack(model, x, y, generator)
        record(stats, attack_start_ce=start_loss)
        logits = model(x_adv)
        target = soft_target(y, logits.shape[1], self.soft_factor)
        loss = self.cross_entropy(logits, target)
        benign = self.cross_entropy(model(x_start), target)
        total = benign.detach().double() * len(y)
        count = torch.tensor(float(len(y)), dtype=torch.float64, device=x.device)
        if group_size() > 1:  # the global batch's mean, as one process computes it
            both = torch.stack([total, count])
            torch_dist.all_reduce(both)
            total, count = both[0], both[1]
        self.state["sum"], self.state["count"] = self.state["sum"] + total, self.state["count"] + count
        record(stats, ce=loss, benign_ce=benign, adv_accuracy=(logits.argmax(1) == y).float())
        if not 1 < context.epoch < context.epochs - 1:
            return loss
        previous = self.state["previous"]
        band = torch.clamp(torch.clamp(self.state["change"], min=self.control_band / self.band_ratio),
                           max=self.control_band)
        difference = total / count - previous
        direction = torch.where(difference > 0, 1.0, -1.0) * (difference.abs() > band)
        return loss + self.control_weight * direction.to(benign.dtype) * benign
