"""Datasets as uint8 tensors in memory, and a device-resident loader with batched augmentation.

`load_dataset(name, data_dir)` reads one of `dataset_names()` and returns its train / validation /
test splits (`DatasetSplits`); `DeviceLoader` serves shuffled, augmented batches of an `ArrayDataset` from device
memory, `StreamLoader` those of a `FileDataset` (images decoded by worker processes as batches need them).
See docs/data.md for the accepted files of every source.
"""

from backsmooth.data.dataset import ArrayDataset, DatasetSplits, unit_float
from backsmooth.data.load import DatasetKind, dataset_kind, dataset_names, load_dataset, register
from backsmooth.data.loader import DeviceLoader
from backsmooth.data.sources import Source, SourceOptions
from backsmooth.data.stream import FileDataset, StreamLoader

__all__ = ["ArrayDataset", "DatasetKind", "DatasetSplits", "DeviceLoader", "FileDataset", "Source", "SourceOptions",
           "StreamLoader", "dataset_kind", "dataset_names", "load_dataset", "register", "unit_float"]
