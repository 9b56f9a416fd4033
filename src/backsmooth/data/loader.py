"""A loader that keeps the whole uint8 dataset on the training device and augments batches as tensor ops.

No worker processes: shuffling is one permutation per epoch and augmentation is one gather per
batch. Every random draw comes from a generator seeded by (seed, epoch) or (seed, epoch, step), so
any step of any epoch can be reproduced on its own: resuming mid-epoch yields the same batches, and
the shards of several ranks put together are exactly the single-process batch.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

import torch

from backsmooth.data.dataset import ArrayDataset, unit_float
from backsmooth.errors import DataError

AUGMENTS = ("none", "flip", "crop_flip")
CROP_PADDING = 4  # crop_flip: random crop from the image zero-padded by this many pixels on each side


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by hashing `parts`, so nearby (seed, epoch, step) tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of the n training examples in `epoch`: a permutation drawn from (seed, epoch), or 0..n-1."""
    return torch.randperm(n, generator=_generator(seed, epoch)) if shuffle else torch.arange(n)


def epoch_steps(n: int, batch_size: int, drop_last: bool, cap: int = 0) -> int:
    """Batches per epoch of n examples: the full ones (and a short last one unless drop_last), at most `cap` > 0."""
    steps = n // batch_size if drop_last else -(-n // batch_size)
    return min(steps, cap) if cap else steps


def shard_of(rank: int, world_size: int, size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous slice [lo, hi) of a global batch of `size`; a short batch is split evenly."""
    return rank * size // world_size, (rank + 1) * size // world_size


class EpochBatches:
    """What both loaders share: the global batch, its shards and the epoch's length.

    `batch_size` is the global batch: with `world_size` > 1, rank `rank` gets its contiguous share of every global
    batch, so the union over ranks equals the batch a single process would see. `steps` > 0 ends every epoch
    after that many batches of its order (--steps-per-epoch). A subclass yields the batches (`indexed_epoch`).
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, rank: int,
                 world_size: int, steps: int) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size {batch_size}, "
                            f"rank {rank}, world_size {world_size}")
        if batch_size % world_size:
            raise DataError(f"the global batch size {batch_size} must be divisible by the number of processes "
                            f"({world_size}); choose a multiple of {world_size}")
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size, self.steps = seed, rank, world_size, steps

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return epoch_steps(self.size, self.batch_size, self.drop_last, self.steps)

    def shard(self, size: int) -> tuple[int, int]:
        """This rank's slice [lo, hi) of a global batch of `size`; a short last batch is split as evenly as possible."""
        return shard_of(self.rank, self.world_size, size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches (x float32 in [0, 1] NCHW, y int64), both on the device, for steps start_step.. of `epoch`."""
        for x, y, _ in self.indexed_epoch(epoch, start_step):
            yield x, y

    def indexed_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """As `epoch`, with the dataset indices of each batch's examples (for per-example method memory)."""
        raise NotImplementedError


class DeviceLoader(EpochBatches):
    """Whole uint8 dataset on the training device; batched augmentation as tensor ops; no workers."""

    def __init__(self, data: ArrayDataset, batch_size: int, *, augment: str = "none", shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1, steps: int = 0) -> None:
        if augment not in AUGMENTS:
            raise DataError(f"unknown augmentation {augment!r}; choose one of: {', '.join(AUGMENTS)}")
        super().__init__(len(data), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
                         world_size=world_size, steps=steps)
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.augment = augment
        self.padding = CROP_PADDING if augment == "crop_flip" else 0

    def indexed_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """As `epoch`, with the dataset indices of each batch's examples (for per-example method memory)."""
        n = len(self.labels)
        order = epoch_order(n, self.seed, epoch, self.shuffle).to(self.device)
        steps = range(start_step, len(self))
        for step, draws in zip(steps, self._draws(epoch, steps)):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            lo, hi = self.shard(len(batch))
            mine = batch[lo:hi]
            x = self.images.index_select(0, mine)
            if draws is not None:
                x = self._augmented(x, *draws)
            yield unit_float(x), self.labels.index_select(0, mine), mine

    def _draws(self, epoch: int, steps: range) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each step's flips and crop offsets for this rank's rows, on the device.

        They are drawn for the whole global batch from a CPU generator seeded by (seed, epoch, step) and then
        sliced, so they do not depend on the number of ranks; the epoch's draws reach the device in one copy,
        because a copy per step would make the host wait for the device's queue at every step.
        """
        if self.augment == "none" or not steps:
            return [None] * len(steps)
        flips, offsets = [], []
        for step in steps:
            size = min(self.batch_size, len(self.labels) - step * self.batch_size)
            lo, hi = self.shard(size)
            generator = _generator(self.seed, epoch, step)
            flips.append((torch.rand(size, generator=generator) < 0.5)[lo:hi])
            offsets.append(torch.randint(0, 2 * self.padding + 1, (2, size), generator=generator)[:, lo:hi])
        counts = [len(flip) for flip in flips]
        flips_here, offsets_here = torch.cat(flips).to(self.device), torch.cat(offsets, 1).to(self.device)
        return list(zip(flips_here.split(counts), offsets_here.split(counts, 1)))

    def _augmented(self, x: torch.Tensor, flip: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flip and crop this rank's uint8 images x with one gather: output pixel (i, j) is pixel
        (i + dy, j' + dx) of the image padded by P zeros on each side, with j' = W - 1 - j if flipped, else j."""
        pad = self.padding
        height, width = x.shape[2:]
        if pad:
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        n, channels, padded_height, padded_width = x.shape
        arange = functools.partial(torch.arange, device=self.device)
        rows = offsets[0, :, None] + arange(height)
        columns = arange(width).expand(n, width)
        columns = offsets[1, :, None] + torch.where(flip[:, None], width - 1 - columns, columns)
        planes = (arange(n)[:, None] * channels + arange(channels)) * (padded_height * padded_width)  # (n, C) starts
        index = planes[:, :, None, None] + rows[:, None, :, None] * padded_width + columns[:, None, None, :]
        return x.flatten().index_select(0, index.flatten()).view(index.shape)  # flat gather: fast on CPU too
