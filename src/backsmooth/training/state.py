"""The training state, written and read in one place: the loop's position and bookkeeping (`TrainState`), the
checkpoint that makes a run resumable bitwise (`capture` / `restore` of the Parts: weights, optimiser,
scaler, every rank's generator and BatchNorm buffers, method state, weight average, RNG states), the
rollback snapshot of the collapse guard, and the stop signals."""

import copy
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from backsmooth import checkpoint
from backsmooth import distributed as dist
from backsmooth.errors import CheckpointError, ConfigError
from backsmooth.runtime import Runtime
from backsmooth.training.guard import GuardState
from backsmooth.training.setup import Parts

Snapshot = dict[str, Any]
"""A copy of the training state at one optimiser step (weights and buffers, optimiser, weight average, method
state, "step"): what --on-collapse rollback restores, and the pre-collapse model a stopped run keeps."""


@dataclasses.dataclass
class TrainState:
    """Loop position and bookkeeping; with the Parts' states it makes a run resumable."""

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
    good: Snapshot | None = None  # --on-collapse rollback / stop: the state at the guard's best check


def capture(parts: Parts, state: TrainState, runtime: Runtime) -> dict[str, Any] | None:
    """Everything the run depends on, as checkpoint.pt holds it (None on ranks other than 0). Collective under
    torchrun: generator states, per-rank method states and BatchNorm buffers come from every rank."""
    proc = runtime.proc
    if parts.average is not None:
        parts.average.synchronise()
    generators = dist.gather_objects(parts.generator.get_state(), proc)
    # a method's state is either the same on every rank (kept once) or each rank's own (gathered)
    method_state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in parts.method.state.items()}
    method_states = [method_state] if parts.method.shared_state else dist.gather_objects(method_state, proc)
    # BatchNorm running statistics drift apart between DDP's buffer broadcasts, and the next
    # attack reads them: keep every rank's own copy so a resumed run continues identically
    buffers = dist.gather_objects({k: v.cpu() for k, v in parts.net.named_buffers()}, proc)
    if not proc.is_main:
        return None
    train_state = dataclasses.asdict(dataclasses.replace(state, good=None))
    saved = {
        "model": parts.net.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "generators": generators,
        "rank_buffers": buffers,
        "method_states": method_states,
        "average": parts.average.state_dict() if parts.average is not None else None,
        "good": state.good,
        "torch_rng": torch.get_rng_state(),
        "train_state": train_state,
    }
    if runtime.device.type == "cuda":
        saved["cuda_rng"] = torch.cuda.get_rng_state(runtime.device)
    return saved


def restore(paths: list[Path], parts: Parts, runtime: Runtime) -> TrainState:
    """Load the newest checkpoint of `paths` that reads cleanly into the parts (falling back to the previous one)
    and return its TrainState."""
    errors = []
    for path in paths:
        try:
            state = _restore_from(path, parts, runtime)
        except (CheckpointError, KeyError, TypeError) as exc:
            errors.append(str(exc))
            continue
        if errors:
            print(f"warning: {errors[0]}; resumed from {path}", file=sys.stderr)
        return state
    raise CheckpointError(f"no usable checkpoint in {paths[0].parent if paths else 'the run directory'}: "
                          f"{'; '.join(errors)}")


def _restore_from(path: Path, parts: Parts, runtime: Runtime) -> TrainState:
    proc, device = runtime.proc, runtime.device
    saved = checkpoint.load(path, map_location=device)
    generators = saved["generators"]
    if len(generators) != proc.world_size:
        raise ConfigError(f"{path} was written by {len(generators)} processes, this run has "
                          f"{proc.world_size}; resume with the same number of processes")
    checkpoint.load_state_into(parts.net, saved["model"], str(path))
    with torch.no_grad():
        for name, buffer in parts.net.named_buffers():
            buffer.copy_(saved["rank_buffers"][proc.rank][name])
    states = saved.get("method_states", [{}])
    mine = states[0] if parts.method.shared_state else states[proc.rank]
    parts.method.state.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in mine.items()})
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scaler.load_state_dict(saved["scaler"])
    parts.generator.set_state(generators[proc.rank].cpu())
    torch.set_rng_state(saved["torch_rng"].cpu())
    if "cuda_rng" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
    state = TrainState(**(saved["train_state"] | {"good": saved.get("good")}))
    state.guard = GuardState(**state.guard)
    if state.guard.alpha is not None:  # lowered by a rollback
        parts.method.set_step_size(state.guard.alpha)
    if parts.average is not None:
        parts.average.load_state_dict(saved["average"])
    return state


def snapshot(parts: Parts, step: int) -> Snapshot:
    """A copy of the training state at optimiser step `step` (see `Snapshot`)."""
    average = parts.average.state_dict() if parts.average is not None else None
    return copy.deepcopy({"model": parts.net.state_dict(), "optimizer": parts.optimizer.state_dict(),
                          "average": average, "method_state": dict(parts.method.state), "step": step})


def roll_back(good: Snapshot, parts: Parts) -> None:
    """Put a snapshot back (copies, so it stays usable for a later rollback)."""
    good = copy.deepcopy(good)
    parts.net.load_state_dict(good["model"])
    parts.optimizer.load_state_dict(good["optimizer"])
    if parts.average is not None:
        parts.average.load_state_dict(good["average"])
    parts.method.state.clear()
    parts.method.state.update(good["method_state"])


def snapshot_weights(good: Snapshot) -> dict[str, torch.Tensor]:
    """The weights a snapshot holds for evaluation (the average's when one is kept, as last.pt does)."""
    return good["average"]["module"] if good["average"] is not None else good["model"]


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
