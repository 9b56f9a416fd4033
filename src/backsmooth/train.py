"""The training loop: optimiser, schedule, precision, checkpoints, timing and metrics.

Run directory: config.json, metrics.jsonl (one line per epoch), checkpoint.pt (everything needed
to resume exactly; checkpoint.prev.pt is the one before), last.pt and best.pt (model weights and
metadata, loadable with `torch.load(path, weights_only=True)`), summary.json (final test results).
"""

import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from backsmooth import checkpoint, methods, models
from backsmooth.config import RunConfig, validate
from backsmooth.data import DatasetSplits, DeviceLoader, load_dataset
from backsmooth.errors import BacksmoothError, CheckpointError, ConfigError
from backsmooth.evaluation import clean_and_pgd
from backsmooth.runtime import Stopwatch, autocast, resolve_device
from backsmooth.schedules import learning_rate

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt", "last.pt", "best.pt",
             "summary.json")
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; resume with --resume


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


class TrainingDiverged(BacksmoothError):
    """The loss became non-finite; the last good checkpoint is kept."""


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


def training_step(model: nn.Module, method: methods.TrainingMethod, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, x: Tensor, y: Tensor, generator: torch.Generator,
                  device: torch.device, precision: str = "fp32", channels_last: bool = False,
                  skip_nonfinite: bool = False) -> dict[str, Tensor] | None:
    """One optimisation step of `method`; returns detached statistics (None if skipped as non-finite).

    No host synchronisation unless `skip_nonfinite` (which must inspect the loss).
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stats: dict[str, Tensor] = {}
    with autocast(device, precision):
        loss = method(model, x, y, generator=generator, stats=stats)
    if skip_nonfinite and not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    stats["loss"] = loss.detach().float()
    stats["nonfinite"] = (~torch.isfinite(stats["loss"])).float()
    return stats


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.method}-{config.dataset}-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_val_size(config: RunConfig) -> int:
    if config.val_size is not None:
        return config.val_size
    return {"digits": 150, "synthetic": 50}.get(config.dataset, 1000)


def prepare_run_dir(run_dir: Path, config: RunConfig, resume: bool, overwrite: bool) -> bool:
    """Create or check the run directory; True when there is a checkpoint to resume from.

    Nothing is deleted unless `overwrite`; a resumed run must have the same configuration.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a directory; choose another --out")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        saved = run_dir / "config.json"
        if saved.exists():
            old = json.loads(saved.read_text())
            new = config.to_dict()
            changed = [k for k in new if k not in ("out", "device") and old.get(k) != new[k]]
            if changed:
                k = changed[0]
                raise ConfigError(f"--resume with a different {k} ({old.get(k)!r} in {saved}, now {new[k]!r}); "
                                  f"use the run's original settings or a new --out")
        return any((run_dir / n).exists() for n in ("checkpoint.pt", "checkpoint.prev.pt"))
    if existing and not overwrite:
        raise ConfigError(f"run directory {run_dir} already holds a run ({existing[0]}); "
                          f"add --resume to continue it, --overwrite to replace it, or choose another --out")
    if existing and overwrite:
        for name in existing:
            (run_dir / name).unlink()
    return False


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
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


class Trainer:
    """Owns one run: builds data, model and method from the config and runs the epochs."""

    def __init__(self, config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool | None = None) -> None:
        self.config = validate(config)
        self.run_dir = Path(config.out) if config.out else default_run_dir(config)
        self.config.out = str(self.run_dir)
        has_checkpoint = prepare_run_dir(self.run_dir, self.config, resume, overwrite)
        self.device = resolve_device(config.device)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.data: DatasetSplits = load_dataset(
            config.dataset, config.data_dir, val_size=default_val_size(config), seed=config.seed,
            download=config.download, cache_dir=config.cache_dir)
        torch.manual_seed(config.seed)
        channels = self.data.image_shape[0]
        self.net = models.build(config.arch, self.data.num_classes, in_channels=channels,
                                mean=self.data.mean, std=self.data.std).to(self.device)
        if config.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.model: nn.Module = torch.compile(self.net) if config.compile else self.net
        self.method = methods.build(config.method, **config.method_hyperparameters())
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.loader = DeviceLoader(self.data.train, config.batch_size, augment=self.data.augment, shuffle=True,
                                   drop_last=True, seed=config.seed, device=self.device)
        if len(self.loader) == 0:
            raise ConfigError(f"batch_size {config.batch_size} is larger than the training set "
                              f"({len(self.data.train)} examples); lower --batch-size")
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self.state = TrainState()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if has_checkpoint:
            self._restore()
        else:
            checkpoint.atomic_write_json(self.run_dir / "config.json", self.config.to_dict())

    # ------------------------------------------------------------------ checkpoints

    def _model_file(self, epoch: int) -> dict[str, Any]:
        meta = dict(arch=self.config.arch, num_classes=self.data.num_classes, in_channels=self.data.image_shape[0],
                    image_shape=list(self.data.image_shape), dataset=self.config.dataset, method=self.config.method,
                    eps=self.config.eps, epoch=epoch)
        return {"model": self.net.state_dict(), "meta": meta}

    def _save_checkpoint(self) -> None:
        state = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "train_state": dataclasses.asdict(self.state),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        current = self.run_dir / "checkpoint.pt"
        if current.exists():
            current.replace(self.run_dir / "checkpoint.prev.pt")
        checkpoint.save(current, state)

    def _restore(self) -> None:
        """Load the newest checkpoint that reads cleanly; fall back to the previous one."""
        errors = []
        for name in ("checkpoint.pt", "checkpoint.prev.pt"):
            path = self.run_dir / name
            if not path.exists():
                continue
            try:
                saved = checkpoint.load(path, map_location=self.device)
                checkpoint.load_state_into(self.net, saved["model"], str(path))
                self.optimizer.load_state_dict(saved["optimizer"])
                self.scaler.load_state_dict(saved["scaler"])
                self.generator.set_state(saved["generator"].cpu())
                torch.set_rng_state(saved["torch_rng"].cpu())
                if "cuda_rng" in saved and self.device.type == "cuda":
                    torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), self.device)
                self.state = TrainState(**saved["train_state"])
                if errors:
                    print(f"warning: {errors[0]}; resumed from {path}", file=sys.stderr)
                checkpoint.write_jsonl(self.run_dir / "metrics.jsonl", self.state.metrics)
                return
            except (CheckpointError, KeyError, TypeError) as exc:
                errors.append(str(exc))
        raise CheckpointError(f"no usable checkpoint in {self.run_dir}: {'; '.join(errors)}")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate last and best on the test set."""
        config, state = self.config, self.state
        total_steps = config.epochs * len(self.loader)
        watch = Stopwatch(self.device)
        with stop_on_signals() as stop_requested:
            while state.epoch < config.epochs:
                epoch = state.epoch
                if state.step_in_epoch == 0:
                    state.epoch_sums = {}
                    state.epoch_seconds = 0.0
                self.net.train()
                bar = tqdm(total=len(self.loader), initial=state.step_in_epoch, disable=not self.progress,
                           desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False)
                watch.seconds = 0.0
                watch.start()
                for x, y in self.loader.epoch(epoch, state.step_in_epoch):
                    lr = learning_rate(config.schedule, config.lr, state.global_step, total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self._step(x, y)
                    state.step_in_epoch += 1
                    state.global_step += 1
                    bar.update()
                    at_log = state.global_step % config.log_every == 0
                    at_checkpoint = config.checkpoint_every and state.global_step % config.checkpoint_every == 0
                    if at_log or at_checkpoint or stop_requested.is_set():
                        self._check_finite()
                        bar.set_postfix(loss=f"{self._mean('loss'):.3f}",
                                        img_s=f"{state.step_in_epoch * x.shape[0] / max(watch.stop() + state.epoch_seconds, 1e-9):.0f}")
                        watch.start()
                    if (at_checkpoint or stop_requested.is_set()) and state.step_in_epoch < len(self.loader):
                        self._pause(watch, self._save_checkpoint)
                    if stop_requested.is_set():
                        bar.close()
                        raise Interrupted(str(self.run_dir))
                bar.close()
                self._check_finite()
                state.epoch_seconds += watch.stop()
                state.train_seconds += state.epoch_seconds
                self._end_epoch(epoch)
        return self._finish()

    def _step(self, x: Tensor, y: Tensor) -> None:
        skip = self.config.on_nonfinite == "skip"
        stats = training_step(self.model, self.method, self.optimizer, self.scaler, x, y, self.generator,
                              self.device, self.config.precision, self.config.channels_last, skip_nonfinite=skip)
        if stats is None:
            self.state.skipped_steps += 1
            return
        sums = self.state.epoch_sums
        for key, value in stats.items():
            sums[key] = sums.get(key, 0) + value
        sums["count"] = sums.get("count", 0) + 1

    def _mean(self, key: str) -> float:
        count = self.state.epoch_sums.get("count", 0)
        return float(self.state.epoch_sums[key]) / float(count) if key in self.state.epoch_sums and count else float("nan")

    def _check_finite(self) -> None:
        if self.state.epoch_sums.get("nonfinite", 0) and float(self.state.epoch_sums["nonfinite"]) > 0:
            raise TrainingDiverged(
                f"loss became non-finite in epoch {self.state.epoch + 1} (before step {self.state.global_step}); "
                f"the last good checkpoint is kept in {self.run_dir}; lower --lr, use --precision fp32, "
                f"or pass --on-nonfinite skip")

    def _pause(self, watch: Stopwatch, action: Any) -> None:
        """Run `action` outside the training clock."""
        self.state.epoch_seconds += watch.stop()
        watch.seconds = 0.0
        action()
        watch.start()

    def _end_epoch(self, epoch: int) -> None:
        config, state = self.config, self.state
        eval_watch = Stopwatch(self.device)
        with eval_watch.running():
            val_clean, val_robust = clean_and_pgd(
                self.net, self.data.val.images, self.data.val.labels, config.eps, config.val_pgd_steps,
                batch_size=config.eval_batch_size, precision=config.precision, seed=config.seed)
        steps = int(self.state.epoch_sums.get("count", 0))
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": state.epoch_seconds,
            "total_train_seconds": state.train_seconds,
            "images_per_second": steps * config.batch_size / max(state.epoch_seconds, 1e-9),
            "val_clean_acc": val_clean,
            f"val_pgd{config.val_pgd_steps}_acc": val_robust,
            "val_examples": len(self.data.val),
            "eval_seconds": eval_watch.seconds,
            "skipped_steps": state.skipped_steps,
        }
        row.update({f"train_{k}": self._mean(k) for k in self.state.epoch_sums if k not in ("count", "nonfinite")})
        state.metrics.append(row)
        score = val_robust if val_robust == val_robust else val_clean  # NaN when no PGD / empty split
        improved = score > state.best_val_robust
        if improved:
            state.best_val_robust, state.best_epoch = score, epoch + 1
        state.epoch, state.step_in_epoch = epoch + 1, 0
        checkpoint.save(self.run_dir / "last.pt", self._model_file(epoch + 1))
        if improved:
            shutil.copyfile(self.run_dir / "last.pt", self.run_dir / ".best.pt.tmp")
            (self.run_dir / ".best.pt.tmp").replace(self.run_dir / "best.pt")
        checkpoint.write_jsonl(self.run_dir / "metrics.jsonl", state.metrics)
        self._save_checkpoint()
        print(f"epoch {epoch + 1}/{config.epochs}  loss {row.get('train_loss', float('nan')):.4f}  "
              f"val clean {val_clean:.4f}  val pgd{config.val_pgd_steps} {val_robust:.4f}  "
              f"train {state.epoch_seconds:.1f}s  ({row['images_per_second']:.0f} img/s)", flush=True)

    def _finish(self) -> dict[str, Any]:
        """Clean and PGD-20 test accuracy of the last and best models; writes summary.json."""
        config = self.config
        test = self.data.test
        results: dict[str, Any] = {"run_dir": str(self.run_dir), "method": config.method, "arch": config.arch,
                                   "dataset": config.dataset, "eps": config.eps, "epochs": config.epochs,
                                   "train_seconds": self.state.train_seconds, "best_epoch": self.state.best_epoch,
                                   "test_examples": len(test)}
        for which in ("last", "best"):
            saved = checkpoint.load(self.run_dir / f"{which}.pt", map_location=self.device)
            checkpoint.load_state_into(self.net, saved["model"], f"{which}.pt")
            clean, robust = clean_and_pgd(self.net, test.images, test.labels, config.eps, 20,
                                          batch_size=config.eval_batch_size, precision=config.precision,
                                          seed=config.seed)
            results[which] = {"epoch": saved["meta"]["epoch"], "clean_acc": clean, "pgd20_acc": robust}
        checkpoint.atomic_write_json(self.run_dir / "summary.json", results)
        return results


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train according to `config`; returns the summary (also written to RUN_DIR/summary.json)."""
    return Trainer(config, resume=resume, overwrite=overwrite, progress=progress).run()
