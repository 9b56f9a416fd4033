"""The training loop's own state: position and bookkeeping (checkpointed), the stop signals, and the
collapse stop. Kept apart so the trainer reads top-down."""

import dataclasses
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from backsmooth.guard import GuardState


class Collapsed(Exception):
    """The collapse guard stopped the run (--on-collapse stop)."""


@dataclasses.dataclass
class TrainState:
    """Loop position and bookkeeping; with model, optimiser and RNG states it makes a run resumable."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    epoch_seconds: float = 0.0
    skipped_steps: int = 0
    best_val_robust: float = -1.0
    best_epoch: int = -1
    epoch_sums: dict[str, Any] = dataclasses.field(default_factory=dict)  # running sums of step statistics
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    guard: GuardState = dataclasses.field(default_factory=GuardState)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: requested.set())
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
