"""The training loop: optimiser, schedule, precision, checkpoints, timing, metrics, and DDP.

`Trainer` reads top-down: build data, model, method, optimiser and loader; restore a checkpoint;
run the epochs; evaluate last and best. The run directory (run_dir.py) owns every file. Under
torchrun, rank 0 alone writes; every rank trains on its shard of each global batch.
"""

import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from backsmooth import checkpoint, methods
from backsmooth import distributed as dist
from backsmooth.accuracy import stratified_subset
from backsmooth.averaging import WeightAverage
from backsmooth.build import build_loader, build_model, load_data, sharded_accuracy
from backsmooth.config import RunConfig, validate
from backsmooth.errors import ConfigError, Interrupted, TrainingDiverged
from backsmooth.guard import GUARD_START, MAX_ROLLBACKS, CollapseGuard, restore, snapshot
from backsmooth.loop_state import Collapsed, TrainState, stop_on_signals
from backsmooth.methods import StepContext
from backsmooth.resume import restore_training_state, save_training_state
from backsmooth.run_dir import RunDirectory
from backsmooth.runtime import Stopwatch
from backsmooth.schedules import learning_rate
from backsmooth.step import training_step


class Trainer:
    """Owns one run: builds data, model and method from the config and runs the epochs."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool | None = None) -> None:
        self.config = validate(config)
        self.proc, self.device = dist.setup(config.device)
        if config.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); drop it on CPU")
        if config.on_nonfinite == "skip" and self.proc.distributed:
            raise ConfigError("--on-nonfinite skip is not supported under torchrun (ranks would diverge); use stop")
        default_dir = Path("runs") / f"{config.method}-{config.dataset}-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = RunDirectory(Path(config.out) if config.out else
                                    Path(dist.broadcast_object(str(default_dir), self.proc)))
        self.config.out = str(self.run_dir.path)
        has_checkpoint, stale = self.run_dir.check(self.config, resume, overwrite)
        if self.proc.is_main:
            self.run_dir.lock()  # an existing directory: refused now if another process trains in it
        try:
            self._build(has_checkpoint, stale, progress)
        except BaseException:
            self.run_dir.release()
            raise

    def _build(self, has_checkpoint: bool, stale: list[str], progress: bool | None) -> None:
        """Data, model, method, optimiser and loader; the run directory; the checkpoint to resume."""
        config = self.config
        dist.barrier(self.proc)  # every rank has checked before rank 0 changes anything
        self.progress = self.proc.is_main and (sys.stderr.isatty() if progress is None else progress)
        self.data = load_data(config, self.proc)
        self.net, self.model = build_model(config, self.data, self.proc, self.device)
        self.method = methods.build(config.method, **config.method_hyperparameters())
        self.method.setup(len(self.data.train), self.data.image_shape, self.device, config.seed)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.loader = build_loader(config, self.data, self.proc, self.device)
        # attack noise differs per rank (Backward Smoothing's xi must not repeat across shards)
        self.generator = torch.Generator(self.device).manual_seed(config.seed + 1_000_003 * self.proc.rank)
        self.state = TrainState()
        self.average = WeightAverage(self.net, config.weight_averaging) if config.weight_averaging else None
        self.compile_warmup_seconds = 0.0  # first step's time with --compile (excluded from training time)
        self.good: dict[str, Any] | None = None  # --on-collapse rollback: the state at the guard's best check
        if self.proc.is_main:
            self.run_dir.create(stale)
            if not has_checkpoint:
                self.run_dir.write_config(self.config)
        dist.barrier(self.proc)
        if has_checkpoint:
            restore_training_state(self)
        every = max(len(self.loader) // 20, 10) if config.collapse_every == -1 else config.collapse_every
        every = every if self.method.adversarial else 0  # natural training has no attack to overfit to
        self.guard = CollapseGuard(self.data.val.images, self.data.val.labels, config.eps, every,
                                   config.collapse_fraction, self.state.guard,
                                   start_step=max(len(self.loader) // GUARD_START, 1))

    @property
    def eval_net(self) -> nn.Module:
        """What validation, selection, the final evaluation and last.pt / best.pt use: the average when on."""
        return self.average.module if self.average is not None else self.net

    # ------------------------------------------------------------------ checkpoints

    def _model_file(self, epoch: int) -> dict[str, Any]:
        meta = dict(arch=self.config.arch, num_classes=self.data.num_classes, in_channels=self.data.image_shape[0],
                    image_shape=list(self.data.image_shape), dataset=self.config.dataset, method=self.config.method,
                    eps=self.config.eps, epoch=epoch)
        return {"model": self.eval_net.state_dict(), "meta": meta}

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate last and best on the test set."""
        stopped = self.state.guard.collapse is not None and self.state.guard.collapse.get("action") == "stop"
        with stop_on_signals() as stop_requested:
            while self.state.epoch < self.config.epochs and not stopped:
                try:
                    self._train_epoch(stop_requested)
                except Collapsed:
                    stopped = True
                    break
                self._end_epoch()
        return self._finish()

    def _train_epoch(self, stop_requested: threading.Event) -> None:
        config, state = self.config, self.state
        total_steps = config.epochs * len(self.loader)
        if state.step_in_epoch == 0:
            state.epoch_sums, state.epoch_seconds = {}, 0.0
        self.net.train()
        bar = tqdm(total=len(self.loader), initial=state.step_in_epoch, disable=not self.progress,
                   desc=f"epoch {state.epoch + 1}/{config.epochs}", unit="step", leave=False)
        watch = Stopwatch(self.device)
        watch.start()
        for x, y, index in self.loader.indexed_epoch(state.epoch, state.step_in_epoch):
            lr = learning_rate(config.schedule, config.lr, state.global_step, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._step(x, y, self._context(index))
            if self.config.compile and not self.compile_warmup_seconds:
                # the first step compiles every graph a step uses: keep that out of the training time
                self.compile_warmup_seconds = watch.stop()
                watch.seconds = 0.0
                watch.start()
            state.step_in_epoch += 1
            state.global_step += 1
            bar.update()
            if self.guard.due(state.global_step):
                seconds = state.train_seconds + state.epoch_seconds + watch.stop()  # the guard is not training time
                event = self.guard.check(self.net, state.global_step, state.epoch)
                state.metrics.append(dict(self.guard.last, event="guard", epoch=state.epoch + 1, step=state.global_step,
                                          epochs_done=state.epoch + state.step_in_epoch / len(self.loader),
                                          total_train_seconds=seconds))
                # rank 0's guard decides the point to stop at or roll back to, so every rank keeps the same one
                if self.config.on_collapse != "warn" and dist.broadcast_object(self.guard.improved, self.proc):
                    self.good = snapshot(self.net, self.optimizer, self.average, self.method, state.global_step)
                collapsed = dist.any_process(event is not None, self.proc, self.device)
                watch.start()
                if collapsed:
                    self._collapsed(bar)
            # under DDP the stop decision is taken together, at log intervals, so ranks stay in step
            stop = stop_requested.is_set() if not self.proc.distributed else (
                state.global_step % config.log_every == 0
                and dist.any_process(stop_requested.is_set(), self.proc, self.device))
            at_log = state.global_step % config.log_every == 0
            at_checkpoint = bool(config.checkpoint_every) and state.global_step % config.checkpoint_every == 0
            if at_log or at_checkpoint or stop:
                self._check_finite()
                seconds = watch.stop() + state.epoch_seconds
                bar.set_postfix(loss=f"{self._mean('loss'):.3f}",
                                img_s=f"{state.step_in_epoch * config.batch_size / max(seconds, 1e-9):.0f}")
                watch.start()
            if (at_checkpoint or stop) and state.step_in_epoch < len(self.loader):
                state.epoch_seconds += watch.stop()
                watch.seconds = 0.0
                save_training_state(self)
                watch.start()
            if stop:
                bar.close()
                raise Interrupted(str(self.run_dir.path))
        bar.close()
        self._check_finite()
        state.epoch_seconds += watch.stop()
        state.train_seconds += state.epoch_seconds

    def _context(self, index: Tensor) -> StepContext:
        """The method's view of the step: position, example indices, shard and the shared batch generator."""
        state, size = self.state, self.config.batch_size
        seed = self.config.seed * 1_000_003 + state.epoch * 100_003 + state.step_in_epoch
        return StepContext(state.epoch, self.config.epochs, state.step_in_epoch,
                           index if self.method.needs_index else None, (*self.loader.shard(size), size),
                           torch.Generator(self.device).manual_seed(seed))

    def _collapsed(self, bar: tqdm) -> None:
        """Record the collapse event, then stop the run (its best.pt is from before), go on (warn), or roll back
        to the state of the guard's best check with a lower alpha (rollback; it stops after MAX_ROLLBACKS)."""
        state, action = self.state, self.config.on_collapse
        # under torchrun another rank may have seen it first (its guard batch statistics differ slightly)
        event = state.guard.collapse = state.guard.collapse or {"event": "collapse", "epoch": state.epoch + 1,
                                                                "step": state.global_step}
        event.update({k: state.metrics[-1][k] for k in ("epochs_done", "total_train_seconds")})  # the check's
        if action == "rollback" and (self.good is None or len(state.guard.rollbacks) >= MAX_ROLLBACKS):
            action = "stop"  # nothing to roll back to, or the lower steps did not help either
        event["action"] = action
        if action == "rollback":
            event["alpha"] = self.method.alpha * self.config.rollback_factor
        self.state.metrics.append(dict(event))
        if self.proc.is_main:
            self.run_dir.write_metrics(self.state.metrics)
            then = {"stop": "stopping, best.pt is from before", "warn": "going on",
                    "rollback": f"rolling back to the best check, alpha {self.method.alpha:.4g} -> "
                                f"{event.get('alpha', 0):.4g}"}[action]
            print(f"warning: catastrophic overfitting at step {event.get('step')}: guard PGD-5 accuracy "
                  f"{event.get('guard_pgd_acc', float('nan')):.1%}, best {event.get('guard_best', float('nan')):.1%}, "
                  f"training accuracy on the method's own attacks {event.get('train_adv_acc', float('nan')):.1%}; "
                  f"{then}", file=sys.stderr, flush=True)
        if action == "rollback" and self.good is not None:
            restore(self.good, self.net, self.optimizer, self.average, self.method)
            self.method.set_step_size(event["alpha"])
            self.guard.rolled_back(event["alpha"])
        elif action == "stop":
            bar.close()
            if self.proc.is_main and self.good is not None and not self.run_dir.file("best.pt").exists():
                # stopped in the first epoch: last.pt is the collapsed model, best.pt the guard's best check
                self.run_dir.save_model(self._model_file(0), best=False)
                good = self.good["average"]["module"] if self.average is not None else self.good["model"]
                checkpoint.save(self.run_dir.file("best.pt"), {"model": good, "meta": dict(
                    self._model_file(0)["meta"], step=self.good["step"])})
            raise Collapsed

    def _step(self, x: Tensor, y: Tensor, context: StepContext) -> None:
        skip = self.config.on_nonfinite == "skip"
        stats = training_step(self.model, self.method, self.optimizer, self.scaler, x, y, self.generator,
                              self.device, self.config.precision, self.config.channels_last, skip_nonfinite=skip,
                              context=context, after_step=self.average and (lambda: self.average.update(self.net)))
        self.guard.observe(stats)
        if stats is None:
            self.state.skipped_steps += 1
            return
        sums = self.state.epoch_sums
        for key, value in stats.items():
            sums[key] = sums.get(key, 0) + value
        sums["count"] = sums.get("count", 0) + 1

    def _mean(self, key: str) -> float:
        sums = self.state.epoch_sums
        count = sums.get("count", 0)
        return float(sums[key]) / float(count) if key in sums and count else float("nan")

    def _check_finite(self) -> None:
        nonfinite = float(self.state.epoch_sums.get("nonfinite", 0))
        if dist.any_process(nonfinite > 0, self.proc, self.device):
            raise TrainingDiverged(
                f"loss became non-finite in epoch {self.state.epoch + 1} (before step {self.state.global_step}); "
                f"the last good checkpoint is kept in {self.run_dir.path}; lower --lr, use --precision fp32, "
                f"or pass --on-nonfinite skip")

    def _accuracy(self, images: Tensor, labels: Tensor, pgd_steps: int) -> tuple[float, float]:
        """Clean and PGD-`pgd_steps` accuracy (step eps/4, random start, fixed seed), sharded over ranks."""
        return sharded_accuracy(self.eval_net, images, labels, self.config.eps, pgd_steps, self.proc, self.device,
                                batch_size=self.config.eval_batch_size, precision=self.config.precision,
                                seed=self.config.seed)

    def _end_epoch(self) -> None:
        config, state = self.config, self.state
        epoch = state.epoch
        eval_watch = Stopwatch(self.device)
        if self.average is not None:
            self.average.synchronise()  # one average on every process before it is evaluated and saved
        with eval_watch.running():
            val_clean, val_robust = self._accuracy(self.data.val.images, self.data.val.labels, config.val_pgd_steps)
        keys = sorted(k for k in state.epoch_sums if k not in ("count", "nonfinite"))
        totals = torch.tensor([float(state.epoch_sums.get("count", 0))] + [float(state.epoch_sums[k]) for k in keys],
                              dtype=torch.float64, device=self.device)
        totals = dist.all_reduce_sum(totals, self.proc).tolist()
        steps = len(self.loader) - state.skipped_steps
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": state.epoch_seconds,
            "total_train_seconds": state.train_seconds,
            "images_per_second": len(self.loader) * config.batch_size / max(state.epoch_seconds, 1e-9),
            "val_clean_acc": val_clean,
            f"val_pgd{config.val_pgd_steps}_acc": val_robust,
            "val_examples": len(self.data.val),
            "eval_seconds": eval_watch.seconds,
            "skipped_steps": state.skipped_steps,
        }
        if config.compile:
            row["compile_warmup_seconds"] = self.compile_warmup_seconds
        row.update({f"train_{k}": total / max(totals[0], 1) for k, total in zip(keys, totals[1:])})
        state.metrics.append(row)
        score = val_robust if val_robust == val_robust else val_clean  # NaN when no PGD / empty split
        improved = score > state.best_val_robust
        if improved:
            state.best_val_robust, state.best_epoch = score, epoch + 1
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if self.proc.is_main:
            self.run_dir.save_model(self._model_file(epoch + 1), best=improved)
            self.run_dir.write_metrics(state.metrics)
        save_training_state(self)
        if self.proc.is_main:
            print(f"epoch {epoch + 1}/{config.epochs}  loss {row.get('train_loss', float('nan')):.4f}  "
                  f"val clean {val_clean:.4f}  val pgd{config.val_pgd_steps} {val_robust:.4f}  "
                  f"train {state.epoch_seconds:.1f}s  ({row['images_per_second']:.0f} img/s)  "
                  f"[{steps} steps]", flush=True)

    def _finish(self) -> dict[str, Any]:
        """Clean and PGD-20 accuracy of the last and best models on a stratified test subset; summary.json."""
        config, test, guard = self.config, self.data.test, self.state.guard
        dist.barrier(self.proc)  # rank 0 has written last.pt and best.pt
        index = stratified_subset(test.labels, config.final_eval_examples, config.seed)
        images, labels = test.images[index], test.labels[index]
        results: dict[str, Any] = {"run_dir": str(self.run_dir.path), "method": config.method, "arch": config.arch,
                                   "dataset": config.dataset, "data_note": self.data.note, "eps": config.eps,
                                   "epochs": config.epochs,
                                   "train_seconds": self.state.train_seconds, "best_epoch": self.state.best_epoch,
                                   "test_examples": len(index), "processes": self.proc.world_size,
                                   "weight_averaging": config.weight_averaging,  # the first collapse event:
                                   "collapse": (guard.rollbacks or [guard.collapse])[0],
                                   "rollbacks": len(guard.rollbacks)}
        for which in ("last", "best"):
            saved = checkpoint.load(self.run_dir.file(f"{which}.pt"), map_location=self.device)
            epoch, step = saved["meta"]["epoch"], saved["meta"].get("step")  # a step: from the collapse guard
            if which == "best" and (epoch, step) == (results["last"]["epoch"], results["last"].get("step")):
                results["best"] = results["last"]  # the same weights
                continue
            checkpoint.load_state_into(self.eval_net, saved["model"], f"{which}.pt")
            clean, robust = self._accuracy(images, labels, 20) if len(index) else (float("nan"), float("nan"))
            results[which] = {"epoch": epoch, "clean_acc": clean, "pgd20_acc": robust} | (
                {"step": step} if step else {})
        if self.proc.is_main:
            self.run_dir.write_summary(results)
        return results


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train according to `config`; returns the summary (also written to RUN_DIR/summary.json)."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite, progress=progress)
    try:
        summary = trainer.run()
    finally:
        trainer.run_dir.release()
    dist.shutdown(trainer.proc)
    return summary
