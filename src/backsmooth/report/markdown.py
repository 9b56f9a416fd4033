"""report.md: the main table, its notes, the seed table and the links to the plots."""

import math
from collections.abc import Sequence

from backsmooth.report.plots import PLOTS
from backsmooth.report.rows import STANDARD_AUTOATTACK, MeanStd, Row, SeedGroup, autoattack_components_text
from backsmooth.units import eps_text

COLUMNS = ("run", "checkpoint", "method", "arch", "dataset", "eps", "epochs", "clean", "PGD-20", "CW", "AutoAttack",
           "worst case", "examples", "train time", "time/epoch", "vs TRADES-10", "source")
COLLAPSED = " (collapsed)"  # after the run label of a run the collapse guard flagged
GROUP_COLUMNS = ("runs", "checkpoint", "n", "seeds", "clean", "PGD-20", "CW", "AutoAttack", "worst case", "time/epoch",
                 "vs TRADES-10", "source")


def format_duration(seconds: float | None) -> str:
    """'42.0 s', '12m 05s' or '3h 07m'."""
    if seconds is None or not math.isfinite(seconds):
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


def _row_cells(row: Row) -> list[str]:
    epoch = f" (epoch {row.epoch})" if row.epoch is not None else ""
    epochs = str(row.epochs) if row.epochs_done == row.epochs else f"{row.epochs_done}/{row.epochs}"
    examples = str(row.n_examples) + (" val" if row.source_kind == "validation" else "")
    ratio = row.relative_to_trades10
    return [row.label + (COLLAPSED if row.collapse else ""), row.checkpoint + epoch, row.method, row.arch, row.dataset,
            eps_text(row.eps), epochs, _percent(row.clean_acc), _percent(row.pgd20_acc),
            _with_name(_percent(row.cw_acc), row.cw_attack, "cw20"),
            _with_name(_percent(row.autoattack_acc), row.autoattack_variant, ""),
            ("<= " if row.worst_case_bound and row.worst_case_acc is not None else "") + _percent(row.worst_case_acc),
            examples, format_duration(row.train_seconds), format_duration(row.seconds_per_epoch),
            "n/a" if ratio is None else f"{ratio:.2f}x", ", ".join(row.sources)]


def _mean_std(stat: MeanStd | None, scale: float = 100.0, digits: int = 2) -> str:
    return "n/a" if stat is None else f"{scale * stat.mean:.{digits}f} ± {scale * stat.std:.{digits}f}"


def _group_cells(group: SeedGroup) -> list[str]:
    time = group.seconds_per_epoch
    n = str(group.n) + (f" ({group.collapsed} collapsed)" if group.collapsed else "")
    return [group.label, group.checkpoint, n, ", ".join(map(str, group.seeds)),
            _mean_std(group.clean_acc), _mean_std(group.pgd20_acc),
            _with_name(_mean_std(group.cw_acc), group.cw_attack, "cw20"),
            _with_name(_mean_std(group.autoattack_acc), group.autoattack_variant, ""),
            _mean_std(group.worst_case_acc),
            "n/a" if time is None else f"{format_duration(time.mean)} ± {format_duration(time.std)}",
            _mean_std(group.relative_to_trades10, 1.0), " + ".join(group.source_kinds)]


def notes(rows: Sequence[Row]) -> list[str]:
    """The lines under the table: data, models and example counts; how the columns were measured; what
    "(collapsed)" means and where each flagged run collapsed (only when one did); then each distinct data note
    that training wrote into a run's summary.json, after its dataset's name."""
    parts = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        mine = [r for r in rows if r.dataset == dataset]
        archs = ", ".join(dict.fromkeys(r.arch for r in mine))
        test = sorted({r.n_examples for r in mine if r.source_kind != "validation"})
        val = sorted({r.n_examples for r in mine if r.source_kind == "validation"})
        counts = ([f"{' / '.join(map(str, test))} test examples (stratified subsets)"] if test else []) + (
            [f"{' / '.join(map(str, val))} validation examples (rows marked val)"] if val else [])
        parts.append(f"{dataset} with {archs}: {', '.join(counts)}")
    lines = [
        "Data and models: " + "; ".join(parts) + ".",
        "Accuracies in %. CW and AutoAttack come from `backsmooth eval` (eval-*.json); runs without one show the "
        "PGD-20 of summary.json (n/a: not evaluated). AutoAttack standard = "
        f"{autoattack_components_text(STANDARD_AUTOATTACK)}. "
        "Worst case: a point counts as robust only if every attack of the row failed on it (from an eval file that "
        "ran them all; '<=' marks an upper bound, the lowest file result, when no single file did). "
        "Training time excludes evaluation; time/epoch is the median epoch; vs TRADES-10 divides it by that of "
        "the TRADES (10 steps) runs with the same architecture, dataset and batch size (n/a: none in this report), "
        "so it compares runs on the same hardware only.",
    ]
    collapsed = dict.fromkeys(f"{r.label} at {r.collapse}" for r in rows if r.collapse)
    if collapsed:
        lines.append(
            f"The mark '{COLLAPSED.strip()}' after a run label: the collapse guard saw catastrophic overfitting: on a "
            "fixed batch of validation images, at two checks in a row, PGD broke almost every image FGSM left "
            "correct and that gap had grown (exact tests at p < 0.001; docs/recipe.md). "
            "A run it stopped (--on-collapse stop) has fewer epochs than planned and its best.pt is from before the "
            f"collapse; with --on-collapse warn training went on. Collapsed: {'; '.join(collapsed)}.")
    data_notes = dict.fromkeys((r.dataset, r.data_note) for r in rows if r.data_note)
    return lines + [f"{dataset}: {note}" for dataset, note in data_notes]


def render_markdown(rows: Sequence[Row], groups: Sequence[SeedGroup]) -> str:
    """report.md: the main table, its notes, the seed table and the embedded plots."""
    lines = ["# Training report", "", *_table(COLUMNS, [_row_cells(r) for r in rows]), ""]
    lines += [f"{note}\n" for note in notes(rows)]
    if groups:
        lines += ["## Mean ± std over seeds", "", *_table(GROUP_COLUMNS, [_group_cells(g) for g in groups]), "",
                  "Runs that differ only by seed; std is the sample standard deviation (n - 1), in % points for "
                  "accuracies; n/a where a run lacks the number (or measured it with another attack)."
                  + (" 'n (k collapsed)': k of the runs collapsed (see above)." if any(g.collapsed for g in groups)
                     else ""), ""]
    lines += ["## Plots", ""] + [f"![{title}]({name})\n" for name, title in PLOTS.items()]
    return "\n".join(lines)
