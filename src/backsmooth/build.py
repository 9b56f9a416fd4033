"""Building a run from its config: the data splits, the model (compiled and DDP-wrapped as asked), the
training loader, and the sharded accuracy its validation uses. Separate functions so the trainer reads
top-down and tools can reuse them."""

import torch
from torch import Tensor, nn

from backsmooth import distributed as dist
from backsmooth import models
from backsmooth.accuracy import correct_under_attack
from backsmooth.attacks import pgd
from backsmooth.config import RunConfig
from backsmooth.data import DatasetSplits, DeviceLoader, dataset_kind, load_dataset
from backsmooth.errors import ConfigError


def default_val_size(config: RunConfig) -> int:
    """--val-size, else the dataset's own default."""
    return config.val_size if config.val_size is not None else dataset_kind(config.dataset).default_val_size


def load_data(config: RunConfig, proc: dist.ProcessInfo) -> DatasetSplits:
    """The dataset splits; under torchrun rank 0 reads (and downloads, and fills the cache) first."""
    if not proc.is_main:
        dist.barrier(proc)
    data = load_dataset(config.dataset, config.data_dir, val_size=default_val_size(config), seed=config.seed,
                        download=config.download and proc.is_main, cache_dir=config.cache_dir)
    if proc.is_main:
        dist.barrier(proc)
    return data


def build_model(config: RunConfig, data: DatasetSplits, proc: dist.ProcessInfo,
                device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the network, the module training calls): compiled and DDP-wrapped as the config asks."""
    torch.manual_seed(config.seed)
    net = models.build(config.arch, data.num_classes, in_channels=data.image_shape[0], mean=data.mean,
                       std=data.std).to(device)
    if config.sync_bn and proc.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model: nn.Module = torch.compile(net) if config.compile else net
    if proc.distributed:  # attacks run on the wrapped module: no gradient or buffer syncs
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return net, model


def build_loader(config: RunConfig, data: DatasetSplits, proc: dist.ProcessInfo, device: torch.device) -> DeviceLoader:
    """Shuffled, augmented training batches; each rank gets its shard of every global batch."""
    loader = DeviceLoader(data.train, config.batch_size, augment=data.augment, shuffle=True, drop_last=True,
                          seed=config.seed, device=device, rank=proc.rank, world_size=proc.world_size)
    if len(loader) == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the training set "
                          f"({len(data.train)} examples); lower --batch-size")
    return loader


def sharded_accuracy(model: nn.Module, images: Tensor, labels: Tensor, eps: float, pgd_steps: int,
                     proc: dist.ProcessInfo, device: torch.device, *, batch_size: int, precision: str,
                     seed: int) -> tuple[float, float]:
    """Clean and PGD-`pgd_steps` accuracy (step eps/4 as in `backsmooth eval`, random start, seeded by `seed`
    and rank) of `model`, each rank attacking its shard of the images; NaN for an empty set (robust: also when
    pgd_steps is 0)."""
    shard = slice(proc.rank, None, proc.world_size)
    images, labels = images[shard], labels[shard]
    clean = correct_under_attack(model, images, labels, batch_size=batch_size, precision=precision)
    robust = clean
    if pgd_steps:
        generator = torch.Generator(device).manual_seed(seed + proc.rank)
        attack = pgd(eps, eps / 4, pgd_steps, random_start=True)
        robust = clean & correct_under_attack(model, images, labels, attack, generator=generator,
                                              batch_size=batch_size, precision=precision)
    counts = torch.tensor([clean.sum().item(), robust.sum().item(), len(labels)], dtype=torch.float64, device=device)
    n_clean, n_robust, n = dist.all_reduce_sum(counts, proc).tolist()
    if n == 0:
        return float("nan"), float("nan")
    return n_clean / n, (n_robust / n if pgd_steps else float("nan"))
