"""`backsmooth eval`: the evaluation protocol on a trained model's stratified test subset; writes
eval-NAME.json (RobustBench's model_info fields plus the full result) next to the run."""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from torch import Tensor

from backsmooth.accuracy import stratified_subset
from backsmooth.atomic import atomic_write_json
from backsmooth.attacks import attack_forms, parse_attacks
from backsmooth.checkpoint import load_model
from backsmooth.config import parse_number
from backsmooth.data import load_dataset
from backsmooth.errors import EXIT_INTERRUPTED, ConfigError, DataError
from backsmooth.evaluation.core import eps_text, evaluate, model_info, result_table
from backsmooth.runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth eval`."""
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--attacks", default="pgd20,cw20",
                        help=f"comma-separated attacks (default pgd20,cw20); forms: {', '.join(attack_forms())}")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="dataset folder (default: the run's)")
    parser.add_argument("--eps", help="L-inf radius, e.g. 8/255 (default: the run's)")
    parser.add_argument("--step-size", help="step of pgd/cw attacks (default: eps/4, which is 2/255 at eps 8/255)")
    parser.add_argument("--n-examples", type=int, default=1000, help="stratified test subset size (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice and random starts")
    parser.add_argument("--name", help="model name in the report and file name eval-NAME.json (default: the run's)")
    parser.add_argument("--out", help="folder for eval-NAME.json (default: the run directory)")
    parser.add_argument("--restart", action="store_true", help="discard the state of an interrupted evaluation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """`backsmooth eval`: the evaluation protocol on a trained model's (stratified) test set; writes eval-NAME.json."""
    specs = parse_attacks(args.attacks)
    if args.n_examples <= 0:
        raise ConfigError(f"--n-examples must be positive, got {args.n_examples}")
    if args.batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {args.batch_size}")
    step_size = parse_number(args.step_size, "--step-size") if args.step_size else None
    if step_size is not None and not 0 < step_size <= 1:
        raise ConfigError(f"--step-size must be in (0, 1] in pixel units (e.g. 2/255), got {args.step_size}")
    eps_given = parse_number(args.eps, "--eps") if args.eps else None
    if eps_given is not None and not 0 <= eps_given <= 1:
        raise ConfigError(f"--eps must be in [0, 1] in pixel units (e.g. 8/255), got {args.eps}")
    if args.name is not None and (not args.name.strip() or args.name in (".", "..")
                                  or any(c in args.name for c in "/\\\0")):
        raise ConfigError(f"--name {args.name!r} must be a plain file-name part (no slashes), e.g. --name bs-last")
    device = resolve_device(args.device)
    model, meta = load_model(args.target, device)
    target = Path(args.target)
    run_dir = target if target.is_dir() else target.parent
    run_config_path = Path(meta["path"]).parent / "config.json"
    run_config = json.loads(run_config_path.read_text()) if run_config_path.exists() else {}
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise DataError(f"{meta['path']} does not name its dataset; pass --dataset")
    eps = eps_given if eps_given is not None else float(meta["eps"])
    test = load_dataset(dataset, args.data_dir or run_config.get("data_dir"), val_size=0,
                        cache_dir=run_config.get("cache_dir")).test
    _check_fits(test.images, test.labels, meta, dataset)
    index = stratified_subset(test.labels, args.n_examples, args.seed)
    name = args.name or (target.name if target.is_dir() else target.stem)
    out = Path(args.out) if args.out else run_dir
    state_path = out / f"eval-{name}.state.pt"
    _check_writable(out)
    print(f"{meta['path']}: {meta['arch']}" + (f" trained with {meta['method']}" if "method" in meta else "")
          + f"; {len(index)} of {len(test.labels)} {dataset} test examples (stratified, seed {args.seed}); "
            f"eps {eps_text(eps)} = {eps:.4f}", flush=True)
    try:
        result = evaluate(model, test.images[index], test.labels[index], eps, [s.name for s in specs],
                          args.batch_size, seed=args.seed, step_size=step_size, state_path=state_path,
                          restart=args.restart, progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print(f"interrupted: finished batches are saved in {state_path}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["batches"]["resumed"]:
        print(f"resumed {state_path.name}: {result['batches']['resumed']} of {result['batches']['total']} batches "
              f"were already done")
    print(result_table(result))
    report_path = out / f"eval-{name}.json"
    extra = dict(checkpoint=dict(path=meta["path"], method=meta.get("method"), epoch=meta.get("epoch")),
                 subset=dict(n_examples=len(index), test_size=len(test.labels), seed=args.seed, stratified=True))
    atomic_write_json(report_path, model_info(result, name, meta["arch"], dataset, extra))
    state_path.unlink(missing_ok=True)
    print(f"wrote {report_path}")
    return 0


def _check_fits(images: Tensor, labels: Tensor, meta: dict[str, Any], dataset: str) -> None:
    """The dataset must have the image shape and classes the model was trained for."""
    shape = tuple(meta.get("image_shape") or ())
    if shape and tuple(images.shape[1:]) != shape:
        raise DataError(f"{dataset} images have shape {tuple(images.shape[1:])} but the model was trained on {shape}")
    if len(labels) and int(labels.max()) >= int(meta["num_classes"]):
        raise DataError(f"{dataset} has labels up to {int(labels.max())} but the model has "
                        f"{meta['num_classes']} classes")


def _check_writable(folder: Path) -> None:
    """`folder` can be created (or exists) and written to: checked before hours of attacks, not after."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write eval-NAME.json under {folder}: {existing} is not a folder; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write eval-NAME.json under {folder}: {existing} is not writable; pass another --out")
