"""Dataset readers, the decoded cache, the download, and the validation split (loader: test_loader.py)."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backsmooth.data import ArrayDataset, DatasetSplits, FileDataset, dataset_names, download, files, load_dataset
from backsmooth.data.cache import DecodedCache, cache_root
from backsmooth.data.dataset import _largest_remainder, stratified_split
from backsmooth.data.sources import CIFAR10_CLASSES, CIFAR100_CLASSES
from backsmooth.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


@contextlib.contextmanager
def raises(match: str) -> Iterator[pytest.ExceptionInfo]:
    """pytest.raises(DataError) whose message must contain `match` literally and fit on one line."""
    with pytest.raises(DataError) as info:
        yield info
    message = str(info.value)
    assert match in message and "\n" not in message, message


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, 3) or (H, W) uint8 array as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def pillow_decode(data: bytes) -> np.ndarray:
    """The reference decoding: what the README of ../shared/data prescribes, as (3, H, W)."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def write_jpeg_npz(path: Path, images: list[np.ndarray], labels: np.ndarray, **extra) -> list[bytes]:
    encoded = [jpeg_bytes(image) for image in images]
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    np.savez(path, jpeg=np.frombuffer(b"".join(encoded), np.uint8), offsets=offsets, y=labels, **extra)
    return encoded


def balanced_labels(n: int, classes: int) -> np.ndarray:
    return RNG.permutation(np.arange(n) % classes).astype(np.int64)


def assert_splits(data: DatasetSplits, name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    assert data.name == name and data.image_shape == shape and data.num_classes == num_classes
    assert len(data.classes) == num_classes and len(data.mean) == len(data.std) == shape[0]
    for part in (data.train, data.val, data.test):
        assert part.images.dtype == torch.uint8 and part.images.is_contiguous() and part.images.device.type == "cpu"
        assert part.labels.dtype == torch.int64 and part.images.shape[1:] == shape
        assert len(part) == 0 or 0 <= part.labels.min() <= part.labels.max() < num_classes


# ---------------------------------------------------------------------------------------- digits, synthetic

def test_dataset_names():
    assert dataset_names() == ("digits", "mnist", "cifar10", "cifar100", "tiny_imagenet", "imagenet", "folder",
                               "synthetic")


def test_digits_has_a_fixed_stratified_test_split():
    a = load_dataset("digits", val_size=150, seed=1)
    b = load_dataset("digits", val_size=150, seed=2)
    assert_splits(a, "digits", (1, 8, 8), 10)
    assert (len(a.train), len(a.val), len(a.test)) == (1797 - 359 - 150, 150, 359)
    assert torch.equal(a.test.images, b.test.images)  # the test set does not move with the run seed
    assert not torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.test.labels).min() >= 35 and a.train.images.max() == 255
    assert a.augment == "none" and 0.2 < a.mean[0] < 0.4


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with raises("pip install 'backsmooth[demo]'"):
        load_dataset("digits")


def test_synthetic_is_fixed_and_learnable():
    a, b = load_dataset("synthetic", val_size=50), load_dataset("synthetic", val_size=50, seed=3)
    assert_splits(a, "synthetic", (3, 32, 32), 10)
    assert (len(a.train), len(a.val)) == (450, 50) and len(a.test) >= 200
    assert torch.equal(a.test.images, b.test.images)
    # the class is readable from the mean colour: nearest class-mean classifier is near perfect
    colour = lambda d: d.images.float().mean(dim=(2, 3))  # noqa: E731
    centres = torch.stack([colour(a.train)[a.train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(colour(a.test), centres).argmin(1)
    assert (predicted == a.test.labels).float().mean() > 0.95


# ---------------------------------------------------------------------------------------- MNIST

def idx_file(path: Path, magic: int, array: np.ndarray) -> None:
    data = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.fixture
def mnist_arrays():
    return {part: (RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), balanced_labels(n, 10).astype(np.uint8))
            for part, n in (("train", 60), ("t10k", 20))}


def test_mnist_from_idx_files_gzipped_or_not(tmp_path, mnist_arrays):
    for part, (x, y) in mnist_arrays.items():
        suffix = ".gz" if part == "train" else ""
        idx_file(tmp_path / f"{part}-images-idx3-ubyte{suffix}", 2051, x)
        idx_file(tmp_path / f"{part}-labels-idx1-ubyte{suffix}", 2049, y)
    data = load_dataset("mnist", tmp_path, val_size=10)
    assert_splits(data, "mnist", (1, 28, 28), 10)
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(mnist_arrays["t10k"][0]))
    assert torch.equal(data.test.labels, torch.from_numpy(mnist_arrays["t10k"][1]).long())
    assert data.mean == (0.1307,) and data.std == (0.3081,) and data.augment == "none"


def test_mnist_idx_header_is_checked(tmp_path, mnist_arrays):
    for part, (x, y) in mnist_arrays.items():
        idx_file(tmp_path / f"{part}-images-idx3-ubyte", 2051, x)
        idx_file(tmp_path / f"{part}-labels-idx1-ubyte", 2049, y)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with raises("train-images-idx3-ubyte is truncated"):
        load_dataset("mnist", tmp_path, val_size=10)
    idx_file(images, 2049, mnist_arrays["train"][0])
    with raises("magic number 2049, expected 2051"):
        load_dataset("mnist", tmp_path, val_size=10)


def test_mnist_from_npz(tmp_path, mnist_arrays):
    for part, name in (("train", "train"), ("t10k", "test")):
        np.savez(tmp_path / f"mnist_{name}.npz", x=mnist_arrays[part][0], y=mnist_arrays[part][1].astype(np.int64))
    data = load_dataset("mnist", tmp_path, val_size=10)
    assert (len(data.train), len(data.val), len(data.test)) == (50, 10, 20)
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(mnist_arrays["t10k"][0]))


@pytest.mark.parametrize("x,y,message", [
    (np.zeros((10, 28, 28), np.float32), np.zeros(10, np.int64), "dtype float32; expected uint8"),
    (np.zeros((10, 28, 27), np.uint8), np.zeros(10, np.int64), "expected (N, 28, 28)"),
    (np.zeros((10, 28, 28), np.uint8), np.full(10, 12, np.int64), "labels in"),
    (np.zeros((10, 28, 28), np.uint8), np.zeros(9, np.int64), "must be 10 integers"),
    (np.zeros((10, 28, 28), np.uint8), np.zeros(10, np.float32), "must be 10 integers"),
])
def test_mnist_npz_bad_arrays(tmp_path, x, y, message):
    np.savez(tmp_path / "mnist_train.npz", x=x, y=y)
    np.savez(tmp_path / "mnist_test.npz", x=np.zeros((5, 28, 28), np.uint8), y=np.zeros(5, np.int64))
    with raises(message):
        load_dataset("mnist", tmp_path, val_size=0)


# ---------------------------------------------------------------------------------------- CIFAR

def fake_cifar(folder: Path, name: str, n_train: int = 200, n_test: int = 100) -> dict[str, np.ndarray]:
    """Write the official extracted layout of a small CIFAR-10/100 into `folder`; return its arrays."""
    classes = 10 if name == "cifar10" else 100
    arrays = {f"{part}_x": RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for part, n in
              (("train", n_train), ("test", n_test))}
    arrays.update(train_y=balanced_labels(n_train, classes), test_y=balanced_labels(n_test, classes))
    folder.mkdir(parents=True)

    def dump(file: str, obj: dict) -> None:
        with open(folder / file, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def batch(x: np.ndarray, y: np.ndarray) -> dict:
        key = b"labels" if name == "cifar10" else b"fine_labels"
        return {b"batch_label": b"fake", b"data": x.reshape(len(x), -1), key: y.tolist(),
                b"coarse_labels": [0] * len(y)}

    if name == "cifar10":
        for k, (x, y) in enumerate(zip(np.array_split(arrays["train_x"], 5), np.array_split(arrays["train_y"], 5))):
            dump(f"data_batch_{k + 1}", batch(x, y))
        dump("test_batch", batch(arrays["test_x"], arrays["test_y"]))
        dump("batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072})
    else:
        dump("train", batch(arrays["train_x"], arrays["train_y"]))
        dump("test", batch(arrays["test_x"], arrays["test_y"]))
        dump("meta", {b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES], b"coarse_label_names": []})
    return arrays


def fake_cifar_archive(folder: Path, name: str) -> tuple[Path, dict[str, np.ndarray]]:
    """The official tar.gz of a small fake CIFAR-10/100 in `folder`."""
    inner = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    arrays = fake_cifar(folder / "build" / inner, name)
    archive = folder / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "build" / inner, arcname=inner)
    return archive, arrays


def assert_cifar(data: DatasetSplits, name: str, arrays: dict[str, np.ndarray]) -> None:
    classes = CIFAR10_CLASSES if name == "cifar10" else CIFAR100_CLASSES
    assert_splits(data, name, (3, 32, 32), len(classes))
    assert data.classes == classes and data.augment == "crop_flip"
    assert torch.equal(data.test.images, torch.from_numpy(arrays["test_x"]))
    assert torch.equal(data.test.labels, torch.from_numpy(arrays["test_y"]))
    everything = torch.cat([data.train.images, data.val.images])
    assert sorted(everything.sum(dim=(1, 2, 3)).tolist()) == sorted(arrays["train_x"].sum(axis=(1, 2, 3)).tolist())


def test_cifar100_has_100_standard_class_names():
    assert len(CIFAR100_CLASSES) == 100 == len(set(CIFAR100_CLASSES))
    assert CIFAR100_CLASSES == tuple(sorted(CIFAR100_CLASSES))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_official_archive_and_folder(tmp_path, name):
    archive, arrays = fake_cifar_archive(tmp_path / "archive", name)
    data = load_dataset(name, archive.parent, val_size=100, cache_dir=tmp_path / "cache")
    assert_cifar(data, name, arrays)
    assert "JPEG" not in data.note  # the genuine archive carries no lossy-copy note into runs and reports
    assert len(data.val) == 100 and torch.bincount(data.val.labels).min() >= 1
    assert data.mean == {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}[name]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    folder = tmp_path / "archive" / "build"  # the extracted layout
    assert_cifar(load_dataset(name, folder, val_size=100, cache_dir=tmp_path / "cache"), name, arrays)


def test_cifar_batches_refuse_foreign_pickles(tmp_path):
    fake_cifar(tmp_path / "cifar-10-batches-py", "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(functools.partial(print, "pwned"), f)
    with raises("functools.partial is not allowed"):
        load_dataset("cifar10", tmp_path, val_size=0)


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_cifar_truncated_archive(tmp_path, cut):
    archive, _ = fake_cifar_archive(tmp_path, "cifar10")
    data = archive.read_bytes()
    archive.write_bytes(data[:int(len(data) * cut)])
    with raises("cifar-10-python.tar.gz is truncated or corrupt"):
        load_dataset("cifar10", tmp_path, val_size=0, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cifar_archive_missing_a_batch(tmp_path):
    archive, _ = fake_cifar_archive(tmp_path, "cifar10")
    (tmp_path / "build" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with raises("lacks data_batch_3"):
        load_dataset("cifar10", tmp_path, val_size=0, cache_dir=tmp_path / "cache")
    with raises("lacks data_batch_3"):
        load_dataset("cifar10", tmp_path / "build", val_size=0)


def test_cifar_from_xy_npz(tmp_path):
    x = {part: RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for part, n in (("train", 50), ("test", 20))}
    y = {part: balanced_labels(len(x[part]), 10) for part in x}
    names = np.array([f"c{k}" for k in range(10)])
    for part in x:
        np.savez(tmp_path / f"cifar10_{part}.npz", x=x[part], y=y[part], classes=names)
    data = load_dataset("cifar10", tmp_path, val_size=10)
    assert_splits(data, "cifar10", (3, 32, 32), 10)
    assert data.classes == tuple(names.tolist())
    assert torch.equal(data.test.images, torch.from_numpy(x["test"].transpose(0, 3, 1, 2)))
    np.savez(tmp_path / "cifar10_test.npz", x=x["test"][..., 0], y=y["test"])
    with raises("expected (N, 32, 32, 3)"):
        load_dataset("cifar10", tmp_path, val_size=10)


def test_cifar_from_jpeg_npz_and_the_cache(tmp_path, monkeypatch):
    images = {part: [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
              for part, n in (("train", 40), ("test", 20))}
    images["test"][3] = images["test"][3][..., 0]  # a grayscale JPEG comes back as RGB
    encoded = {part: write_jpeg_npz(tmp_path / f"cifar10_{part}_jpeg.npz", images[part],
                                    balanced_labels(len(images[part]), 10)) for part in images}
    cache = tmp_path / "cache"
    data = load_dataset("cifar10", tmp_path, val_size=10, cache_dir=cache)
    assert_splits(data, "cifar10", (3, 32, 32), 10)
    assert data.classes == CIFAR10_CLASSES and "JPEG" in data.note
    expected = np.stack([pillow_decode(e) for e in encoded["test"]])
    assert torch.equal(data.test.images, torch.from_numpy(expected))
    assert len(list(cache.glob("*.npz"))) == 2 and not list(cache.glob(".*"))  # no temporary files left

    monkeypatch.setattr(files, "decode_images", lambda *a, **k: pytest.fail("decoded again instead of the cache"))
    again = load_dataset("cifar10", tmp_path, val_size=10, cache_dir=cache)
    assert torch.equal(again.test.images, data.test.images) and torch.equal(again.train.images, data.train.images)
    monkeypatch.undo()

    # a changed source is decoded again; a corrupt cache entry is rebuilt
    write_jpeg_npz(tmp_path / "cifar10_test_jpeg.npz", images["test"][::-1], balanced_labels(20, 10))
    changed = load_dataset("cifar10", tmp_path, val_size=10, cache_dir=cache)
    assert torch.equal(changed.test.images, data.test.images.flip(0))
    for entry in cache.glob("*.npz"):
        entry.write_bytes(entry.read_bytes()[:500])
    rebuilt = load_dataset("cifar10", tmp_path, val_size=10, cache_dir=cache)
    assert torch.equal(rebuilt.test.images, changed.test.images)


def test_corrupt_jpeg(tmp_path):
    images = [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(10)]
    encoded = write_jpeg_npz(tmp_path / "cifar10_train_jpeg.npz", images, balanced_labels(10, 10))
    blob = bytearray(b"".join(encoded))
    start = len(encoded[0]) + len(encoded[1])
    blob[start:start + 40] = b"\x00" * 40  # wreck the header of image 2
    offsets = np.cumsum([0] + [len(e) for e in encoded])
    np.savez(tmp_path / "cifar10_test_jpeg.npz", jpeg=np.frombuffer(bytes(blob), np.uint8), offsets=offsets,
             y=balanced_labels(10, 10))
    with raises("image 2 of"):
        load_dataset("cifar10", tmp_path, val_size=0, cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "cifar10_test_jpeg.npz", jpeg=np.frombuffer(bytes(blob), np.uint8), offsets=offsets[::-1],
             y=balanced_labels(10, 10))
    with raises("increasing positions"):
        load_dataset("cifar10", tmp_path, val_size=0, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------- download

@pytest.fixture
def http_folder(tmp_path):
    """(folder, base URL): a local HTTP server on 127.0.0.1 serving `folder`."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_then_loads(tmp_path, http_folder, monkeypatch):
    served, url = http_folder
    archive, arrays = fake_cifar_archive(served, "cifar10")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(download.ARCHIVES, "cifar10", download.Archive(f"{url}/{archive.name}", md5))
    target = tmp_path / "data" / "new"
    data = load_dataset("cifar10", target, val_size=20, download=True, cache_dir=tmp_path / "cache")
    assert_cifar(data, "cifar10", arrays)
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-python.tar.gz"]


def test_download_rejects_a_bad_checksum_and_leaves_nothing(tmp_path, http_folder):
    served, url = http_folder
    (served / "file.bin").write_bytes(b"x" * 3000)
    dest = tmp_path / "data" / "file.bin"
    with raises(f"expected md5 {'0' * 32}, got {hashlib.md5(b'x' * 3000).hexdigest()}"):
        download.download_file(f"{url}/file.bin", dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []
    with raises("could not download"):
        download.download_file(f"{url}/missing.bin", dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []
    assert download.download_file(f"{url}/file.bin", dest, hashlib.md5(b"x" * 3000).hexdigest()) == dest
    assert dest.read_bytes() == b"x" * 3000


def test_official_archive_addresses():
    assert download.ARCHIVES["cifar10"].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert download.ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert download.ARCHIVES["cifar100"].filename == "cifar-100-python.tar.gz"


# ---------------------------------------------------------------------------------------- Tiny ImageNet

WNIDS = [f"n{k:08d}" for k in range(200)]


def test_tiny_imagenet_official_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS[::-1]) + "\n")  # the official file is not sorted
    (root / "words.txt").write_text("".join(f"{w}\tthing {k}, stuff\n" for k, w in enumerate(WNIDS)) + "n99\tother\n")
    image = np.zeros((64, 64, 3), np.uint8)
    for k, wnid in enumerate(WNIDS):
        (root / "train" / wnid / "images").mkdir(parents=True)
        image[:] = k
        Image.fromarray(image).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "val" / "images" / "val_0.JPEG")  # grayscale
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(root / "val" / "images" / "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{WNIDS[5]}\t0\t0\t10\t10\n"
                                                      f"val_1.JPEG\t{WNIDS[9]}\t1\t2\t30\t40\n")
    data = load_dataset("tiny_imagenet", tmp_path, val_size=0, cache_dir=tmp_path / "cache")
    assert_splits(data, "tiny_imagenet", (3, 64, 64), 200)
    assert data.classes[3] == "thing 3, stuff" and data.augment == "flip"
    assert torch.equal(data.train.labels, torch.arange(200))
    assert torch.equal(data.train.images[:, 0, 0, 0], torch.arange(200).to(torch.uint8))
    assert data.test.labels.tolist() == [5, 9] and data.test.images[0].float().mean().round() == 7
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn77777777\t0\t0\t10\t10\n")
    with raises("names class n77777777"):
        load_dataset("tiny_imagenet", tmp_path, val_size=0, cache_dir=tmp_path / "cache")


def test_tiny_imagenet_val_npz_is_split_80_20(tmp_path):
    labels = np.repeat(np.arange(200), 2)
    images = [np.full((64, 64, 3), k % 256, np.uint8) for k in range(len(labels))]
    images[1] = images[1][..., 0]
    write_jpeg_npz(tmp_path / "tinyimagenet_val_jpeg.npz", images, labels, wnids=np.array(WNIDS),
                   words=np.array([f"word {k}" for k in range(200)]))
    data = load_dataset("tiny_imagenet", tmp_path, val_size=20, cache_dir=tmp_path / "cache")
    assert_splits(data, "tiny_imagenet", (3, 64, 64), 200)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 20, 80)
    assert data.classes[7] == "word 7" and "80%" in data.note
    assert torch.equal(data.test.images, load_dataset("tiny_imagenet", tmp_path, val_size=20, seed=5,
                                                      cache_dir=tmp_path / "cache").test.images)


def test_tiny_imagenet_missing(tmp_path):
    with raises("tiny-imagenet-200/"):
        load_dataset("tiny_imagenet", tmp_path)


# ---------------------------------------------------------------------------------------- image folders

def write_class_folders(root: Path, per_class: int, size: tuple[int, int] = (12, 10)) -> dict[str, list[np.ndarray]]:
    images = {}
    for name in ("cat", "dog", "emu"):
        (root / name).mkdir(parents=True)
        images[name] = [RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(per_class)]
        for k, image in enumerate(images[name]):
            Image.fromarray(image).save(root / name / f"{k}.{'png' if k % 2 else 'BMP'}")
    (root / "cat" / "notes.txt").write_text("not an image")
    return images


def test_folder_with_a_held_out_test_split(tmp_path, monkeypatch):
    images = write_class_folders(tmp_path / "data", 10)
    data = load_dataset("folder", tmp_path / "data", val_size=3, cache_dir=tmp_path / "cache")
    assert_splits(data, "folder", (3, 10, 12), 3)
    assert data.classes == ("cat", "dog", "emu") and data.augment == "crop_flip"
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 6)
    assert torch.bincount(data.test.labels).tolist() == [2, 2, 2]
    every = {tuple(x.flatten().tolist()) for x in torch.cat([data.train.images, data.val.images, data.test.images])}
    assert every == {tuple(x.transpose(2, 0, 1).flatten().tolist()) for xs in images.values() for x in xs}
    mean = torch.cat([data.train.images, data.val.images]).float().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(data.mean, mean.tolist(), atol=1e-5)
    monkeypatch.setattr(files, "decode_images", lambda *a, **k: pytest.fail("decoded again instead of the cache"))
    assert torch.equal(load_dataset("folder", tmp_path / "data", val_size=3, cache_dir=tmp_path / "cache").test.images,
                       data.test.images)


def test_folder_with_train_and_test(tmp_path):
    write_class_folders(tmp_path / "data" / "train", 4)
    write_class_folders(tmp_path / "data" / "test", 2)
    data = load_dataset("folder", tmp_path / "data", val_size=0, cache_dir=tmp_path / "cache")
    assert (len(data.train), len(data.val), len(data.test)) == (12, 0, 6)
    (tmp_path / "data" / "test" / "yak").mkdir()
    with raises("has class folder(s) yak"):
        load_dataset("folder", tmp_path / "data", val_size=0, cache_dir=tmp_path / "cache")


def test_folder_images_of_several_sizes_stream_and_the_device_loader_refuses_them(tmp_path):
    write_class_folders(tmp_path / "data", 3)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "data" / "dog" / "odd.png")
    with raises(f"--loader device needs images of one size: {tmp_path / 'data' / 'cat' / '0.BMP'} is 12x10 but "
                f"{tmp_path / 'data' / 'dog' / 'odd.png'} is 5x5; use --loader stream"):
        load_dataset("folder", tmp_path / "data", val_size=0, cache_dir=tmp_path / "cache", loader="device")
    data = load_dataset("folder", tmp_path / "data", val_size=0, cache_dir=tmp_path / "cache")
    assert isinstance(data.train, FileDataset) and data.image_shape == (3, 224, 224)
    assert data.augment == "resized_crop_flip"


# ---------------------------------------------------------------------------------------- errors

def test_bad_names_and_folders(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet21k'; choose one of: digits, mnist"):
        load_dataset("imagenet21k")
    with raises(f"data directory {tmp_path / 'nowhere'} does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    cache, empty = tmp_path / "cache", tmp_path / "data"
    empty.mkdir()
    with raises(f"CIFAR-10 not found in {empty}: expected cifar-10-python.tar.gz, cifar-10-batches-py/, "
                f"or cifar10_{{train,test}}[_jpeg].npz; pass --download or --data-dir DIR"):
        load_dataset("cifar10", empty)
    with raises("MNIST not found"):
        load_dataset("mnist", empty)
    with raises("has no class sub-folders"):
        load_dataset("folder", empty, cache_dir=cache)
    (empty / "mnist_train.npz").write_bytes(b"PK\x03\x04 broken")
    (empty / "mnist_test.npz").write_bytes(b"PK\x03\x04 broken")
    with raises("mnist_train.npz is not a readable npz file"):
        load_dataset("mnist", empty)


def test_array_dataset_checks_types():
    ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with raises("images must be uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with raises("labels must be int64 (2,)"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------- validation split

def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.from_numpy(np.repeat(np.arange(10), [100, 100, 100, 100, 100, 50, 50, 50, 30, 20]))
    rest, held = stratified_split(labels, 70, seed=4)
    assert len(held) == 70 and len(rest) == len(labels) - 70
    assert torch.equal(torch.sort(torch.cat([rest, held])).values, torch.arange(len(labels)))
    assert torch.bincount(labels[held]).tolist() == [10, 10, 10, 10, 10, 5, 5, 5, 3, 2]
    again, other = stratified_split(labels, 70, seed=4)[1], stratified_split(labels, 70, seed=5)[1]
    assert torch.equal(held, again) and not torch.equal(held, other)
    rest, held = stratified_split(labels, 0, seed=0)
    assert len(held) == 0 and torch.equal(rest, torch.arange(len(labels)))


def test_largest_remainder_keeps_every_class():
    assert _largest_remainder([100, 1, 2, 50], 5) == [2, 0, 1, 2]
    assert _largest_remainder([100, 100, 3], 10) == [4, 5, 1]
    assert sum(_largest_remainder([7, 5, 3, 2], 9)) == 9


def test_validation_split_through_load_dataset():
    a, b = load_dataset("synthetic", val_size=30, seed=1), load_dataset("synthetic", val_size=30, seed=1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.bincount(a.val.labels).tolist() == [3] * 10
    train_rows = {tuple(x.flatten()[:64].tolist()) for x in a.train.images}
    assert not any(tuple(x.flatten()[:64].tolist()) in train_rows for x in a.val.images)
    assert len(load_dataset("synthetic", val_size=0).val) == 0
    with raises("val_size must be in 0..499"):
        load_dataset("synthetic", val_size=500)
    with raises("got -1"):
        load_dataset("synthetic", val_size=-1)


# ---------------------------------------------------------------------------------------- cache location

def test_cache_location_and_unwritable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKSMOOTH_CACHE", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache" and cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("BACKSMOOTH_CACHE")
    assert cache_root() == Path.home() / ".cache" / "backsmooth"
    (tmp_path / "file").write_text("")
    cache = DecodedCache(tmp_path / "file" / "sub")  # cannot be created: a file is in the way
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        arrays = cache.get("thing", [tmp_path / "file"], lambda: {"a": np.arange(3)})
    assert arrays["a"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------- the real files

@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def real_cifar10(shared_data, real_cache, tmp_path_factory) -> tuple[Path, DatasetSplits]:
    """CIFAR-10 with the real 10k test set standing in for the train set too: one decode of 10k JPEGs."""
    folder = tmp_path_factory.mktemp("cifar10")
    for part in ("train", "test"):
        (folder / f"cifar10_{part}_jpeg.npz").symlink_to(shared_data / "cifar10_test_jpeg.npz")
    return folder, load_dataset("cifar10", folder, val_size=1000, cache_dir=real_cache)


def test_real_cifar10_jpeg(shared_data, real_cifar10):
    _, data = real_cifar10
    assert_splits(data, "cifar10", (3, 32, 32), 10)
    assert (len(data.train), len(data.val), len(data.test)) == (9000, 1000, 10000)
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10 and data.test.labels[1000 * 3] == 3
    assert torch.bincount(data.val.labels).tolist() == [100] * 10
    assert data.classes == CIFAR10_CLASSES and "JPEG" in data.note
    with np.load(shared_data / "cifar10_test_jpeg.npz") as z:
        blob, offsets = z["jpeg"], z["offsets"]
    for i in (0, 4321, 9999):
        expected = pillow_decode(blob[offsets[i]:offsets[i + 1]].tobytes())
        assert torch.equal(data.test.images[i], torch.from_numpy(expected))


def test_real_cifar10_second_load_hits_the_cache(real_cifar10, real_cache, monkeypatch):
    folder, data = real_cifar10
    monkeypatch.setattr(files, "decode_images", lambda *a, **k: pytest.fail("decoded again instead of the cache"))
    again = load_dataset("cifar10", folder, val_size=1000, cache_dir=real_cache)  # the cache, not the decoder
    assert torch.equal(again.test.images, data.test.images) and torch.equal(again.val.labels, data.val.labels)


def test_real_mnist(shared_data):
    data = load_dataset("mnist", shared_data, val_size=1000)
    assert (len(data.train), len(data.val), len(data.test)) == (59000, 1000, 10000)
    assert data.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(data.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_tiny_imagenet_val(shared_data, real_cache):
    data = load_dataset("tiny_imagenet", shared_data, val_size=1000, cache_dir=real_cache)
    assert_splits(data, "tiny_imagenet", (3, 64, 64), 200)
    assert (len(data.train), len(data.val), len(data.test)) == (7000, 1000, 2000)
    assert torch.bincount(data.test.labels).tolist() == [10] * 200 and "80%" in data.note
    assert data.classes[0].startswith("goldfish")
