"""Run under torchrun by test_stream.py: each rank streams two epochs of the test folder's training split and saves
the dataset indices it was given, per epoch. Arguments: DATA_DIR CACHE_DIR OUT_DIR."""

import os
import sys
from pathlib import Path

import torch

from backsmooth.data import StreamLoader, load_dataset

if __name__ == "__main__":
    data_dir, cache_dir, out = sys.argv[1:4]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    data = load_dataset("imagenet", data_dir, val_size=6, cache_dir=cache_dir, image_size=24, workers=0)
    loader = StreamLoader(data.train, 6, augment=data.augment, seed=3, drop_last=False, rank=rank,
                          world_size=world_size, workers=1)
    seen = [torch.cat([index for _, _, index in loader.indexed_epoch(epoch)]) for epoch in (0, 1)]
    Path(out).mkdir(exist_ok=True)
    torch.save(seen, Path(out) / f"{rank}.pt")
