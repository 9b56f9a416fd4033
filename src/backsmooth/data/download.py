"""Download the official CIFAR archives, verifying their md5 before they are used."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from backsmooth.atomic import atomic_file
from backsmooth.errors import DataError


@dataclass(frozen=True)
class Archive:
    """Where an official archive lives and the checksum its publisher gives for it."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def download_file(url: str, dest: str | os.PathLike, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`, verifying its md5; `dest` only ever holds a complete, verified file.

    The bytes go to a temporary file next to `dest`, which is renamed into place once the checksum
    matches and deleted otherwise.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot write to {dest.parent}: {error}; choose a writable --data-dir") from error
    try:
        digest = hashlib.md5()
        with atomic_file(dest) as file, urllib.request.urlopen(url, timeout=timeout) as response:
            print(f"downloading {url} to {dest}", file=sys.stderr)
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                file.write(chunk)
            if digest.hexdigest() != md5:  # raising here deletes the temporary file: dest is never corrupt
                raise DataError(f"checksum mismatch for {url}: expected md5 {md5}, got {digest.hexdigest()}; "
                                f"the download is corrupt, try again or fetch the file by hand into {dest.parent}")
    except OSError as error:  # includes urllib's URLError and HTTPError
        raise DataError(f"could not download {url}: {error}; check the connection, "
                        f"or fetch the file by hand into {dest.parent}") from error
    return dest
