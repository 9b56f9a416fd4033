"""Datasets as uint8 tensors in memory, and a device-resident loader with batched augmentation.

`load_dataset(name, data_dir)` reads one of `dataset_names()` and returns its train / validation /
test splits (`DatasetSplits`); `DeviceLoader` serves shuffled, augmented batches of an `ArrayDataset`.
See docs/data.md for the accepted files of every source.
"""

from backsmooth.data.dataset import ArrayDataset, DatasetSplits, unit_float
from backsmooth.data.load import DatasetKind, dataset_kind, dataset_names, load_dataset, register
from backsmooth.data.loader import DeviceLoader
from backsmooth.data.sources import Source, SourceOptions

__all__ = ["ArrayDataset", "DatasetKind", "DatasetSplits", "DeviceLoader", "Source", "SourceOptions", "dataset_kind",
           "dataset_names", "load_dataset", "register", "unit_float"]
