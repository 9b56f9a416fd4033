"""In-memory datasets, the seeded stratified split, per-channel statistics, and uint8 pixels as floats."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from backsmooth.errors import DataError

# k / 255 for every pixel value, divided on the CPU: CUDA divides a tensor by a scalar as a multiplication by
# the reciprocal, which differs from the true quotient in the last bit for 126 of the 256 values
_UNIT_VALUES = torch.arange(256, dtype=torch.float32) / 255


@functools.cache
def _unit_table(device: torch.device) -> torch.Tensor:
    return _UNIT_VALUES.to(device)


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1] (k -> k / 255 correctly rounded), bit-identical on every device,
    so a CPU and a GPU run see the same inputs."""
    return _unit_table(images.device)[images.long()]


@dataclass(frozen=True)
class ArrayDataset:
    """Images as uint8 (N, C, H, W) and int64 labels (N,): small enough to keep whole in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise DataError(f"labels must be int64 ({len(self.images)},) to match the images, "
                            f"got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images.shape[1:]
        return c, h, w

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        """The examples at `index`, copied into contiguous tensors."""
        return ArrayDataset(self.images[index].contiguous(), self.labels[index].contiguous())


class ImageSet(Protocol):
    """What training and evaluation need of a split: an ArrayDataset (in memory) or a FileDataset (streamed)."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    @property
    def images(self) -> torch.Tensor: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def subset(self, index: torch.Tensor) -> ImageSet: ...


@dataclass(frozen=True)
class DatasetSplits:
    """Train / validation / test splits of one dataset, with what a model and loader need to know about it."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    classes: tuple[str, ...]
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str = ""  # where the data came from, and anything a report should mention (e.g. lossy copies)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return self.train.image_shape


def checked_dataset(images: np.ndarray, labels: np.ndarray, where: str, num_classes: int,
                    image_shape: tuple[int, ...] | None = None, channels_last: bool = False) -> ArrayDataset:
    """Validate arrays read from `where` and wrap them as tensors.

    Dtype, shape (`image_shape` excludes N) and label range are checked here so every reader reports
    them the same way. Grayscale (N, H, W) images get a channel axis; `channels_last` (N, H, W, C)
    images are transposed to (N, C, H, W).
    """
    if images.dtype != np.uint8:
        raise DataError(f"images in {where} have dtype {images.dtype}; expected uint8 pixels 0..255 "
                        f"(convert with np.round(x * 255).astype(np.uint8) if they are floats in [0, 1])")
    if image_shape is not None and images.shape[1:] != image_shape:
        expected = ", ".join(map(str, image_shape))
        raise DataError(f"images in {where} have shape {images.shape}; expected (N, {expected})")
    labels = checked_labels(labels, len(images), where, num_classes)
    if images.ndim == 3:  # grayscale (N, H, W)
        images = images[:, None]
    elif channels_last:
        images = images.transpose(0, 3, 1, 2)
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)),
                        torch.from_numpy(labels.astype(np.int64)))


def checked_labels(labels: np.ndarray, count: int, where: str, num_classes: int) -> np.ndarray:
    """`count` integer labels in 0..num_classes-1 read from `where`, else a DataError saying what is wrong."""
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (count,):
        raise DataError(f"labels in {where} must be {count} integers (one per image), got {labels.dtype} "
                        f"{labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels in {where} must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}; "
                        f"check that the file belongs to this dataset")
    return labels


def stratified_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held_out) with `size` examples held out, per class in proportion to its count.

    Per-class counts follow the largest-remainder rule; when `size` allows, every class with at least
    two examples gets one held-out example. Within a class the examples are drawn by a seeded
    permutation, so the same seed always gives the same split. Both index tensors are sorted.
    """
    n = len(labels)
    if not 0 <= size < n:
        raise DataError(f"cannot hold out {size} of {n} examples; choose a size in 0..{n - 1}")
    counts = torch.bincount(labels).tolist()
    quota = _largest_remainder(counts, size)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    by_class = perm[torch.sort(labels[perm], stable=True).indices]  # class-major, random within a class
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    rank = torch.arange(n) - starts[labels[by_class]]  # position of each example within its class
    held = rank < torch.tensor(quota)[labels[by_class]]
    return torch.sort(by_class[~held]).values, torch.sort(by_class[held]).values


def _largest_remainder(counts: list[int], size: int) -> list[int]:
    """Split `size` over classes in proportion to `counts`, then make sure no class (of >= 2) is left out."""
    total = sum(counts)
    exact = [size * c / total for c in counts]
    quota = [int(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda k: quota[k] - exact[k])  # largest remainder first
    for k in by_remainder[:size - sum(quota)]:
        quota[k] += 1
    for k, c in enumerate(counts):
        donor = max(range(len(counts)), key=lambda j: quota[j])
        if quota[k] == 0 and c >= 2 and quota[donor] >= 2:
            quota[k], quota[donor] = 1, quota[donor] - 1
    return quota


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images scaled to [0, 1].

    Works through the images in chunks of about 4M pixels, so memory stays small for big datasets.
    """
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    chunk = max(1, 2**22 // max(1, images[0].numel())) if len(images) else 1
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
