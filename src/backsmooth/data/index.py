"""The index of an image folder: its class folders, files, labels and image sizes (headers only, read by worker
processes), cached like decoded data. It decides whether the folder streams, and finds an unreadable image
before a run writes anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from backsmooth.data.files import image_files, open_image
from backsmooth.data.sources import SourceOptions
from backsmooth.data.stream import default_workers, worker_batches
from backsmooth.errors import DataError

Arrays = dict[str, np.ndarray]
MEMORY_SHARE = 4  # auto streams a dataset whose decoded pixels exceed 1 / MEMORY_SHARE of this machine's memory
MEMORY_CAP = 8 * 2**30  # ... or 8 GiB, whichever is smaller (it must also fit the GPU with the model beside it)


def class_folders(root: Path) -> list[str]:
    """The sorted names of the non-hidden sub-folders of `root`: one per class."""
    try:
        entries = list(root.iterdir())
    except OSError as error:
        raise DataError(f"cannot list {root} ({error.strerror}); check its permissions") from error
    names = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root} has no class sub-folders; put the images of each class in their own folder")
    return names


def folder_index(options: SourceOptions, parts: tuple[str, ...]) -> Arrays:
    """The index of `data_dir/PART/CLASS/*` for each of `parts` ("" for `data_dir/CLASS/*`), cached: `classes`, and
    per part `{part}_paths` (relative to data_dir, bytes), `{part}_y` and `{part}_sizes` ((N, 2) width, height)."""
    folder = options.data_dir
    return options.cache.get("folder-index-" + "-".join(p or "all" for p in parts), [folder],
                             lambda: _build_index(folder, parts, options.workers))


def _build_index(folder: Path, parts: tuple[str, ...], workers: int | None) -> Arrays:
    classes = class_folders(folder / parts[0])
    arrays: Arrays = {"classes": np.array(classes)}
    for number, part in enumerate(parts):
        root = folder / part
        extra = sorted(set(class_folders(root)) - set(classes))
        if extra:
            raise DataError(f"{root} has class folder(s) {', '.join(extra)} that {folder / parts[0]} lacks; "
                            f"use the same class names in every split")
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = image_files(root / name) if (root / name).is_dir() else []
            if not found and number == 0:
                raise DataError(f"class folder {root / name} holds no images (.png, .jpg, .jpeg or .bmp)")
            paths += [str(p.relative_to(folder)) for p in found]
            labels += [label] * len(found)
        if not paths:
            raise DataError(f"{root} holds no images in its class folders (.png, .jpg, .jpeg or .bmp)")
        prefix = f"{part}_" if part else ""
        arrays[f"{prefix}paths"] = np.array([p.encode() for p in paths], dtype=np.bytes_)
        arrays[f"{prefix}y"] = np.array(labels, np.int64)
        arrays[f"{prefix}sizes"] = image_sizes(folder, arrays[f"{prefix}paths"], workers)
    return arrays


class _Headers(Dataset):
    """Item i -> (width, height) of image i, from its header; an unreadable file is a DataError naming it."""

    def __init__(self, folder: Path, paths: np.ndarray) -> None:
        self.folder, self.paths = folder, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.folder / self.paths[i].decode()
        with open_image(path, str(path)) as image:
            return torch.tensor(image.size, dtype=torch.int64)


def image_sizes(folder: Path, paths: np.ndarray, workers: int | None = None) -> np.ndarray:
    """(N, 2) width and height of every image, read from the headers by `workers` processes."""
    count = default_workers() if workers is None else workers
    loader = DataLoader(_Headers(folder, paths), batch_size=256, num_workers=count if len(paths) > 512 else 0)
    sizes = list(worker_batches(loader))
    return torch.cat(sizes).numpy() if sizes else np.zeros((0, 2), np.int64)


def fits_in_memory(count: int, side_pixels: int) -> bool:
    """Whether `count` decoded RGB images of `side_pixels` pixels each are small enough to keep whole in memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * 2**30
    return count * 3 * side_pixels <= min(memory // MEMORY_SHARE, MEMORY_CAP)
