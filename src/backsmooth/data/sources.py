"""Dataset readers for digits, synthetic, MNIST and CIFAR-10/100: each returns a train and a test set.

Readers validate what they read (dtype, shape, label range) and raise DataError with a one-line
message that names the file and says how to fix it. Image-folder datasets are in image_folders.py.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backsmooth.data.cache import DecodedCache
from backsmooth.data.dataset import ArrayDataset, checked_dataset, stratified_split
from backsmooth.data.download import ARCHIVES, download_file
from backsmooth.data.files import PICKLE_ERRORS, decode_jpeg_npz, load_npz, unpickle
from backsmooth.data.stream import FileDataset
from backsmooth.errors import DataError

TEST_SPLIT_SEED = 0  # datasets without an official test split always hold out the same examples


@dataclass(frozen=True)
class SourceOptions:
    """What a reader may use: where the files are, whether to download, the decoded cache, and for the readers
    that can stream (image folders, ImageNet, Tiny ImageNet) the loader asked for, the side length of streamed
    images (0: the dataset's own) and the number of decoding processes (None: default_workers())."""

    data_dir: Path
    download: bool
    cache: DecodedCache
    loader: str = "auto"
    image_size: int = 0
    workers: int | None = None


@dataclass(frozen=True)
class Source:
    """A dataset as read from disk, before the validation split."""

    train: ArrayDataset | FileDataset
    test: ArrayDataset | FileDataset
    classes: tuple[str, ...]
    note: str
    augment: str | None = None  # the training augmentation when it is not the dataset kind's (a streamed folder)


def split_off_test(full: ArrayDataset | FileDataset, fraction: float) -> tuple[Any, Any]:
    """(train, test) with a stratified `fraction` held out as test, always the same examples."""
    rest, test = stratified_split(full.labels, round(fraction * len(full)), TEST_SPLIT_SEED)
    return full.subset(rest), full.subset(test)


# ---------------------------------------------------------------------------------------- digits, synthetic

def read_digits(options: SourceOptions) -> Source:
    """scikit-learn's 1797 bundled 8x8 digits (values 0..16 scaled to 0..255); a fixed 20% is the test set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits demo needs scikit-learn: pip install 'backsmooth[demo]'") from None
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    full = checked_dataset(images, digits.target, "scikit-learn's digits", 10, (8, 8))
    train, test = split_off_test(full, 0.2)
    return Source(train, test, tuple(str(d) for d in range(10)),
                  "scikit-learn's handwritten digits; a fixed stratified 20% is the test set")


SYNTHETIC_COLOURS = torch.tensor(  # 8 cube corners, grey and violet: far apart, so the task is easy
    [(r, g, b) for r in (0.25, 0.75) for g in (0.25, 0.75) for b in (0.25, 0.75)]
    + [(0.5, 0.5, 0.5), (0.5, 0.25, 0.75)])


def read_synthetic(options: SourceOptions) -> Source:
    """Fixed random 3x32x32 images for tests: a class-dependent colour plus noise (learnable in one epoch)."""
    generator = torch.Generator().manual_seed(TEST_SPLIT_SEED)

    def make(n: int) -> ArrayDataset:
        labels = torch.randperm(n, generator=generator) % 10
        pixels = SYNTHETIC_COLOURS[labels][:, :, None, None] + 0.15 * torch.randn(n, 3, 32, 32, generator=generator)
        return ArrayDataset(pixels.clamp(0, 1).mul(255).round().to(torch.uint8), labels)

    return Source(make(500), make(200), tuple(f"class{c}" for c in range(10)),
                  "synthetic: class colour plus Gaussian noise, for tests")


# ---------------------------------------------------------------------------------------- MNIST

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers of the idx3 (images) and idx1 (labels) formats


def read_mnist(options: SourceOptions) -> Source:
    """The official idx files (optionally gzipped) or mnist_{train,test}.npz with `x` (N, 28, 28) and `y`."""
    folder = options.data_dir
    idx = {part: [_existing(folder / f"{split}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
           for part, split in (("train", "train"), ("test", "t10k"))}
    npz = {part: folder / f"mnist_{part}.npz" for part in ("train", "test")}
    if all(path is not None for paths in idx.values() for path in paths):
        sets = [checked_dataset(_read_idx(images, IDX_IMAGES, 3), _read_idx(labels, IDX_LABELS, 1),
                                f"{images} and {labels.name}", 10, (28, 28)) for images, labels in idx.values()]
        where = f"{folder} (idx files)"
    elif all(path.exists() for path in npz.values()):
        sets = []
        for path in npz.values():
            arrays = load_npz(path, ("x", "y"))
            sets.append(checked_dataset(arrays["x"], arrays["y"], str(path), 10, (28, 28)))
        where = f"{folder} (npz)"
    else:
        raise DataError(f"MNIST not found in {folder}: expected train-images-idx3-ubyte[.gz], "
                        f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], "
                        f"or mnist_{{train,test}}.npz; pass --data-dir DIR")
    return Source(sets[0], sets[1], tuple(str(d) for d in range(10)), f"MNIST from {where}")


def _existing(path: Path) -> Path | None:
    """`path` or `path.gz`, whichever exists."""
    gz = path.with_name(path.name + ".gz")
    return path if path.exists() else gz if gz.exists() else None


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """An idx file (big-endian header: magic, then `dims` sizes; then uint8 data) as an array."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is truncated or corrupt ({error}); download it again") from error
    header = 4 * (dims + 1)
    found = int.from_bytes(data[:4], "big")
    if len(data) < header or found != magic:
        raise DataError(f"{path} is not an MNIST idx file with {dims} dimension(s) (magic number {found}, "
                        f"expected {magic}); check the file names")
    shape = tuple(int.from_bytes(data[4 * k:4 * k + 4], "big") for k in range(1, dims + 1))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: its header promises {shape} bytes of data but "
                        f"{len(data) - header} follow; download it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()  # writable, for torch


# ---------------------------------------------------------------------------------------- CIFAR-10/100

@dataclass(frozen=True)
class CifarLayout:
    """Where the official CIFAR python archive keeps what, for one of the two datasets."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    classes: tuple[str, ...]  # the standard names, for npz files without `classes`


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
    caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
    flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
    maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
    tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

CIFAR = {
    "cifar10": CifarLayout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{k}" for k in range(1, 6)),
                           "test_batch", "batches.meta", b"labels", b"label_names", CIFAR10_CLASSES),
    "cifar100": CifarLayout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", b"fine_labels",
                            b"fine_label_names", CIFAR100_CLASSES),
}


def read_cifar(name: str, options: SourceOptions) -> Source:
    """CIFAR-10 or -100 from the first copy found in data_dir; else the official archive, if downloading.

    Preference: the extracted folder, the x/y npz pair (both lossless and quick), the official
    tar.gz, the JPEG-bytes npz pair (lossy).
    """
    layout, folder = CIFAR[name], options.data_dir
    archive = folder / ARCHIVES[name].filename
    npz = [folder / f"{name}_{part}.npz" for part in ("train", "test")]
    jpeg = [folder / f"{name}_{part}_jpeg.npz" for part in ("train", "test")]
    if (folder / layout.folder).is_dir():
        batches = _read_cifar_folder(folder / layout.folder, layout)
        return _cifar_source(_cifar_arrays(batches, layout, folder / layout.folder), layout, folder / layout.folder)
    if all(path.exists() for path in npz):
        return _cifar_from_npz(npz, layout, name)
    if not archive.exists() and not all(path.exists() for path in jpeg) and options.download:
        download_file(ARCHIVES[name].url, archive, ARCHIVES[name].md5)
    if archive.exists():
        return _cifar_source(options.cache.get(f"{name}-archive", [archive], lambda: _read_cifar_tar(archive, layout)),
                             layout, archive)
    if all(path.exists() for path in jpeg):
        return _cifar_from_jpeg(jpeg, layout, name, options.cache)
    raise DataError(f"{layout.title} not found in {folder}: expected {archive.name}, {layout.folder}/, "
                    f"or {name}_{{train,test}}[_jpeg].npz; pass --download or --data-dir DIR")


def _cifar_source(arrays: dict[str, np.ndarray], layout: CifarLayout, where: Path) -> Source:
    """Train and test sets from the arrays of the official batches (see _cifar_arrays)."""
    train, test = (checked_dataset(arrays[f"{part}_x"], arrays[f"{part}_y"], str(where), len(layout.classes))
                   for part in ("train", "test"))
    return Source(train, test, tuple(arrays["classes"].tolist()), f"{layout.title} from {where}")


def _read_cifar_folder(folder: Path, layout: CifarLayout) -> dict[str, Any]:
    """The unpickled batches of an extracted official archive."""
    batches = {}
    for name in (*layout.train, layout.test, layout.meta):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder} lacks {name}; extract the official {layout.title} archive there again")
        try:
            with open(path, "rb") as file:
                batches[name] = unpickle(file)
        except (OSError, *PICKLE_ERRORS) as error:
            raise DataError(f"{path} is not a readable {layout.title} batch ({error}); "
                            f"extract the official archive again") from error
    return batches


def _read_cifar_tar(archive: Path, layout: CifarLayout) -> dict[str, np.ndarray]:
    """Arrays of the official tar.gz, read member by member without extracting anything to disk."""
    wanted = {*layout.train, layout.test, layout.meta}
    batches = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                file = tar.extractfile(member) if member.isfile() and name in wanted else None
                if file is not None:
                    batches[name] = unpickle(file)
    except (tarfile.TarError, OSError, zlib.error, *PICKLE_ERRORS) as error:
        raise DataError(f"{archive} is truncated or corrupt ({error}); delete it and download it again "
                        f"(--download)") from error
    missing = sorted(wanted - batches.keys())
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}, so it is not the official {layout.title} archive; "
                        f"delete it and download it again (--download)")
    return _cifar_arrays(batches, layout, archive)


def _cifar_arrays(batches: dict[str, Any], layout: CifarLayout, where: Path) -> dict[str, np.ndarray]:
    """Concatenate the batches into train_x/train_y/test_x/test_y (x as uint8 N, 3, 32, 32) and classes."""
    arrays: dict[str, np.ndarray] = {}
    for part, names in (("train", layout.train), ("test", (layout.test,))):
        xs, ys = [], []
        for name in names:
            batch = batches[name]
            if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
                raise DataError(f"{name} in {where} is not a {layout.title} batch (no data or labels); "
                                f"use the official archive")
            xs.append(np.asarray(batch[b"data"]))
            ys.append(np.asarray(batch[layout.label_key]))
        x = np.concatenate(xs)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise DataError(f"{part} data in {where} is {x.dtype} {x.shape}, expected uint8 (N, 3072); "
                            f"use the official archive")
        arrays[f"{part}_x"], arrays[f"{part}_y"] = x.reshape(-1, 3, 32, 32), np.concatenate(ys).astype(np.int64)
    meta = batches[layout.meta]
    names = meta.get(layout.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != len(layout.classes):
        raise DataError(f"{layout.meta} in {where} lacks the {len(layout.classes)} class names; "
                        f"use the official archive")
    arrays["classes"] = np.array([n.decode() if isinstance(n, bytes) else str(n) for n in names])
    return arrays


def _cifar_from_npz(paths: list[Path], layout: CifarLayout, name: str) -> Source:
    """The x/y npz pair: `x` uint8 (N, 32, 32, 3), `y` labels, optional `classes`."""
    sets, classes = [], layout.classes
    for path in paths:
        arrays = load_npz(path, ("x", "y"), ("classes",))
        sets.append(checked_dataset(arrays["x"], arrays["y"], str(path), len(layout.classes), (32, 32, 3),
                                    channels_last=True))
        classes = _class_names(arrays, path, classes)
    return Source(sets[0], sets[1], classes, f"{layout.title} from {paths[0].parent}/{name}_{{train,test}}.npz")


def _cifar_from_jpeg(paths: list[Path], layout: CifarLayout, name: str, cache: DecodedCache) -> Source:
    """The JPEG-bytes npz pair, decoded once and then read from the cache."""
    sets, classes = [], layout.classes
    for path in paths:
        arrays = cache.get(path.resolve().stem, [path], lambda path=path: decode_jpeg_npz(path, (32, 32), ("classes",)))
        sets.append(checked_dataset(arrays["x"], arrays["y"], str(path), len(layout.classes)))
        classes = _class_names(arrays, path, classes)
    return Source(sets[0], sets[1], classes,
                  f"{layout.title} from {name}_{{train,test}}_jpeg.npz: a JPEG-compressed copy, "
                  f"not bit-exact {layout.title} (accuracies can differ from published numbers)")


def _class_names(arrays: dict[str, np.ndarray], path: Path, default: tuple[str, ...]) -> tuple[str, ...]:
    """The file's `classes` array if it has one (it must have one name per class), else `default`."""
    if "classes" not in arrays:
        return default
    names = tuple(str(n) for n in arrays["classes"].tolist())
    if len(names) != len(default):
        raise DataError(f"`classes` in {path} has {len(names)} names, expected {len(default)}; "
                        f"check that the file belongs to this dataset")
    return names
