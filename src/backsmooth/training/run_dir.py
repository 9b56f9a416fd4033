"""A run directory and everything written into it, by one process at a time.

Files: config.json, metrics.jsonl (one line per epoch), checkpoint.pt (everything needed to resume
exactly; checkpoint.prev.pt is the one before), last.pt and best.pt (model weights and metadata,
loadable with `torch.load(path, weights_only=True)`), summary.json (final test results),
.lock, which the training process holds (an OS file lock, so a killed process releases it), and with
--tensorboard alone the TensorBoard events in tensorboard/ (tensorboard.py writes them). Nothing else writes
into a run directory while it trains.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any

from backsmooth import checkpoint
from backsmooth.atomic import atomic_write_json
from backsmooth.config import RunConfig, from_mapping
from backsmooth.errors import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt", "last.pt", "best.pt",
             "summary.json")
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")  # newest first
RESUME_IGNORED = ("out", "device", "log_every", "tensorboard")  # may change between a run and its resume


class DirectoryLock:
    """An OS lock on DIR/.lock held until released or the process ends (a killed process releases it), naming
    its holder; a second process is refused in one line. Run directories and study folders both use it.

    A POSIX record lock (lockf), not flock: forked children such as the stream loader's decoding workers do not
    inherit it, so the workers of a killed run, which outlive it by a few seconds, do not keep its folder locked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock (the folder must exist); refuse (one line) if another process holds it."""
        if fcntl is None or self._handle is not None:
            return
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"{self.path} is in use by {holder}; wait for it to finish or stop it "
                              f"(a killed process releases the lock), or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class RunDirectory:
    """The files of one run: checks before anything is written, the lock, and every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = DirectoryLock(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ before writing

    def check(self, config: RunConfig, resume: bool, overwrite: bool) -> tuple[bool, list[str]]:
        """Read-only: (a resumable checkpoint is present?, run files to delete before starting).

        Nothing is deleted unless `overwrite`; a resumed run must have the same configuration.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a directory; choose another --out")
        existing = [name for name in RUN_FILES if self.file(name).exists()]
        if resume:
            self._check_same_config(config)
            return any(self.file(n).exists() for n in CHECKPOINTS), []
        if existing and not overwrite:
            raise ConfigError(f"run directory {self.path} already holds a run ({existing[0]}); "
                              f"add --resume to continue it, --overwrite to replace it, or choose another --out")
        return False, existing

    def _check_same_config(self, config: RunConfig) -> None:
        saved = self.file("config.json")
        if not saved.exists():
            return
        try:
            old = from_mapping(json.loads(saved.read_text())).to_dict()
        except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, AttributeError):
            raise ConfigError(f"{saved} is not a valid config.json; cannot check that --resume uses the same "
                              f"settings (use a new --out)") from None
        new = config.to_dict()
        changed = [k for k in new if k not in RESUME_IGNORED and old.get(k) != new[k]]
        if changed:
            k = changed[0]
            raise ConfigError(f"--resume with a different {k} ({old.get(k)!r} in {saved}, now {new[k]!r}); "
                              f"use the run's original settings or a new --out")

    def lock(self) -> None:
        """Hold the directory's lock (see DirectoryLock); only an existing directory is locked here, `create`
        locks a new one, so a run refused before it starts leaves nothing behind."""
        if self.path.is_dir():
            self._lock.acquire()

    def create(self, stale: list[str]) -> None:
        """Make the directory, lock it, and delete the run files an --overwrite replaces."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        for name in stale:
            self.file(name).unlink()

    def release(self) -> None:
        """Give the lock back (the process ending does the same)."""
        self._lock.release()

    # ------------------------------------------------------------------ writing

    def write_config(self, config: RunConfig) -> None:
        atomic_write_json(self.file("config.json"), config.to_dict())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """checkpoint.pt, keeping the one before as checkpoint.prev.pt."""
        current = self.file("checkpoint.pt")
        if current.exists():
            current.replace(self.file("checkpoint.prev.pt"))
        checkpoint.save(current, state)

    def checkpoints(self) -> list[Path]:
        """The checkpoints to resume from, newest first."""
        return [self.file(n) for n in CHECKPOINTS if self.file(n).exists()]

    def save_model(self, weights: dict[str, Any], meta: dict[str, Any], best: bool) -> None:
        """last.pt, and best.pt as a copy of it when this epoch is the best so far."""
        checkpoint.save(self.file("last.pt"), {"model": weights, "meta": meta})
        if best:
            shutil.copyfile(self.file("last.pt"), self.file(".best.pt.tmp"))
            self.file(".best.pt.tmp").replace(self.file("best.pt"))

    def save_pre_collapse(self, weights: dict[str, Any], meta: dict[str, Any], good_weights: dict[str, Any] | None,
                          good_step: int) -> None:
        """A run the guard stopped in its first epoch (no best.pt yet): last.pt is the collapsed model, best.pt
        the model of the guard's best check (its meta names the step); with no check before the stop that lacked
        the signature (`good_weights` None), best.pt is the collapsed model too, at the stopping step."""
        if self.file("best.pt").exists():
            return
        self.save_model(weights, meta, best=False)
        checkpoint.save(self.file("best.pt"), {"model": weights if good_weights is None else good_weights,
                                               "meta": dict(meta, step=good_step)})

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        checkpoint.write_jsonl(self.file("metrics.jsonl"), rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.file("summary.json"), summary)
