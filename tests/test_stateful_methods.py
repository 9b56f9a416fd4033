"""Methods with state (FGSM-PGI's per-example memory, ELLE-A's error statistics, Free-AT's carried
perturbation, LIET's label-informed perturbation, FGSM-RS-CS's epoch means of the benign loss), MART and TRADES
with adversarial weight perturbation (--awp): a SIGKILL at any moment and --resume give weights bitwise equal to an
uninterrupted run, and under torchrun (2 CPU processes, gloo) a run equals one process with the same global batch.

As in test_distributed.py, exact equality across process counts needs a batch-independent model
(small_cnn_gn: GroupNorm), since BatchNorm statistics are per process without SyncBatchNorm."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import kill_after_two_checkpoints

SRC = str(Path(__file__).resolve().parents[1] / "src")
STATEFUL = ("fgsm_pgi", "elle_a", "free_at", "liet")


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def train_args(method: str, out: Path, cache: Path, *extra: str) -> list[str]:
    options = {"fgsm_pgi": ["--reset", "1"], "free_at": ["--replay", "3"],  # resets inside the run
               "trades+awp": ["--awp", "0.005"]}.get(method, [])
    method = method.removesuffix("+awp")
    return ["-m", "backsmooth", "train", "--dataset", "synthetic", "--method", method, *options, "--epochs", "2",
            "--batch-size", "32", "--val-pgd-steps", "1", "--final-eval-examples", "50", "--device", "cpu",
            "--cache-dir", str(cache), "--out", str(out), "--no-progress", "--log-every", "2", *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("method", (*STATEFUL, "mart", "trades+awp", "fgsm_rs_cs"))
def test_sigkill_and_resume_is_bitwise_identical(method, tmp_path):
    cache = tmp_path / "cache"
    reference = run(train_args(method, tmp_path / "reference", cache, "--checkpoint-every", "3"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    # two checkpoints written: the method state has been saved and changed since
    kill_after_two_checkpoints([sys.executable, *train_args(method, out, cache, "--checkpoint-every", "3")], out, env())
    resumed = run(train_args(method, out, cache, "--checkpoint-every", "3", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "reference"), weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_compute_the_state_of_one(tmp_path):
    """The same global batches split over two processes leave the state one process computes: FGSM-PGI's
    memory (shared rows, the batch L1 norm) on every rank, ELLE-A's statistics on every rank (the error
    averaged over processes, its points drawn for the global batch), Free-AT's rows of the perturbation."""
    worker = str(Path(__file__).with_name("ddp_state_worker.py"))
    single = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], env=env(), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", worker,
                          str(tmp_path / "two.pt")], env=env(), capture_output=True, text=True, timeout=300)
    assert (tmp_path / "two.pt").exists(), two.stderr
    one, split = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in ("fgsm_pgi", "elle_a"):  # shared state: both ranks hold the single-process state
        for rank_state in split[name]:
            for key, value in one[name][0].items():
                if key in ("delta", "momentum"):  # a sign may flip where a gradient entry is ~0
                    close = torch.isclose(rank_state[key], value, rtol=1e-4, atol=1e-7)
                    assert close.float().mean() > 0.999, (name, key)
                else:
                    torch.testing.assert_close(rank_state[key], value, rtol=1e-5, atol=1e-9, msg=f"{name} {key}")
    assert int(one["elle_a"][0]["count"]) == 3 and int(one["fgsm_pgi"][0]["period"]) == 0
    rows = torch.cat([rank_state["delta"] for rank_state in split["free_at"]])  # each rank's batch rows, in order
    assert torch.isclose(rows, one["free_at"][0]["delta"], rtol=1e-4, atol=1e-7).float().mean() > 0.999
    assert rows.abs().max() > 0  # the perturbation moved
    # FGSM-RS-CS: the benign loss is summed over the processes, so both hold the same sums, over the global batch
    # (its random starts come from each rank's own generator, so the sums are not the single process's)
    first, second = split["fgsm_rs_cs"]
    assert torch.equal(first["sum"], second["sum"]) and float(first["sum"]) > 0
    assert float(first["count"]) == float(one["fgsm_rs_cs"][0]["count"]) == 48
