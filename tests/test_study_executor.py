"""`backsmooth study --executor local|slurm`: one submitit job per run. The smoke study through submitit's local
executor gives the in-process table; a preempted job (USR2) is requeued and a killed one (SIGKILL) submitted again,
both resuming to the numbers of an uninterrupted study; a job's real error is reported while the others go on; the
[executor] table is no changed spec; bad settings and a missing submitit are one line, exit 2, nothing written."""

import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_study import accuracies, env

from backsmooth.cli import main
from backsmooth.study import check_existing, load_study
from backsmooth.study.executor import RunJob, _error_line

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "studies" / "smoke.toml"
SRC = str(ROOT / "src")
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit is not installed (pip install 'backsmooth[cluster]')")
TINY = """
seeds = [0, 1]
[protocol]
preset = "cpu-digits-{method}"
epochs = 1
val_pgd_steps = 5
final_eval_examples = 0
[evaluation]
attacks = ["pgd10"]
n_examples = 100
checkpoints = ["last"]
[[entries]]
method = "fgsm_rs"
"""


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "backsmooth", "study", *args]


def study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), env=env(), capture_output=True, text=True, timeout=600)


def table(out: Path) -> list[tuple]:
    """study.json's rows without their timings (which differ from one execution to the next)."""
    rows = json.loads((out / "report" / "study.json").read_text())["entries"]
    return [(r["entry"], r["checkpoint"], r["seeds"], r["clean"], r["attacks"], r["worst_case"]) for r in rows]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The smoke study, in process and uninterrupted."""
    out = tmp_path_factory.mktemp("inprocess") / "study"
    result = study(str(SMOKE), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
@needs_submitit
def test_local_executor_gives_the_in_process_table(reference, tmp_path):
    out = tmp_path / "study"
    result = study(str(SMOKE), "--out", str(out), "--executor", "local", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert "now training backward_smoothing-seed0 in job" in result.stdout
    assert "[study smoke] 4/4 runs trained, 8/8 evaluations done; now writing the report" in result.stdout
    assert accuracies(out) == accuracies(reference) and len(accuracies(out)) == 8
    assert table(out) == table(reference)
    assert len(list((out / "jobs").glob("*_log.out"))) == 4  # submitit's logs, one per job
    # where the runs execute is no change of the spec: the same folder with another [executor] does nothing
    moved = tmp_path / "smoke.toml"
    moved.write_text(SMOKE.read_text() + '\n[executor]\nkind = "slurm"\npartition = "gpu"\nmax_parallel = 8\n')
    runs = snapshot(out / "runs")
    again = study(str(moved), "--out", str(out), "--executor", "inprocess")
    assert again.returncode == 0, again.stderr
    assert "training" not in again.stdout and "evaluating" not in again.stdout
    assert snapshot(out / "runs") == runs


def _signal_the_run(process: subprocess.Popen, run: Path, signum: int) -> None:
    """Send `signum` to the job process training `run` once it has written a mid-run checkpoint (its pid is in
    the run directory's lock)."""
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    pid = int(re.match(r"pid (\d+)", (run / ".lock").read_text()).group(1))
    os.kill(pid, signum)
    assert not (run / "summary.json").exists(), f"{run.name} finished before it could be stopped"


@pytest.mark.slow
@needs_submitit
def test_preempted_and_killed_jobs_resume_to_the_uninterrupted_numbers(reference, tmp_path):
    out = tmp_path / "study"
    process = subprocess.Popen(command(str(SMOKE), "--out", str(out), "--executor", "local", "--jobs", "1"),
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_the_run(process, out / "runs" / "backward_smoothing-seed0", signal.SIGUSR2)  # SLURM's warning signal
    _signal_the_run(process, out / "runs" / "backward_smoothing-seed1", signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    logs = "".join(path.read_text() for path in (out / "jobs").glob("*_log.*"))
    assert "Requeued job" in logs  # submitit called RunJob.checkpoint and ran the same job again
    assert re.search(r"warning: job \d+ of backward_smoothing-seed1 ended without a result .*submitting it "
                     r"again \(1/3\)", stdout), stdout
    assert stdout.count("now training backward_smoothing-seed1 in job") == 2
    assert accuracies(out) == accuracies(reference) and len(accuracies(out)) == 8


@pytest.mark.slow
@needs_submitit
def test_a_job_that_fails_is_reported_and_the_others_go_on(tmp_path):
    spec, out = tmp_path / "tiny.toml", tmp_path / "study"
    spec.write_text(TINY)
    broken = load_study(spec, out).runs[0]  # a run folder to resume whose checkpoint is not one
    Path(broken.config.out).mkdir(parents=True)
    (Path(broken.config.out) / "config.json").write_text(json.dumps(broken.config.to_dict()))
    (Path(broken.config.out) / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = study(str(spec), "--out", str(out), "--executor", "local")
    assert result.returncode == 1, result.stderr
    (error,) = [line for line in result.stdout.splitlines() if line.startswith("error: fgsm_rs-seed0")]
    assert re.search(r"failed in job \d+: \S+: .*; its log: .*_log\.err$", error), error
    assert "fgsm_rs-seed1 finished in job" in result.stdout
    assert (out / "runs" / "fgsm_rs-seed1" / "eval-last.json").is_file() and (out / "report" / "study.md").is_file()
    assert "1 job(s) failed: fgsm_rs-seed0" in result.stderr


def test_the_executor_table_changes_no_run(tmp_path):
    plain, placed = tmp_path / "plain.toml", tmp_path / "placed.toml"
    plain.write_text(TINY)
    placed.write_text(TINY + '[executor]\nkind = "slurm"\npartition = "gpu"\ngpus_per_node = 1\naccount = "lab"\n'
                             'timeout_min = 60\nmax_parallel = 2\ncpus_per_task = 8\nfolder = "logs"\n')
    out = tmp_path / "study"
    first, second = load_study(plain, out), load_study(placed, out)
    assert first.runs == second.runs and first.executor.kind == "inprocess"
    assert (second.executor.kind, second.executor.partition, second.executor.max_parallel) == ("slurm", "gpu", 2)
    for run in first.runs:  # the study's run folders, as the spec without [executor] left them
        Path(run.config.out).mkdir(parents=True)
        (Path(run.config.out) / "config.json").write_text(json.dumps(run.config.to_dict()))
    check_existing(second)


@needs_submitit
def test_a_run_job_pickles_and_requeues_itself(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    job = RunJob(load_study(spec, tmp_path / "study"), "fgsm_rs-seed1")
    assert pickle.loads(pickle.dumps(job)) == job
    assert job.checkpoint().function is job  # submitit requeues the same job: the run directory resumes


def test_a_failed_jobs_error_is_the_last_line_of_its_trace():
    class FailedJobError(RuntimeError):
        pass

    trace = "Traceback (most recent call last):\n  File 'x.py', line 1\nValueError: boom\n"
    error = FailedJobError(f"Job (task=0) failed during processing with trace:\n{'-' * 22}\n{trace}\n{'-' * 22}\n"
                           f"You can check full logs with 'job.stderr(0)'")
    assert _error_line(error) == "ValueError: boom"
    assert _error_line(RuntimeError("first\nsecond")) == "first"


BAD = {
    "unknown kind": ('[executor]\nkind = "slurmm"\n', [],
                     "[executor] kind (--executor) must be one of inprocess, local, slurm, got 'slurmm' (did you mean "
                     "'slurm'?)"),
    "unknown key": ('[executor]\npartion = "gpu"\n', [], "[executor]: unknown key 'partion' (did you mean "
                                                       "'partition'?)"),
    "zero jobs in the spec": ("[executor]\nmax_parallel = 0\n", [], "max_parallel (--jobs) must be an integer >= 1"),
    "time as text": ('[executor]\ntimeout_min = "4h"\n', [], "timeout_min (--time) must be an integer >= 1"),
    "negative jobs": ("", ["--jobs", "-2"], "max_parallel (--jobs) must be an integer >= 1, got -2"),
    "negative gpus": ("", ["--gpus", "-1"], "gpus_per_node (--gpus) must be an integer >= 0, got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_executor_settings_are_one_line_exit_2_and_write_nothing(case, tmp_path, capsys):
    text, flags, message = BAD[case]
    spec, out = tmp_path / "spec.toml", tmp_path / "study"
    spec.write_text(TINY + text)
    assert main(["study", str(spec), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_an_unknown_executor_flag_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["study", str(SMOKE), "--out", str(tmp_path / "study"), "--executor", "cloud"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'cloud'" in err, err
    assert not (tmp_path / "study").exists()


def test_a_missing_submitit_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    spec, out = tmp_path / "spec.toml", tmp_path / "study"
    spec.write_text(TINY)
    assert main(["study", str(spec), "--out", str(out), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'backsmooth[cluster]'" in err, err
    assert not out.exists()


@needs_submitit
def test_without_srun_the_slurm_executor_is_one_line(tmp_path, capsys, monkeypatch):
    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun on it
    spec, out = tmp_path / "spec.toml", tmp_path / "study"
    spec.write_text(TINY)
    assert main(["study", str(spec), "--out", str(out), "--executor", "slurm", "--partition", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--executor slurm" in err and "srun" in err, err
    assert not (out / "spec.toml").exists()
