"""A study spread over jobs: with `[executor] kind = "slurm"` (or "local", submitit's executor on this machine) each
run that is left becomes one submitit job, which trains it (resuming its checkpoint) and evaluates it through
`runner.run_one`, the function the in-process study calls. This process holds the study's lock, keeps up to
max_parallel jobs going, prints the progress lines, submits again a job that died (killed, lost node) and at the
end writes the report. On SLURM a job that reaches its time limit or is preempted gets USR2 first: submitit then
requeues the same job (`RunJob.checkpoint`), which resumes the run directory bitwise.
"""

import dataclasses
import importlib
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from backsmooth import distributed as dist
from backsmooth.errors import ConfigError, Interrupted, one_line
from backsmooth.study.runner import (
    Log,
    Plan,
    check_existing,
    evaluations_left,
    finish_study,
    is_trained,
    open_study,
    run_one,
)
from backsmooth.study.spec import PlannedRun, Study

INSTALL_HINT = "pip install 'backsmooth[cluster]'"
RETRIES = 3  # a job that ends without a result (killed, lost node) is submitted again this many times
MAX_TIMEOUTS = 100  # requeues of one job at its time limit: a long run goes on in time-limit slices
POLL_SECONDS = {"local": 1.0, "slurm": 20.0}  # how often the jobs' states are read


def _submitit(kind: str) -> ModuleType:
    """The submitit package; a one-line hint when it is not installed."""
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise ConfigError(f"--executor {kind} runs each run as a submitit job, and submitit is not installed: "
                          f"{INSTALL_HINT}") from None


@dataclasses.dataclass(frozen=True)
class RunJob:
    """What one job runs: a run of the study, trained then evaluated. Picklable; submitit calls `checkpoint` when
    the job is preempted or reaches its time limit, and requeues the same job, which resumes the run."""

    study: Study
    name: str
    progress: bool | None = False

    def __call__(self) -> tuple[str, str]:
        """("done", ""), ("diverged", the warning line) or ("interrupted", the run) when SIGTERM/SIGINT stopped
        it after saving its state."""
        run = next(r for r in self.study.runs if r.name == self.name)
        proc, _ = dist.setup(run.config.device)

        def announce(now: str) -> None:
            print(f"[{self.name}] {now}", flush=True)

        try:
            warning = run_one(run, self.study, proc, self.progress, announce)
        except Interrupted as stop:
            return "interrupted", str(stop)
        return ("done", "") if warning is None else ("diverged", warning)

    def checkpoint(self) -> Any:
        """The same job again (submitit requeues it): the run directory holds all there is to resume."""
        return _submitit(self.study.executor.kind).helpers.DelayedSubmission(self)


def _executor(submitit: ModuleType, study: Study) -> Any:
    """A submitit executor for the study's jobs, with its [executor] settings."""
    settings = study.executor
    folder = Path(settings.folder) if settings.folder else study.out / "jobs"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=settings.kind, slurm_max_num_timeout=MAX_TIMEOUTS,
                                         local_max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as error:  # submitit's "Could not detect srun": not on a SLURM cluster
        raise ConfigError(f"--executor {settings.kind}: {error}") from None
    executor.update_parameters(timeout_min=settings.timeout_min, gpus_per_node=settings.gpus_per_node,
                               cpus_per_task=settings.cpus_per_task, slurm_partition=settings.partition,
                               slurm_account=settings.account)
    return executor


def _error_line(error: Exception) -> str:
    """The error a failed job raised: the last line of the trace submitit reports, else the error's first line."""
    text = str(error)
    parts = text.split("-" * 22 + "\n")  # submitit's FailedJobError: the job's traceback between two rules
    trace = [line for line in parts[1].splitlines() if line.strip()] if len(parts) > 2 else []
    return trace[-1] if trace else (text.splitlines() or [type(error).__name__])[0]


class _Jobs:
    """The study's jobs: at most max_parallel at once, polled, submitted again when one dies."""

    def __init__(self, submitit: ModuleType, study: Study, plan: Plan, progress: bool | None, log: Log) -> None:
        self.study, self.plan, self.progress, self.log = study, plan, progress, log
        self.executor = _executor(submitit, study)
        self.job_error = submitit.core.utils.FailedJobError  # the job raised (not: it ended without a result)
        settings = study.executor
        self.limit = settings.max_parallel or (len(study.runs) if settings.kind == "slurm" else 1)
        self.running: dict[str, Any] = {}  # run name -> its job
        self.tries: dict[str, int] = {}
        self.diverged: list[str] = []
        self.failed: list[str] = []

    def announce(self, now: str) -> None:
        self.log(self.plan.progress_line(now, self.plan.measured_rates()))

    def run(self, runs: list[PlannedRun]) -> None:
        """Submit every run of `runs` and wait for them all; Ctrl-C cancels the running jobs."""
        waiting = list(runs)
        try:
            while waiting or self.running:
                while waiting and len(self.running) < self.limit:
                    self._submit(waiting.pop(0))
                time.sleep(POLL_SECONDS[self.study.executor.kind])
                for run in [r for r in self.study.runs if r.name in self.running]:
                    job = self.running[run.name]
                    if job.done():
                        del self.running[run.name]
                        if self._again(run, job):
                            waiting.insert(0, run)
        except BaseException:
            for job in self.running.values():
                job.cancel(check=False)
            raise

    def _submit(self, run: PlannedRun) -> None:
        title = re.sub(r"[^A-Za-z0-9_.+-]", "_", self.study.title)  # a SLURM job name: no spaces or quotes
        self.executor.update_parameters(name=f"{title}-{run.name}")
        job = self.executor.submit(RunJob(self.study, run.name, self.progress))
        self.running[run.name] = job
        self.announce(f"{'evaluating' if is_trained(run) else 'training'} {run.name} in job {job.job_id}")

    def _again(self, run: PlannedRun, job: Any) -> bool:
        """Report how the job ended; True when it is to be submitted again (it died, or a signal stopped it)."""
        error = job.exception()  # None, FailedJobError (it raised) or UncompletedJobError (no result: killed)
        if error is None:
            status, detail = job.result()
            if status == "done":
                self.announce(f"{run.name} finished in job {job.job_id}")
                return False
            if status == "diverged":
                self.diverged.append(run.name)
                self.log(detail)
                return False
            reason = "was stopped by a signal after saving its state"
        elif isinstance(error, self.job_error) or str(job.state).upper().startswith("CANCELLED"):
            self.failed.append(run.name)
            self.log(one_line(f"error: {run.name} failed in job {job.job_id}: {_error_line(error)}; "
                              f"its log: {job.paths.stderr}"))
            return False
        else:
            reason = f"ended without a result (killed, out of memory or a lost node? state {job.state})"
        tries = self.tries[run.name] = self.tries.get(run.name, 0) + 1
        if tries > RETRIES:
            self.failed.append(run.name)
            self.log(one_line(f"error: job {job.job_id} of {run.name} {reason}, after {RETRIES} new submissions; "
                              f"giving up on it; its log: {job.paths.stderr}"))
            return False
        self.log(one_line(f"warning: job {job.job_id} of {run.name} {reason}; submitting it again ({tries}/{RETRIES}),"
                          f" it resumes from its checkpoint; its log: {job.paths.stderr}"))
        return True


def execute_jobs(study: Study, command: str, *, progress: bool | None = False, log: Log = print) -> dict[str, Any]:
    """Run what is left of the study as one submitit job per run (study.executor), then write the report of the
    runs finished; returns {"diverged": [...], "failed": [...], "report": path or None}."""
    submitit = _submitit(study.executor.kind)
    check_existing(study)
    plan = Plan.of(study)
    jobs = _Jobs(submitit, study, plan, progress, log)
    lock = open_study(study)
    jobs.run([r for r in study.runs if not is_trained(r) or evaluations_left(r)])
    report = finish_study(study, plan, command, log)
    lock.release()
    return {"diverged": jobs.diverged, "failed": jobs.failed, "report": report}
