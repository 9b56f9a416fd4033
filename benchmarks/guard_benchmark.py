"""The collapse guard's benchmark table (docs/recipe.md#the-guards-benchmark) from finished study folders.

    python benchmarks/guard_benchmark.py runs/study/guard-digits runs/study/guard-mnist runs/study/guard-cifar10

Each run is labelled twice, independently of the guard:
- by design: entries named `collapse-...` were chosen to collapse (a step of 1.5 eps or more), the others
  to be healthy;
- by its final model on the test set (the study's FGSM and PGD-20 evaluation of last.pt, shown per run):
  "gap at the end" when PGD-20 keeps less than a quarter of the accuracy FGSM leaves, with FGSM accuracy at
  least 20%. A run that ends near chance has no gap by this measure: read its clean accuracy too.
The summary counts by design, and splits the healthy-by-design runs by their final model: a guard event on
a healthy-by-design run without a gap at the end is a false alarm; on one that ended with the gap, or on a
collapsing-by-design run, a detection.
The guard's decision is a function of each check's logged counts, so it is computed here from them with the
rule as it stands (backsmooth.training.guard, the default --collapse-fraction, and whether the method's own
attack is a single CE step): runs logged by an earlier version of the thresholds are judged by the current
one. The delay of a
detection is counted from the onset, the first check after which the guard's own PGD accuracy stays below
half of the highest it read before (the first check for a run that was never robust), to the event.
Writes the Markdown table to stdout and every run's row to guard_benchmark.json in the current folder;
`--checks FOLDER...` prints every check's counts instead.
"""

import json
import sys
from pathlib import Path

from backsmooth import methods
from backsmooth.config import RunConfig
from backsmooth.training.guard import CONSECUTIVE, exact_tests, signature


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_accuracies(run: Path) -> tuple[float, float, float]:
    """Clean, FGSM and PGD-20 accuracy of last.pt on the study's test subset."""
    per_attack = json.loads((run / "eval-last.json").read_text())["evaluation"]
    return per_attack["clean_acc"], per_attack["per_attack"]["fgsm"], per_attack["per_attack"]["pgd20"]


def onset(checks: list[dict]) -> dict | None:
    """The first check after which the guard's PGD accuracy stays below half of its best before it."""
    best = 0.0
    for i, check in enumerate(checks):
        if all(later["guard_pgd_acc"] < 0.5 * max(best, 1e-9) for later in checks[i:]) and best > 0:
            return check
        best = max(best, check["guard_pgd_acc"])
    return checks[0] if checks and max(c["guard_pgd_acc"] for c in checks) < 0.05 else None


def tests(check: dict) -> tuple[float, float, float]:
    """The three exact tests of a logged check under the current rule and the default --collapse-fraction."""
    return exact_tests(check["clean"], check["single"], check["kept"], check["up"], check["down"],
                       RunConfig().collapse_fraction)


def first_event(checks: list[dict], decides: bool) -> dict | None:
    """The check at which the guard records a collapse: CONSECUTIVE signatures in a row (deciding methods)."""
    for check in checks:
        check["recomputed_signature"] = signature(*tests(check))
    below = 0
    for check in checks:
        below = below + 1 if check["recomputed_signature"] else 0
        if decides and below >= CONSECUTIVE:
            return check
    return None


def run_row(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    rows = read_jsonl(run / "metrics.jsonl")
    checks = [r for r in rows if r.get("event") == "guard" and r["step"] > 0]
    decides = methods.method_class(config["method"]).single_step_attack
    event = first_event(checks, decides)
    clean, fgsm, pgd = final_accuracies(run)
    entry = run.name.rsplit("-seed", 1)[0]
    row = dict(run=run.name, entry=entry, dataset=config["dataset"], method=config["method"], eps=config["eps"],
               seed=config["seed"], decides=decides, signatures=sum(c["recomputed_signature"] for c in checks),
               designed_collapse=entry.startswith("collapse-"), clean=clean, fgsm=fgsm,
               pgd20=pgd, final_collapsed=fgsm >= 0.2 and pgd < 0.25 * fgsm, checks=len(checks),
               steps=max((r["step"] for r in checks), default=0), guard_seconds=rows[-1].get("guard_seconds"),
               train_seconds=rows[-1].get("total_train_seconds"), event_step=None, event_epochs=None,
               delay_steps=None, delay_epochs=None)
    if event is not None:
        row.update(event_step=event["step"], event_epochs=event["epochs_done"])
        start = onset(checks)
        if start is not None:
            row.update(delay_steps=event["step"] - start["step"],
                       delay_epochs=event["epochs_done"] - start["epochs_done"])
    return row


def table(rows: list[dict]) -> str:
    lines = ["| set | runs | guard events | rate | event minus onset, steps / epochs (negative: before the fall) |",
             "|---|---|---|---|---|"]
    deciding = [r for r in rows if r["decides"]]
    healthy = [r for r in deciding if not r["designed_collapse"]]
    for label, chosen in (("healthy by design and without a gap at the end, single-step (guard decides)",
                           [r for r in healthy if not r["final_collapsed"]]),
                          ("healthy by design but with a gap at the end (guard decides)",
                           [r for r in healthy if r["final_collapsed"]]),
                          ("collapsing by design (guard decides)", [r for r in deciding if r["designed_collapse"]]),
                          ("PGD-AT and TRADES family (guard logs only)", [r for r in rows if not r["decides"]])):
        fired = [r for r in chosen if r["event_step"] is not None]
        delays = [f"{r['delay_steps']} / {r['delay_epochs']:.2f}" for r in fired if r["delay_steps"] is not None]
        lines.append(f"| {label} | {len(chosen)} | {len(fired)} | {len(fired) / max(len(chosen), 1):.0%} | "
                     f"{', '.join(delays) or 'n/a'} |")
    lines += ["", "| run | design | dataset | eps | final clean / FGSM / PGD-20 | gap at the end | "
              "checks with the signature | guard event (step, epoch) | guard s / train s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        event = f"step {r['event_step']} ({r['event_epochs']:.2f})" if r["event_step"] is not None else "none"
        verdict = "yes" if r["final_collapsed"] else "no"
        decides = "" if r["decides"] else " (logged only)"
        design = "collapsing" if r["designed_collapse"] else "healthy"
        lines.append(f"| {r['run']} | {design} | {r['dataset']} | {r['eps']:.4g} | {r['clean']:.1%} / "
                     f"{r['fgsm']:.1%} / {r['pgd20']:.1%} | {verdict} | {r['signatures']} of {r['checks']}{decides} | "
                     f"{event} | {r['guard_seconds'] or 0:.0f} / {r['train_seconds'] or 0:.0f} |")
    return "\n".join(lines)


def checks_text(runs: list[Path]) -> str:
    """Every check's counts, run by run: the numbers the rule decided on, to judge again by hand."""
    lines = []
    for run in runs:
        clean, fgsm, pgd = final_accuracies(run)
        lines.append(f"{run.name}: last.pt clean {clean:.3f}, FGSM {fgsm:.3f}, PGD-20 {pgd:.3f}")
        for c in (r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "guard" and r["step"] > 0):
            lines.append(f"  step {c['step']:4d}: clean {c['clean']:3d}, S {c['single']:3d}, K {c['kept']:3d}, "
                         f"gap {c['single'] - c['kept']:3d}, up {c['up']:3d}, down {c['down']:3d}, "
                         f"signature {int(signature(*tests(c)))}")
    return "\n".join(lines)


def main(args: list[str]) -> None:
    """The table (and guard_benchmark.json) of the study folders given; with --checks first, every check's counts."""
    folders = args[1:] if args[:1] == ["--checks"] else args
    runs = [run for folder in folders for run in sorted((Path(folder) / "runs").iterdir())
            if (run / "eval-last.json").is_file()]
    if args[:1] == ["--checks"]:
        print(checks_text(runs))
        return
    rows = [run_row(run) for run in runs]
    Path("guard_benchmark.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
