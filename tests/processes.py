"""Helpers of the kill-and-resume tests: start a training command and SIGKILL it at a known point."""

import signal
import subprocess
import time
from pathlib import Path


def kill_after_two_checkpoints(command: list[str], out: Path, env: dict[str, str]) -> None:
    """Run `command` (a `backsmooth train` writing to `out`) and SIGKILL it as soon as its second checkpoint exists
    (checkpoint.prev.pt: one checkpoint saved, and the state changed since); fail if it finished first."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.prev.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()
