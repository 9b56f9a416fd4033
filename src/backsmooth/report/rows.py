"""Typed rows of the report: one `Row` per run, evaluated checkpoint and test subset, one `SeedGroup` per set of
runs that differ only by seed and were measured on the same examples; labels, the attack columns, the choice of
CW and AutoAttack, and the pointwise worst case."""

import re
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from backsmooth.report.read import RunData, collapse_text, finite_or_none, flat_config, method_options
from backsmooth.units import eps_text

# config keys that do not change what a run computes: never in labels, ignored when grouping seeds
IGNORED_KEYS = ("method", "out", "device", "data_dir", "cache_dir", "download", "log_every", "checkpoint_every",
                "eval_batch_size", "tensorboard")
# label order: these keys, then the method options (sorted), then LABEL_KEYS_THEN, every other key sorted, seed
LABEL_KEYS_FIRST = ("arch", "dataset", "eps")
LABEL_KEYS_THEN = ("epochs", "batch_size", "lr", "schedule")
# RobustBench's standard AutoAttack ensemble, in its order; a subset is named by its components
STANDARD_AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
_CHECKPOINT_ORDER = {"best": 0, "last": 1}


@dataclass(frozen=True)
class Row:
    """One table row: a run's numbers for one checkpoint, eps and test subset (fractions; times in seconds)."""

    run_dir: str
    label: str
    group: str  # the label without the seed: rows of one group differ only by seed
    method: str
    arch: str
    dataset: str
    epochs: int
    epochs_done: int
    seed: int
    batch_size: int
    checkpoint: str  # "best", "last", another checkpoint's file stem, or "model"
    epoch: int | None
    eps: float
    n_examples: int | None
    subset_seed: int | None  # seed of the examples' choice (the eval file's; the run's for summary.json/validation)
    source_kind: str  # "eval" (eval-*.json), "test" (summary.json) or "validation" (metrics.jsonl)
    sources: tuple[str, ...]
    clean_acc: float | None
    per_attack: dict[str, float | None]
    pgd20_acc: float | None
    cw_attack: str | None
    cw_acc: float | None
    autoattack_variant: str | None
    autoattack_acc: float | None
    worst_case_acc: float | None
    worst_case_bound: bool  # True: no single result ran every attack, worst_case_acc is an upper bound
    worst_case_attacks: str | None
    train_seconds: float
    seconds_per_epoch: float
    relative_to_trades10: float | None
    data_note: str | None  # the run's summary.json note: in the report's notes, not in its rows
    collapse: str | None = None  # where the collapse guard saw catastrophic overfitting (see `collapse_text`)
    norm: str = "linf"  # the threat model's norm; eps is its radius

    def to_json(self) -> dict[str, Any]:
        """The row as report.json has always stored it (the data note goes to its notes instead)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "data_note"}
        return data | dict(sources=list(self.sources), per_attack=dict(self.per_attack))


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (n - 1) of one statistic over a seed group."""

    mean: float
    std: float

    def to_json(self) -> dict[str, float]:
        """{"mean": ..., "std": ...}, as in report.json."""
        return dict(mean=self.mean, std=self.std)


@dataclass(frozen=True)
class SeedGroup:
    """Rows of distinct runs that differ only by seed, for the same checkpoint, eps and test examples; a statistic
    is None unless every run has it, measured with the same attack."""

    label: str
    checkpoint: str
    eps: float
    n_examples: int | None
    subset_seed: int | None
    n: int
    seeds: tuple[int, ...]
    run_dirs: tuple[str, ...]
    source_kinds: tuple[str, ...]
    clean_acc: MeanStd | None
    pgd20_acc: MeanStd | None
    cw_attack: str | None
    cw_acc: MeanStd | None
    autoattack_variant: str | None
    autoattack_acc: MeanStd | None
    worst_case_attacks: str | None
    worst_case_acc: MeanStd | None
    seconds_per_epoch: MeanStd | None
    relative_to_trades10: MeanStd | None
    per_attack: dict[str, MeanStd | None] = field(default_factory=dict)  # every attack a member ran
    collapsed: int = 0  # how many of the runs the collapse guard flagged
    norm: str = "linf"

    def to_json(self) -> dict[str, Any]:
        """The group as report.json stores it."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["per_attack"] = {name: stat and stat.to_json() for name, stat in self.per_attack.items()}
        return {key: value.to_json() if isinstance(value, MeanStd) else list(value) if isinstance(value, tuple)
                else value for key, value in data.items()}


@dataclass
class _Accuracies:
    """The accuracy part of a row while its eval files are merged."""

    checkpoint: str
    epoch: int | None
    eps: float
    clean_acc: float | None
    n_examples: int | None
    subset_seed: int | None
    source_kind: str
    sources: list[str]
    per_attack: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)  # the eval files' per-attack reports (settings)
    results: list[tuple[set[str], float | None]] = field(default_factory=list)  # (attacks run, pointwise worst)
    norm: str = "linf"


def _value_text(key: str, value: Any) -> str:
    if value is None:
        return "default"
    if key == "eps":
        return eps_text(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(configs: Sequence[dict[str, Any]], *, with_seed: bool = True) -> list[str]:
    """Method plus every setting that differs between runs of that method (seed last), e.g. 'trades beta=6'.

    `configs` are config.json contents, old (flat method hyperparameters) or new (`method_options`), alike.
    """
    settings = [flat_config(c) for c in configs]
    keys = set().union(*settings) - set(IGNORED_KEYS) - {"seed"}
    options = set().union(*map(method_options, configs)) - set(LABEL_KEYS_FIRST) - set(LABEL_KEYS_THEN)
    ordered = [k for k in LABEL_KEYS_FIRST if k in keys] + sorted(options & keys)
    ordered += [k for k in LABEL_KEYS_THEN if k in keys]
    ordered += sorted(keys - set(ordered)) + (["seed"] if with_seed else [])
    labels = []
    for config in settings:
        peers = [c for c in settings if c["method"] == config["method"]]
        varying = [k for k in ordered if len({_value_text(k, c.get(k)) for c in peers}) > 1]
        labels.append(" ".join([config["method"], *(f"{k}={_value_text(k, config.get(k))}" for k in varying)]))
    return labels


def autoattack_components_text(components: Sequence[str]) -> str:
    """'APGD-CE + APGD-T' for ("apgd-ce", "apgd-t")."""
    return " + ".join("Square" if c == "square" else c.upper() for c in components)


_ITERATIVE = re.compile(r"(pgd|cw)(\d+)(?:x(\d+))?(-norand)?")


def _attack_order(name: str) -> tuple[Any, ...]:
    """PGD by steps (then restarts, random start first), CW likewise, AutoAttack (standard first), then the rest."""
    if match := _ITERATIVE.fullmatch(name):
        kind, steps, restarts, norand = match.groups()
        return (kind != "pgd", int(steps), int(restarts or 1), bool(norand), name)
    return (2 if name.startswith("autoattack") else 3, name != "autoattack", 0, False, name)


def attack_columns(per_attacks: Iterable[Mapping[str, Any]]) -> list[str]:
    """The attacks named in any of `per_attacks` (rows' or groups'), in column order: PGD-K by K, CW, AutoAttack
    variants, then the others by name; the report's columns follow what was evaluated."""
    return sorted({name for per_attack in per_attacks for name in per_attack}, key=_attack_order)


def attack_title(name: str) -> str:
    """The column title of an attack: 'PGD-20' for pgd20, 'CW-20x5' for cw20x5, 'AutoAttack-APGD' for
    autoattack-apgd, 'FGSM'; other names as they are."""
    if match := _ITERATIVE.fullmatch(name):
        return f"{match.group(1).upper()}-{name[len(match.group(1)):]}"
    if name.startswith("autoattack"):
        return "AutoAttack" + name.removeprefix("autoattack").upper()
    return "FGSM" if name == "fgsm" else name


def subset_tags(keys: Sequence[Hashable], subsets: Sequence[tuple[int | None, int | None]]) -> list[str]:
    """Tell apart items (rows, seed groups) sharing a key, e.g. a run's checkpoint and eps, measured on other test
    examples (`subsets`: (n_examples, subset_seed)): 'n=60' or 'subset seed 1' where those differ, else ''."""
    tags = []
    for key, (n, seed) in zip(keys, subsets):
        peers = [subset for other, subset in zip(keys, subsets) if other == key]
        parts = [f"n={n}"] if len({p[0] for p in peers}) > 1 else []
        parts += [f"subset seed {seed}"] if len({p[1] for p in peers if p[0] == n}) > 1 else []
        tags.append(", ".join(parts))
    return tags


def _pick_cw(per_attack: dict[str, float | None]) -> tuple[str | None, float | None]:
    """cw20 when evaluated, else the first other CW attack."""
    names = ["cw20"] + sorted(n for n in per_attack if n.startswith("cw") and n != "cw20")
    for name in names:
        if per_attack.get(name) is not None:
            return name, per_attack[name]
    return None, None


def _autoattack_components(attacks: dict[str, Any], name: str) -> tuple[str, ...] | None:
    """The components of attack `name` when its settings in the eval file say kind "autoattack", else None."""
    settings = (attacks.get(name) or {}).get("settings") or {}
    return tuple(settings.get("components") or ()) if settings.get("kind") == "autoattack" else None


def _pick_autoattack(per_attack: dict[str, float | None],
                     attacks: dict[str, Any]) -> tuple[str | None, float | None]:
    """The standard AutoAttack when evaluated, else a subset; returns (variant description, accuracy)."""
    components = {name: found for name in per_attack
                  if (found := _autoattack_components(attacks, name)) is not None and per_attack[name] is not None}
    if not components:
        return None, None
    name = min(components, key=lambda n: (components[n] != STANDARD_AUTOATTACK, n))
    if components[name] == STANDARD_AUTOATTACK:
        return "standard", per_attack[name]
    return autoattack_components_text(components[name]) or name, per_attack[name]


def _eval_accuracies(run: RunData) -> list[_Accuracies]:
    """One entry per checkpoint, eps and subset: eval files for the same one (e.g. pgd20,cw20 then autoattack)
    share a row."""
    merged: dict[tuple[Any, ...], _Accuracies] = {}
    for name, info in run.evals.items():
        evaluation, checkpoint = info["evaluation"], info.get("checkpoint") or {}
        which = Path(checkpoint["path"]).stem if checkpoint.get("path") else "model"
        subset_seed = (info.get("subset") or {}).get("seed")
        norm = str(evaluation.get("norm", "linf"))
        entry = merged.setdefault((which, norm, evaluation["eps"], evaluation["n_examples"], subset_seed), _Accuracies(
            checkpoint=which, epoch=checkpoint.get("epoch"), eps=float(evaluation["eps"]),
            clean_acc=finite_or_none(evaluation["clean_acc"]), n_examples=evaluation["n_examples"],
            subset_seed=subset_seed, source_kind="eval", sources=[], norm=norm))
        entry.per_attack.update(evaluation["per_attack"])
        entry.attacks.update(evaluation.get("attacks") or {})
        entry.sources.append(name)
        entry.results.append((set(evaluation["per_attack"]), finite_or_none(evaluation.get("robust_acc"))))
    return sorted(merged.values(), key=lambda e: (_CHECKPOINT_ORDER.get(e.checkpoint, 2), e.checkpoint, e.norm, e.eps,
                                                  e.n_examples, -1 if e.subset_seed is None else e.subset_seed))


def _accuracies(run: RunData) -> list[_Accuracies]:
    """The accuracy part of the run's rows: eval files grouped by checkpoint, else summary, else validation (the
    trainer draws both its final test subset and its validation split with the run's seed)."""
    if run.evals:
        return _eval_accuracies(run)
    eps, seed, norm = float(run.settings["eps"]), run.settings["seed"], str(run.settings.get("norm", "linf"))
    if run.summary is not None and run.summary["test_examples"] > 0:
        best = run.summary["best"]
        pgd20 = finite_or_none(best.get("pgd20_acc"))
        return [_Accuracies(checkpoint="best", epoch=best.get("epoch"), eps=eps,
                            clean_acc=finite_or_none(best.get("clean_acc")), n_examples=run.summary["test_examples"],
                            subset_seed=seed, source_kind="test", sources=["summary.json"],
                            per_attack={"pgd20": best.get("pgd20_acc")}, results=[({"pgd20"}, pgd20)], norm=norm)]

    # unfinished run: the epoch the trainer keeps as best.pt, on the validation split
    def score(row: dict[str, Any]) -> float:  # as the trainer: robust accuracy, clean when there is none
        robust = finite_or_none(row.get(run.val_key))
        return robust if robust is not None else finite_or_none(row.get("val_clean_acc")) or 0.0

    row = max(run.metrics, key=score)  # the first of equals, as the trainer keeps
    attack = run.val_key.removeprefix("val_").removesuffix("_acc")  # pgdK of the validation split
    return [_Accuracies(checkpoint="best", epoch=row["epoch"], eps=eps,
                        clean_acc=finite_or_none(row.get("val_clean_acc")), n_examples=row.get("val_examples"),
                        subset_seed=seed, source_kind="validation", sources=["metrics.jsonl (validation split)"],
                        per_attack={attack: row.get(run.val_key)},
                        results=[({attack}, finite_or_none(row.get(run.val_key)))], norm=norm)]


def _worst_case(results: Sequence[tuple[set[str], float | None]],
                attacks: set[str]) -> tuple[float | None, bool, str | None]:
    """Pointwise worst case over the row's attacks, from a result (attacks run, robust accuracy) that ran them all;
    returns (accuracy, is an upper bound, attacks).

    Without such a result (e.g. pgd20,cw20 in one eval file and AutoAttack in another) the per-point flags
    are not combined; the lowest result is then an upper bound.
    """
    exact = [acc for ran, acc in results if ran >= attacks and acc is not None]
    if exact:
        return min(exact), False, "+".join(sorted(attacks))
    known = [acc for _, acc in results if acc is not None]
    return (min(known) if known else None), True, None


def is_reference(settings: dict[str, Any], like: dict[str, Any], method: str, steps: int | None = None) -> bool:
    """Whether a run with flat `settings` can be the time reference `method` (with `steps` attack steps when
    given; a run that does not set them has the default) for a run with flat settings `like`: only runs
    with the same architecture, dataset and batch size are compared."""
    return (settings["method"] == method and (steps is None or settings.get("steps", steps) == steps)
            and all(settings[k] == like[k] for k in ("arch", "dataset", "batch_size")))


def _trades10_seconds(run: RunData, runs: Sequence[RunData]) -> float | None:
    """Mean per-epoch time of the TRADES-10 runs with the run's architecture, dataset and batch size."""
    refs = [r.seconds_per_epoch for r in runs if r.metrics and is_reference(r.settings, run.settings, "trades", 10)]
    return statistics.fmean(refs) if refs else None


def build_rows(runs: Sequence[RunData]) -> list[Row]:
    """One row per run, evaluated checkpoint, eps and test subset."""
    labels = run_labels([r.config for r in runs])
    groups = run_labels([r.config for r in runs], with_seed=False)
    labels = [f"{label} [{run.path.name}]" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]
    rows = []
    for run, label, group in zip(runs, labels, groups):
        reference = _trades10_seconds(run, runs)
        for entry in _accuracies(run):
            per_attack = {k: finite_or_none(v) for k, v in entry.per_attack.items()}
            cw_attack, cw_acc = _pick_cw(per_attack)
            variant, autoattack_acc = _pick_autoattack(per_attack, entry.attacks)
            worst_acc, worst_bound, worst_attacks = _worst_case(entry.results, set(per_attack))
            rows.append(Row(
                run_dir=str(run.path), label=label, group=group, method=run.settings["method"],
                arch=run.settings["arch"], dataset=run.settings["dataset"], epochs=run.settings["epochs"],
                epochs_done=run.epochs_done, seed=run.settings["seed"], batch_size=run.settings["batch_size"],
                checkpoint=entry.checkpoint, epoch=entry.epoch, eps=entry.eps, n_examples=entry.n_examples,
                subset_seed=entry.subset_seed, source_kind=entry.source_kind, sources=tuple(entry.sources),
                clean_acc=entry.clean_acc, per_attack=per_attack, pgd20_acc=per_attack.get("pgd20"),
                cw_attack=cw_attack, cw_acc=cw_acc, autoattack_variant=variant, autoattack_acc=autoattack_acc,
                worst_case_acc=worst_acc, worst_case_bound=worst_bound, worst_case_attacks=worst_attacks,
                train_seconds=run.train_seconds, seconds_per_epoch=run.seconds_per_epoch,
                relative_to_trades10=run.seconds_per_epoch / reference if reference and run.metrics else None,
                data_note=run.data_note, collapse=collapse_text(run.collapse), norm=entry.norm))
    return rows


# statistic -> the attack name it depends on
SEED_FIELDS = {"clean_acc": None, "pgd20_acc": None, "cw_acc": "cw_attack", "autoattack_acc": "autoattack_variant",
               "worst_case_acc": "worst_case_attacks", "seconds_per_epoch": None, "relative_to_trades10": None}


def _mean_std(values: Sequence[float | None]) -> MeanStd | None:
    """None unless every member has the value."""
    known = [v for v in values if v is not None]
    return MeanStd(statistics.fmean(known), statistics.stdev(known)) if len(known) == len(values) else None


def _seed_group(members: Sequence[Row]) -> SeedGroup:
    statistics_and_names: dict[str, Any] = {}
    for name, attack in SEED_FIELDS.items():
        values = [getattr(m, name) for m in members]
        names = {getattr(m, attack) for m in members} if attack else {None}
        if attack:
            statistics_and_names[attack] = next(iter(names)) if len(names) == 1 else None
        # no attack name (e.g. a worst case that is only an upper bound) or differing ones: not comparable
        statistics_and_names[name] = None if len(names) > 1 or (attack and None in names) else _mean_std(values)
    first = members[0]
    per_attack = {name: _mean_std([m.per_attack.get(name) for m in members])
                  for name in attack_columns(m.per_attack for m in members)}
    return SeedGroup(label=first.group, checkpoint=first.checkpoint, eps=first.eps, n_examples=first.n_examples,
                     subset_seed=first.subset_seed, n=len(members), per_attack=per_attack,
                     seeds=tuple(m.seed for m in members), run_dirs=tuple(m.run_dir for m in members),
                     source_kinds=tuple(sorted({m.source_kind for m in members})),
                     collapsed=sum(m.collapse is not None for m in members), norm=first.norm,
                     **statistics_and_names)


def seed_groups(rows: Sequence[Row]) -> list[SeedGroup]:
    """Mean and sample std (n - 1) over rows of 2 or more distinct runs that differ only by seed.

    Grouped rows share the checkpoint, eps and test examples (the same size and subset seed, whether the numbers
    come from eval files or summary.json; never validation-split rows with test rows), so rows of one run
    evaluated on two subsets are never taken for two seeds. summary.json and the validation split draw their
    examples with the run's seed: runs of other seeds need `backsmooth eval` on a common subset to be grouped.
    A statistic is None unless every run has it, measured with the same attack (the worst case: with the same
    attacks, exactly).
    """
    by_key: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        key = (row.group, row.checkpoint, row.norm, row.eps, row.source_kind == "validation", row.n_examples,
               row.subset_seed)
        by_key.setdefault(key, []).append(row)
    return [_seed_group(members) for members in by_key.values() if len({m.run_dir for m in members}) >= 2]
