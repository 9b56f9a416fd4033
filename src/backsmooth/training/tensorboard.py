"""TensorBoard events of a run (--tensorboard [DIR]): every number of metrics.jsonl, as the trainer records it.

metrics.jsonl stays the source of truth: the trainer hands each row it appends to `TensorBoardLog.record`, which
writes the row's numbers as they are (nothing is computed twice), at the row's optimiser step. Tags:

- an epoch row: `val/KEY` for `val_KEY` (val/clean_acc, val/pgd20_acc, val/examples), `time/KEY` for the times
  (train_seconds, total_train_seconds, eval_seconds, guard_seconds, images_per_second), `train/KEY` for the rest
  (`train_loss` -> train/loss, train/lr, train/epoch, train/skipped_steps);
- an event row (`"event": E`: the collapse guard's checks, E = guard, and its collapse, E = collapse): `E/KEY` for
  each number, a leading `E_` dropped (guard/pgd_acc, guard/fgsm_acc, guard/p_keep, guard/signature as 0 or 1);
  an event other than a check also as text, the whole row (a collapse's action, a string, is only there).

`step` is the axis, strings are left out. Only rank 0 writes. The writer opens with purge_step = the resumed step
+ 1 (1 for a new run): TensorBoard hides what an earlier process logged after the checkpoint the run continues
from, which the run logs again, and what a replaced (--overwrite) run left in the folder. The log is flushed
before every checkpoint, so what a checkpoint holds is on disk as events too.
"""

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from backsmooth.errors import ConfigError

IN_RUN_DIR = "RUN_DIR"  # a first path component that stands for the run directory
DEFAULT = f"{IN_RUN_DIR}/tensorboard"  # the folder of --tensorboard without a value
CHECK_EVENT = "guard"  # the routine event, logged as numbers only


def event_folder(value: str | None, run_dir: Path) -> str | None:
    """The folder of --tensorboard VALUE (RUN_DIR/... inside the run directory), or None when off. Refuses an empty
    value, a file, or a missing tensorboard package in one line, before the run writes anything."""
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(f"--tensorboard needs a folder, or no value for {DEFAULT}")
    parts = Path(value).parts
    path = run_dir.joinpath(*parts[1:]) if parts[0] == IN_RUN_DIR else Path(value)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--tensorboard {path} is a file, not a folder; choose another")
    _writer_class()
    return str(path)


def _writer_class() -> type:
    """torch's SummaryWriter, imported only when asked for (the tensorboard package is an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(f"--tensorboard needs the tensorboard package ({error}): pip install tensorboard "
                          f"(or pip install 'backsmooth[tensorboard]')") from None
    return SummaryWriter


def tag(row: dict[str, Any], key: str) -> str:
    """The TensorBoard tag of `key` in a metrics.jsonl row (see the module docstring)."""
    group = row.get("event")
    if group is None:
        group = ("time" if key.endswith("_seconds") or key == "images_per_second"
                 else "val" if key.startswith("val_") else "train")
    return f"{group}/{key.removeprefix(f'{group}_')}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers by tag (booleans as 0 or 1); its step and strings are left out."""
    return {tag(row, k): float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardLog:
    """A SummaryWriter fed the rows of metrics.jsonl; does nothing without one (no --tensorboard, or not rank 0).
    A context manager: leaving it, at the end, on an error or an interrupt, closes the writer."""

    def __init__(self, folder: str | None = None, purge_step: int = 1) -> None:
        self._writer = None if folder is None else _writer_class()(log_dir=folder, purge_step=purge_step)

    def record(self, row: dict[str, Any]) -> None:
        """Write one metrics.jsonl row at its step."""
        if self._writer is None:
            return
        step = int(row["step"])
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, step)
        if row.get("event", CHECK_EVENT) != CHECK_EVENT:
            self._writer.add_text(row["event"], f"`{json.dumps(row, sort_keys=True)}`", step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
