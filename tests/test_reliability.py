"""Interruption, exact resume, atomic files, safe loading and one-line errors for bad input."""

import hashlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backsmooth import atomic, checkpoint, cli
from backsmooth.errors import CheckpointError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def train_command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "backsmooth", "train", "--dataset", "synthetic", "--arch", "small_cnn",
            "--method", "backward_smoothing", "--epochs", "2", "--batch-size", "32", "--val-pgd-steps", "1",
            "--checkpoint-every", "3", "--final-eval-examples", "50", "--cache-dir", str(cache), "--out", str(out),
            "--no-progress", *extra]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("reference")
    result = run(train_command(base / "run", base / "cache"))
    assert result.returncode == 0, result.stderr
    return base / "run", base / "cache"


def _wait_for_new_checkpoint(out: Path, process: subprocess.Popen, after: float, timeout: float = 300) -> bool:
    """True once checkpoint.pt is newer than `after`; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "checkpoint.pt"
        if path.exists() and path.stat().st_mtime > after:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(reference_run, tmp_path):
    """Kill -9 at a random moment after each new checkpoint (so every attempt makes progress), resume."""
    reference, cache = reference_run
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    kills = 0
    for attempt in range(30):
        command = train_command(out, cache, *(["--resume"] if attempt else []))
        started = time.time()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 3 and _wait_for_new_checkpoint(out, process, started):
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside the next steps, a save, or an evaluation
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        process.wait(timeout=600)
        assert process.returncode == 0, process.stderr.read()
        break
    else:
        pytest.fail("training never finished")
    assert kills == 3, "the test must actually interrupt the run"
    assert_bitwise_equal(weights(out), weights(reference))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_75_and_resumes_identically(reference_run, tmp_path):
    reference, cache = reference_run
    out = tmp_path / "terminated"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    process = subprocess.Popen(train_command(out, cache), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:  # wait until training is under way
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    resumed = run(train_command(out, cache, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(weights(out), weights(reference))


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.slow
def test_one_writer_per_run_directory(reference_run, tmp_path):
    """A second --resume while the first trains is refused and touches nothing; after SIGKILL the lock is
    gone with the process, and the run resumes to the same weights as an uninterrupted one."""
    reference, cache = reference_run
    out = tmp_path / "locked"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    first = subprocess.Popen(train_command(out, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    assert _wait_for_new_checkpoint(out, first, 0.0), first.stderr.read()
    first.send_signal(signal.SIGSTOP)  # hold it mid-training while the second process tries
    try:
        before = _files(out)
        second = run(train_command(out, cache, "--resume"))
        assert second.returncode == 2, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "is in use by pid" in second.stderr
        assert f"pid {first.pid} " in second.stderr
        assert _files(out) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = run(train_command(out, cache, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(weights(out), weights(reference))


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing(reference_run, tmp_path):
    reference, cache = reference_run
    before = weights(reference)
    again = run(train_command(reference, cache, "--resume"))
    assert again.returncode == 0, again.stderr
    assert_bitwise_equal(weights(reference), before)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path):
    _, cache = reference_run
    out = tmp_path / "corrupt"
    first = run(train_command(out, cache, "--epochs", "1"))
    assert first.returncode == 0, first.stderr
    assert (out / "checkpoint.prev.pt").exists()
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated, as a crash mid-write would leave it
    resumed = run(train_command(out, cache, "--epochs", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "corrupt or truncated" in resumed.stderr


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    torch_path = tmp_path / "evil_torch.pt"
    torch.save({"model": _Exploit()}, torch_path)
    for candidate in (path, torch_path):
        with pytest.raises(CheckpointError, match="refusing|corrupt"):
            checkpoint.load(candidate)
    assert not (tmp_path / "PWNED").exists()
    assert cli.main(["eval", str(torch_path)]) == 2
    assert not (tmp_path / "PWNED").exists()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic.atomic_write_json(target, {"a": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic.atomic_write_json(target, {"a": 2})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_mismatched_architecture_is_reported_by_name(reference_run):
    reference, _ = reference_run
    from backsmooth import models

    with pytest.raises(CheckpointError, match="does not fit this architecture.*--arch"):
        checkpoint.load_state_into(models.build("resnet18", 10), weights(reference), "last.pt")
    with pytest.raises(CheckpointError, match="different number of classes"):
        checkpoint.load_state_into(models.build("small_cnn", 7), weights(reference), "last.pt")


# ----------------------------------------------------------------------------- bad input


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def workspace(tmp_path, reference_run):
    """A folder with an existing finished run, config files and data files to misuse."""
    reference, cache = reference_run
    existing = tmp_path / "existing"
    for p in reference.iterdir():
        (existing / p.name).parent.mkdir(parents=True, exist_ok=True)
        (existing / p.name).write_bytes(p.read_bytes())
    (tmp_path / "bad_key.toml").write_text("epochz = 3\n")
    (tmp_path / "bad_type.toml").write_text('batch_size = "many"\n')
    (tmp_path / "broken.toml").write_text("epochs = \n")
    (tmp_path / "config.ini").write_text("[x]\n")
    (tmp_path / "truncated.pt").write_bytes((reference / "last.pt").read_bytes()[:1000])
    (tmp_path / "mnist").mkdir()
    import numpy as np

    np.savez(tmp_path / "mnist" / "mnist_train.npz", x=np.zeros((10, 28, 28), np.float32), y=np.zeros(10, np.int64))
    np.savez(tmp_path / "mnist" / "mnist_test.npz", x=np.zeros((10, 28, 28), np.uint8), y=np.zeros(10, np.int64))
    (tmp_path / "labels").mkdir()
    np.savez(tmp_path / "labels" / "mnist_train.npz", x=np.zeros((10, 28, 28), np.uint8), y=np.full(10, 12, np.int64))
    np.savez(tmp_path / "labels" / "mnist_test.npz", x=np.zeros((10, 28, 28), np.uint8), y=np.zeros(10, np.int64))
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    return tmp_path, cache


T = ["train", "--no-progress", "--epochs", "1"]
BAD_INPUTS = [
    (T + ["--eps", "0"], "eps must be in (0, 1]"),
    (T + ["--eps", "1.5"], "eps must be in (0, 1]"),
    (T + ["--eps", "eight"], "is not a finite number"),
    (T + ["--gamma", "0"], "gamma must be > 0"),
    (T + ["--method", "madry"], "unknown method 'madry'"),
    (T + ["--arch", "vgg19"], "unknown architecture 'vgg19'"),
    (T + ["--dataset", "imagenet1k"], "unknown dataset 'imagenet1k'"),
    (T + ["--dataset", "cifar10"], "needs --data-dir"),
    (T + ["--schedule", "linear"], "unknown schedule"),
    (T + ["--precision", "fp8"], "unknown precision"),
    (T + ["--epochs", "-1"], "epochs must be >= 1"),
    (T + ["--epochs", "1.5"], "must be an integer"),
    (T + ["--batch-size", "0"], "batch_size must be >= 1"),
    (T + ["--lr", "-1"], "lr must be > 0"),
    (T + ["--method", "trades", "--gamma", "1"], "--gamma does not apply to method trades"),
    (T + ["--method", "natural", "--steps", "3"], "--steps does not apply to method natural"),
    (T + ["--method", "pgd_at", "--steps", "0"], "steps must be an integer >= 1"),
    (T + ["--device", "tpu"], "device must be auto, cpu"),
    (T + ["--preset", "cifar10-resnet50-trades"], "unknown preset"),
    (T + ["--config", "{w}/missing.toml"], "not found"),
    (T + ["--config", "{w}/bad_key.toml"], "unknown config key 'epochz'"),
    (T + ["--config", "{w}/bad_type.toml"], "batch_size must be an integer"),
    (T + ["--config", "{w}/broken.toml"], "cannot parse"),
    (T + ["--config", "{w}/config.ini"], "must end in .toml"),
    (T + ["--out", "{w}/existing"], "already holds a run"),
    (T + ["--out", "{w}/bad_key.toml"], "is a file, not a directory"),
    (T + ["--dataset", "mnist", "--data-dir", "{w}/nowhere"], "{w}/nowhere"),
    (T + ["--dataset", "mnist", "--data-dir", "{w}/mnist"], "uint8"),
    (T + ["--dataset", "mnist", "--data-dir", "{w}/labels"], "label"),
    (T + ["--dataset", "cifar10", "--data-dir", "{w}/cifar"], "cifar-10-python.tar.gz"),
    (T + ["--dataset", "synthetic", "--batch-size", "100000"], "batch"),
    (T + ["--sync-bn"], "--sync-bn needs CUDA"),
    (T + ["--bogus-flag"], "unrecognized arguments"),
    (["eval", "{w}/nowhere"], "not found"),
    (["eval", "{w}/truncated.pt"], "corrupt or truncated"),
    (["eval", "{w}/bad_key.toml"], "corrupt or truncated"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS,
                         ids=[" ".join(a[len(T):] if a[:1] == ["train"] else a) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(workspace, argv, message, capsys, monkeypatch):
    folder, cache = workspace
    monkeypatch.chdir(folder)
    monkeypatch.setenv("BACKSMOOTH_CACHE", str(cache))
    before = _snapshot(folder)
    argv = [a.replace("{w}", str(folder)) for a in argv]
    with pytest.raises(SystemExit) as exited:
        sys.exit(cli.main(argv))
    assert exited.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert message.replace("{w}", str(folder)) in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(folder) == before


# ----------------------------------------------------------------------------- numerical faults


def _poisoned_natural(bad_steps: set[int]):
    """A natural-training loss that turns NaN at the given (0-based) call numbers."""
    from backsmooth.methods import Natural

    calls = {"n": 0}

    class Poisoned(Natural):
        def __call__(self, model, x, y, generator=None, stats=None):
            loss = super().__call__(model, x, y, generator, stats)
            step, calls["n"] = calls["n"], calls["n"] + 1
            return loss * float("nan") if step in bad_steps else loss

    return Poisoned()


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from backsmooth import methods
    from backsmooth.config import from_mapping
    from backsmooth.errors import TrainingDiverged
    from backsmooth.training import train

    steps_per_epoch = 450 // 32
    monkeypatch.setattr(methods, "build", lambda name, **kw: _poisoned_natural({steps_per_epoch + 3}))
    config = from_mapping(dict(dataset="synthetic", method="natural", epochs=3, batch_size=32, val_pgd_steps=1,
                               final_eval_examples=0, log_every=5, out=str(tmp_path / "run"),
                               cache_dir=str(tmp_path / "cache")))
    with pytest.raises(TrainingDiverged, match="non-finite in epoch 2.*last good checkpoint"):
        train(config, progress=False)
    saved = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert saved["train_state"]["epoch"] == 1 and saved["train_state"]["step_in_epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, monkeypatch):
    from backsmooth import methods
    from backsmooth.config import from_mapping
    from backsmooth.training import train

    monkeypatch.setattr(methods, "build", lambda name, **kw: _poisoned_natural({2, 5}))
    config = from_mapping(dict(dataset="synthetic", method="natural", epochs=1, batch_size=32, val_pgd_steps=1,
                               final_eval_examples=0, on_nonfinite="skip", out=str(tmp_path / "run"),
                               cache_dir=str(tmp_path / "cache")))
    train(config, progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["skipped_steps"] == 2 and math.isfinite(row["train_loss"])
    weights = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
