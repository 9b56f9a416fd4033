"""A run's checkpoint: what makes training resumable bitwise (weights, optimiser, scaler, every rank's
generator and BatchNorm buffers, method state, weight average, the collapse guard's copy, RNG states and
the loop's own state), written and read for the Trainer. Kept apart so train.py reads top-down."""

import dataclasses
import sys
from typing import Any

import torch

from backsmooth import checkpoint
from backsmooth import distributed as dist
from backsmooth.errors import CheckpointError, ConfigError
from backsmooth.guard import GuardState
from backsmooth.loop_state import TrainState


def save_training_state(self: Any) -> None:
    """checkpoint.pt of a Trainer `self`: everything the run depends on; collective under DDP (generator states
    come from every rank)."""
    self.guard.flush()
    if self.average is not None:
        self.average.synchronise()
    generators = dist.gather_objects(self.generator.get_state(), self.proc)
    # a method's state is either the same on every rank (kept once) or each rank's own (gathered)
    method_state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.method.state.items()}
    method_states = [method_state] if self.method.shared_state else dist.gather_objects(method_state, self.proc)
    # BatchNorm running statistics drift apart between DDP's buffer broadcasts, and the next
    # attack reads them: keep every rank's own copy so a resumed run continues identically
    buffers = dist.gather_objects({k: v.cpu() for k, v in self.net.named_buffers()}, self.proc)
    if not self.proc.is_main:
        return
    state = {
        "model": self.net.state_dict(),
        "optimizer": self.optimizer.state_dict(),
        "scaler": self.scaler.state_dict(),
        "generators": generators,
        "rank_buffers": buffers,
        "method_states": method_states,
        "average": self.average.state_dict() if self.average is not None else None,
        "good": self.good,
        "torch_rng": torch.get_rng_state(),
        "train_state": dataclasses.asdict(self.state),
    }
    if self.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
    self.run_dir.save_checkpoint(state)

def restore_training_state(self: Any) -> None:
    """Load the newest checkpoint of a Trainer `self` that reads cleanly; fall back to the previous one."""
    errors = []
    for path in self.run_dir.checkpoints():
        try:
            saved = checkpoint.load(path, map_location=self.device)
            generators = saved["generators"]
            if len(generators) != self.proc.world_size:
                raise ConfigError(f"{path} was written by {len(generators)} processes, this run has "
                                  f"{self.proc.world_size}; resume with the same number of processes")
            checkpoint.load_state_into(self.net, saved["model"], str(path))
            with torch.no_grad():
                for name, buffer in self.net.named_buffers():
                    buffer.copy_(saved["rank_buffers"][self.proc.rank][name])
            states = saved.get("method_states", [{}])
            mine = states[0] if self.method.shared_state else states[self.proc.rank]
            self.method.state.update({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in mine.items()})
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scaler.load_state_dict(saved["scaler"])
            self.generator.set_state(generators[self.proc.rank].cpu())
            torch.set_rng_state(saved["torch_rng"].cpu())
            if "cuda_rng" in saved and self.device.type == "cuda":
                torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), self.device)
            self.state = TrainState(**saved["train_state"])
            self.state.guard = GuardState(**self.state.guard)
            self.good = saved.get("good")
            if self.state.guard.alpha is not None:  # lowered by a rollback
                self.method.set_step_size(self.state.guard.alpha)
            if self.average is not None:
                self.average.load_state_dict(saved["average"])
        except (CheckpointError, KeyError, TypeError) as exc:
            errors.append(str(exc))
            continue
        if errors:
            print(f"warning: {errors[0]}; resumed from {path}", file=sys.stderr)
        if self.proc.is_main:
            self.run_dir.write_metrics(self.state.metrics)
        return
    raise CheckpointError(f"no usable checkpoint in {self.run_dir.path}: {'; '.join(errors)}")
