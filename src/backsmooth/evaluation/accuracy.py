"""Per-example accuracy: correctness flags under an attack, their exact mean, the pointwise worst case
the stratified test subset every evaluation of a comparison shares, and the sharded accuracy of a run's
validation and final check (each torchrun process attacks its share). Used by training and by the suite."""

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from backsmooth import distributed as dist
from backsmooth.attacks import Perturbation, attack_mode, pgd
from backsmooth.data import unit_float
from backsmooth.runtime import Runtime, autocast


def to_unit_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images -> float32 in [0, 1] on `device` (the same bits on every device); float images pass through."""
    images = images.to(device, non_blocking=True)
    return unit_float(images) if images.dtype == torch.uint8 else images.float()


def correct_under_attack(model: nn.Module, images: Tensor, labels: Tensor, attack: Perturbation | None = None,
                         *, batch_size: int = 256, device: torch.device | None = None, precision: str = "fp32",
                         generator: torch.Generator | None = None) -> Tensor:
    """A bool per example: still classified correctly after `attack` (clean accuracy when None).

    The model runs in eval mode throughout; its previous mode is restored.
    """
    device = device or next(model.parameters()).device
    flags = []
    for start in range(0, len(labels), batch_size):
        x = to_unit_float(images[start:start + batch_size], device)
        y = labels[start:start + batch_size].to(device)
        with autocast(device, precision):
            if attack is not None:
                x = attack(model, x, y, generator).x_adv
            with attack_mode(model) as net, torch.no_grad():
                flags.append((net(x).argmax(1) == y).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def fraction(flags: Tensor) -> float:
    """The fraction of True flags, computed exactly (0.83, not float32's 0.8299999833); NaN when empty."""
    return int(flags.sum()) / len(flags) if len(flags) else float("nan")


def worst_case(clean: Tensor, robust: Iterable[Tensor]) -> Tensor:
    """Pointwise worst case: robust only if classified correctly clean and under every attack."""
    flags = clean.clone()
    for attack_flags in robust:
        flags &= attack_flags
    return flags


def stratified_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of `n` examples with classes in proportion (all of them when n >= len), seeded."""
    if n >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    # round-robin over classes in random order keeps class proportions within one example
    ranks = torch.empty_like(order)
    shuffled = labels[order]
    for c in shuffled.unique():
        members = (shuffled == c).nonzero().squeeze(1)
        ranks[members] = torch.arange(len(members)) * len(labels) // len(members)
    chosen = order[torch.argsort(ranks, stable=True)[:n]]
    return chosen.sort().values


def sharded_accuracy(model: nn.Module, images: Tensor, labels: Tensor, eps: float, pgd_steps: int, runtime: Runtime,
                     *, batch_size: int, seed: int, norm: str = "linf") -> tuple[float, float]:
    """Clean and PGD-`pgd_steps` accuracy (step eps/4 as in `backsmooth eval`, random start, seeded by `seed`
    and rank, in the `norm` ball) of `model`, each rank attacking its shard of the images; NaN for an empty set
    (robust: also when pgd_steps is 0)."""
    proc, device = runtime.proc, runtime.device
    shard = slice(proc.rank, None, proc.world_size)
    images, labels = images[shard], labels[shard]
    clean = correct_under_attack(model, images, labels, batch_size=batch_size, precision=runtime.precision)
    robust = clean
    if pgd_steps:
        generator = torch.Generator(device).manual_seed(seed + proc.rank)
        attack = pgd(eps, eps / 4, pgd_steps, random_start=True, norm=norm)
        robust = clean & correct_under_attack(model, images, labels, attack, generator=generator,
                                              batch_size=batch_size, precision=runtime.precision)
    counts = torch.tensor([clean.sum().item(), robust.sum().item(), len(labels)], dtype=torch.float64, device=device)
    n_clean, n_robust, n = dist.all_reduce_sum(counts, proc).tolist()
    if n == 0:
        return float("nan"), float("nan")
    return n_clean / n, (n_robust / n if pgd_steps else float("nan"))
