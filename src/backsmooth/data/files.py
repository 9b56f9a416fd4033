"""Low-level file formats shared by the readers: npz archives, encoded images, official pickles."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from backsmooth.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# what pickle.load may raise on a damaged or foreign file
PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)


def load_npz(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The `required` (and present `optional`) arrays of an npz file, read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in required if key not in archive.files]
            if missing:
                raise DataError(f"{path} lacks the array(s) {', '.join(missing)}; "
                                f"expected {', '.join(required)} (see docs/data.md)")
            return {key: archive[key] for key in (*required, *optional) if key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not a readable npz file ({error}); replace it with a good copy") from error


def decode_images(sources: Sequence[Path | bytes | memoryview], name_of: Callable[[int], str],
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image files or encoded bytes (at least one) into one RGB uint8 array (N, 3, H, W).

    Every image must have the same size: `size` (width, height) if given, else the first one's.
    `name_of(i)` says which file or entry an error is about.
    """
    first = _decode(sources[0], name_of(0))
    height, width = first.shape[:2]
    if size is not None and (width, height) != size:
        raise DataError(f"{name_of(0)} is {width}x{height} pixels, expected {size[0]}x{size[1]}; "
                        f"check that the file belongs to this dataset")
    out = np.empty((len(sources), 3, height, width), np.uint8)
    out[0] = first.transpose(2, 0, 1)
    for i in range(1, len(sources)):
        pixels = _decode(sources[i], name_of(i))
        if pixels.shape != first.shape:
            raise DataError(f"all images must share one size: {name_of(0)} is {width}x{height} but {name_of(i)} is "
                            f"{pixels.shape[1]}x{pixels.shape[0]}; resize the images first")
        out[i] = pixels.transpose(2, 0, 1)
    return out


def _decode(source: Path | bytes | memoryview, name: str) -> np.ndarray:
    """One image as RGB uint8 (H, W, 3) (see `rgb_image`)."""
    with open_image(source, name) as image:
        return np.asarray(rgb_image(image, name))


def open_image(source: Path | str | bytes | memoryview, name: str) -> Image.Image:
    """An image file or encoded bytes opened lazily (only the header is read); a broken link, a missing file or
    bytes that are not an image are a DataError naming `name`. Use as a context manager."""
    if isinstance(source, (Path, str)) and Path(source).is_symlink() and not Path(source).exists():
        raise DataError(f"{name} is a broken symbolic link; remove it or point it at the image")
    try:
        return Image.open(source if isinstance(source, (Path, str)) else io.BytesIO(source))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{name} is not a readable image ({error}); replace or remove it") from error


def rgb_image(image: Image.Image, name: str) -> Image.Image:
    """The decoded image in RGB, as docs/data.md states: grayscale is copied to the three channels, CMYK and YCbCr
    are converted by Pillow, an alpha channel (RGBA, LA, a palette's transparency) is dropped, and 16-bit
    grayscale keeps its top 8 bits (Pillow's own conversion would clip it to white)."""
    try:
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
        if image.mode in ("I", "F"):
            raise DataError(f"{name} has {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels; "
                            f"save it as an 8- or 16-bit image")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # Pillow warns when a palette's transparency goes straight to RGB
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{name} is not a readable image ({error}); replace or remove it") from error


def decode_jpeg_npz(path: Path, size: tuple[int, int], extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Decode an npz of concatenated JPEG files (`jpeg`, `offsets`, `y`) into `x` (N, 3, H, W) and `y`.

    The `extra` arrays present in the file (class names and the like) are passed through.
    """
    arrays = jpeg_npz(path, extra)
    blob, offsets = arrays.pop("jpeg"), arrays.pop("offsets")
    view = memoryview(blob)
    sources = [view[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    arrays["x"] = decode_images(sources, lambda i: f"image {i} of {path}", size)
    return arrays


def jpeg_npz(path: Path, extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of an npz of concatenated JPEG files, checked: `jpeg` uint8 bytes, `offsets` N+1 increasing
    positions from 0 to len(jpeg), `y`, and the `extra` arrays present."""
    arrays = load_npz(path, ("jpeg", "offsets", "y"), extra)
    blob, offsets = arrays["jpeg"], arrays["offsets"]
    if (blob.dtype != np.uint8 or blob.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer)
            or offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(blob)
            or np.any(np.diff(offsets) <= 0)):
        raise DataError(f"{path} is malformed: `jpeg` must be uint8 bytes and `offsets` N+1 increasing positions "
                        f"from 0 to len(jpeg); rebuild the file (see docs/data.md)")
    return arrays


def image_files(folder: Path) -> list[Path]:
    """The image files (by suffix, any case, not hidden) directly inside `folder`, sorted by name.

    Broken links with an image suffix are kept, so decoding refuses them by name instead of the
    dataset silently shrinking; sub-folders, hidden files and other suffixes are ignored.
    """
    try:
        entries = list(folder.iterdir())
    except OSError as error:
        raise DataError(f"cannot list {folder} ({error.strerror}); check its permissions") from error
    return sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and (p.is_file() or (p.is_symlink() and not p.exists())))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR batches (dicts, lists, bytes, numpy arrays) and refuses anything else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")


def unpickle(file: IO[bytes]) -> Any:
    """Load one official CIFAR pickle (Python 2 format, so byte-string keys); see _ArrayUnpickler."""
    return _ArrayUnpickler(file, encoding="bytes").load()
