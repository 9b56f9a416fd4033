"""`backsmooth report`: a Markdown table, report.json and three plots from run directories.

Each run directory of `backsmooth train` gives one row, or one per evaluated checkpoint when
`backsmooth eval` wrote eval-*.json files for several. Accuracies come from those files, else from
summary.json (clean and PGD-20 on the test subset), else from the validation split in metrics.jsonl.
Runs that differ only by seed are also summarised as mean ± std. See docs/report.md.
"""

import argparse
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backsmooth.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from backsmooth.errors import BacksmoothError, ConfigError, DataError
from backsmooth.evaluation import AUTOATTACK_VARIANTS, eps_text

PLOTS = {
    "val_robust_by_epoch.png": "Validation robust accuracy per epoch",
    "val_robust_by_time.png": "Validation robust accuracy against training time",
    "clean_vs_robust.png": "Final clean against PGD-20 accuracy",
}
CIFAR10_NOTE = ("CIFAR-10 results from ../shared/data use a JPEG-75 copy; absolute numbers may differ from "
                "published ones by a few points.")
MATPLOTLIB_HINT = "plots need matplotlib: pip install 'backsmooth[report]'"
COLUMNS = ("run", "checkpoint", "method", "arch", "dataset", "eps", "epochs", "clean", "PGD-20", "CW", "AutoAttack",
           "worst case", "examples", "train time", "time/epoch", "vs TRADES-10", "source")
GROUP_COLUMNS = ("runs", "checkpoint", "n", "seeds", "clean", "PGD-20", "CW", "AutoAttack", "worst case", "time/epoch",
                 "vs TRADES-10", "source")
# config keys that do not change what a run computes: never in labels, ignored when grouping seeds
IGNORED_KEYS = ("method", "out", "device", "data_dir", "cache_dir", "download", "log_every", "checkpoint_every",
                "eval_batch_size")
LABEL_KEYS_FIRST = ("arch", "dataset", "eps", "alpha", "beta", "gamma", "steps", "grad_align_lambda", "epochs",
                    "batch_size", "lr", "schedule")
_CONFIG_TYPES = {"method": str, "arch": str, "dataset": str, "eps": (int, float), "epochs": int, "batch_size": int,
                 "seed": int}
_CHECKPOINT_ORDER = {"best": 0, "last": 1}


# --------------------------------------------------------------------------- reading run directories


@dataclass
class RunData:
    """The checked files of one run directory."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    evals: dict[str, dict[str, Any]]  # eval-*.json file name -> contents

    @property
    def val_key(self) -> str:
        """The metrics key of the per-epoch validation robust accuracy."""
        return f"val_pgd{self.config.get('val_pgd_steps', 20)}_acc"

    @property
    def train_seconds(self) -> float:
        return float(self.metrics[-1]["total_train_seconds"])

    @property
    def seconds_per_epoch(self) -> float:
        """Median epoch training time: a slow first epoch (warm-up, compilation) does not distort it."""
        return statistics.median(float(row["train_seconds"]) for row in self.metrics)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found; is {path.parent} a run directory of `backsmooth train`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; {what} is damaged, rewrite or remove it") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected a JSON object ({what})")
    return data


def _require(data: dict[str, Any], types: dict[str, type | tuple[type, ...]], source: str) -> None:
    for key, kind in types.items():
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{source} lacks a valid {key!r} (got {value!r})")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path.parent} has no metrics.jsonl; is it a run directory of `backsmooth train`?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object")
        _require(row, {"epoch": int, "train_seconds": (int, float), "total_train_seconds": (int, float)},
                 f"{path} line {number}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no epochs yet; report a run after its first epoch")
    return rows


def read_run(path: str | Path) -> RunData:
    """Read and check config.json, metrics.jsonl, summary.json (optional) and eval-*.json of a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run directory {path} not found" if not path.exists()
                        else f"{path} is a file, not a run directory")
    config = _read_json(path / "config.json", "the run's configuration")
    _require(config, _CONFIG_TYPES, f"{path / 'config.json'}")
    metrics = _read_metrics(path / "metrics.jsonl")
    summary = None
    if (path / "summary.json").exists():
        summary = _read_json(path / "summary.json", "the final test summary")
        _require(summary, {"best": dict, "test_examples": int}, f"{path / 'summary.json'}")
    evals = {}
    for file in sorted(path.glob("eval-*.json")):
        info = _read_json(file, "a `backsmooth eval` report")
        evaluation = info.get("evaluation")
        if not isinstance(evaluation, dict):
            raise DataError(f"{file} has no 'evaluation' object; is it a `backsmooth eval` report?")
        _require(evaluation, {"clean_acc": (int, float), "per_attack": dict, "n_examples": int, "eps": (int, float)},
                 f"{file} evaluation")
        evals[file.name] = info
    return RunData(path, config, metrics, summary, evals)


# --------------------------------------------------------------------------- rows


def _finite(value: Any) -> float | None:
    """A float, or None for missing/NaN values (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _value_text(key: str, value: Any) -> str:
    if value is None:
        return "default"
    if key == "eps":
        return eps_text(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(configs: Sequence[dict[str, Any]], *, with_seed: bool = True) -> list[str]:
    """Method plus every setting that differs between runs of that method (seed last), e.g. 'trades beta=6'."""
    keys = set().union(*configs) - set(IGNORED_KEYS) - {"seed"}
    ordered = [k for k in LABEL_KEYS_FIRST if k in keys] + sorted(keys - set(LABEL_KEYS_FIRST))
    ordered += ["seed"] if with_seed else []
    labels = []
    for config in configs:
        peers = [c for c in configs if c["method"] == config["method"]]
        varying = [k for k in ordered if len({_value_text(k, c.get(k)) for c in peers}) > 1]
        labels.append(" ".join([config["method"], *(f"{k}={_value_text(k, config.get(k))}" for k in varying)]))
    return labels


def _pick_cw(per_attack: dict[str, Any]) -> tuple[str | None, float | None]:
    """cw20 when evaluated, else the first other CW attack."""
    names = ["cw20"] + sorted(n for n in per_attack if n.startswith("cw") and n != "cw20")
    for name in names:
        if _finite(per_attack.get(name)) is not None:
            return name, float(per_attack[name])
    return None, None


def _pick_autoattack(per_attack: dict[str, Any], attacks: dict[str, Any]) -> tuple[str | None, float | None]:
    """The standard AutoAttack when evaluated, else a subset; returns (variant description, accuracy)."""
    for name in sorted((n for n in per_attack if n.startswith("autoattack")), key=lambda n: (n != "autoattack", n)):
        if _finite(per_attack[name]) is None:
            continue
        settings = (attacks.get(name) or {}).get("settings") or {}
        components = tuple(settings.get("components") or AUTOATTACK_VARIANTS.get(name, ()))
        if components == AUTOATTACK_VARIANTS["autoattack"]:
            return "standard", float(per_attack[name])
        return " + ".join("Square" if c == "square" else c.upper() for c in components) or name, float(per_attack[name])
    return None, None


def _accuracy_rows(run: RunData) -> list[dict[str, Any]]:
    """The accuracy part of the run's rows: eval files grouped by checkpoint, else summary, else validation."""
    if run.evals:
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        for name, info in run.evals.items():
            evaluation, checkpoint = info["evaluation"], info.get("checkpoint") or {}
            which = Path(checkpoint["path"]).stem if checkpoint.get("path") else "model"
            subset_seed = (info.get("subset") or {}).get("seed")
            # files for the same checkpoint, eps and subset (e.g. pgd20,cw20 then autoattack) share a row
            entry = merged.setdefault((which, evaluation["eps"], evaluation["n_examples"], subset_seed), dict(
                checkpoint=which, epoch=checkpoint.get("epoch"), eps=float(evaluation["eps"]),
                clean_acc=_finite(evaluation["clean_acc"]), per_attack={}, attacks={},
                n_examples=evaluation["n_examples"], source_kind="eval", sources=[], results=[]))
            entry["per_attack"].update(evaluation["per_attack"])
            entry["attacks"].update(evaluation.get("attacks") or {})
            entry["sources"].append(name)
            entry["results"].append((set(evaluation["per_attack"]), _finite(evaluation.get("robust_acc"))))
        return sorted(merged.values(), key=lambda e: (_CHECKPOINT_ORDER.get(e["checkpoint"], 2), e["checkpoint"],
                                                      e["eps"], e["n_examples"]))
    eps = float(run.config["eps"])
    if run.summary is not None and run.summary["test_examples"] > 0:
        best = run.summary["best"]
        return [dict(checkpoint="best", epoch=best.get("epoch"), eps=eps, clean_acc=_finite(best.get("clean_acc")),
                     per_attack={"pgd20": best.get("pgd20_acc")}, attacks={}, n_examples=run.summary["test_examples"],
                     source_kind="test", sources=["summary.json"], results=[({"pgd20"}, _finite(best.get("pgd20_acc")))])]
    # unfinished run: the epoch the trainer keeps as best.pt, on the validation split
    def score(row: dict[str, Any]) -> float:  # as the trainer: robust accuracy, clean when there is none
        robust = _finite(row.get(run.val_key))
        return robust if robust is not None else _finite(row.get("val_clean_acc")) or 0.0

    row = max(run.metrics, key=score)  # the first of equals, as the trainer keeps
    return [dict(checkpoint="best", epoch=row["epoch"], eps=eps, clean_acc=_finite(row.get("val_clean_acc")),
                 per_attack={"pgd20": row.get("val_pgd20_acc")}, attacks={}, n_examples=row.get("val_examples"),
                 source_kind="validation", sources=["metrics.jsonl (validation split)"],
                 results=[({"pgd20"}, _finite(row.get("val_pgd20_acc")))])]


def _worst_case(results: Sequence[tuple[set[str], float | None]], attacks: set[str]) -> dict[str, Any]:
    """Pointwise worst case over the row's attacks, from a result (attacks run, robust accuracy) that ran them all.

    Without such a result (e.g. pgd20,cw20 in one eval file and AutoAttack in another) the per-point flags
    are not combined; the lowest result is then an upper bound (worst_case_bound=True).
    """
    exact = [acc for ran, acc in results if ran >= attacks and acc is not None]
    if exact:
        return dict(worst_case_acc=min(exact), worst_case_bound=False, worst_case_attacks="+".join(sorted(attacks)))
    known = [acc for _, acc in results if acc is not None]
    return dict(worst_case_acc=min(known) if known else None, worst_case_bound=True, worst_case_attacks=None)


def _trades10_seconds(run: RunData, runs: Sequence[RunData]) -> float | None:
    """Mean per-epoch time of the TRADES-10 runs with the run's architecture, dataset and batch size."""
    same = ("arch", "dataset", "batch_size")
    refs = [r.seconds_per_epoch for r in runs if r.config["method"] == "trades" and r.config.get("steps") in (None, 10)
            and all(r.config[k] == run.config[k] for k in same)]
    return statistics.fmean(refs) if refs else None


def build_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One JSON-ready row per run and evaluated checkpoint (accuracies as fractions, times in seconds)."""
    labels = run_labels([r.config for r in runs])
    groups = run_labels([r.config for r in runs], with_seed=False)
    labels = [f"{label} [{run.path.name}]" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]
    rows = []
    for run, label, group in zip(runs, labels, groups):
        reference = _trades10_seconds(run, runs)
        for entry in _accuracy_rows(run):
            per_attack = {k: _finite(v) for k, v in entry.pop("per_attack").items()}
            cw_attack, cw_acc = _pick_cw(per_attack)
            variant, autoattack_acc = _pick_autoattack(per_attack, entry.pop("attacks"))
            entry.update(_worst_case(entry.pop("results"), set(per_attack)))
            rows.append(dict(
                run_dir=str(run.path), label=label, group=group, method=run.config["method"],
                arch=run.config["arch"], dataset=run.config["dataset"], epochs=run.config["epochs"],
                epochs_done=run.metrics[-1]["epoch"], seed=run.config["seed"], batch_size=run.config["batch_size"],
                **entry, per_attack=per_attack, pgd20_acc=per_attack.get("pgd20"), cw_attack=cw_attack, cw_acc=cw_acc,
                autoattack_variant=variant, autoattack_acc=autoattack_acc, train_seconds=run.train_seconds,
                seconds_per_epoch=run.seconds_per_epoch,
                relative_to_trades10=run.seconds_per_epoch / reference if reference else None))
    return rows


# statistic -> the attack name it depends on
SEED_FIELDS = {"clean_acc": None, "pgd20_acc": None, "cw_acc": "cw_attack", "autoattack_acc": "autoattack_variant",
               "worst_case_acc": "worst_case_attacks", "seconds_per_epoch": None, "relative_to_trades10": None}


def seed_groups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (n - 1) over rows that differ only by seed, for groups of 2 or more runs.

    Rows of the same checkpoint and eps are grouped whether their numbers come from eval files or
    summary.json (both are test subsets), never with validation-split rows. A statistic is None
    unless every run has it, measured with the same attack (the worst case: with the same attacks, exactly).
    """
    by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["group"], row["checkpoint"], row["eps"], row["source_kind"] == "validation")
        by_key.setdefault(key, []).append(row)
    groups = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        group: dict[str, Any] = dict(label=members[0]["group"], checkpoint=members[0]["checkpoint"],
                                     eps=members[0]["eps"], n=len(members), seeds=[m["seed"] for m in members],
                                     run_dirs=[m["run_dir"] for m in members],
                                     source_kinds=sorted({m["source_kind"] for m in members}))
        for field, attack in SEED_FIELDS.items():
            values = [m[field] for m in members]
            names = {m[attack] for m in members} if attack else {None}
            if attack:
                group[attack] = next(iter(names)) if len(names) == 1 else None
            # no attack name (e.g. a worst case that is only an upper bound) or differing ones: not comparable
            group[field] = (None if any(v is None for v in values) or len(names) > 1 or (attack and None in names)
                            else dict(mean=statistics.fmean(values), std=statistics.stdev(values)))
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- Markdown


def format_duration(seconds: float | None) -> str:
    """'42.0 s', '12m 05s' or '3h 07m'."""
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes}m {int(round(seconds)) % 60:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _with_name(text: str, name: str | None, default: str) -> str:
    return text if name in (None, default) or text == "n/a" else f"{text} ({name})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def _row_cells(row: dict[str, Any]) -> list[str]:
    epoch = f" (epoch {row['epoch']})" if row["epoch"] is not None else ""
    epochs = str(row["epochs"]) if row["epochs_done"] == row["epochs"] else f"{row['epochs_done']}/{row['epochs']}"
    examples = str(row["n_examples"]) + (" val" if row["source_kind"] == "validation" else "")
    ratio = row["relative_to_trades10"]
    return [row["label"], row["checkpoint"] + epoch, row["method"], row["arch"], row["dataset"], eps_text(row["eps"]),
            epochs, _percent(row["clean_acc"]), _percent(row["pgd20_acc"]),
            _with_name(_percent(row["cw_acc"]), row["cw_attack"], "cw20"),
            _with_name(_percent(row["autoattack_acc"]), row["autoattack_variant"], ""),
            ("<= " if row["worst_case_bound"] and row["worst_case_acc"] is not None else "")
            + _percent(row["worst_case_acc"]),
            examples, format_duration(row["train_seconds"]), format_duration(row["seconds_per_epoch"]),
            "n/a" if ratio is None else f"{ratio:.2f}x", ", ".join(row["sources"])]


def _mean_std(stat: dict[str, float] | None, scale: float = 100.0, digits: int = 2) -> str:
    return "n/a" if stat is None else f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _group_cells(group: dict[str, Any]) -> list[str]:
    time = group["seconds_per_epoch"]
    return [group["label"], group["checkpoint"], str(group["n"]), ", ".join(map(str, group["seeds"])),
            _mean_std(group["clean_acc"]), _mean_std(group["pgd20_acc"]),
            _with_name(_mean_std(group["cw_acc"]), group["cw_attack"], "cw20"),
            _with_name(_mean_std(group["autoattack_acc"]), group["autoattack_variant"], ""),
            _mean_std(group["worst_case_acc"]),
            "n/a" if time is None else f"{format_duration(time['mean'])} ± {format_duration(time['std'])}",
            _mean_std(group["relative_to_trades10"], 1.0), " + ".join(group["source_kinds"])]


def notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The lines under the table: data, models and example counts; how the columns were measured."""
    parts = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        archs = ", ".join(dict.fromkeys(r["arch"] for r in mine))
        test = sorted({r["n_examples"] for r in mine if r["source_kind"] != "validation"})
        val = sorted({r["n_examples"] for r in mine if r["source_kind"] == "validation"})
        counts = ([f"{' / '.join(map(str, test))} test examples (stratified subsets)"] if test else []) + (
            [f"{' / '.join(map(str, val))} validation examples (rows marked val)"] if val else [])
        parts.append(f"{dataset} with {archs}: {', '.join(counts)}")
    lines = [
        "Data and models: " + "; ".join(parts) + ".",
        "Accuracies in %. CW and AutoAttack come from `backsmooth eval` (eval-*.json); runs without one show the "
        "PGD-20 of summary.json (n/a: not evaluated). AutoAttack standard = APGD-CE + APGD-T + FAB-T + Square. "
        "Worst case: a point counts as robust only if every attack of the row failed on it (from an eval file that "
        "ran them all; '<=' marks an upper bound, the lowest file result, when no single file did). "
        "Training time excludes evaluation; time/epoch is the median epoch; vs TRADES-10 divides it by that of "
        "the TRADES (10 steps) runs with the same architecture, dataset and batch size (n/a: none in this report), "
        "so it compares runs on the same hardware only.",
    ]
    if any(r["dataset"] == "cifar10" for r in rows):
        lines.append(CIFAR10_NOTE)
    return lines


def render_markdown(rows: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]]) -> str:
    """report.md: the main table, its notes, the seed table and the embedded plots."""
    lines = ["# Training report", "", *_table(COLUMNS, [_row_cells(r) for r in rows]), ""]
    lines += [f"{note}\n" for note in notes(rows)]
    if groups:
        lines += ["## Mean ± std over seeds", "", *_table(GROUP_COLUMNS, [_group_cells(g) for g in groups]), "",
                  "Runs that differ only by seed; std is the sample standard deviation (n - 1), in % points for "
                  "accuracies; n/a where a run lacks the number (or measured it with another attack).", ""]
    lines += ["## Plots", ""] + [f"![{title}]({name})\n" for name, title in PLOTS.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _figure() -> Any:
    """A matplotlib Figure drawn with Agg, without touching pyplot's global backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BacksmoothError(MATPLOTLIB_HINT) from None
    return Figure(figsize=(7, 4.5), layout="constrained")


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _style(index: int) -> dict[str, Any]:
    """Colours of the default cycle, then new line styles once they repeat."""
    return dict(color=f"C{index % 10}", linestyle=("-", "--", ":", "-.")[index // 10 % 4])


def _time_axis(max_seconds: float) -> tuple[float, str]:
    if max_seconds > 2 * 3600:
        return 3600.0, "hours"
    return (60.0, "minutes") if max_seconds > 120 else (1.0, "seconds")


def plot_curves(runs: Sequence[RunData], labels: Sequence[str], out_dir: Path) -> None:
    """Validation robust accuracy per epoch and against cumulative training time, one line per run."""
    steps = {r.config.get("val_pgd_steps", 20) for r in runs}
    ylabel = f"validation PGD-{steps.pop()} accuracy (%)" if len(steps) == 1 else "validation PGD-K accuracy (%)"
    scale, unit = _time_axis(max(r.train_seconds for r in runs))
    for name, x_key, xlabel in (("val_robust_by_epoch.png", "epoch", "epoch"),
                                ("val_robust_by_time.png", "total_train_seconds", f"training time ({unit})")):
        figure = _figure()
        axes = figure.add_subplot()
        drawn = 0
        for index, (run, label) in enumerate(zip(runs, labels)):
            points = [(float(r[x_key]) / (scale if x_key != "epoch" else 1.0), 100 * _finite(r.get(run.val_key)))
                      for r in run.metrics if _finite(r.get(run.val_key)) is not None]
            if points:
                suffix = f" (PGD-{run.config.get('val_pgd_steps', 20)})" if "K" in ylabel else ""
                axes.plot(*zip(*points), marker="o", markersize=3, label=label + suffix, **_style(index))
                drawn += 1
        if drawn:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no validation robust accuracy recorded", ha="center", transform=axes.transAxes)
        axes.set(xlabel=xlabel, ylabel=ylabel, title=PLOTS[name])
        axes.grid(alpha=0.3)
        _save(figure, out_dir / name)


def plot_clean_vs_robust(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """One labelled point per row: final clean against PGD-20 accuracy, coloured as the run's curves."""
    figure = _figure()
    axes = figure.add_subplot()
    run_index = {run_dir: i for i, run_dir in enumerate(dict.fromkeys(r["run_dir"] for r in rows))}
    per_run = {run_dir: sum(1 for r in rows if r["run_dir"] == run_dir) for run_dir in run_index}
    for row in (r for r in rows if r["clean_acc"] is not None and r["pgd20_acc"] is not None):
        label = row["label"] + (f" ({row['checkpoint']})" if per_run[row["run_dir"]] > 1 else "")
        label += " (validation)" if row["source_kind"] == "validation" else ""
        x, y = 100 * row["clean_acc"], 100 * row["pgd20_acc"]
        axes.scatter([x], [y], color=_style(run_index[row["run_dir"]])["color"],
                     marker={"best": "o", "last": "s"}.get(row["checkpoint"], "^"))
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    axes.margins(0.2)
    axes.set(xlabel="clean accuracy (%)", ylabel="PGD-20 accuracy (%)", title=PLOTS["clean_vs_robust.png"])
    axes.grid(alpha=0.3)
    _save(figure, out_dir / "clean_vs_robust.png")


# --------------------------------------------------------------------------- entry points


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write report.md, report.json and the plots into `out_dir`; returns the path of report.md."""
    if not run_dirs:
        raise ConfigError("no run directories given")
    seen = [Path(d).resolve() for d in run_dirs]
    twice = next((d for i, d in enumerate(run_dirs) if seen[i] in seen[:i]), None)
    if twice is not None:
        raise ConfigError(f"run directory {twice} is given twice")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    runs = [read_run(d) for d in run_dirs]
    rows = build_rows(runs)
    groups = seed_groups(rows)
    _figure()  # a missing matplotlib fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    labels = {r["run_dir"]: r["label"] for r in rows}
    plot_curves(runs, [labels[str(run.path)] for run in runs], out)
    plot_clean_vs_robust(rows, out)
    atomic_write_json(out / "report.json", dict(runs=[str(r.path) for r in runs], rows=rows, seed_groups=groups,
                                                notes=notes(rows), plots=list(PLOTS)))
    atomic_write_text(out / "report.md", render_markdown(rows, groups))
    return out / "report.md"


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth report`."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `backsmooth train`")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the PNG plots")


def main_report(args: argparse.Namespace) -> int:
    """`backsmooth report`: build the report and say where it is."""
    path = build_report(args.runs, args.out)
    print(f"wrote {path}, report.json and {len(PLOTS)} plots ({', '.join(PLOTS)}) in {path.parent}")
    return 0
