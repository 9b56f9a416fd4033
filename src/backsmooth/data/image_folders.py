"""Readers for datasets stored as image files: Tiny ImageNet and a generic folder of class sub-folders.

Decoding thousands of JPEGs is slow, so the decoded arrays go through the cache (cache.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backsmooth.data.dataset import checked_dataset
from backsmooth.data.files import decode_images, decode_jpeg_npz, image_files
from backsmooth.data.sources import Source, SourceOptions, split_off_test
from backsmooth.errors import DataError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


# ---------------------------------------------------------------------------------------- Tiny ImageNet

def read_tiny_imagenet(options: SourceOptions) -> Source:
    """Tiny ImageNet from the official folder `tiny-imagenet-200/`, else from JPEG-bytes npz files.

    The official val set is the test set. With only the val npz, it is split 80/20 into train and test.
    """
    folder = options.data_dir
    root = folder / "tiny-imagenet-200"
    train_npz, val_npz = folder / "tinyimagenet_train_jpeg.npz", folder / "tinyimagenet_val_jpeg.npz"
    if root.is_dir():
        arrays = options.cache.get("tiny_imagenet-folder", [root], lambda: _read_tiny_folder(root))
        train, test = (checked_dataset(arrays[f"{part}_x"], arrays[f"{part}_y"], str(root), 200)
                       for part in ("train", "test"))
        return Source(train, test, tuple(arrays["classes"].tolist()),
                      f"Tiny ImageNet from {root} (test = official val)")
    if not val_npz.exists():
        raise DataError(f"Tiny ImageNet not found in {folder}: expected tiny-imagenet-200/ (unzip {TINY_IMAGENET_URL} "
                        f"there) or tinyimagenet_val_jpeg.npz; pass --data-dir DIR")
    test_arrays = _read_tiny_npz(val_npz, options)
    test = checked_dataset(test_arrays["x"], test_arrays["y"], str(val_npz), 200)
    classes = _tiny_classes(test_arrays, val_npz)
    if train_npz.exists():
        train_arrays = _read_tiny_npz(train_npz, options)
        train = checked_dataset(train_arrays["x"], train_arrays["y"], str(train_npz), 200)
        return Source(train, test, classes, f"Tiny ImageNet from {folder} (npz; test = official val)")
    train, test = split_off_test(test, 0.2)
    return Source(train, test, classes,
                  f"Tiny ImageNet from {val_npz}: only the official val set is available, split into a fixed "
                  f"stratified 80% train / 20% test (not comparable with results trained on the official train set)")


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
    """Decode the official layout: wnids.txt, words.txt, train/<wnid>/images/, val/images + val_annotations.txt.

    Labels index the sorted WordNet ids (the ImageFolder convention); class names come from words.txt.
    """
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
    return {"train_x": decode_images(train_files, lambda i: str(train_files[i]), (64, 64)),
            "train_y": np.array(train_labels, np.int64),
            "test_x": decode_images(val_files, lambda i: str(val_files[i]), (64, 64)),
            "test_y": np.array(val_labels, np.int64),
            "classes": np.array([words.get(wnid, wnid) for wnid in wnids])}


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
    arrays = options.cache.get("folder", [folder], lambda: _read_class_folders(folder))
    classes = tuple(arrays["classes"].tolist())
    if "test_x" in arrays:
        train, test = (checked_dataset(arrays[f"{part}_x"], arrays[f"{part}_y"], str(folder / part), len(classes))
                       for part in ("train", "test"))
        return Source(train, test, classes, f"image folders {folder}/train and {folder}/test")
    train, test = split_off_test(checked_dataset(arrays["x"], arrays["y"], str(folder), len(classes)), 0.2)
    return Source(train, test, classes, f"image folder {folder}; a fixed stratified 20% is the test set")


def _read_class_folders(folder: Path) -> dict[str, np.ndarray]:
    """Decode `folder/<class>/*` (as `x`, `y`) or `folder/{train,test}/<class>/*` (as `train_x`, ... `test_y`)."""
    if (folder / "train").is_dir() != (folder / "test").is_dir():
        raise DataError(f"{folder} must have both train/ and test/ sub-folders, or neither (then one folder per class)")
    split = (folder / "train").is_dir()
    classes = _class_folders(folder / "train" if split else folder)
    arrays = {"classes": np.array(classes)}
    for part in ("train", "test") if split else ("",):
        root = folder / part
        extra = sorted(set(_class_folders(root)) - set(classes))
        if extra:
            raise DataError(f"{root} has class folder(s) {', '.join(extra)} that {folder / 'train'} lacks; "
                            f"use the same class names in train/ and test/")
        files, labels = [], []
        for label, name in enumerate(classes):
            found = image_files(root / name) if (root / name).is_dir() else []
            if not found and part != "test":
                raise DataError(f"class folder {root / name} holds no images (.png, .jpg, .jpeg or .bmp)")
            files += found
            labels += [label] * len(found)
        if not files:
            raise DataError(f"{root} holds no images in its class folders (.png, .jpg, .jpeg or .bmp)")
        prefix = f"{part}_" if part else ""
        arrays[f"{prefix}x"] = decode_images(files, lambda i, files=files: str(files[i]))
        arrays[f"{prefix}y"] = np.array(labels, np.int64)
    if split and arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"train and test images in {folder} differ in size ({arrays['train_x'].shape[3]}x"
                        f"{arrays['train_x'].shape[2]} vs {arrays['test_x'].shape[3]}x{arrays['test_x'].shape[2]}); "
                        f"resize them to one size")
    return arrays


def _class_folders(root: Path) -> list[str]:
    """The sorted names of the non-hidden sub-folders of `root`: one per class."""
    try:
        entries = list(root.iterdir())
    except OSError as error:
        raise DataError(f"cannot list {root} ({error.strerror}); check its permissions") from error
    names = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root} has no class sub-folders; put the images of each class in their own folder")
    return names
