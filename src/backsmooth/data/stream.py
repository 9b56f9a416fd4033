"""Images decoded as they are needed: datasets whose images differ in size or would not fit in memory.

A `FileDataset` is a list of encoded images (files under one folder, or JPEG byte ranges of one blob) with their
labels, decoded at `size` x `size` pixels. `StreamLoader` serves its training batches through torch's DataLoader
worker processes with the contract of the device-resident loader: the epoch's order comes from (seed, epoch),
every example's augmentation from (seed, epoch, index), and each rank takes its contiguous share of every
global batch. So a batch does not depend on which worker decoded it, a run resumed mid-epoch sees the same
batches, and the ranks of torchrun together see each image once per epoch.

The file list is kept in numpy arrays, not Python lists: worker processes share them copy-on-write without the
reference-count writes that make every worker copy a list of strings (memory stays flat as the dataset grows).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from backsmooth.data.dataset import unit_float
from backsmooth.data.files import open_image, rgb_image
from backsmooth.data.loader import CROP_PADDING, EpochBatches, epoch_order
from backsmooth.errors import DataError
from backsmooth.schedules import size_at

STREAM_AUGMENTS = ("none", "flip", "crop_flip", "resized_crop_flip")
RESIZED_CROP_SCALE, RESIZED_CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # the standard ImageNet training crop


def default_workers() -> int:
    """Decoding processes when --workers is not given: the CPUs this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class EncodedImages:
    """Where each image's bytes are: files (paths relative to `root`) or ranges of one byte array."""

    def __init__(self, root: Path | None = None, paths: np.ndarray | None = None, blob: np.ndarray | None = None,
                 offsets: np.ndarray | None = None, where: str = "") -> None:
        self.root, self.paths, self.blob, self.offsets, self.where = root, paths, blob, offsets, where

    @classmethod
    def files(cls, root: Path, paths: Sequence[str]) -> EncodedImages:
        """Files given by their paths relative to `root` (stored as UTF-8 bytes)."""
        return cls(root=root, paths=np.array([p.encode() for p in paths], dtype=np.bytes_))

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.offsets) - 1

    def source(self, i: int) -> Path | memoryview:
        """Image i's file, or its bytes."""
        if self.paths is not None:
            return self.root / self.paths[i].decode()
        return memoryview(self.blob)[int(self.offsets[i]):int(self.offsets[i + 1])]

    def name(self, i: int) -> str:
        """How an error names image i."""
        return str(self.source(i)) if self.paths is not None else f"image {i} of {self.where}"


class FileDataset:
    """Encoded images and int64 labels, decoded at `size` x `size` RGB only when needed.

    The evaluation view (`images`, `decoded`) resizes the shorter side to size / crop_fraction and takes the
    central size x size crop (crop_fraction 0.875 is ImageNet's 224 of 256; 1 keeps an image of the right size
    as it is). `index` maps this dataset's examples to the images of `encoded`.
    """

    def __init__(self, encoded: EncodedImages, labels: torch.Tensor, size: int, crop_fraction: float = 0.875,
                 index: np.ndarray | None = None, workers: int | None = None) -> None:
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise DataError(f"labels must be int64 (N,), got {labels.dtype} {tuple(labels.shape)}")
        self.encoded, self.labels, self.size, self.crop_fraction = encoded, labels, size, crop_fraction
        self.index = np.arange(len(labels), dtype=np.int64) if index is None else index
        self.workers = default_workers() if workers is None else workers
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every decoded image."""
        return 3, self.size, self.size

    def subset(self, index: torch.Tensor) -> FileDataset:
        """The examples at `index` (nothing is decoded)."""
        picked = torch.as_tensor(index, dtype=torch.int64)
        return FileDataset(self.encoded, self.labels[picked].contiguous(), self.size, self.crop_fraction,
                           self.index[picked.numpy()], self.workers)

    def decoded(self, i: int, augment: str = "none", rng: random.Random | None = None,
                size: int | None = None) -> np.ndarray:
        """Example i as uint8 (3, S, S), S = `size` or the dataset's: the evaluation view, or a training view drawn
        from `rng`."""
        size = size or self.size
        position = int(self.index[i])
        name = self.encoded.name(position)
        with open_image(self.encoded.source(position), name) as image:
            if augment == "resized_crop_flip":
                pixels = _resized_crop(image, name, size, rng)
            else:
                pixels = _center_view(rgb_image(image, name), size, self.crop_fraction)
                if augment == "crop_flip":
                    pixels = _padded_crop(pixels, rng)
        if augment != "none" and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    @property
    def images(self) -> torch.Tensor:
        """Every example's evaluation view as uint8 (N, 3, size, size), decoded once by worker processes and kept:
        meant for the validation split and evaluation subsets, not for a whole large dataset."""
        if self._images is None:
            items = [(i, 0) for i in range(len(self))]
            batches = [items[start:start + 64] for start in range(0, len(items), 64)]
            workers = self.workers if len(self) > 256 else 0  # starting processes costs more than a few images
            loader = DataLoader(_Decoder(self, "none", 0), batch_sampler=batches, num_workers=workers,
                                collate_fn=_collate)
            parts = [x for x, _, _ in worker_batches(loader)]
            self._images = torch.cat(parts) if parts else torch.empty(0, *self.image_shape, dtype=torch.uint8)
        return self._images


def _center_view(image: Image.Image, size: int, crop_fraction: float) -> np.ndarray:
    """Resize the shorter side to round(size / crop_fraction) (bilinear, antialiased) and take the central crop of
    size x size, rounding the offsets as torchvision's Resize + CenterCrop do; (size, size, 3) uint8."""
    width, height = image.size
    short = round(size / crop_fraction)
    if min(width, height) != short:
        scale = short / min(width, height)
        width, height = (short, int(height * scale)) if width <= height else (int(width * scale), short)
        image = image.resize((width, height), Image.BILINEAR)
    top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _resized_crop(image: Image.Image, name: str, size: int, rng: random.Random) -> np.ndarray:
    """The standard random-resized crop: an area of 8% to 100% at an aspect ratio of 3/4 to 4/3 (ten tries, then
    the central crop at the nearest allowed ratio), resized to size x size. A JPEG is decoded at the smallest
    DCT scale that still gives the crop at least `size` pixels each way (Pillow's draft): the same crop, far
    less decoding for large photographs."""
    width, height = image.size
    top, left, crop_h, crop_w = _crop_box(width, height, rng)
    if image.format == "JPEG":
        image.draft("RGB", (math.ceil(width * size / crop_w), math.ceil(height * size / crop_h)))
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    return np.asarray(rgb_image(image, name).resize((size, size), Image.BILINEAR, box=box))


def _crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of a width x height image."""
    area = width * height
    low, high = math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*RESIZED_CROP_SCALE)
        ratio = math.exp(rng.uniform(low, high))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < RESIZED_CROP_RATIO[0]:
        w, h = width, round(width / RESIZED_CROP_RATIO[0])
    elif ratio > RESIZED_CROP_RATIO[1]:
        w, h = round(height * RESIZED_CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _padded_crop(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random crop of the image zero-padded by CROP_PADDING pixels on each side (CIFAR's augmentation)."""
    size = pixels.shape[0]
    padded = np.pad(pixels, ((CROP_PADDING, CROP_PADDING), (CROP_PADDING, CROP_PADDING), (0, 0)))
    dy, dx = rng.randint(0, 2 * CROP_PADDING), rng.randint(0, 2 * CROP_PADDING)
    return padded[dy:dy + size, dx:dx + size]


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random draws of one example's augmentation in one epoch: the same whichever worker decodes it."""
    digest = hashlib.blake2b(repr((seed, epoch, index)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class _Decoder(Dataset):
    """Item (i, epoch) -> (uint8 (3, S, S), label, i), augmented with draws from (seed, epoch, i), at the size
    `resize` (progressive resizing: ((epoch, size), ...)) gives that epoch, else the dataset's."""

    def __init__(self, data: FileDataset, augment: str, seed: int, resize: tuple[tuple[int, int], ...] = ()) -> None:
        self.data, self.augment, self.seed, self.resize = data, augment, seed, resize

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        i, epoch = item
        rng = example_rng(self.seed, epoch, i) if self.augment != "none" else None
        size = size_at(self.resize, epoch, self.data.size)
        return torch.from_numpy(self.data.decoded(i, self.augment, rng, size)), int(self.data.labels[i]), i


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, index = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)


def worker_batches(loader: DataLoader) -> Iterator[Any]:
    """The batches of a DataLoader; a DataError raised in one of its workers comes back as itself, in one line (the
    DataLoader wraps it in the worker's traceback)."""
    try:
        yield from loader
    except DataError as error:
        raise DataError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


class _EpochSampler:
    """The batch sampler of a StreamLoader: this rank's items of the steps `start..` of the current epoch."""

    def __init__(self, loader: StreamLoader) -> None:
        self.loader, self.epoch, self.start = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        loader = self.loader
        order = epoch_order(loader.size, loader.seed, self.epoch, loader.shuffle)
        for step in range(self.start, len(loader)):
            batch = order[step * loader.batch_size:(step + 1) * loader.batch_size]
            lo, hi = loader.shard(len(batch))
            yield [(int(i), self.epoch) for i in batch[lo:hi]]


class StreamLoader(EpochBatches):
    """Training batches of a FileDataset decoded by `workers` processes, pinned and copied to the device one batch
    ahead; the same interface and the same reproducibility as DeviceLoader (see the module's docstring).
    `resize` ((epoch, size), ...) decodes the training images of those epochs at that size (progressive
    resizing); the dataset's own size holds before its first entry."""

    def __init__(self, data: FileDataset, batch_size: int, *, augment: str = "none", shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, workers: int | None = None, prefetch: int = 4,
                 resize: tuple[tuple[int, int], ...] = (), steps: int = 0) -> None:
        if augment not in STREAM_AUGMENTS:
            raise DataError(f"unknown augmentation {augment!r}; choose one of: {', '.join(STREAM_AUGMENTS)}")
        super().__init__(len(data), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
                         world_size=world_size, steps=steps)
        self.data, self.augment, self.device = data, augment, torch.device(device)
        self.workers = default_workers() if workers is None else workers
        self._sampler = _EpochSampler(self)
        self._loader = DataLoader(_Decoder(data, augment, seed, resize), batch_sampler=self._sampler,
                                  num_workers=self.workers, collate_fn=_collate,
                                  pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                                  prefetch_factor=prefetch if self.workers else None)

    def indexed_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """As `epoch`, with the dataset indices of each batch's examples."""
        self._sampler.epoch, self._sampler.start = epoch, start_step
        ahead: tuple[torch.Tensor, ...] | None = None
        for batch in worker_batches(self._loader):
            moved = tuple(t.to(self.device, non_blocking=True) for t in batch)  # copies while the last batch trains
            if ahead is not None:
                yield unit_float(ahead[0]), ahead[1], ahead[2]
            ahead = moved
        if ahead is not None:
            yield unit_float(ahead[0]), ahead[1], ahead[2]

