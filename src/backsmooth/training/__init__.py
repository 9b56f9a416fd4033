"""Training: `train(config)` and its parts. setup.py turns a RunConfig into a Runtime and typed Parts, step.py
is one optimisation step, trainer.py the loop, state.py the checkpointed state, guard.py the collapse guard
and its policy, run_dir.py the run directory and its lock, averaging.py the weight average, bench.py the
seconds per step of every method."""

from backsmooth.training.run_dir import DirectoryLock, RunDirectory
from backsmooth.training.setup import DEFAULT_RUNS, Parts, build_parts
from backsmooth.training.step import training_step
from backsmooth.training.trainer import Trainer, train

__all__ = ["DEFAULT_RUNS", "DirectoryLock", "Parts", "RunDirectory", "Trainer", "build_parts", "train", "training_step"]
