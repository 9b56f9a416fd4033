"""`backsmooth export`: a finished run's model as a self-describing folder that leaves the run directory.

The folder holds model.safetensors (weights only; the normalisation is part of them), config.json (what
`backsmooth.load` needs to rebuild the model, and what the model is: classes, input size, threat model, training
and every evaluation of this checkpoint) and README.md, a model card in the Hugging Face Hub's conventions.
`robustbench=True` adds RobustBench's model_info JSON in its repository's layout."""

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from backsmooth import __version__, checkpoint
from backsmooth.atomic import atomic_write_json, atomic_write_text
from backsmooth.errors import ConfigError
from backsmooth.publish.card import model_card, robustbench_info, robustbench_needs
from backsmooth.units import NORM_TEXT, threat_model_text


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of the exported checkpoint: an eval file's result, or the trainer's own final check."""

    source: str  # 'eval-NAME.json' or 'summary.json'
    n_examples: int
    test_size: int  # the test set's size, n_examples of which were evaluated (0: not recorded)
    seed: int
    norm: str
    eps: float
    clean_acc: float
    per_attack: dict[str, float]
    worst_case: float
    attacks: dict[str, dict[str, Any]]  # attack name -> its settings (steps, step size, AutoAttack version, ...)


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """What an export reads from a run directory."""

    run_dir: Path
    checkpoint: str  # 'best' or 'last'
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]
    config: dict[str, Any]
    summary: dict[str, Any]
    evaluations: list[Evaluation]


def read_finished_run(run_dir: str | Path, which: str | None = None) -> FinishedRun:
    """The run's best.pt (else last.pt, or `which`), its config, summary and the evaluations of that checkpoint.
    Refuses, in one line, a folder that is not a run directory and a run that has not finished."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a run directory of `backsmooth train` (it has no config.json)")
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{run_dir} has not finished training (no summary.json); finish it with `backsmooth train "
                          f"--out {run_dir} --resume`, then export it")
    if which not in (None, "best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {which!r}")
    which = which or ("best" if (run_dir / "best.pt").is_file() else "last")
    path = run_dir / f"{which}.pt"
    model, meta = checkpoint.load_model(path)  # the weights, checked against the architecture the meta names
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluations = _eval_files(run_dir, path) + _final_check(summary, which, config)
    return FinishedRun(run_dir, which, model.state_dict(), meta, config, summary, evaluations)


def _same_weights(first: Path, second: Path) -> bool:
    return first.resolve() == second.resolve() or (
        first.is_file() and second.is_file() and first.read_bytes() == second.read_bytes())


def _eval_files(run_dir: Path, path: Path) -> list[Evaluation]:
    """The eval-*.json files in the run directory whose checkpoint holds the exported weights."""
    found = []
    for file in sorted(run_dir.glob("eval-*.json")):
        data = json.loads(file.read_text())
        source = data.get("checkpoint", {})
        evaluated = Path(source.get("same_weights_as") or source.get("path", ""))
        if not evaluated.name or not _same_weights(evaluated if evaluated.is_absolute() else run_dir / evaluated,
                                                   path):
            continue
        result, subset = data["evaluation"], data.get("subset", {})
        found.append(Evaluation(
            source=file.name, n_examples=int(result["n_examples"]),
            test_size=int(subset.get("test_size", result["n_examples"])), seed=int(subset.get("seed", 0)),
            norm=str(result.get("norm", "linf")), eps=float(result["eps"]), clean_acc=float(result["clean_acc"]),
            per_attack={k: float(v) for k, v in result["per_attack"].items()}, worst_case=float(result["robust_acc"]),
            attacks={k: dict(v.get("settings", {})) for k, v in result.get("attacks", {}).items()}))
    return found


def _final_check(summary: dict[str, Any], which: str, config: dict[str, Any]) -> list[Evaluation]:
    """The trainer's own PGD-20 check of the checkpoint on its stratified test subset, when it ran."""
    result, n = summary.get(which) or {}, int(summary.get("test_examples", 0))
    if not n or "pgd20_acc" not in result or result["pgd20_acc"] != result["pgd20_acc"]:  # none, or NaN
        return []
    eps, norm = float(summary["eps"]), str(summary.get("norm", "linf"))
    return [Evaluation(source="summary.json", n_examples=n, test_size=int(summary.get("test_size", 0)),
                       seed=int(config.get("seed", 0)), norm=norm, eps=eps,
                       clean_acc=float(result["clean_acc"]), per_attack={"pgd20": float(result["pgd20_acc"])},
                       worst_case=float(result["pgd20_acc"]),
                       attacks={"pgd20": dict(kind="pgd", loss="CE", steps=20, step_size=eps / 4, random_start=True,
                                              restarts=1, norm=NORM_TEXT.get(norm, norm), eps=eps)})]


def export_run(run_dir: str | Path, out: str | Path, *, which: str | None = None, name: str | None = None,
               robustbench: bool = False) -> Path:
    """Write the export folder `out` (refused if it exists and is not empty: nothing is overwritten); returns it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; choose a new --out (nothing was written)")
    run = read_finished_run(run_dir, which)
    name = name or out.name
    out.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().cpu().contiguous() for key, value in run.weights.items()}
    save_file(weights, str(out / checkpoint.EXPORT_WEIGHTS), metadata={"format": "pt", "library": "backsmooth"})
    config = export_config(run, name)
    atomic_write_json(out / checkpoint.EXPORT_CONFIG, config)
    atomic_write_text(out / "README.md", model_card(config, robustbench=robustbench))
    if robustbench:
        info = robustbench_info(config)
        folder = out / "robustbench" / "model_info" / info["dataset"] / NORM_TEXT[config["threat_model"]["norm"]]
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / f"{name}.json", info)
    return out


def export_config(run: FinishedRun, name: str) -> dict[str, Any]:
    """config.json of the export: `checkpoint` is what `load` needs, the rest says what the model is and how it
    was trained and evaluated (fractions, not percentages)."""
    meta, config, summary = run.meta, run.config, run.summary
    normalisation = {key: run.weights[f"normalize.{key}"].flatten().tolist()
                     for key in ("mean", "std") if f"normalize.{key}" in run.weights}
    checkpoint_meta = {key: meta[key] for key in ("arch", "num_classes", "in_channels", "image_shape", "dataset",
                                                  "method", "eps", "norm", "epoch", "step", "classes") if key in meta}
    return {
        "library": "backsmooth", "format": checkpoint.EXPORT_FORMAT, "backsmooth_version": __version__,
        "name": name, "architecture": meta["arch"], "num_classes": meta["num_classes"],
        "input_size": meta.get("image_shape"), "input_range": [0.0, 1.0],
        "normalization": dict(normalisation, inside_model=True), "classes": meta.get("classes"),
        "dataset": meta.get("dataset"), "data_note": summary.get("data_note"),
        "threat_model": {"norm": meta.get("norm", "linf"), "eps": meta["eps"],
                         "text": threat_model_text(meta.get("norm", "linf"), meta["eps"])},
        "training": {
            "method": config["method"], "method_options": config.get("method_options", {}),
            **{key: config.get(key) for key in ("epochs", "batch_size", "lr", "schedule", "momentum", "weight_decay",
                                                "weight_averaging", "label_smoothing", "precision", "seed",
                                                "val_pgd_steps", "val_size")},
            "train_seconds": summary.get("train_seconds"), "device": summary.get("device"),
            "processes": summary.get("processes"), "collapse": summary.get("collapse"),
            "checkpoint": run.checkpoint, "checkpoint_epoch": meta.get("epoch"),
            "best_epoch": summary.get("best_epoch"),
        },
        "evaluations": [dataclasses.asdict(e) for e in run.evaluations],
        "checkpoint": checkpoint_meta,
    }


def what_robustbench_needs(out: str | Path) -> list[str]:
    """What a RobustBench submission of the exported folder still needs, for the command line to print."""
    return robustbench_needs(json.loads((Path(out) / checkpoint.EXPORT_CONFIG).read_text()))
