"""report.md: the main table, its notes, the seed table and the links to the plots. The accuracy columns follow
the evaluations read: clean, one column per attack present (`attack_columns`), then the worst case."""

import math
from collections.abc import Sequence

from backsmooth.report.plots import PLOTS
from backsmooth.report.rows import (
    STANDARD_AUTOATTACK,
    MeanStd,
    Row,
    SeedGroup,
    attack_columns,
    attack_title,
    autoattack_components_text,
    subset_tags,
)
from backsmooth.units import threat_model_text

# the main table's columns before and after the accuracies (clean, one per attack, worst case)
COLUMNS = ("run", "checkpoint", "method", "arch", "dataset", "threat model", "epochs")
COLUMNS_AFTER = ("examples", "train time", "time/epoch", "vs TRADES-10", "source")
COLLAPSED = " (collapsed)"  # after the run label of a run the collapse guard flagged
GROUP_COLUMNS = ("runs", "checkpoint", "threat model", "n", "seeds", "examples")
GROUP_COLUMNS_AFTER = ("time/epoch", "vs TRADES-10", "source")


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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def _with_tag(text: str, tag: str) -> str:
    return f"{text}, {tag}" if tag else text


def _row_cells(row: Row, attacks: Sequence[str], tag: str) -> list[str]:
    epoch = f" (epoch {row.epoch})" if row.epoch is not None else ""
    epochs = str(row.epochs) if row.epochs_done == row.epochs else f"{row.epochs_done}/{row.epochs}"
    examples = str(row.n_examples) + (" val" if row.source_kind == "validation" else "")
    ratio = row.relative_to_trades10
    return [row.label + (COLLAPSED if row.collapse else ""), _with_tag(row.checkpoint + epoch, tag), row.method,
            row.arch, row.dataset, threat_model_text(row.norm, row.eps), epochs, _percent(row.clean_acc),
            *(_percent(row.per_attack.get(a)) for a in attacks),
            ("<= " if row.worst_case_bound and row.worst_case_acc is not None else "") + _percent(row.worst_case_acc),
            examples, format_duration(row.train_seconds), format_duration(row.seconds_per_epoch),
            "n/a" if ratio is None else f"{ratio:.2f}x", ", ".join(row.sources)]


def _mean_std(stat: MeanStd | None, scale: float = 100.0, digits: int = 2) -> str:
    return "n/a" if stat is None else f"{scale * stat.mean:.{digits}f} ± {scale * stat.std:.{digits}f}"


def _group_cells(group: SeedGroup, attacks: Sequence[str], tag: str) -> list[str]:
    time = group.seconds_per_epoch
    n = str(group.n) + (f" ({group.collapsed} collapsed)" if group.collapsed else "")
    examples = str(group.n_examples) + (" val" if "validation" in group.source_kinds else "")
    return [group.label, _with_tag(group.checkpoint, tag), threat_model_text(group.norm, group.eps), n,
            ", ".join(map(str, group.seeds)), examples,
            _mean_std(group.clean_acc), *(_mean_std(group.per_attack.get(a)) for a in attacks),
            _mean_std(group.worst_case_acc),
            "n/a" if time is None else f"{format_duration(time.mean)} ± {format_duration(time.std)}",
            _mean_std(group.relative_to_trades10, 1.0), " + ".join(group.source_kinds)]


def notes(rows: Sequence[Row]) -> list[str]:
    """The lines under the table: data, models and example counts; how the columns were measured; how a run's rows
    of several test subsets are told apart (only when there are such); what "(collapsed)" means and where each
    flagged run collapsed (only when one did); then each distinct data note that training wrote into a run's
    summary.json, after its dataset's name."""
    parts = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        mine = [r for r in rows if r.dataset == dataset]
        archs = ", ".join(dict.fromkeys(r.arch for r in mine))
        test = sorted({r.n_examples for r in mine if r.source_kind != "validation"})
        val = sorted({r.n_examples for r in mine if r.source_kind == "validation"})
        counts = ([f"{' / '.join(map(str, test))} test examples (stratified subsets)"] if test else []) + (
            [f"{' / '.join(map(str, val))} validation examples (rows marked val)"] if val else [])
        parts.append(f"{dataset} with {archs}: {', '.join(counts)}")
    autoattack = (f"AutoAttack = the standard {autoattack_components_text(STANDARD_AUTOATTACK)}; AutoAttack-X runs "
                  "the components its eval file lists. "
                  if any(a.startswith("autoattack") for r in rows for a in r.per_attack) else "")
    lines = [
        "Data and models: " + "; ".join(parts) + ".",
        "Accuracies in %, one column per attack evaluated (n/a: not run for that row). They come from `backsmooth "
        "eval` (eval-*.json); runs without one show the PGD-20 of summary.json, unfinished runs the validation PGD of "
        f"their best epoch. {autoattack}"
        "Worst case: a point counts as robust only if every attack of the row failed on it (from an eval file that "
        "ran them all; '<=' marks an upper bound, the lowest file result, when no single file did). "
        "Training time excludes evaluation; time/epoch is the median epoch; vs TRADES-10 divides it by that of "
        "the TRADES (10 steps) runs with the same architecture, dataset and batch size (n/a: none in this report), "
        "so it compares runs on the same hardware only.",
    ]
    if any(_row_tags(rows)):
        lines.append("A run evaluated on several test subsets has one row per subset; its checkpoint cell names the "
                     "subset (n=: examples; subset seed: the seed that chose them) and rows of different subsets are "
                     "never averaged as seeds.")
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


def _row_tags(rows: Sequence[Row]) -> list[str]:
    """The subset tags that tell a run's rows of one checkpoint and eps apart."""
    return subset_tags([(r.run_dir, r.checkpoint, r.eps) for r in rows], [(r.n_examples, r.subset_seed) for r in rows])


def _accuracy_header(attacks: Sequence[str]) -> list[str]:
    return ["clean", *map(attack_title, attacks), "worst case"]


def render_markdown(rows: Sequence[Row], groups: Sequence[SeedGroup], plots: Sequence[str]) -> str:
    """report.md: the main table, its notes, the seed table and the embedded `plots` (names of PLOTS written)."""
    attacks = attack_columns(r.per_attack for r in rows)
    header = [*COLUMNS, *_accuracy_header(attacks), *COLUMNS_AFTER]
    cells = [_row_cells(r, attacks, tag) for r, tag in zip(rows, _row_tags(rows))]
    lines = ["# Training report", "", *_table(header, cells), ""]
    lines += [f"{note}\n" for note in notes(rows)]
    if groups:
        attacks = attack_columns(g.per_attack for g in groups)
        header = [*GROUP_COLUMNS, *_accuracy_header(attacks), *GROUP_COLUMNS_AFTER]
        tags = subset_tags([(g.label, g.checkpoint, g.eps) for g in groups],
                           [(g.n_examples, g.subset_seed) for g in groups])
        lines += ["## Mean ± std over seeds", "",
                  *_table(header, [_group_cells(g, attacks, tag) for g, tag in zip(groups, tags)]), "",
                  "Distinct runs that differ only by seed, measured on the same test examples (same size and subset "
                  "seed); std is the sample standard deviation (n - 1), in % points for accuracies; n/a where a run "
                  "lacks the number (or measured it with another attack)."
                  + (" 'n (k collapsed)': k of the runs collapsed (see above)." if any(g.collapsed for g in groups)
                     else ""), ""]
    lines += ["## Plots", ""] + [f"![{PLOTS[name]}]({name})\n" for name in plots]
    return "\n".join(lines)
