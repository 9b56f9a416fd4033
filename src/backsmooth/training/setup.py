"""From a RunConfig to the typed parts of a run: its `Runtime`, its data splits, and its `Parts` (network,
the module training calls, method, optimiser, scaler, loader, attack generator, weight average)."""

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backsmooth import distributed as dist
from backsmooth import methods, models, schedules
from backsmooth.checkpoint import load_model, load_state_into
from backsmooth.config import RunConfig
from backsmooth.data import DatasetSplits, DeviceLoader, FileDataset, StreamLoader, dataset_kind, load_dataset
from backsmooth.errors import ConfigError
from backsmooth.methods import TrainingMethod
from backsmooth.models import backbones
from backsmooth.runtime import Runtime
from backsmooth.training.averaging import WeightAverage
from backsmooth.training.awp import WeightPerturbation


@dataclasses.dataclass
class Parts:
    """What a training step works on. `net` is the network whose weights train; `model` is what the method
    calls (net, compiled and DDP-wrapped as asked); `loader` is None where batches are fed by hand (bench)."""

    net: nn.Module
    model: nn.Module
    method: TrainingMethod
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    loader: DeviceLoader | StreamLoader | None = None
    average: WeightAverage | None = None
    awp: WeightPerturbation | None = None  # --awp: adversarial weight perturbation around the method's step

    @property
    def eval_net(self) -> nn.Module:
        """What validation, selection, the final evaluation and last.pt / best.pt use: the average when on."""
        return self.average.module if self.average is not None else self.net


def runtime_for(config: RunConfig) -> Runtime:
    """Join the torchrun group (if any) and check what the config asks of the device."""
    runtime = dist.runtime(config.device, config.precision, config.channels_last)
    if config.sync_bn and runtime.device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); drop it on CPU")
    if config.on_nonfinite == "skip" and runtime.proc.distributed:
        raise ConfigError("--on-nonfinite skip is not supported under torchrun (ranks would diverge); use stop")
    return runtime


DEFAULT_RUNS = "runs"  # where a run without --out goes (relative to the working directory)


def default_run_path(config: RunConfig, runtime: Runtime) -> Path:
    """--out, else runs/METHOD-DATASET-ARCH-TIME (rank 0's time on every rank)."""
    if config.out:
        return Path(config.out)
    name = f"{config.method}-{config.dataset}-{config.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(dist.broadcast_object(str(Path(DEFAULT_RUNS) / name), runtime.proc))


def default_val_size(config: RunConfig) -> int:
    """--val-size, else the dataset's own default."""
    return config.val_size if config.val_size is not None else dataset_kind(config.dataset).default_val_size


def load_data(config: RunConfig, runtime: Runtime) -> DatasetSplits:
    """The dataset splits; under torchrun rank 0 reads (and downloads, and fills the cache) first."""
    proc = runtime.proc
    if not proc.is_main:
        dist.barrier(proc)
    data = load_dataset(config.dataset, config.data_dir, val_size=default_val_size(config), seed=config.seed,
                        download=config.download and proc.is_main, cache_dir=config.cache_dir, loader=config.loader,
                        image_size=config.image_size, workers=config.decode_workers())
    if proc.is_main:
        dist.barrier(proc)
    return data


def build_parts(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> Parts:
    """The run's parts, in an order that fixes every random draw: model weights from the run seed, then the
    method's state, the loader's order, and the attack generator (which differs per rank)."""
    net, model = build_model(config, data, runtime)
    method = methods.build(config.method, **config.method_hyperparameters())
    method.setup(len(data.train), data.image_shape, runtime.device, config.seed)
    optimizer = torch.optim.SGD(parameter_groups(net, config), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.precision == "fp16")
    loader = build_loader(config, data, runtime)
    # attack noise differs per rank (Backward Smoothing's xi must not repeat across shards)
    generator = torch.Generator(runtime.device).manual_seed(config.seed + 1_000_003 * runtime.proc.rank)
    average = WeightAverage(net, config.weight_averaging) if config.weight_averaging else None
    awp = WeightPerturbation(net, config.awp, config.awp_warmup, runtime.proc) if config.awp else None
    return Parts(net, model, method, optimizer, scaler, generator, loader, average, awp)


def parameter_groups(net: nn.Module, config: RunConfig) -> list[dict[str, Any]]:
    """One group of every parameter; with --freeze-epochs, the classifier head's and the rest's (whose learning
    rate the trainer holds at 0 for those epochs), so the optimiser's state has the same layout throughout."""
    if not config.freeze_epochs:
        return [{"params": list(net.parameters()), "name": "all"}]
    head = {f"net.{key}" for key in backbones.head_names(net.net)}
    named = list(net.named_parameters())
    return [{"params": [p for n, p in named if n not in head], "name": "body"},
            {"params": [p for n, p in named if n in head], "name": "head"}]


def set_learning_rates(optimizer: torch.optim.Optimizer, lr: float, epoch: int, step_in_epoch: int,
                       freeze_epochs: int) -> None:
    """Every group at `lr`, but the body (see parameter_groups) at 0 before epoch `freeze_epochs`; as that epoch
    starts the body's momentum, gathered from gradients it did not follow, is cleared, so it starts as a frozen
    layer would (weight decay does not act at lr 0 either)."""
    for group in optimizer.param_groups:
        frozen = group.get("name") == "body" and epoch < freeze_epochs
        group["lr"] = 0.0 if frozen else lr
        if group.get("name") == "body" and epoch == freeze_epochs and step_in_epoch == 0:
            for parameter in group["params"]:
                optimizer.state.get(parameter, {}).pop("momentum_buffer", None)


def build_model(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> tuple[nn.Module, nn.Module]:
    """(the network, the module training calls): compiled and DDP-wrapped as the config asks."""
    torch.manual_seed(config.seed)
    net = models.build(config.arch, data.num_classes, in_channels=data.image_shape[0], mean=data.mean,
                       std=data.std).to(runtime.device)
    if config.init_from:
        start_from(net, config.init_from)
    if config.pretrained or config.weights:
        source = f"--weights {config.weights}" if config.weights else f"the pretrained {config.arch}"
        state = backbones.pretrained_state(config.arch, data.num_classes, data.image_shape[0], config.weights)
        fresh = backbones.load_backbone(net.net, state, source)
        if runtime.proc.is_main:
            print(f"started from {source}" + (f"; a new head ({', '.join(fresh)})" if fresh else ""), flush=True)
    if config.sync_bn and runtime.proc.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model: nn.Module = torch.compile(net) if config.compile else net
    if runtime.proc.distributed:  # attacks run on the wrapped module: no gradient or buffer syncs
        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return net, model


def start_from(net: nn.Module, source: str) -> None:
    """--init-from: the weights of a trained model (normalisation included), refused in one line when they do not
    fit this architecture and number of classes. A resumed run then restores its own checkpoint over them."""
    if not Path(source).exists():
        raise ConfigError(f"--init-from {source}: no such run directory, model file or exported folder")
    trained, _ = load_model(source)
    load_state_into(net, trained.state_dict(), f"--init-from {source}")


def build_loader(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> DeviceLoader | StreamLoader:
    """Shuffled, augmented training batches; each rank gets its shard of every global batch. A streamed dataset
    (FileDataset) gets worker processes that decode; one in memory stays on the device."""
    common = dict(augment=data.augment, shuffle=True, drop_last=True, seed=config.seed, device=runtime.device,
                  rank=runtime.proc.rank, world_size=runtime.proc.world_size, steps=config.steps_per_epoch)
    resize = schedules.parse_resize_schedule(config.resize_schedule)
    if resize and not isinstance(data.train, FileDataset):
        raise ConfigError("--resize-schedule resizes streamed images; this dataset is decoded in memory: add "
                          "--loader stream")
    loader = (StreamLoader(data.train, config.batch_size, workers=config.decode_workers(), resize=resize, **common)
              if isinstance(data.train, FileDataset) else DeviceLoader(data.train, config.batch_size, **common))
    if len(loader) == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the training set "
                          f"({len(data.train)} examples); lower --batch-size")
    return loader
