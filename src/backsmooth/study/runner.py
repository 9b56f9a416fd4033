"""Running a study: every planned (entry, seed) is an ordinary run directory under OUT/runs/. A run with
summary.json is finished and skipped, one with config.json is resumed from its checkpoint, any other is
started; then its checkpoints are evaluated (resumably) into eval-last.json / eval-best.json, and the report
goes to OUT/report/. Killed at any moment, the same command carries on where it stopped.

Under torchrun every process walks the same plan and trains each run together (rank 0 decides what is left
and writes); the evaluations and the report then run on rank 0 alone. With a submitit executor
(study.executor) each run is a job that calls `run_one`, the function this process calls for each run.
"""

import dataclasses
import hashlib
import json
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backsmooth import distributed as dist
from backsmooth.atomic import atomic_write_json, atomic_write_text
from backsmooth.config import from_mapping
from backsmooth.errors import ConfigError, TrainingDiverged, one_line
from backsmooth.evaluation.saved import SavedProtocol, evaluate_saved
from backsmooth.report import format_duration, read_run
from backsmooth.runtime import ProcessInfo
from backsmooth.study.estimate import (
    AUTOATTACK_REACH,
    DataFacts,
    bench_rate,
    data_facts,
    measured_rate,
    run_units,
    step_units,
)
from backsmooth.study.report import write_study_report
from backsmooth.study.spec import PlannedRun, Study
from backsmooth.training import DirectoryLock, train
from backsmooth.training.run_dir import RESUME_IGNORED

Log = Callable[[str], None]


def run_path(run: PlannedRun) -> Path:
    """The run's directory (OUT/runs/<entry>-seed<k>)."""
    return Path(run.config.out or "")


def is_trained(run: PlannedRun) -> bool:
    """Finished training: the trainer writes summary.json last."""
    return (run_path(run) / "summary.json").is_file()


def eval_path(run: PlannedRun, checkpoint: str) -> Path:
    """eval-last.json or eval-best.json of the run."""
    return run_path(run) / f"eval-{checkpoint}.json"


def check_existing(study: Study) -> None:
    """Refuse (one line, before anything runs) a study folder whose runs or evaluations were made with other
    settings than the spec now asks for. Entries, seeds and attacks may be added; any other change needs another
    --out."""
    if study.out.exists() and not study.out.is_dir():
        raise ConfigError(f"--out {study.out} is a file, not a folder; choose another --out")
    for run in study.runs:
        _check_run(run, study)
        for checkpoint in run.checkpoints:
            path = eval_path(run, checkpoint)
            if not path.is_file():
                continue
            attacks, n_examples, seed = _saved_evaluation(path)
            if (n_examples, seed) != (study.evaluation.n_examples, study.evaluation.seed) \
                    or not set(attacks) <= set(run.attacks):
                raise ConfigError(f"{path} was evaluated with other attacks, example count or seed than the spec "
                                  f"asks ({', '.join(run.attacks)} on {study.evaluation.n_examples}); a spec may add "
                                  f"attacks, not drop or change them: {_remedy(study)}")


def _check_run(run: PlannedRun, study: Study) -> None:
    """Refuse a run folder whose config.json holds other settings than the spec now gives the run."""
    folder = run_path(run)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file where the study keeps a run folder; move it away or pass another --out")
    saved = folder / "config.json"
    if not saved.is_file():
        return
    try:
        old = from_mapping(json.loads(saved.read_text())).to_dict()
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ConfigError(f"{saved} is not a config.json of `backsmooth train`; move {folder} away or pass another "
                          f"--out") from None
    new = run.config.to_dict()
    changed = [k for k in new if k not in RESUME_IGNORED and old.get(k) != new[k]]
    if changed:
        key = changed[0]
        raise ConfigError(f"{folder} belongs to another version of the study: it was trained with {key} = "
                          f"{old.get(key)!r} ({saved}), this spec gives {new[key]!r}; {_remedy(study)}")


def _remedy(study: Study) -> str:
    """What a user can do when the study folder was made by another version of the spec."""
    saved = study.out / "spec.toml"
    if saved.is_file() and saved.read_text(encoding="utf-8", errors="replace") != study.spec_text:
        go_on = f"to go on with that study run `backsmooth study {shlex.join([str(saved), '--out', str(study.out)])}`"
    else:
        go_on = "to go on with that study restore the spec it was made with"
    return f"{go_on}, or give this spec a new folder with --out DIR"


def _saved_evaluation(path: Path) -> tuple[list[str], int, int]:
    """The attacks, example count and seed of an eval file."""
    try:
        saved = json.loads(path.read_text())
        settings, n_examples = saved["evaluation"]["settings"], saved["subset"]["n_examples"]
        return list(settings["attacks"]), n_examples, settings["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not an evaluation file of `backsmooth eval`; move it away") from None


def evaluations_left(run: PlannedRun) -> list[str]:
    """The run's planned checkpoints not evaluated yet."""
    return [c for c in run.checkpoints if not is_evaluated(run, c)]


def is_evaluated(run: PlannedRun, checkpoint: str) -> bool:
    """Whether the checkpoint's eval file exists and ran every attack the spec asks (a spec may add attacks:
    then the checkpoint is evaluated again with all of them, and its file replaced when that is done)."""
    path = eval_path(run, checkpoint)
    return path.is_file() and set(_saved_evaluation(path)[0]) == set(run.attacks)


@dataclasses.dataclass
class Plan:
    """Estimated cost of every run (F per example) and how far the study is."""

    study: Study
    units: dict[str, tuple[float, float]]  # run name -> (training F, evaluation F)
    facts: dict[str, DataFacts]

    @classmethod
    def of(cls, study: Study) -> "Plan":
        facts: dict[str, DataFacts] = {}
        cache: dict[tuple[Any, ...], DataFacts] = {}
        for run in study.runs:
            c = run.config
            key = (c.dataset, c.data_dir, c.val_size, c.cache_dir)
            if key not in cache:
                cache[key] = data_facts(c)
            facts[run.name] = cache[key]
        return cls(study, {r.name: run_units(r, study, facts[r.name]) for r in study.runs}, facts)

    def measured_rates(self) -> dict[str, float]:
        """Seconds per F per example, by architecture, from the runs trained so far."""
        rates: dict[str, list[float]] = {}
        for run in self.study.runs:
            if not (run_path(run) / "metrics.jsonl").is_file() or not is_trained(run):
                continue
            data = read_run(run_path(run))
            rate = measured_rate(data.train_seconds, run.config, self.facts[run.name],
                                          int(data.metrics[-1]["epoch"]))
            if rate is not None:
                rates.setdefault(run.config.arch, []).append(rate)
        return {arch: sum(values) / len(values) for arch, values in rates.items()}

    def seconds_left(self, rates: dict[str, float]) -> float | None:
        """Estimated seconds of training and evaluation still to do; None without a rate for some run."""
        total = 0.0
        for run in self.study.runs:
            train, evaluation = self.units[run.name]
            left = (0.0 if is_trained(run) else train) + evaluation * len(evaluations_left(run)) / len(
                run.checkpoints)
            if left and run.config.arch not in rates:
                return None
            total += left * rates.get(run.config.arch, 0.0)
        return total

    def progress_line(self, now: str, rates: dict[str, float]) -> str:
        runs = self.study.runs
        planned = sum(len(r.checkpoints) for r in runs)
        evaluated = planned - sum(len(evaluations_left(r)) for r in runs)
        left = self.seconds_left(rates)
        eta = "time left known after the first run" if left is None else f"about {format_duration(left)} left"
        return (f"[study {self.study.title}] {sum(map(is_trained, runs))}/{len(runs)} runs trained, "
                f"{evaluated}/{planned} evaluations done; now {now}; {eta}")


def _bench_key(run: PlannedRun, plan: Plan) -> tuple[Any, ...]:
    """What a bench rate depends on: runs that agree on it share one measurement."""
    c = run.config
    return (c.arch, c.method, tuple(sorted(c.method_options.items())), c.batch_size, c.precision, c.device,
            c.channels_last, plan.facts[run.name].image_shape)


def dry_run(study: Study, log: Log) -> None:
    """Print the plan with an estimated time for each run from a short bench of its method here; write nothing."""
    plan = Plan.of(study)
    rates: dict[tuple[Any, ...], float] = {}
    log(f"study {study.title}: {len(study.runs)} runs in {study.out} (estimates from a few eager training steps "
        f"of each method on this machine; AutoAttack assumed to reach {AUTOATTACK_REACH:.0%} of examples)")
    log(f"{'run':<28} {'method':<20} {'epochs':>6} {'F/step':>6} {'train':>10} {'evaluate':>10}  status")
    for run in study.runs:
        c = run.config
        key = _bench_key(run, plan)
        if key not in rates:
            rates[key] = bench_rate(c, plan.facts[run.name])
    # an attack step costs about what a training step of the same F does: one rate per architecture, the median
    by_arch: dict[str, list[float]] = {}
    for key, rate in rates.items():
        by_arch.setdefault(key[0], []).append(rate)
    eval_rate = {arch: statistics.median(values) for arch, values in by_arch.items()}
    total = 0.0
    for run in study.runs:
        c = run.config
        key = _bench_key(run, plan)
        train, evaluation = plan.units[run.name]
        share = len(evaluations_left(run)) / len(run.checkpoints)
        status = ("trained" if is_trained(run) else "resume" if (run_path(run) / "config.json").is_file()
                  else "new") + f", {len(run.checkpoints) - len(evaluations_left(run))} evaluated"
        total += (0.0 if is_trained(run) else train * rates[key]) + evaluation * eval_rate[c.arch] * share
        log(f"{run.name:<28} {c.method:<20} {c.epochs:>6} {step_units(c):>6} "
            f"{format_duration(train * rates[key]):>10} {format_duration(evaluation * eval_rate[c.arch]):>10}  "
            f"{status}")
    log(f"left to do: about {format_duration(total)}")


def _write_spec(study: Study) -> None:
    """OUT/spec.toml is the spec of the latest invocation; an earlier, different one is kept as spec-N.toml."""
    path = study.out / "spec.toml"
    if path.is_file() and path.read_text(encoding="utf-8") != study.spec_text:
        number = 1
        while (study.out / f"spec-{number}.toml").exists():
            number += 1
        path.replace(study.out / f"spec-{number}.toml")
    atomic_write_text(path, study.spec_text)


def _train(run: PlannedRun, progress: bool | None) -> bool:
    """Train (or resume) one run; False when its loss diverged (the study goes on without it)."""
    resume = (run_path(run) / "config.json").is_file()
    try:
        train(dataclasses.replace(run.config), resume=resume, progress=progress)
    except TrainingDiverged:
        return False
    return True


def open_study(study: Study) -> DirectoryLock:
    """Create the study folder, take its lock (held until the report is written) and save the spec."""
    study.out.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(study.out)
    lock.acquire()
    _write_spec(study)
    return lock


def run_one(run: PlannedRun, study: Study, proc: ProcessInfo, progress: bool | None,
            announce: Log) -> str | None:
    """One run of the study, wherever it executes: train it (resuming its checkpoint) unless it has finished,
    then, on a single process, evaluate its checkpoints. `announce` gets what is done now ("training NAME").
    Returns the warning line when its loss diverged (the study goes on without it), else None."""
    if not dist.broadcast_object(is_trained(run), proc):
        announce(f"training {run.name}")
        started = time.time()
        if not _train(run, progress):
            return one_line(f"warning: {run.name} diverged (non-finite loss) after {time.time() - started:.0f} s; "
                            f"the study goes on without it (see {run_path(run)})")
    if proc.is_main and not proc.distributed:
        _evaluate(run, study, progress, announce)
    return None


def finish_study(study: Study, plan: Plan, command: str, log: Log) -> Path | None:
    """Write the report of the runs finished so far (None when none has)."""
    finished = [r for r in study.runs if is_trained(r)]
    log(plan.progress_line("writing the report", plan.measured_rates()))
    return write_study_report(study, finished, command) if finished else None


def execute(study: Study, command: str, *, progress: bool | None = False, report_only: bool = False,
            log: Log = print) -> dict[str, Any]:
    """Run what is left of the study in this process (with `report_only`, nothing) and write the report of the
    runs finished so far; returns {"diverged": [...], "report": path or None}."""
    check_existing(study)
    if report_only and not any(map(is_trained, study.runs)):
        raise ConfigError(f"--report-only: no run of the study in {study.out} has finished yet, so there is no "
                          f"report to write; run the study first: {command}")
    proc, _ = dist.setup(study.runs[0].config.device)
    plan = Plan.of(study)
    lock = open_study(study) if proc.is_main else None

    def announce(now: str) -> None:
        if proc.is_main:
            log(plan.progress_line(now, plan.measured_rates()))

    diverged: list[str] = []
    for run in () if report_only else study.runs:
        warning = run_one(run, study, proc, progress, announce)
        if warning is not None:
            diverged.append(run.name)
            log(warning)
    dist.shutdown()
    if lock is None:
        return {"diverged": diverged, "report": None}
    for run in () if report_only else study.runs:
        if run.name not in diverged:
            _evaluate(run, study, progress, announce)
    report = finish_study(study, plan, command, log)
    lock.release()
    return {"diverged": diverged, "report": report}


def _evaluate(run: PlannedRun, study: Study, progress: bool | None, announce: Log) -> None:
    """Evaluate the run's planned checkpoints that have no eval file yet. When best.pt is a copy of last.pt (the
    last epoch was the best) and one of them is evaluated, the other's file is that result under its own name."""
    if not is_trained(run):
        return
    for checkpoint in evaluations_left(run):
        twin = "best" if checkpoint == "last" else "last"
        if is_evaluated(run, twin) and _same_file(run_path(run) / "best.pt", run_path(run) / "last.pt"):
            data = json.loads(eval_path(run, twin).read_text())
            data["name"] = checkpoint
            data["checkpoint"] = dict(data["checkpoint"], path=str(run_path(run) / f"{checkpoint}.pt"),
                                      same_weights_as=data["checkpoint"]["path"])
            atomic_write_json(eval_path(run, checkpoint), data)
            continue
        announce(f"evaluating {run.name} {checkpoint}.pt")
        evaluation = study.evaluation
        protocol = SavedProtocol(run.attacks, evaluation.n_examples, evaluation.batch_size, evaluation.seed)
        evaluate_saved(run_path(run) / f"{checkpoint}.pt", protocol, name=checkpoint, device=run.config.device,
                       progress=progress, log=lambda _line: None)


def _same_file(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes (best.pt is written as a copy of last.pt)."""
    if not first.is_file() or not second.is_file() or first.stat().st_size != second.stat().st_size:
        return False
    return hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
