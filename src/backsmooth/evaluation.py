"""Robustness evaluation: per-example correctness under attacks, on the shared perturbation engine."""

import argparse

import torch
from torch import Tensor, nn

from backsmooth.attacks import Perturbation, attack_mode, pgd
from backsmooth.runtime import autocast


def to_unit_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images -> float32 in [0, 1] on `device`; float images pass through."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


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


def clean_and_pgd(model: nn.Module, images: Tensor, labels: Tensor, eps: float, steps: int = 20, *,
                  batch_size: int = 256, precision: str = "fp32", seed: int = 0) -> tuple[float, float]:
    """Clean and PGD-`steps` accuracy (step 2/255, random start, a fixed seed): the per-epoch check."""
    device = next(model.parameters()).device
    clean = correct_under_attack(model, images, labels, batch_size=batch_size, precision=precision)
    if steps == 0 or len(labels) == 0:
        return _mean(clean), float("nan")
    generator = torch.Generator(device).manual_seed(seed)
    attack = pgd(eps, 2 / 255, steps, random_start=True)
    robust = correct_under_attack(model, images, labels, attack, batch_size=batch_size, precision=precision,
                                  generator=generator)
    return _mean(clean), _mean(robust & clean)


def _mean(flags: Tensor) -> float:
    return flags.float().mean().item() if len(flags) else float("nan")


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


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth eval`."""
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="dataset folder (default: the run's)")
    parser.add_argument("--eps", help="L-inf radius (default: the run's)")
    parser.add_argument("--n-examples", type=int, default=1000, help="stratified test subset size (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice and random starts")


def main_eval(args: argparse.Namespace) -> int:
    """`backsmooth eval`: clean and PGD-20 accuracy of a trained model on a stratified test subset."""
    import json
    from pathlib import Path

    from backsmooth.checkpoint import load_model
    from backsmooth.config import parse_number
    from backsmooth.data import load_dataset
    from backsmooth.runtime import resolve_device

    device = resolve_device(args.device)
    model, meta = load_model(args.target, device)
    run_config_path = Path(meta["path"]).parent / "config.json"
    run_config = json.loads(run_config_path.read_text()) if run_config_path.exists() else {}
    dataset = args.dataset or meta["dataset"]
    data_dir = args.data_dir or run_config.get("data_dir")
    eps = parse_number(args.eps) if args.eps else float(meta["eps"])
    test = load_dataset(dataset, data_dir, val_size=0, cache_dir=run_config.get("cache_dir")).test
    index = stratified_subset(test.labels, args.n_examples, args.seed)
    clean, robust = clean_and_pgd(model, test.images[index], test.labels[index], eps, 20,
                                  batch_size=args.batch_size, seed=args.seed)
    print(f"{meta['path']}: {len(index)} {dataset} test examples, eps {eps:.4f}")
    print(f"clean {clean:.2%}   PGD-20 {robust:.2%}")
    return 0
