"""A study's report: the ordinary run report (report.md, report.json, plots) of every finished run, and
study.md with one row per entry and checkpoint: mean ± std over seeds of clean accuracy, each attack and the
pointwise worst case, time per epoch with its ratios to the study's own TRADES-10 and FGSM-RS entries, the
forward-pass cost of a training step, and a plot of robustness against training time (study.json holds it all)."""

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backsmooth.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from backsmooth.report import Row, build_report, build_rows, format_duration, read_run
from backsmooth.report.plots import plot_tradeoff
from backsmooth.report.read import flat_config
from backsmooth.report.rows import is_reference
from backsmooth.study.estimate import step_units
from backsmooth.study.spec import PlannedRun, Study
from backsmooth.units import threat_model_text

REFERENCES = {"TRADES-10": ("trades", 10), "FGSM-RS": ("fgsm_rs", None)}  # label -> (method, steps or None)


@dataclasses.dataclass(frozen=True)
class EntryRow:
    """One entry's numbers for one checkpoint over its finished seeds (fractions; None where a run lacks one)."""

    entry: str
    method: str
    checkpoint: str
    threat_model: str  # 'L2, eps 0.5': of training, validation and the evaluation
    seeds: tuple[int, ...]
    f_per_step: int
    clean: tuple[float, float] | None  # (mean, sample std; 0 for one seed)
    attacks: dict[str, tuple[float, float] | None]
    worst_case: tuple[float, float] | None
    seconds_per_epoch: tuple[float, float]
    ratios: dict[str, float | None]  # reference label -> time/epoch over the reference entry's
    collapsed: int


def _mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    if not values or any(v is None for v in values):
        return None
    known = [float(v) for v in values if v is not None]
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0


def entry_rows(study: Study, runs: Sequence[PlannedRun], rows: Sequence[Row]) -> list[EntryRow]:
    """The study table: entries in spec order, checkpoints in the evaluation's order."""
    by_dir = {row_key: [r for r in rows if r.run_dir == row_key] for row_key in {r.run_dir for r in rows}}
    seconds = {run.name: next(iter(by_dir.get(str(run.config.out), [])), None) for run in runs}
    per_epoch = {name: row.seconds_per_epoch for name, row in seconds.items() if row is not None}
    settings = {run.name: flat_config(dataclasses.asdict(run.config)) for run in runs}  # flat, as the report's
    result = []
    for entry in study.entries():
        members = [r for r in runs if r.entry == entry]
        if not members:
            continue
        first = members[0]
        ratios: dict[str, float | None] = {}
        mine = statistics.fmean(per_epoch[r.name] for r in members if r.name in per_epoch)
        for label, (method, steps) in REFERENCES.items():
            refs = [per_epoch[r.name] for r in runs
                    if r.name in per_epoch and is_reference(settings[r.name], settings[first.name], method, steps)]
            ratios[label] = mine / statistics.fmean(refs) if refs else None
        for checkpoint in (c for c in study.checkpoints() if c in first.checkpoints):
            # the row of the study's own eval file (eval-CHECKPOINT.json): not one of another subset of the run
            found = [next((row for row in by_dir.get(str(r.config.out), [])
                           if f"eval-{checkpoint}.json" in row.sources), None) for r in members]
            chosen = [row for row in found if row is not None]
            result.append(EntryRow(
                entry=entry, method=first.config.method, checkpoint=checkpoint,
                threat_model=threat_model_text(first.config.norm, first.config.eps),
                seeds=tuple(r.seed for r, row in zip(members, found) if row is not None),
                f_per_step=step_units(first.config), clean=_mean_std([row.clean_acc for row in chosen]),
                attacks={a: _mean_std([row.per_attack.get(a) for row in chosen]) for a in first.attacks},
                worst_case=_mean_std([row.worst_case_acc for row in chosen]),
                seconds_per_epoch=_mean_std([per_epoch[r.name] for r in members]) or (mine, 0.0),
                ratios=ratios, collapsed=sum(row.collapse is not None for row in chosen)))
    return result


def _percent(stat: tuple[float, float] | None, n: int) -> str:
    if stat is None:
        return "n/a"
    return f"{100 * stat[0]:.2f}" + (f" ± {100 * stat[1]:.2f}" if n > 1 else "")


def render(study: Study, table: Sequence[EntryRow], command: str) -> str:
    """study.md."""
    c = study.runs[0].config
    attacks = list(dict.fromkeys(a for row in table for a in row.attacks))
    mixed = len({row.threat_model for row in table}) > 1  # entries that override norm or eps: a column says which
    header = ["entry", "method", *(["threat model"] if mixed else []), "F/step", "seeds", "clean", *attacks,
              "worst case", "time/epoch", *(f"time vs {label}" for label in REFERENCES)]
    lines = [f"# Study: {study.title}", "", f"Command: `{command}`; spec: [spec.toml](../spec.toml).", "",
             f"Protocol: {c.dataset}, {c.arch}, {threat_model_text(c.norm, c.eps)}, "
             f"{c.epochs} epoch{'s' * (c.epochs != 1)} "
             f"(Free-AT: epochs / m), "
             f"batch {c.batch_size}, {c.schedule} lr {c.lr:g}, weight averaging {c.weight_averaging:g}, label "
             f"smoothing {c.label_smoothing:g}, {c.precision} on {c.device} (entries may override). Evaluation: "
             f"{', '.join(study.evaluation.attacks)} on {study.evaluation.n_examples} stratified test examples "
             f"(seed {study.evaluation.seed}).", ""]
    for checkpoint in study.checkpoints():
        lines += [f"## {checkpoint}.pt", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in (r for r in table if r.checkpoint == checkpoint):
            n = len(row.seeds)
            mean, std = row.seconds_per_epoch
            cells = [row.entry + (f" ({row.collapsed} collapsed)" if row.collapsed else ""), row.method,
                     *([row.threat_model] if mixed else []), str(row.f_per_step),
                     ", ".join(map(str, row.seeds)) or "none evaluated", _percent(row.clean, n),
                     *(_percent(row.attacks.get(a), n) for a in attacks), _percent(row.worst_case, n),
                     format_duration(mean) + (f" ± {format_duration(std)}" if n > 1 else ""),
                     *("n/a" if row.ratios[label] is None else f"{row.ratios[label]:.2f}x" for label in REFERENCES)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Accuracies in % (mean ± sample std over seeds when there are several); worst case: a point counts as "
              "robust only if every attack failed on it. F/step: forward-pass units of one training batch per "
              "example (a backward pass counts 2; Free-AT's m replays included). time/epoch: median epoch training "
              "time, evaluation excluded; 'time vs' divides it by the same study's TRADES-10 or FGSM-RS entry on the "
              "same architecture, dataset and batch (n/a: none), so only runs on one machine are compared. "
              "Per-run rows, curves and data notes: [report.md](report.md).", "",
              "![worst-case accuracy against time per epoch](tradeoff.png)", ""]
    return "\n".join(lines)


def write_study_report(study: Study, runs: Sequence[PlannedRun], command: str) -> Path:
    """OUT/report/: the run report of `runs` (finished runs) plus study.md, study.json and tradeoff.png."""
    out = study.out / "report"
    paths = [Path(str(r.config.out)) for r in runs]
    build_report(paths, out)
    rows = build_rows([read_run(p) for p in paths])
    table = entry_rows(study, runs, rows)
    last = "last" if "last" in study.checkpoints() else study.checkpoints()[0]
    points = [(row.entry, row.seconds_per_epoch[0], row.worst_case) for row in table
              if row.checkpoint == last and row.worst_case is not None]
    atomic_write_bytes(out / "tradeoff.png", plot_tradeoff(
        [p[0] for p in points], [p[1] for p in points], [100 * p[2][0] for p in points],
        [100 * p[2][1] for p in points], f"worst-case accuracy of {last}.pt (%)"))
    data: dict[str, Any] = dict(title=study.title, command=command, entries=[dataclasses.asdict(r) for r in table])
    atomic_write_json(out / "study.json", data)
    atomic_write_text(out / "study.md", render(study, table, command))
    return out / "study.md"
