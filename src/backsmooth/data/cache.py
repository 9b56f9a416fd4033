"""A disk cache of decoded datasets, so JPEGs and archives are decoded once, not on every run.

Each entry is an uncompressed `.npz` named after the dataset part and a hash of its sources' absolute
paths, sizes and modification times: a changed source gets a new entry. Entries are written to a
temporary file and renamed into place, so a reader never sees half a file; an unreadable entry is
rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from backsmooth.atomic import atomic_file

Arrays = dict[str, np.ndarray]

FORMAT_VERSION = 1  # bump when what the readers store changes


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: `cache_dir`, else $BACKSMOOTH_CACHE, else ~/.cache/backsmooth."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("BACKSMOOTH_CACHE"):
        return Path(os.environ["BACKSMOOTH_CACHE"]).expanduser()
    return Path.home() / ".cache" / "backsmooth"


def source_key(paths: Iterable[Path]) -> str:
    """A hash of every file and folder under `paths`: absolute path, size and modification time."""
    digest = hashlib.sha256(f"backsmooth-cache-v{FORMAT_VERSION}".encode())
    for path in paths:
        for entry in _entries(path.resolve()):
            stat = _stat(entry)
            digest.update(f"{entry}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _stat(entry: str) -> os.stat_result:
    """The entry's status, or its link's own for a broken symbolic link (the readers decide what it means)."""
    try:
        return os.stat(entry)
    except OSError:
        return os.lstat(entry)


def _entries(path: Path) -> list[str]:
    """`path` and, for a folder, everything below it (so an added or renamed folder counts too), in a fixed order."""
    if not path.is_dir():
        return [str(path)]
    below = (os.path.join(folder, name) for folder, dirs, files in os.walk(path) for name in (*dirs, *files))
    return [str(path), *sorted(below)]


class DecodedCache:
    """Named entries of numpy arrays under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, name: str, sources: Iterable[Path], build: Callable[[], Arrays]) -> Arrays:
        """The arrays cached for `name` and the current state of `sources`, built (and stored) on a miss.

        `name` only labels the entry file (use the real source's name); the hash of `sources` keys it.
        """
        path = self.root / f"{name}-{source_key(sources)}.npz"
        arrays = _read(path)
        if arrays is None:
            arrays = build()
            _write(path, arrays)
        return arrays


def _read(path: Path) -> Arrays | None:
    """The entry's arrays, or None if it is missing or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            return {key: entry[key] for key in entry.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _write(path: Path, arrays: Arrays) -> None:
    """Store atomically: temporary file in the same folder, flushed to disk, then renamed into place."""
    try:
        with atomic_file(path) as file:
            np.savez(file, **arrays)
    except OSError as error:  # a read-only or full disk costs speed, not correctness
        warnings.warn(f"could not write the dataset cache {path}: {error}; set --cache-dir or BACKSMOOTH_CACHE",
                      stacklevel=3)
