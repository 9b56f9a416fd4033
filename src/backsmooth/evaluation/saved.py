"""The evaluation protocol on a saved model: load a run directory's checkpoint (or a model file), take the
stratified test subset, run the attacks resumably and write eval-NAME.json beside it. `backsmooth eval`
and `backsmooth study` both call `evaluate_saved`."""

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from backsmooth.atomic import atomic_write_json
from backsmooth.attacks import parse_attacks
from backsmooth.attacks.norms import RadiusWarning, max_radius, norm_name, radius_warning
from backsmooth.checkpoint import load_model
from backsmooth.data import load_dataset
from backsmooth.errors import ConfigError, DataError, Interrupted
from backsmooth.evaluation.accuracy import stratified_subset
from backsmooth.evaluation.core import EvalResult, evaluate, model_info, result_table
from backsmooth.runtime import resolve_device
from backsmooth.units import threat_model_text


class EvaluationInterrupted(Interrupted):
    """Ctrl-C during the attacks; the message names the state file that holds the finished batches."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        saved = (f"finished batches are saved in {state_path}" if state_path.is_file()
                 else "no batch had finished, so nothing is saved")
        super().__init__(f"interrupted: {saved}; run the same command again to resume")


def check_name(name: str) -> str:
    """`name` if it can be part of a file name (eval-NAME.json), else a one-line error."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"--name {name!r} must be a plain file-name part (no slashes), e.g. --name bs-last")
    return name


@dataclasses.dataclass(frozen=True)
class SavedProtocol:
    """What an evaluation of a saved model measures: the attacks, on how many stratified test examples, with
    which batch size and seed, in which threat model (default: the run's norm and eps; another norm needs its
    eps) and step size (default eps / 4), on which data (default: the run's dataset and folder)."""

    attacks: str | Sequence[str]
    n_examples: int = 1000
    batch_size: int = 256
    seed: int = 0
    eps: float | None = None
    step_size: float | None = None
    dataset: str | None = None
    data_dir: str | None = None
    norm: str | None = None
    image_size: int | None = None  # streamed data: the side of the evaluation view (default: the run's)
    name: str = ""  # a named protocol (--protocol), recorded in the report


def evaluate_saved(target: str | Path, protocol: SavedProtocol, *, name: str | None = None,
                   out: str | Path | None = None, device: str = "auto", restart: bool = False,
                   progress: bool | None = None, log: Callable[[str], None] = print) -> tuple[Path, EvalResult]:
    """Evaluate `target` (a run directory or model file) as `protocol` says and write eval-NAME.json into `out`
    (default: the run directory); returns (that path, the result).

    Per-example flags go to eval-NAME.state.pt after every batch, so a killed evaluation resumes where it
    stopped when called again (`restart` discards them); Ctrl-C raises EvaluationInterrupted, which names that
    file. Bad arguments fail before any attack runs.
    """
    attacks, n_examples, batch_size, seed = protocol.attacks, protocol.n_examples, protocol.batch_size, protocol.seed
    eps, step_size, dataset, data_dir = protocol.eps, protocol.step_size, protocol.dataset, protocol.data_dir
    specs = parse_attacks(attacks)
    norm = norm_name(protocol.norm) if protocol.norm is not None else None
    for spec in specs:
        spec.check_norm(norm or "linf")
    if n_examples <= 0:
        raise ConfigError(f"--n-examples must be positive, got {n_examples}")
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if step_size is not None and not 0 < step_size < float("inf"):
        raise ConfigError(f"--step-size must be a finite number > 0 in pixel units (e.g. 2/255), got {step_size}")
    if eps is not None and not (0 <= eps < float("inf")):
        raise ConfigError(f"--eps must be a finite number >= 0 in pixel units (e.g. 8/255), got {eps}")
    if name is not None:
        check_name(name)
    model, meta = load_model(target, resolve_device(device))
    target = Path(target)
    run_dir = target if target.is_dir() else target.parent
    run_config_path = Path(meta["path"]).parent / "config.json"
    run_config = json.loads(run_config_path.read_text()) if run_config_path.exists() else {}
    dataset = dataset or meta.get("dataset")
    if dataset is None:
        raise DataError(f"{meta['path']} does not name its dataset; pass --dataset")
    trained_norm = str(meta.get("norm", "linf"))
    norm = norm or trained_norm
    if eps is None and norm != trained_norm:
        raise ConfigError(f"the model was trained at {trained_norm} eps {meta['eps']:g}; give --eps for {norm} "
                          f"(e.g. --norm l2 --eps 0.5)")
    eps = eps if eps is not None else float(meta["eps"])
    targeted = [s.name for s in specs if s.components and int(meta["num_classes"]) < 4]
    if targeted:  # AutoAttack's targeted DLR loss reads the 4th-largest logit
        raise ConfigError(f"{targeted[0]} needs a model of at least 4 classes (its targeted DLR loss), this one has "
                          f"{meta['num_classes']}; evaluate it with pgd/cw attacks")
    same_data = dataset == run_config.get("dataset")  # then the images are read as the run read them
    image_size = protocol.image_size if protocol.image_size is not None else (
        run_config.get("image_size", 0) if same_data else 0)
    test = load_dataset(dataset, data_dir or run_config.get("data_dir"), val_size=0,
                        cache_dir=run_config.get("cache_dir"), loader=run_config.get("loader", "auto") if same_data
                        else "auto", image_size=image_size).test
    _check_fits(test.image_shape, test.labels, meta, dataset, protocol.image_size is not None)
    largest = max_radius(norm, math.prod(test.image_shape))
    for flag, value in (("--eps", eps), ("--step-size", step_size)):
        if value is not None and value > largest:
            raise ConfigError(f"{flag} must be at most {largest:g} at {norm} on {dataset} (pixel units; the box's "
                              f"diameter), got {value:g}")
    warning = radius_warning(eps, norm)
    if warning:
        log(f"warning: {warning}")
    index = stratified_subset(test.labels, n_examples, seed)
    name = name or (target.name if target.is_dir() else target.stem)
    folder = Path(out) if out else run_dir
    state_path = folder / f"eval-{name}.state.pt"
    _check_writable(folder)
    log(f"{meta['path']}: {meta['arch']}" + (f" trained with {meta['method']}" if "method" in meta else "")
        + f"; {len(index)} of {len(test.labels)} {dataset} test examples (stratified, seed {seed}); "
          f"{threat_model_text(norm, eps)} = {eps:.4f}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RadiusWarning)  # logged above, in one line
            chosen = test.subset(index)
            result = evaluate(model, chosen.images, chosen.labels, eps, [s.name for s in specs],
                              batch_size, seed=seed, step_size=step_size, state_path=state_path, restart=restart,
                              progress=progress, norm=norm)
    except KeyboardInterrupt:
        raise EvaluationInterrupted(state_path) from None
    if result.batches["resumed"]:
        log(f"resumed {state_path.name}: {result.batches['resumed']} of {result.batches['total']} batches "
            f"were already done")
    log(result_table(result))
    report_path = folder / f"eval-{name}.json"
    extra = dict(checkpoint=dict(path=meta["path"], method=meta.get("method"), epoch=meta.get("epoch")),
                 subset=dict(n_examples=len(index), test_size=len(test.labels), seed=seed, stratified=True),
                 **({"protocol": protocol.name, "image_size": test.image_shape[-1]} if protocol.name else {}))
    atomic_write_json(report_path, model_info(result, name, meta["arch"], dataset, extra))
    state_path.unlink(missing_ok=True)
    return report_path, result


def _check_fits(image_shape: tuple[int, ...], labels: Tensor, meta: dict[str, Any], dataset: str,
                sized: bool = False) -> None:
    """The dataset must have the image shape (unless an image size was asked for: a model that pools globally
    takes any) and the classes the model was trained for."""
    shape = tuple(meta.get("image_shape") or ())
    if shape and not sized and tuple(image_shape) != shape:
        raise DataError(f"{dataset} images have shape {tuple(image_shape)} but the model was trained on {shape}")
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
