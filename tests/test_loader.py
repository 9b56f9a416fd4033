"""The device-resident loader: batches, determinism, exact resume, augmentation, rank shards."""

import pytest
import torch

from backsmooth.data import ArrayDataset, DeviceLoader, unit_float
from backsmooth.errors import DataError


def dataset(n: int = 103, shape: tuple[int, int, int] = (3, 8, 8)) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, *shape), generator=generator, dtype=torch.uint8)  # no zeros: padding shows
    return ArrayDataset(images, torch.arange(n) % 10)


def batches(loader: DeviceLoader, epoch: int = 0, start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start_step))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_shapes_range_and_length():
    data = dataset()
    loader = DeviceLoader(data, 10, augment="crop_flip")
    out = batches(loader)
    assert len(loader) == len(out) == 10
    for x, y in out:
        assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == y.device.type == "cpu" and 0 <= x.min() and x.max() <= 1
    seen = torch.cat([y for _, y in out])
    assert len(set(seen.tolist())) == 10 and len(seen) == 100  # drop_last: 3 examples left out
    kept = DeviceLoader(data, 10, drop_last=False)
    assert len(kept) == 11 and [len(y) for _, y in kept.epoch(0)][-1] == 3
    assert DeviceLoader(data, 200, drop_last=True).__len__() == 0


def test_unshuffled_plain_order_is_the_dataset():
    data = dataset()
    out = batches(DeviceLoader(data, 16, shuffle=False, drop_last=False))
    assert torch.equal(torch.cat([x for x, _ in out]), data.images.float() / 255)
    assert torch.equal(torch.cat([y for _, y in out]), data.labels)


def test_seeded_determinism_and_epochs_differ():
    data = dataset()
    a, b = DeviceLoader(data, 10, augment="crop_flip", seed=3), DeviceLoader(data, 10, augment="crop_flip", seed=3)
    assert_same(batches(a, 2), batches(b, 2))
    other = batches(DeviceLoader(data, 10, augment="crop_flip", seed=4), 2)
    assert not torch.equal(other[0][1], batches(a, 2)[0][1])
    assert not torch.equal(batches(a, 1)[0][1], batches(a, 2)[0][1])


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip"])
def test_resume_mid_epoch_equals_skipping(augment):
    loader = DeviceLoader(dataset(), 10, augment=augment, seed=7, drop_last=False)
    full = batches(loader, 5)
    assert_same(batches(loader, 5, start_step=4), full[4:])
    assert batches(loader, 5, start_step=len(loader)) == []


def crops(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop (and its mirror) of `image` zero-padded by `pad`, by slicing one at a time."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[1:]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(2)]
    return out


def test_crop_flip_shifts_zero_pads_and_flips():
    images = dataset(64).images
    data = ArrayDataset(images, torch.arange(64))  # the label says which image a batch row came from
    x, y = next(DeviceLoader(data, 64, augment="crop_flip", seed=1).epoch(0))
    x = (x * 255).round().to(torch.uint8)
    centred = 4 * 9 + 4  # index of the crop that does not move (dy = dx = 4)
    flipped = shifted = 0
    for image, label in zip(x, y):
        match = next(k for k, crop in enumerate(crops(images[label], 4)) if torch.equal(crop, image))
        flipped += match % 2
        if match // 2 != centred:
            shifted += 1
            assert (image == 0).any()  # the zero padding shows: the source images have no zero pixels
    assert 16 < flipped < 48 and shifted > 48


def test_flip_only_mirrors():
    data = dataset(64)
    x, y = next(DeviceLoader(data, 64, augment="flip", shuffle=False).epoch(0))
    x = (x * 255).round().to(torch.uint8)
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(x, data.images)]
    assert all(m or torch.equal(a, b) for m, a, b in zip(mirrored, x, data.images))
    assert 16 < sum(mirrored) < 48


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip"])
@pytest.mark.parametrize("n,last", [(103, [1, 2]), (101, [0, 1])])
def test_rank_shards_concatenate_to_the_single_process_batch(augment, n, last):
    data = dataset(n)
    single = batches(DeviceLoader(data, 10, augment=augment, seed=2, drop_last=False), 3)
    shards = [batches(DeviceLoader(data, 10, augment=augment, seed=2, drop_last=False, rank=r, world_size=2), 3)
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 11
    for step, (x, y) in enumerate(single):
        assert [len(s[step][1]) for s in shards] == ([5, 5] if step < 10 else last)
        assert torch.equal(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)


def test_pixels_are_correctly_rounded_quotients_whatever_the_division():
    pixels = torch.arange(256, dtype=torch.uint8)
    exact = (torch.arange(256, dtype=torch.float64) / 255).float()
    assert torch.equal(unit_float(pixels), exact)
    assert torch.equal(unit_float(pixels.view(1, 1, 16, 16)).flatten(), exact)
    # CUDA divides by a scalar as a multiplication by its reciprocal; a loader doing that would differ from a CPU
    # run in the last bit of about half the pixel values (seen on an H200), which the lookup avoids
    assert (pixels.float() * (torch.tensor(1.0) / 255) != exact).sum() > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    data = dataset()
    cpu = batches(DeviceLoader(data, 10, augment="crop_flip", seed=5), 1)
    cuda = batches(DeviceLoader(data, 10, augment="crop_flip", seed=5, device="cuda"), 1)
    assert all(x.is_cuda and y.is_cuda for x, y in cuda)
    assert_same(cpu, [(x.cpu(), y.cpu()) for x, y in cuda])


def test_bad_arguments():
    data = dataset()
    with pytest.raises(DataError, match="must be divisible by the number of processes"):
        DeviceLoader(data, 10, world_size=3)
    with pytest.raises(DataError, match="unknown augmentation 'rotate'"):
        DeviceLoader(data, 10, augment="rotate")
    with pytest.raises(DataError, match="rank 2"):
        DeviceLoader(data, 10, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pixels_equal_cpu_pixels():
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_float(pixels.cuda()).cpu(), unit_float(pixels))


def test_an_epoch_copies_to_the_device_a_fixed_number_of_times(monkeypatch):
    """A blocking host-to-device copy per step makes the host wait for the GPU's queue at every step (seen as
    17 ms a step on an H200); the epoch's random draws travel together, so the copies do not grow with steps."""
    copies = []
    original = torch.Tensor.to

    def counting(self, *args, **kwargs):
        copies.append(1)
        return original(self, *args, **kwargs)

    counts = []
    for n in (40, 400):
        loader = DeviceLoader(dataset(n), 10, augment="crop_flip", seed=1)
        batches(loader)  # first use: per-device constants are made once
        copies.clear()
        monkeypatch.setattr(torch.Tensor, "to", counting)
        assert len(batches(loader)) == n // 10
        monkeypatch.setattr(torch.Tensor, "to", original)
        counts.append(len(copies))
    assert counts[0] == counts[1] <= 3
