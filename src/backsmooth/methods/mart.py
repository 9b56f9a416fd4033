"""MART (Wang et al. 2020, "Improving adversarial robustness requires revisiting misclassified examples"), as the
authors' mart.py computes it.

Attack: K CE sign steps of alpha from x + 0.001 N(0, I) (TRADES' start), eval mode. Loss, train mode, on the
clean and the adversarial forward (p = softmax f(x), p' = softmax f(x')):
    CE(f(x'), y) - log(1.0001 - p'_{y*})                          (the boosted CE; y* the likeliest wrong class)
    + beta * mean_i KL(p_i || p'_i) * (1.0000001 - p_{i,y_i})      (misclassified examples weigh more)
with gradients through both sides of the KL and through the weight, the authors' constants included.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import Perturbation, ce_loss, gaussian_init
from backsmooth.methods.base import Stats, StepContext, TrainingMethod, hyperparameter, record
from backsmooth.methods.registry import register
from backsmooth.schedules import stage_drops


@register
@dataclasses.dataclass(frozen=True)
class MART(TrainingMethod):
    name = "mart"
    summary = ("MART: PGD-K with the boosted CE on the adversarial input plus beta KL weighted towards "
               "misclassified examples; a TRADES-cost reference")
    loss_forwards = 2  # the clean and the adversarial forward of its loss
    single_step_attack = False  # a multi-step attack (the collapse guard logs, does not decide)
    # the authors' ResNet-18 script (train_resnet.py): 120 epochs, lr 0.01 x0.1 at epochs 75, 90 and 100,
    # weight decay 3.5e-3, beta 5; their WRN-34-10 script: 76 epochs, lr 0.1 x0.1 at 75, weight decay 2e-4, beta 6
    paper_settings = {"epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3, "beta": 5.0,
                      "schedule": stage_drops(120, {75: 0.1, 90: 0.01, 100: 0.001})}
    paper_arch_settings = {"wrn34_10": {"epochs": 76, "lr": 0.1, "weight_decay": 2e-4, "beta": 6.0,
                                        "schedule": stage_drops(76, {75: 0.1, 90: 0.01, 100: 0.001})}}
    eps: float = 8 / 255
    alpha: float = hyperparameter(0.007, "attack step size (the authors' 0.007)")
    steps: int = hyperparameter(10, "attack steps K")
    beta: float = hyperparameter(6.0, "weight of the misclassification-aware KL term (mart.py's default)")

    def __post_init__(self) -> None:
        self._check_eps_alpha()
        self._check_steps()
        self._check(self.beta >= 0, "beta", ">= 0")

    def floor_units(self) -> int:
        return 2 * self.steps + 6  # K input-gradient steps; clean and adversarial forwards and their backward

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                stats: Stats | None = None) -> Tensor:
        attack = Perturbation(ce_loss, gaussian_init(0.001, self.norm), self.eps, self.alpha, self.steps,
                              norm=self.norm)
        x_adv, start_loss = attack(model, x, y, generator)
        record(stats, attack_start_ce=start_loss)
        return x_adv

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        return self.loss_on(model, x, self.perturb(model, x, y, generator, stats), y, stats)

    def loss_on(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, stats: Stats | None = None) -> Tensor:
        logits_nat, logits_adv = model(x), model(x_adv)
        adv_probs = F.softmax(logits_adv.float(), dim=1)
        top_two = torch.argsort(adv_probs, dim=1)[:, -2:]
        wrong = torch.where(top_two[:, -1] == y, top_two[:, -2], top_two[:, -1])  # the likeliest wrong class
        ce = self.cross_entropy(logits_adv, y)
        boost = F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
        nat_probs = F.softmax(logits_nat.float(), dim=1)
        true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)  # KL(p || p') per example
        weighted_kl = (kl * (1.0000001 - true_probs)).mean()
        record(stats, ce=ce, boost=boost, kl=weighted_kl,
               accuracy=(logits_nat.argmax(1) == y).float(), adv_accuracy=(logits_adv.argmax(1) == y).float())
        return ce + boost + self.beta * weighted_kl
