"""The streaming data path measured (docs/benchmarks.md#the-streaming-data-path): images per second per decoding
worker at 224 px, resident memory against the dataset's size, and (with --arch) the fraction of a training step's
time spent waiting for data.

It writes an ImageNet-like folder of JPEGs (sizes drawn around ImageNet's average, 500 x 375, smooth content at
quality 90) once, then a folder ten times as large made of hard links to the same files (no extra disk), and
streams both. Usage:
    python benchmarks/stream_bench.py --out runs/stream-bench [--images 2000] [--workers 1,2] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backsmooth import models
from backsmooth.data import StreamLoader, load_dataset

CLASSES = 10


def write_folder(root: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs in train/ (and a few in val/), ten classes, sizes around 500 x 375, smooth random content."""
    if (root / "done").exists():
        return
    rng = np.random.default_rng(seed)
    for part, n in (("train", count), ("val", max(CLASSES, count // 50))):
        for k in range(n):
            folder = root / part / f"c{k % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = int(rng.integers(350, 650)), int(rng.integers(260, 490))
            coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
            noise = rng.integers(-12, 13, (height, width, 3))
            pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.JPEG", quality=90)
    (root / "done").touch()


def linked_copy(source: Path, target: Path, copies: int) -> None:
    """`target` holds `copies` hard links to each training image of `source` (and its val/), no new bytes."""
    if (target / "done").exists():
        return
    for path in sorted((source / "train").rglob("*.JPEG")) + sorted((source / "val").rglob("*.JPEG")):
        relative = path.relative_to(source)
        for copy in range(copies if relative.parts[0] == "train" else 1):
            destination = target / relative.parent / f"{copy}-{path.name}"
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not destination.exists():
                os.link(path, destination)
    (target / "done").touch()


def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        stack += [int(child) for child in children]
    return total


class PeakMemory:
    """The peak of `tree_rss` of this process, sampled every 50 ms while in the `with` block."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def images_per_second(data, workers: int, augment: str, batches: int, batch_size: int) -> float:
    """Decoded training images per second over `batches` batches, after the workers' first batch."""
    loader = StreamLoader(data.train, batch_size, augment=augment, workers=workers, seed=0)
    iterator = loader.epoch(0)
    next(iterator)
    start = time.perf_counter()
    for count, _ in enumerate(iterator, 1):
        if count == batches:
            break
    return count * batch_size / (time.perf_counter() - start)


def data_wait_fraction(data, arch: str, workers: int, batch_size: int, steps: int, device: torch.device) -> dict:
    """Seconds per step and the fraction of it spent waiting for the next batch, for a plain training step
    (forward, backward, SGD) of `arch` at the data's size: the floor of any method's step."""
    net = models.build(arch, CLASSES, mean=data.mean, std=data.std).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loader = StreamLoader(data.train, batch_size, augment=data.augment, workers=workers, device=device)
    waiting, total, iterator = 0.0, 0.0, loader.epoch(0)
    for step in range(steps + 2):
        start = time.perf_counter()
        x, y = next(iterator)
        fetched = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # the first batches wait for the workers to start
            waiting += fetched - start
            total += time.perf_counter() - start
    return {"arch": arch, "batch_size": batch_size, "workers": workers, "steps": steps,
            "seconds_per_step": total / steps, "data_wait_fraction": waiting / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/stream-bench")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--arch", default="", help="also time a training step of this architecture at 224 px")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one folder's peak memory, then exit
    args = parser.parse_args()
    out = Path(args.out)
    if args.memory_of:
        with PeakMemory() as memory:
            streamed = load_dataset("imagenet", args.memory_of, val_size=0, cache_dir=out / "cache", image_size=224)
            images_per_second(streamed, 2, "resized_crop_flip", args.batches, args.batch_size)
        print(json.dumps({"folder": Path(args.memory_of).name, "train_images": len(streamed.train),
                          "workers": 2, "peak_rss_mib": memory.peak / 2**20}))
        return
    small, large = out / "folder", out / "folder-x10"
    write_folder(small, args.images)
    linked_copy(small, large, 10)
    results: dict = {"images": args.images, "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                     "decode": [], "memory": []}
    data = load_dataset("imagenet", small, val_size=0, cache_dir=out / "cache", image_size=224)
    for workers in (int(w) for w in args.workers.split(",")):
        for augment in ("resized_crop_flip", "none"):
            rate = images_per_second(data, workers, augment, args.batches, args.batch_size)
            results["decode"].append({"workers": workers, "view": augment, "images_per_second": rate,
                                      "per_worker": rate / max(workers, 1)})
            print(json.dumps(results["decode"][-1]), flush=True)
    for folder in (small, large):  # each in a fresh process, so neither inherits the other's memory
        measured = subprocess.run([sys.executable, __file__, "--out", str(out), "--memory-of", str(folder),
                                   "--batches", str(args.batches), "--batch-size", str(args.batch_size)],
                                  capture_output=True, text=True, check=True)
        results["memory"].append(json.loads(measured.stdout.strip().splitlines()[-1]))
        print(json.dumps(results["memory"][-1]), flush=True)
    if args.arch:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results["step"] = data_wait_fraction(data, args.arch, max(int(w) for w in args.workers.split(",")),
                                             args.batch_size, args.steps, device)
        print(json.dumps(results["step"]), flush=True)
    (out / "stream_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
