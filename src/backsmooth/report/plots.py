"""The report's PNG plots, drawn with matplotlib's object API (Agg), never touching pyplot's global backend."""

import io
from collections.abc import Sequence
from typing import Any

from backsmooth.errors import BacksmoothError
from backsmooth.report.read import RunData, finite_or_none
from backsmooth.report.rows import Row, attack_title, subset_tags

PLOTS = {
    "val_robust_by_epoch.png": "Validation robust accuracy per epoch",
    "val_robust_by_time.png": "Validation robust accuracy against training time",
    "clean_vs_robust.png": "Final clean against robust accuracy",
}
"""Every plot the report can draw; clean_vs_robust.png only when a row has a robust accuracy (see `robust_measure`)."""
MATPLOTLIB_HINT = "plots need matplotlib: pip install 'backsmooth[report]'"


def _figure() -> Any:
    """A matplotlib Figure; a one-line hint when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BacksmoothError(MATPLOTLIB_HINT) from None
    return Figure(figsize=(7, 4.5), layout="constrained")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _style(index: int) -> dict[str, Any]:
    """Colours of the default cycle, then new line styles once they repeat."""
    return dict(color=f"C{index % 10}", linestyle=("-", "--", ":", "-.")[index // 10 % 4])


def _time_axis(max_seconds: float) -> tuple[float, str]:
    if max_seconds > 2 * 3600:
        return 3600.0, "hours"
    return (60.0, "minutes") if max_seconds > 120 else (1.0, "seconds")


def _steps_per_epoch(run: RunData) -> int | None:
    """Optimiser steps per epoch, from an epoch row's throughput and time (None when no row tells)."""
    batch = run.settings["batch_size"]
    for row in run.metrics:
        rate, seconds = finite_or_none(row.get("images_per_second")), finite_or_none(row.get("train_seconds"))
        if rate and seconds and batch > 0 and round(rate * seconds / batch) > 0:
            return round(rate * seconds / batch)
    return None


def collapse_points(run: RunData) -> list[tuple[float, float, float]]:
    """(epochs done, training seconds, guard PGD accuracy in %) of each collapse event of the run: placed within
    the epoch it happened in by its step, on the curve's last value before it when the event has no accuracy."""
    steps = _steps_per_epoch(run)
    points = []
    for event in (e for e in run.events if e["event"] == "collapse"):
        done, seconds = finite_or_none(event.get("epochs_done")), finite_or_none(event.get("total_train_seconds"))
        robust = finite_or_none(event.get("guard_pgd_acc"))
        if done is not None and seconds is not None and robust is not None:  # the trainer logged its position
            points.append((done, seconds, 100 * robust))
            continue
        before = [r for r in run.metrics if r["epoch"] < event["epoch"]]
        step = finite_or_none(event.get("step"))
        within = 1.0 if not steps or step is None else min(max(step / steps - (event["epoch"] - 1), 0.0), 1.0)
        this = next((r for r in run.metrics if r["epoch"] == event["epoch"]), None)
        seconds = float(this["train_seconds"]) if this else run.seconds_per_epoch
        curve = [100 * v for r in before if (v := finite_or_none(r.get(run.val_key))) is not None]
        robust = finite_or_none(event.get("guard_pgd_acc"))
        y = 100 * robust if robust is not None else curve[-1] if curve else None
        if y is not None:
            start = float(before[-1]["total_train_seconds"]) if before else 0.0
            points.append((event["epoch"] - 1 + within, start + within * seconds, y))
    return points


def guard_checks(run: RunData) -> list[tuple[float, float, float]]:
    """(epochs done, training seconds, guard PGD accuracy in %) of every collapse-guard check the run logged."""
    return [(float(e["epochs_done"]), float(e["total_train_seconds"]), 100 * float(e["guard_pgd_acc"]))
            for e in run.events if e["event"] == "guard" and finite_or_none(e.get("guard_pgd_acc")) is not None
            and finite_or_none(e.get("epochs_done")) is not None
            and finite_or_none(e.get("total_train_seconds")) is not None]


def plot_curves(runs: Sequence[RunData], labels: Sequence[str]) -> dict[str, bytes]:
    """Validation robust accuracy per epoch and against cumulative training time, one line per run (PNG bytes)."""
    steps = {r.settings.get("val_pgd_steps", 20) for r in runs}
    ylabel = f"validation PGD-{steps.pop()} accuracy (%)" if len(steps) == 1 else "validation PGD-K accuracy (%)"
    scale, unit = _time_axis(max(r.train_seconds for r in runs))
    pngs = {}
    for name, x_key, xlabel in (("val_robust_by_epoch.png", "epoch", "epoch"),
                                ("val_robust_by_time.png", "total_train_seconds", f"training time ({unit})")):
        figure = _figure()
        axes = figure.add_subplot()
        drawn = collapsed = guarded = 0
        for index, (run, label) in enumerate(zip(runs, labels)):
            points = [(float(r[x_key]) / (scale if x_key != "epoch" else 1.0), 100 * finite_or_none(r.get(run.val_key)))
                      for r in run.metrics if finite_or_none(r.get(run.val_key)) is not None]
            if points:
                suffix = f" (PGD-{run.settings.get('val_pgd_steps', 20)})" if "K" in ylabel else ""
                axes.plot(*zip(*points), marker="o", markersize=3, label=label + suffix, **_style(index))
                drawn += 1
            checks = guard_checks(run)
            if checks:  # the guard's own PGD accuracy on its batch, dotted in the run's colour
                axes.plot([c[0] if x_key == "epoch" else c[1] / scale for c in checks], [c[2] for c in checks],
                          linestyle=":", linewidth=1.2, color=_style(index)["color"], alpha=0.8)
                guarded += 1
            for epoch, seconds, robust in collapse_points(run):  # an x in the run's colour, at the guard's accuracy
                axes.plot([epoch if x_key == "epoch" else seconds / scale], [robust], marker="x", markersize=10,
                          markeredgewidth=2.5, linestyle="none", color=_style(index)["color"], zorder=3)
                collapsed += 1
        if guarded:
            axes.plot([], [], linestyle=":", color="black", label="collapse guard's PGD (its batch)")
        if collapsed:  # one legend entry for every run's markers
            axes.plot([], [], marker="x", markersize=8, markeredgewidth=2, linestyle="none", color="black",
                      label="collapse (guard)")
        if drawn or collapsed or guarded:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no validation robust accuracy recorded", ha="center", transform=axes.transAxes)
        axes.set(xlabel=xlabel, ylabel=ylabel, title=PLOTS[name])
        axes.grid(alpha=0.3)
        pngs[name] = _png(figure)
    return pngs


def robust_measure(rows: Sequence[Row]) -> str | None:
    """What the clean-vs-robust plot shows against clean accuracy: pgd20 when a row has it, else the single
    attack the rows ran, else the worst case ("worst_case"); None when no row has a robust number."""
    rows = [r for r in rows if r.clean_acc is not None]
    attacks = {name for r in rows for name, value in r.per_attack.items() if value is not None}
    if "pgd20" in attacks or len(attacks) == 1:
        return "pgd20" if "pgd20" in attacks else attacks.pop()
    return "worst_case" if any(r.worst_case_acc is not None for r in rows) else None


def robust_value(row: Row, measure: str) -> float | None:
    """The row's accuracy under `measure` (an attack name or "worst_case", see `robust_measure`)."""
    return row.worst_case_acc if measure == "worst_case" else row.per_attack.get(measure)


def robust_title(measure: str) -> str:
    """'PGD-10' for the attack pgd10, 'worst-case' for "worst_case": the clean-vs-robust plot's y axis."""
    return "worst-case" if measure == "worst_case" else attack_title(measure)


def plot_clean_vs_robust(rows: Sequence[Row], measure: str) -> bytes:
    """One labelled point per row: final clean against `measure` accuracy (an attack or "worst_case"), coloured as
    the run's curves; rows without both numbers are left out (PNG bytes)."""
    figure = _figure()
    axes = figure.add_subplot()
    run_index = {run_dir: i for i, run_dir in enumerate(dict.fromkeys(r.run_dir for r in rows))}
    per_run = {run_dir: sum(1 for r in rows if r.run_dir == run_dir) for run_dir in run_index}
    tags = subset_tags([(r.run_dir, r.checkpoint, r.eps) for r in rows], [(r.n_examples, r.subset_seed) for r in rows])
    for row, tag in zip(rows, tags):
        robust = robust_value(row, measure)
        if row.clean_acc is None or robust is None:
            continue
        label = row.label + (f" ({row.checkpoint}{', ' + tag if tag else ''})" if per_run[row.run_dir] > 1 else "")
        label += " (validation)" if row.source_kind == "validation" else ""
        label += " (upper bound)" if measure == "worst_case" and row.worst_case_bound else ""
        x, y = 100 * row.clean_acc, 100 * robust
        axes.scatter([x], [y], color=_style(run_index[row.run_dir])["color"],
                     marker={"best": "o", "last": "s"}.get(row.checkpoint, "^"))
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    axes.margins(0.2)
    title = robust_title(measure)
    axes.set(xlabel="clean accuracy (%)", ylabel=f"{title} accuracy (%)", title=f"Final clean against {title} accuracy")
    axes.grid(alpha=0.3)
    return _png(figure)


def plot_tradeoff(labels: Sequence[str], seconds: Sequence[float], accuracies: Sequence[float],
                  errors: Sequence[float], ylabel: str) -> bytes:
    """One labelled point per entry: accuracy (with its std over seeds as an error bar) against training time per
    epoch on a log axis, the cost-robustness trade-off of a study (PNG bytes)."""
    figure = _figure()
    axes = figure.add_subplot()
    for index, (label, x, y, error) in enumerate(zip(labels, seconds, accuracies, errors)):
        axes.errorbar([x], [y], yerr=[error], fmt="o", color=_style(index)["color"], capsize=3)
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    if seconds:
        axes.set_xscale("log")
    axes.margins(0.2)
    axes.set(xlabel="training time per epoch (seconds, log scale)", ylabel=ylabel,
             title="Robustness against training cost")
    axes.grid(alpha=0.3, which="both")
    return _png(figure)


def render_plots(runs: Sequence[RunData], rows: Sequence[Row]) -> dict[str, bytes]:
    """The plots of PLOTS that have something to show, as PNG bytes in PLOTS' order, drawn before anything is
    written (a missing matplotlib writes nothing); no clean_vs_robust.png when no row has a robust accuracy."""
    labels = {row.run_dir: row.label for row in rows}
    pngs = plot_curves(runs, [labels[str(run.path)] for run in runs])
    measure = robust_measure(rows)
    if measure is not None:
        pngs["clean_vs_robust.png"] = plot_clean_vs_robust(rows, measure)
    return {name: pngs[name] for name in PLOTS if name in pngs}
