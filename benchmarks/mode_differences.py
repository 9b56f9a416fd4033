"""How much the BatchNorm mode of an attack's forward matters: our attacks run in eval mode (running statistics);
ELLE's authors compute their FGSM step, and Madry et al. their PGD steps, on train-mode forwards (batch
statistics). On one batch of CIFAR-10 training images (the JPEG-75 copy) this prints, for FGSM (eps 8/255) and
PGD-10 (step 2/255, one random start shared by both modes): the fraction of perturbation entries whose sign
differs between the two modes, and the relative change of the training loss CE(f_train(x_adv), y) on the two
points. docs/algorithms.md quotes its output.

    python benchmarks/mode_differences.py [RUN_DIR_OR_MODEL ...] [--data-dir ../shared/data]

With no model it uses a freshly initialised small_cnn (seed 0); each RUN_DIR_OR_MODEL is loaded with
backsmooth.load_model.
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import backsmooth
from backsmooth import models
from backsmooth.data import load_dataset

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def _step(model: nn.Module, x_adv: Tensor, y: Tensor, train: bool) -> Tensor:
    """sign grad_x CE(f(x_adv), y) with the model in train (batch statistics) or eval mode; the model is a copy, so
    train-mode running-statistics updates do not carry over."""
    model.train(train)
    x_adv = x_adv.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    return grad.sign()


def _attack(model: nn.Module, x: Tensor, y: Tensor, start: Tensor, steps: int, step: float, train: bool) -> Tensor:
    net, x_adv = copy.deepcopy(model), start.clone()
    for _ in range(steps):
        x_adv = torch.min(torch.max(x_adv + step * _step(net, x_adv, y, train), x - EPS), x + EPS).clamp(0, 1)
    return x_adv


def compare(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Sign disagreement and loss change of FGSM and PGD-10 between train-mode and eval-mode attack forwards."""
    found = {}
    start = (x + (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1) * EPS).clamp(0, 1)
    for name, steps, step, origin in (("fgsm", 1, EPS, x), ("pgd10", STEPS, ALPHA, start)):
        points = {mode: _attack(model, x, y, origin, steps, step, mode) for mode in (True, False)}
        differs = ((points[True] - x).sign() != (points[False] - x).sign()).float().mean().item()
        losses = {}
        for mode, point in points.items():
            net = copy.deepcopy(model).train()
            with torch.no_grad():
                losses[mode] = F.cross_entropy(net(point), y).item()
        found[name] = dict(sign_differs=differs, loss_train_mode_attack=losses[True],
                           loss_eval_mode_attack=losses[False],
                           relative_change=(losses[True] - losses[False]) / losses[False])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="run directories or model files (default: a new small_cnn)")
    parser.add_argument("--data-dir", default="../shared/data", help="folder of the CIFAR-10 copy")
    parser.add_argument("--batch", type=int, default=128, help="images in the batch (default: 128)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("cifar10", args.data_dir, val_size=0)
    x, y = data.train.images[:args.batch].float() / 255, data.train.labels[:args.batch]
    chosen = {path: backsmooth.load_model(path)[0] for path in args.models} or {
        "small_cnn (initialised, seed 0)": models.build("small_cnn", 10, mean=data.mean, std=data.std)}
    for name, model in chosen.items():
        for attack, row in compare(model, x, y).items():
            print(f"{name} {attack}: signs differ {100 * row['sign_differs']:.1f}%, training loss on the point "
                  f"{row['loss_train_mode_attack']:.4f} (train-mode attack) vs {row['loss_eval_mode_attack']:.4f} "
                  f"(eval-mode), {100 * row['relative_change']:+.1f}%")


if __name__ == "__main__":
    main()
