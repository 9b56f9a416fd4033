"""`load_dataset`: read a dataset by name, hold out the validation split, attach its constants."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backsmooth.data.cache import DecodedCache, cache_root
from backsmooth.data.dataset import DatasetSplits, channel_stats, stratified_split
from backsmooth.data.download import ARCHIVES
from backsmooth.data.image_folders import read_folder, read_tiny_imagenet
from backsmooth.data.sources import Source, SourceOptions, read_cifar, read_digits, read_mnist, read_synthetic
from backsmooth.errors import DataError

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class DatasetKind:
    """How to read one dataset and what comes with it."""

    read: Callable[[SourceOptions], Source]
    augment: str  # the training augmentation that suits it (see loader.py)
    stats: Stats | None  # standard per-channel (mean, std); None: computed from the training images
    needs_files: bool = True


DATASETS: dict[str, DatasetKind] = {
    "digits": DatasetKind(read_digits, "none", None, needs_files=False),
    "mnist": DatasetKind(read_mnist, "none", ((0.1307,), (0.3081,))),
    "cifar10": DatasetKind(functools.partial(read_cifar, "cifar10"), "crop_flip",
                           ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))),
    "cifar100": DatasetKind(functools.partial(read_cifar, "cifar100"), "crop_flip",
                            ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "tiny_imagenet": DatasetKind(read_tiny_imagenet, "flip", ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))),
    "folder": DatasetKind(read_folder, "crop_flip", None),
    "synthetic": DatasetKind(read_synthetic, "none", None, needs_files=False),
}


def dataset_names() -> tuple[str, ...]:
    """The names `load_dataset` accepts."""
    return tuple(DATASETS)


def default_data_dir() -> Path:
    """Where datasets are looked for (and downloaded to) without --data-dir.

    $BACKSMOOTH_DATA, else ~/.cache/backsmooth/data.
    """
    return Path(os.environ.get("BACKSMOOTH_DATA") or Path.home() / ".cache" / "backsmooth" / "data").expanduser()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_size: int = 1000, seed: int = 0,
                 download: bool = False, cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """Read dataset `name` and hold out a stratified, seeded validation split of `val_size` training examples.

    `download` fetches the official CIFAR archive into `data_dir` when no copy is there. Decoded
    JPEGs and archives are cached in `cache_dir` (see cache.py). The test split never depends on `seed`.
    """
    kind = DATASETS.get(name)
    if kind is None:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if kind.needs_files and not folder.is_dir() and not (download and name in ARCHIVES):
        raise DataError(f"data directory {folder} does not exist; pass --data-dir DIR holding the {name} files "
                        f"(see docs/data.md)")
    source = kind.read(SourceOptions(folder, download, DecodedCache(cache_root(cache_dir))))
    if not 0 <= val_size < len(source.train):
        raise DataError(f"val_size must be in 0..{len(source.train) - 1} for {name} ({len(source.train)} training "
                        f"examples), got {val_size}; pass a smaller --val-size")
    rest, held_out = stratified_split(source.train.labels, val_size, seed)
    mean, std = kind.stats or channel_stats(source.train.images)
    return DatasetSplits(name=name, train=source.train.subset(rest), val=source.train.subset(held_out),
                         test=source.test, num_classes=len(source.classes), classes=source.classes,
                         augment=kind.augment, mean=mean, std=std, note=source.note)
