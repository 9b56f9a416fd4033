"""`backsmooth report`: a Markdown table, report.json and up to three plots from run directories.

Each run directory of `backsmooth train` gives one row, or one per evaluated checkpoint and test subset when
`backsmooth eval` wrote eval-*.json files for several. Accuracies come from those files, else from
summary.json (clean and PGD-20 on the test subset), else from the validation split in metrics.jsonl; the
table has one column per attack evaluated. Distinct runs that differ only by seed, measured on the same test
examples, are also summarised as mean ± std. See docs/report.md.

Modules: `read` (run directories), `rows` (typed rows and seed groups), `markdown` (report.md) and
`plots` (PNG figures). Importing the package loads neither torch nor `backsmooth.evaluation`.
"""

from collections.abc import Sequence
from pathlib import Path

from backsmooth.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from backsmooth.errors import ConfigError
from backsmooth.report.markdown import format_duration, notes, render_markdown
from backsmooth.report.plots import PLOTS, render_plots, robust_measure
from backsmooth.report.read import RunData, read_run
from backsmooth.report.rows import MeanStd, Row, SeedGroup, build_rows, run_labels, seed_groups

__all__ = ["PLOTS", "MeanStd", "Row", "RunData", "SeedGroup", "build_report", "build_rows",
           "format_duration", "notes", "read_run", "render_markdown", "run_labels", "seed_groups"]


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write report.md, report.json and the plots into `out_dir`; returns the path of report.md. report.json's
    `plots` lists the plots written (a plot of an earlier report that has nothing to show now is removed) and
    `clean_vs_robust` the accuracy that plot shows against clean (an attack, "worst_case", or null: no plot)."""
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
    pngs = render_plots(runs, rows)  # a missing matplotlib fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        if name in pngs:
            atomic_write_bytes(out / name, pngs[name])
        else:
            (out / name).unlink(missing_ok=True)
    atomic_write_json(out / "report.json", dict(
        runs=[str(r.path) for r in runs], rows=[r.to_json() for r in rows], seed_groups=[g.to_json() for g in groups],
        notes=notes(rows), plots=list(pngs), clean_vs_robust=robust_measure(rows)))
    atomic_write_text(out / "report.md", render_markdown(rows, groups, list(pngs)))
    return out / "report.md"
