"""The training loop: `train(config)` builds the run's parts, restores its checkpoint, runs the epochs and
evaluates last and best.

Reads top-down: `Trainer.__init__` sets the run up (setup.py), `run` loops over epochs, `_train_epoch` over
steps with one timer bracket for what is not training (the guard's checks, logging, checkpoints),
`_end_epoch` validates and saves, `_finish` evaluates. The run directory (run_dir.py) owns every file; the
training state (state.py) is captured and restored in one place; the collapse guard and its policy live in
guard.py; with --tensorboard every metrics.jsonl row also goes to TensorBoard (tensorboard.py). Under
torchrun, rank 0 alone writes; every rank trains on its shard of each global batch.
"""

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm import tqdm

from backsmooth import checkpoint
from backsmooth import distributed as dist
from backsmooth.config import RunConfig, setting_warnings, validate
from backsmooth.errors import Interrupted, TrainingDiverged
from backsmooth.evaluation.accuracy import sharded_accuracy, stratified_subset
from backsmooth.methods import StepContext
from backsmooth.runtime import Stopwatch, device_name
from backsmooth.schedules import learning_rate, warmup_factor
from backsmooth.training.guard import CHECKS_PER_EPOCH, GUARD_START, CollapseGuard, response, warning
from backsmooth.training.run_dir import RunDirectory
from backsmooth.training.setup import build_parts, default_run_path, load_data, runtime_for, set_learning_rates
from backsmooth.training.state import (
    TrainState,
    capture,
    restore,
    roll_back,
    snapshot,
    snapshot_weights,
    stop_on_signals,
)
from backsmooth.training.step import training_step
from backsmooth.training.tensorboard import TensorBoardLog, event_folder

T = TypeVar("T")


class Collapsed(Exception):
    """The collapse guard stopped the run (--on-collapse stop)."""


class Trainer:
    """Owns one run: its runtime, data, parts, state and run directory."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool | None = None) -> None:
        self.config = config = validate(config)
        self.runtime = runtime_for(config)
        self.proc = self.runtime.proc
        self.run_dir = RunDirectory(default_run_path(config, self.runtime))
        config.out = str(self.run_dir.path)
        self.tensorboard_dir = event_folder(config.tensorboard, self.run_dir.path)  # None: off; refused here
        self.log = TensorBoardLog()  # the TensorBoard events, written while `run` runs
        has_checkpoint, stale = self.run_dir.check(config, resume, overwrite)
        if self.proc.is_main:
            self.run_dir.lock()  # an existing directory: refused now if another process trains in it
        try:
            self._set_up(has_checkpoint, stale, progress)
        except BaseException:
            self.run_dir.release()
            raise

    def _set_up(self, has_checkpoint: bool, stale: list[str], progress: bool | None) -> None:
        """Data and parts; the run directory; the checkpoint to resume; the collapse guard."""
        config = self.config
        dist.barrier(self.proc)  # every rank has checked before rank 0 changes anything
        self.progress = self.proc.is_main and (sys.stderr.isatty() if progress is None else progress)
        self.data = load_data(config, self.runtime)
        self.parts = build_parts(config, self.data, self.runtime)
        self.state = TrainState()
        self.compile_warmup_seconds = 0.0  # first step's time with --compile (excluded from training time)
        if self.proc.is_main:
            for line in setting_warnings(config):
                print(f"warning: {line}", file=sys.stderr, flush=True)
            self.run_dir.create(stale)
            if not has_checkpoint:
                self.run_dir.write_config(config)
        dist.barrier(self.proc)
        if has_checkpoint:
            self.state = restore(self.run_dir.checkpoints(), self.parts, self.runtime)
            if self.proc.is_main:
                self.run_dir.write_metrics(self.state.metrics)
        self.loader = self.parts.loader
        steps = len(self.loader)
        every = max(steps // CHECKS_PER_EPOCH, 10) if config.collapse_every == -1 else config.collapse_every
        every = every if self.parts.method.adversarial else 0  # natural training has no attack to overfit to
        self.guard = CollapseGuard(self.data.val.images, self.data.val.labels, config.eps, every,
                                     config.collapse_fraction, self.state.guard,
                                     start_step=max(steps // GUARD_START, 1),
                                     after_collapse=config.on_collapse == "warn",
                                     decides=self.parts.method.single_step_attack, norm=config.norm)
        if self.state.global_step == 0:
            self._time_guard(lambda: self.guard.reference_check(self.parts.net))

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate last and best on the test set."""
        collapse = self.state.guard.collapse
        stopped = collapse is not None and collapse.get("action") == "stop"
        # rank 0 opens the writer here, not in __init__, so that setting a run up writes nothing outside it
        self.log = TensorBoardLog(self.tensorboard_dir if self.proc.is_main else None, self.state.global_step + 1)
        with self.log, stop_on_signals() as stop_requested:
            while self.state.epoch < self.config.epochs and not stopped:
                try:
                    self._train_epoch(stop_requested)
                except Collapsed:
                    break
                self._end_epoch()
        return self._finish()

    def _train_epoch(self, stop_requested: threading.Event) -> None:
        config, progress = self.config, self.state
        total_steps = config.epochs * len(self.loader)
        if progress.step_in_epoch == 0:
            progress.epoch_sums, progress.epoch_seconds = {}, 0.0
        self.parts.net.train()
        bar = tqdm(total=len(self.loader), initial=progress.step_in_epoch, disable=not self.progress,
                   desc=f"epoch {progress.epoch + 1}/{config.epochs}", unit="step", leave=False)
        watch = Stopwatch(self.runtime.device)  # training time only: every other phase runs paused
        watch.start()
        for x, y, index in self.loader.indexed_epoch(progress.epoch, progress.step_in_epoch):
            lr = learning_rate(config.schedule, config.lr, progress.global_step, total_steps) * warmup_factor(
                progress.global_step, round(config.warmup_epochs * len(self.loader)))
            set_learning_rates(self.parts.optimizer, lr, progress.epoch, progress.step_in_epoch, config.freeze_epochs)
            self._step(x, y, self._context(index))
            if config.compile and not self.compile_warmup_seconds:
                # the first step compiles every graph a step uses: keep that out of the training time
                self.compile_warmup_seconds = watch.stop()
                watch.restart()
            progress.step_in_epoch += 1
            progress.global_step += 1
            bar.update()
            if self._between_steps_due(stop_requested):
                with watch.paused():
                    self._between_steps(stop_requested, watch, bar)
        bar.close()
        self._check_finite()
        progress.epoch_seconds += watch.stop()
        progress.train_seconds += progress.epoch_seconds

    def _between_steps_due(self, stop_requested: threading.Event) -> bool:
        """Whether this step is followed by a check, a log line, a checkpoint or a stop (the watch pauses only
        then: pausing synchronises the device)."""
        step, config = self.state.global_step, self.config
        return (self.guard.due(step) or step % config.log_every == 0
                or (bool(config.checkpoint_every) and step % config.checkpoint_every == 0)
                or (not self.proc.distributed and stop_requested.is_set()))

    def _between_steps(self, stop_requested: threading.Event, watch: Stopwatch, bar: tqdm) -> None:
        """The guard's check when due, the progress line, a mid-epoch checkpoint, and a requested stop."""
        config, progress = self.config, self.state
        step = progress.global_step
        if self.guard.due(step):
            self._check_collapse(progress.train_seconds + progress.epoch_seconds + watch.seconds, bar)
        # under DDP the stop decision is taken together, at log intervals, so ranks stay in step
        at_log = step % config.log_every == 0
        stop = stop_requested.is_set() if not self.proc.distributed else (
            at_log and dist.any_process(stop_requested.is_set(), self.proc, self.runtime.device))
        at_checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        if at_log or at_checkpoint or stop:
            self._check_finite()
            seconds = watch.seconds + progress.epoch_seconds
            bar.set_postfix(loss=f"{self._mean('loss'):.3f}",
                            img_s=f"{progress.step_in_epoch * config.batch_size / max(seconds, 1e-9):.0f}")
        if (at_checkpoint or stop) and progress.step_in_epoch < len(self.loader):
            progress.epoch_seconds += watch.seconds
            watch.seconds = 0.0
            self._save_checkpoint()
        if stop:
            bar.close()
            raise Interrupted(str(self.run_dir.path))

    def _context(self, index: Tensor) -> StepContext:
        """The method's view of the step: position, example indices, shard and the shared batch generator."""
        progress, size, device = self.state, self.config.batch_size, self.runtime.device
        seed = self.config.seed * 1_000_003 + progress.epoch * 100_003 + progress.step_in_epoch
        return StepContext(progress.epoch, self.config.epochs, progress.step_in_epoch,
                           index if self.parts.method.needs_index else None, (*self.loader.shard(size), size),
                           torch.Generator(device).manual_seed(seed))

    def _step(self, x: Tensor, y: Tensor, context: StepContext) -> None:
        stats = training_step(self.parts, x, y, self.runtime, context=context,
                              skip_nonfinite=self.config.on_nonfinite == "skip")
        self.guard.observe(stats)
        if stats is None:
            self.state.skipped_steps += 1
            return
        sums = self.state.epoch_sums
        for key, value in stats.items():
            sums[key] = sums.get(key, 0) + value
        sums["count"] = sums.get("count", 0) + 1

    # ------------------------------------------------------------------ the collapse guard

    def _check_collapse(self, train_seconds: float, bar: tqdm) -> None:
        """One guard check; keep the rollback point when it improved; respond to a collapse (guard.response)."""
        progress, proc = self.state, self.proc
        event = self._time_guard(lambda: self.guard.check(self.parts.net, progress.global_step, progress.epoch))
        self._record(dict(self.guard.last, event="guard", epoch=progress.epoch + 1,
                          step=progress.global_step, total_train_seconds=train_seconds,
                          epochs_done=progress.epoch + progress.step_in_epoch / len(self.loader)))
        # rank 0's guard decides the point to stop at or roll back to, so every rank keeps the same one
        if self.config.on_collapse != "warn" and dist.broadcast_object(self.guard.improved, proc):
            progress.good = snapshot(self.parts, progress.global_step)
        if dist.any_process(event is not None, proc, self.runtime.device):
            self._collapsed(bar)

    def _collapsed(self, bar: tqdm) -> None:
        """Record the collapse event and carry out the guard's response: stop (best.pt is from before), warn and
        go on, or roll back to the state of the guard's best check with a lower alpha."""
        progress, method = self.state, self.parts.method
        # under torchrun another rank may have seen it first (its guard batch statistics differ slightly)
        event = progress.guard.collapse = progress.guard.collapse or {
            "event": "collapse", "epoch": progress.epoch + 1, "step": progress.global_step}
        event.update({k: progress.metrics[-1][k] for k in ("epochs_done", "total_train_seconds")})  # the check's
        action = event["action"] = response(self.config.on_collapse, progress.good is not None,
                                                  len(progress.guard.rollbacks))
        if action == "rollback":
            event["alpha"] = method.alpha * self.config.rollback_factor
        self._record(dict(event))
        if self.proc.is_main:
            self.run_dir.write_metrics(progress.metrics)
            print(warning(event, method.alpha), file=sys.stderr, flush=True)
        if action == "rollback":
            roll_back(progress.good, self.parts)
            method.set_step_size(event["alpha"])
            self.guard.rolled_back(event["alpha"])
        elif action == "stop":
            bar.close()
            if self.proc.is_main:
                good = progress.good
                self.run_dir.save_pre_collapse(self._weights(), self._meta(0),
                                               None if good is None else snapshot_weights(good),
                                               progress.global_step if good is None else good["step"])
            raise Collapsed

    def _time_guard(self, work: Callable[[], T]) -> T:
        """Run guard work, adding its time to the guard's seconds (shown beside the training time, not in it)."""
        watch = Stopwatch(self.runtime.device)
        with watch.running():
            result = work()
        self.state.guard.seconds += watch.seconds
        return result

    # ------------------------------------------------------------------ epochs, checkpoints, the end

    def _end_epoch(self) -> None:
        config, progress = self.config, self.state
        epoch = progress.epoch
        eval_watch = Stopwatch(self.runtime.device)
        if self.parts.average is not None:
            self.parts.average.synchronise()  # one average on every process before it is evaluated and saved
        with eval_watch.running():
            val_clean, val_robust = self._accuracy(self.data.val.images, self.data.val.labels, config.val_pgd_steps)
        row = self._epoch_row(epoch, val_clean, val_robust, eval_watch.seconds)
        self._record(row)
        score = val_robust if val_robust == val_robust else val_clean  # NaN when no PGD / empty split
        improved = score > progress.best_val_robust or score != score  # no validation split: best.pt is the last
        if improved:
            progress.best_val_robust, progress.best_epoch = score, epoch + 1
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        if self.proc.is_main:
            self.run_dir.save_model(self._weights(), self._meta(epoch + 1), best=improved)
            self.run_dir.write_metrics(progress.metrics)
        self._save_checkpoint()
        if self.proc.is_main:
            print(f"epoch {epoch + 1}/{config.epochs}  loss {row.get('train_loss', float('nan')):.4f}  "
                  f"val clean {val_clean:.4f}  val pgd{config.val_pgd_steps} {val_robust:.4f}  "
                  f"train {progress.epoch_seconds:.1f}s  ({row['images_per_second']:.0f} img/s)  "
                  f"[{len(self.loader) - progress.skipped_steps} steps]", flush=True)

    def _epoch_row(self, epoch: int, val_clean: float, val_robust: float, eval_seconds: float) -> dict[str, Any]:
        """The epoch's metrics.jsonl row: time, validation, and the mean step statistics over every rank."""
        config, progress = self.config, self.state
        keys = sorted(k for k in progress.epoch_sums if k not in ("count", "nonfinite"))
        totals = torch.tensor([float(progress.epoch_sums.get("count", 0))]
                              + [float(progress.epoch_sums[k]) for k in keys],
                              dtype=torch.float64, device=self.runtime.device)
        totals = dist.all_reduce_sum(totals, self.proc).tolist()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": progress.global_step,
            "lr": self.parts.optimizer.param_groups[-1]["lr"],
            "train_seconds": progress.epoch_seconds,
            "total_train_seconds": progress.train_seconds,
            "images_per_second": len(self.loader) * config.batch_size / max(progress.epoch_seconds, 1e-9),
            "val_clean_acc": val_clean,
            f"val_pgd{config.val_pgd_steps}_acc": val_robust,
            "val_examples": len(self.data.val),
            "eval_seconds": eval_seconds,
            "skipped_steps": progress.skipped_steps,
            "guard_seconds": progress.guard.seconds,
        }
        if config.compile:
            row["compile_warmup_seconds"] = self.compile_warmup_seconds
        row.update({f"train_{k}": total / max(totals[0], 1) for k, total in zip(keys, totals[1:])})
        return row

    def _record(self, row: dict[str, Any]) -> None:
        """Append a row to metrics.jsonl (on disk at the next write_metrics) and write it to TensorBoard."""
        self.state.metrics.append(row)
        self.log.record(row)

    def _save_checkpoint(self) -> None:
        """checkpoint.pt (collective under torchrun); the TensorBoard events it holds are flushed before."""
        self.guard.flush()
        self.log.flush()
        saved = capture(self.parts, self.state, self.runtime)
        if saved is not None:
            self.run_dir.save_checkpoint(saved)

    def _weights(self) -> dict[str, Tensor]:
        return self.parts.eval_net.state_dict()

    def _meta(self, epoch: int) -> dict[str, Any]:
        """What last.pt and best.pt say about the model beside its weights."""
        config, data = self.config, self.data
        return dict(arch=config.arch, num_classes=data.num_classes, in_channels=data.image_shape[0],
                    image_shape=list(data.image_shape), dataset=config.dataset, method=config.method,
                    eps=config.eps, norm=config.norm, epoch=epoch, classes=list(data.classes))

    def _mean(self, key: str) -> float:
        sums = self.state.epoch_sums
        count = sums.get("count", 0)
        return float(sums[key]) / float(count) if key in sums and count else float("nan")

    def _check_finite(self) -> None:
        nonfinite = float(self.state.epoch_sums.get("nonfinite", 0))
        if dist.any_process(nonfinite > 0, self.proc, self.runtime.device):
            raise TrainingDiverged(
                f"loss became non-finite in epoch {self.state.epoch + 1} (before step {self.state.global_step}); "
                f"the last good checkpoint is kept in {self.run_dir.path}; lower --lr, use --precision fp32, "
                f"or pass --on-nonfinite skip")

    def _accuracy(self, images: Tensor, labels: Tensor, pgd_steps: int) -> tuple[float, float]:
        """Clean and PGD-`pgd_steps` accuracy (step eps/4, random start, fixed seed), sharded over ranks."""
        return sharded_accuracy(self.parts.eval_net, images, labels, self.config.eps, pgd_steps, self.runtime,
                                batch_size=self.config.eval_batch_size, seed=self.config.seed, norm=self.config.norm)

    def _finish(self) -> dict[str, Any]:
        """Clean and PGD-20 accuracy of the last and best models on a stratified test subset; summary.json."""
        config, test, guard_state = self.config, self.data.test, self.state.guard
        dist.barrier(self.proc)  # rank 0 has written last.pt and best.pt
        index = stratified_subset(test.labels, config.final_eval_examples, config.seed)
        chosen = test.subset(index)
        images, labels = chosen.images, chosen.labels
        results: dict[str, Any] = {"run_dir": str(self.run_dir.path), "method": config.method, "arch": config.arch,
                                   "dataset": config.dataset, "data_note": self.data.note, "eps": config.eps,
                                   "norm": config.norm,
                                   "epochs": config.epochs,
                                   "train_seconds": self.state.train_seconds, "best_epoch": self.state.best_epoch,
                                   "guard_seconds": guard_state.seconds,
                                   "test_examples": len(index), "test_size": len(test.labels),
                                   "device": device_name(self.runtime.device), "processes": self.proc.world_size,
                                   "weight_averaging": config.weight_averaging,  # the first collapse event:
                                   "collapse": (guard_state.rollbacks or [guard_state.collapse])[0],
                                   "rollbacks": len(guard_state.rollbacks)}
        for which in ("last", "best"):
            saved = checkpoint.load(self.run_dir.file(f"{which}.pt"), map_location=self.runtime.device)
            epoch, step = saved["meta"]["epoch"], saved["meta"].get("step")  # a step: from the collapse guard
            if which == "best" and (epoch, step) == (results["last"]["epoch"], results["last"].get("step")):
                results["best"] = results["last"]  # the same weights
                continue
            checkpoint.load_state_into(self.parts.eval_net, saved["model"], f"{which}.pt")
            clean, robust = self._accuracy(images, labels, 20) if len(index) else (float("nan"), float("nan"))
            results[which] = {"epoch": epoch, "clean_acc": clean, "pgd20_acc": robust} | (
                {"step": step} if step else {})
        if self.proc.is_main:
            self.run_dir.write_summary(results)
        return results


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train according to `config`; returns the summary (also written to RUN_DIR/summary.json). The process
    group of a torchrun launch stays up (the caller may train again; `distributed.shutdown` ends it)."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.run_dir.release()
