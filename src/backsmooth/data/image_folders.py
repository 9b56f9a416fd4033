"""Readers for datasets stored as image files: Tiny ImageNet, a generic folder of class sub-folders, and the
ImageNet layout.

Decoding thousands of JPEGs is slow, so the decoded arrays go through the cache (cache.py). Data that differs in
size or would not fit in memory is streamed instead (stream.py): a FileDataset per split, decoded by workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from backsmooth.data.dataset import checked_dataset, checked_labels
from backsmooth.data.files import decode_images, decode_jpeg_npz, image_files, jpeg_npz
from backsmooth.data.index import fits_in_memory, folder_index
from backsmooth.data.sources import Source, SourceOptions, split_off_test
from backsmooth.data.stream import EncodedImages, FileDataset
from backsmooth.errors import DataError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


# ---------------------------------------------------------------------------------------- Tiny ImageNet

def read_tiny_imagenet(options: SourceOptions) -> Source:
    """Tiny ImageNet from the official folder `tiny-imagenet-200/`, else from JPEG-bytes npz files.

    The official val set is the test set. With only the val npz, it is split 80/20 into train and test.
    With --loader stream the images are decoded as batches need them (at --image-size, default 64).
    """
    folder = options.data_dir
    root = folder / "tiny-imagenet-200"
    train_npz, val_npz = folder / "tinyimagenet_train_jpeg.npz", folder / "tinyimagenet_val_jpeg.npz"
    stream = options.loader == "stream"
    if root.is_dir():
        if stream:
            files = _tiny_folder_files(root)
            train, test = (_tiny_stream(EncodedImages.files(root, [str(f.relative_to(root)) for f in files[part]]),
                                        files[f"{part}_y"], options) for part in ("train", "test"))
            return Source(train, test, files["classes"], f"Tiny ImageNet from {root}, streamed (test = official val)")
        arrays = options.cache.get("tiny_imagenet-folder", [root], lambda: _read_tiny_folder(root))
        train, test = (checked_dataset(arrays[f"{part}_x"], arrays[f"{part}_y"], str(root), 200)
                       for part in ("train", "test"))
        return Source(train, test, tuple(arrays["classes"].tolist()),
                      f"Tiny ImageNet from {root} (test = official val)")
    if not val_npz.exists():
        raise DataError(f"Tiny ImageNet not found in {folder}: expected tiny-imagenet-200/ (unzip {TINY_IMAGENET_URL} "
                        f"there) or tinyimagenet_val_jpeg.npz; pass --data-dir DIR")
    test_arrays = jpeg_npz(val_npz, ("wnids", "words")) if stream else _read_tiny_npz(val_npz, options)
    test = _tiny_stream_npz(test_arrays, val_npz, options) if stream else checked_dataset(
        test_arrays["x"], test_arrays["y"], str(val_npz), 200)
    classes = _tiny_classes(test_arrays, val_npz)
    how = ", streamed" if stream else ""
    if train_npz.exists():
        train_arrays = jpeg_npz(train_npz) if stream else _read_tiny_npz(train_npz, options)
        train = _tiny_stream_npz(train_arrays, train_npz, options) if stream else checked_dataset(
            train_arrays["x"], train_arrays["y"], str(train_npz), 200)
        return Source(train, test, classes, f"Tiny ImageNet from {folder} (npz{how}; test = official val)")
    train, test = split_off_test(test, 0.2)
    return Source(train, test, classes,
                  f"Tiny ImageNet from {val_npz}{how}: only the official val set is available, split into a fixed "
                  f"stratified 80% train / 20% test (not comparable with results trained on the official train set)")


def _tiny_stream_npz(arrays: dict[str, np.ndarray], path: Path, options: SourceOptions) -> FileDataset:
    """A JPEG-bytes npz of Tiny ImageNet as a streamed dataset."""
    encoded = EncodedImages(blob=arrays["jpeg"], offsets=arrays["offsets"], where=str(path))
    return _tiny_stream(encoded, checked_labels(arrays["y"], len(encoded), str(path), 200), options)


def _tiny_stream(encoded: EncodedImages, labels: np.ndarray, options: SourceOptions) -> FileDataset:
    """Tiny ImageNet streamed at --image-size (default its own 64 pixels, kept as they are)."""
    size = options.image_size or 64
    return FileDataset(encoded, torch.from_numpy(labels.astype(np.int64)), size, 1.0 if size == 64 else 0.875,
                       workers=options.workers)


def _read_tiny_npz(path: Path, options: SourceOptions) -> dict[str, np.ndarray]:
    """Decoded arrays of one Tiny ImageNet JPEG npz (`x`, `y`, and `wnids`/`words` when present)."""
    return options.cache.get(path.resolve().stem, [path], lambda: decode_jpeg_npz(path, (64, 64), ("wnids", "words")))


def _tiny_classes(arrays: dict[str, np.ndarray], path: Path) -> tuple[str, ...]:
    """Human-readable class names (`words`), else the WordNet ids, else the ids' positions."""
    names = arrays.get("words", arrays.get("wnids"))
    if names is None:
        return tuple(str(c) for c in range(200))
    if len(names) != 200:
        raise DataError(f"{path} names {len(names)} classes, expected Tiny ImageNet's 200; use the original file")
    return tuple(str(n) for n in names.tolist())


def _read_tiny_folder(root: Path) -> dict[str, np.ndarray]:
    """Decode the official layout (see `_tiny_folder_files`)."""
    files = _tiny_folder_files(root)
    return {"train_x": decode_images(files["train"], lambda i: str(files["train"][i]), (64, 64)),
            "train_y": files["train_y"],
            "test_x": decode_images(files["test"], lambda i: str(files["test"][i]), (64, 64)),
            "test_y": files["test_y"],
            "classes": np.array(files["classes"])}


def _tiny_folder_files(root: Path) -> dict:
    """The files and labels of the official layout: wnids.txt, words.txt, train/<wnid>/images/, val/images +
    val_annotations.txt. Labels index the sorted WordNet ids (the ImageFolder convention); class names come
    from words.txt."""
    wnids = sorted(_lines(root / "wnids.txt"))
    if len(wnids) != 200:
        raise DataError(f"{root / 'wnids.txt'} lists {len(wnids)} classes, expected 200; "
                        f"unzip the official archive again")
    label = {wnid: k for k, wnid in enumerate(wnids)}
    words_file = root / "words.txt"  # optional: without it the WordNet ids are the class names
    words = dict(line.split("\t", 1) for line in _lines(words_file) if "\t" in line) if words_file.exists() else {}
    train_files, train_labels = [], []
    for wnid in wnids:
        files = image_files(root / "train" / wnid / "images") if (root / "train" / wnid / "images").is_dir() else []
        if not files:
            raise DataError(f"{root / 'train' / wnid / 'images'} holds no images; unzip the official archive again")
        train_files += files
        train_labels += [label[wnid]] * len(files)
    val_files, val_labels = [], []
    for line in _lines(root / "val" / "val_annotations.txt"):
        name, wnid = line.split("\t")[:2]
        if wnid not in label:
            raise DataError(f"{root / 'val' / 'val_annotations.txt'} names class {wnid}, which is not in wnids.txt; "
                            f"unzip the official archive again")
        val_files.append(root / "val" / "images" / name)
        val_labels.append(label[wnid])
    return {"train": train_files, "train_y": np.array(train_labels, np.int64), "test": val_files,
            "test_y": np.array(val_labels, np.int64), "classes": tuple(words.get(wnid, wnid) for wnid in wnids)}


def _lines(path: Path) -> list[str]:
    """The non-empty lines of a text file of the official layout."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror}); unzip the official archive again") from error


# ---------------------------------------------------------------------------------------- image folders

def read_folder(options: SourceOptions) -> Source:
    """One sub-folder per class of image files, or train/ and test/ folders that each have them.

    Without train/ and test/, a fixed stratified 20% of the images is the test set.
    """
    folder = options.data_dir
    if (folder / "train").is_dir() != (folder / "test").is_dir():
        raise DataError(f"{folder} must have both train/ and test/ sub-folders, or neither (then one folder per class)")
    return _class_folder_source(options, ("train", "test") if (folder / "train").is_dir() else ("",), False)


def read_imagenet(options: SourceOptions) -> Source:
    """The ImageNet layout, `train/CLASS/*` and `val/CLASS/*` (val is the test set), streamed at --image-size."""
    folder = options.data_dir
    if not ((folder / "train").is_dir() and (folder / "val").is_dir()):
        raise DataError(f"{folder} must hold train/ and val/ folders with one sub-folder of images per class (the "
                        f"ImageNet layout, docs/data.md); pass --data-dir DIR")
    return _class_folder_source(options, ("train", "val"), True)


def _class_folder_source(options: SourceOptions, parts: tuple[str, ...], always_stream: bool) -> Source:
    """Class folders read through their index: decoded whole when they fit and share one size (the device
    loader), else streamed (`--loader` decides when it is not auto)."""
    folder, index = options.data_dir, folder_index(options, parts)
    classes = tuple(index["classes"].tolist())
    sizes = np.concatenate([index[_key(part, "sizes")] for part in parts])
    uniform = bool((sizes == sizes[0]).all())
    width, height = (int(v) for v in sizes[0])
    if options.loader == "device" or (options.loader == "auto" and not always_stream and uniform
                                      and not options.image_size and fits_in_memory(len(sizes), width * height)):
        if not uniform:
            odd = int(np.flatnonzero((sizes != sizes[0]).any(axis=1))[0])
            raise DataError(f"--loader device needs images of one size: {folder / _path(index, parts, 0)} is "
                            f"{width}x{height} but {folder / _path(index, parts, odd)} is {sizes[odd][0]}x"
                            f"{sizes[odd][1]}; use --loader stream")
        if options.image_size and options.image_size != (width if width == height else 0):
            raise DataError(f"--image-size resizes streamed images only; the images here are {width}x{height}: drop "
                            f"--image-size or use --loader stream")
        arrays = options.cache.get("folder", [folder], lambda: _decode_index(folder, index, parts))
        splits = [checked_dataset(arrays[_key(part, "x")], index[_key(part, "y")], str(folder / part), len(classes))
                  for part in parts]
        augment = "crop_flip"
    else:
        size = options.image_size or (width if uniform and width == height else 224)
        crop = 1.0 if uniform and width == height == size else 0.875
        splits = [FileDataset(EncodedImages.files(folder, [p.decode() for p in index[_key(part, "paths")]]),
                              torch.from_numpy(index[_key(part, "y")]), size, crop, workers=options.workers)
                  for part in parts]
        augment = None if crop == 1.0 else "resized_crop_flip"
    where = f"{folder} ({'streamed' if isinstance(splits[0], FileDataset) else 'decoded in memory'})"
    if len(parts) == 2:
        return Source(splits[0], splits[1], classes, f"image folders {where}: {parts[0]}/ and {parts[1]}/", augment)
    train, test = split_off_test(splits[0], 0.2)
    return Source(train, test, classes, f"image folder {where}; a fixed stratified 20% is the test set", augment)


def _key(part: str, name: str) -> str:
    return f"{part}_{name}" if part else name


def _path(index: dict[str, np.ndarray], parts: tuple[str, ...], i: int) -> str:
    """The path of image i of the parts' images put together."""
    paths = np.concatenate([index[_key(part, "paths")] for part in parts])
    return paths[i].decode()


def _decode_index(folder: Path, index: dict[str, np.ndarray], parts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every image of the index decoded into one uint8 (N, 3, H, W) array per part."""
    arrays = {}
    for part in parts:
        files = [folder / p.decode() for p in index[_key(part, "paths")]]
        arrays[_key(part, "x")] = decode_images(files, lambda i, files=files: str(files[i]))
    return arrays
