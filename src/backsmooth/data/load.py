"""The dataset registry and `load_dataset`: read a dataset by name, hold out the validation split,
attach its constants. A new dataset is a reader plus one `register` call (docs/extending.md)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from backsmooth.data.cache import DecodedCache, cache_root
from backsmooth.data.dataset import ArrayDataset, DatasetSplits, ImageSet, channel_stats, stratified_split
from backsmooth.data.download import ARCHIVES
from backsmooth.data.image_folders import read_folder, read_imagenet, read_tiny_imagenet
from backsmooth.data.sources import Source, SourceOptions, read_cifar, read_digits, read_mnist, read_synthetic
from backsmooth.errors import ConfigError, DataError

ChannelStats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)


@dataclass(frozen=True)
class DatasetKind:
    """How to read one dataset and what comes with it.

    The reader returns a `Source` whose `note` says where the data came from and anything a report
    must mention (a lossy copy, a non-standard split); runs record it and reports print it.
    """

    read: Callable[[SourceOptions], Source]
    augment: str  # the training augmentation that suits it (see loader.py)
    stats: ChannelStats | None  # standard per-channel (mean, std); None: computed from the training images
    needs_files: bool = True  # False: built in or generated, no --data-dir
    default_val_size: int = 1000  # validation examples held out of the training set when --val-size is not given
    summary: str = ""  # one line for help texts
    streams: bool = False  # its reader can stream (--loader stream, --image-size; data/stream.py)


DATASETS: dict[str, DatasetKind] = {}


def register(name: str, kind: DatasetKind) -> DatasetKind:
    """Add dataset `name` (a new name, or replace a user's earlier registration of it)."""
    if not name or not name.replace("_", "").isalnum():
        raise DataError(f"dataset name {name!r} must be letters, digits and underscores")
    DATASETS[name] = kind
    return kind


register("digits", DatasetKind(read_digits, "none", None, needs_files=False, default_val_size=150,
                               summary="scikit-learn's 8x8 handwritten digits, embedded (the CPU demo)"))
register("mnist", DatasetKind(read_mnist, "none", ((0.1307,), (0.3081,)), summary="MNIST, 1x28x28"))
register("cifar10", DatasetKind(functools.partial(read_cifar, "cifar10"), "crop_flip",
                                ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), summary="CIFAR-10, 3x32x32"))
register("cifar100", DatasetKind(functools.partial(read_cifar, "cifar100"), "crop_flip",
                                 ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), summary="CIFAR-100, 3x32x32"))
register("tiny_imagenet", DatasetKind(read_tiny_imagenet, "flip", ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
                                      summary="Tiny ImageNet, 3x64x64, 200 classes", streams=True))
register("imagenet", DatasetKind(read_imagenet, "resized_crop_flip", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                 summary="the ImageNet layout train/CLASS/*, val/CLASS/*, streamed", streams=True))
register("folder", DatasetKind(read_folder, "crop_flip", None, summary="one sub-folder of images per class",
                               streams=True))
register("synthetic", DatasetKind(read_synthetic, "none", None, needs_files=False, default_val_size=50,
                                  summary="generated colour classes, for tests"))


def dataset_names() -> tuple[str, ...]:
    """The names `load_dataset` accepts."""
    return tuple(DATASETS)


def dataset_kind(name: str) -> DatasetKind:
    """The registered kind of dataset `name`; an unknown name is a one-line error listing the known ones."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def check_streaming(name: str, loader: str, image_size: int) -> None:
    """--loader stream and --image-size are for the datasets that can stream; a one-line ConfigError otherwise."""
    if not dataset_kind(name).streams and (loader == "stream" or image_size):
        streaming = ", ".join(n for n, k in DATASETS.items() if k.streams)
        raise ConfigError(f"--loader stream and --image-size apply to the datasets that stream ({streaming}), "
                          f"not {name}")


def default_data_dir() -> Path:
    """Where datasets are looked for (and downloaded to) without --data-dir.

    $BACKSMOOTH_DATA, else ~/.cache/backsmooth/data.
    """
    return Path(os.environ.get("BACKSMOOTH_DATA") or Path.home() / ".cache" / "backsmooth" / "data").expanduser()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_size: int = 1000, seed: int = 0,
                 download: bool = False, cache_dir: str | os.PathLike | None = None, loader: str = "auto",
                 image_size: int = 0, workers: int | None = None) -> DatasetSplits:
    """Read dataset `name` and hold out a stratified, seeded validation split of `val_size` training examples.

    `download` fetches the official CIFAR archive into `data_dir` when no copy is there. Decoded
    JPEGs and archives are cached in `cache_dir` (see cache.py). The test split never depends on `seed`.
    `loader` (auto, device, stream), `image_size` and `workers` apply to the datasets that can stream.
    """
    kind = dataset_kind(name)
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if kind.needs_files and not folder.is_dir() and not (download and name in ARCHIVES):
        raise DataError(f"data directory {folder} does not exist; pass --data-dir DIR holding the {name} files "
                        f"(see docs/data.md)")
    check_streaming(name, loader, image_size)
    source = kind.read(SourceOptions(folder, download, DecodedCache(cache_root(cache_dir)), loader, image_size,
                                     workers))
    if not 0 <= val_size < len(source.train):
        raise DataError(f"val_size must be in 0..{len(source.train) - 1} for {name} ({len(source.train)} training "
                        f"examples), got {val_size}; pass a smaller --val-size")
    rest, held_out = stratified_split(source.train.labels, val_size, seed)
    mean, std = kind.stats or channel_stats(_stats_images(source.train))
    return DatasetSplits(name=name, train=source.train.subset(rest), val=source.train.subset(held_out),
                         test=source.test, num_classes=len(source.classes), classes=source.classes,
                         augment=source.augment or kind.augment, mean=mean, std=std, note=source.note)


STATS_SAMPLE = 2000  # streamed training images whose mean and std stand for the whole set's


def _stats_images(train: ImageSet) -> torch.Tensor:
    """The images whose per-channel statistics normalise the model: all of an in-memory set; of a streamed one, the
    evaluation view of a fixed stratified sample of STATS_SAMPLE."""
    if isinstance(train, ArrayDataset) or len(train) <= STATS_SAMPLE:
        return train.images
    return train.subset(stratified_split(train.labels, STATS_SAMPLE, 0)[1]).images
