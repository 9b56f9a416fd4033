"""The resumable state of one evaluation: per unit (clean, each engine attack, each AutoAttack
component) a correctness flag per example, the batches finished and the seconds spent, saved
atomically after every batch so a killed evaluation resumes to exactly the uninterrupted result."""

import hashlib
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from backsmooth.attacks import predict_eval
from backsmooth.checkpoint import load, save
from backsmooth.errors import ConfigError
from backsmooth.evaluation.accuracy import to_unit_float

BatchFn = Callable[[Tensor, Tensor, int, slice], Tensor]
"""(images in [0, 1] on the device, labels, batch index, slice of the batch) -> bool flags of the batch."""


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from (seed, attack, batch, restart): resumable runs redraw the same noise."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


def digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A short content hash of named tensors (model weights, data) for the resume fingerprint."""
    hasher = hashlib.sha256()
    for name, tensor in tensors:
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


class EvaluationState:
    """The batches of one evaluation and its resumable per-unit flags (see the module docstring)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int, seed: int,
                 state_path: str | Path | None, restart: bool, progress: bool | None,
                 settings: dict[str, Any]) -> None:
        self.model, self.x, self.y, self.batch_size, self.seed = model, x, y, batch_size, seed
        first = next(iter(model.parameters()), next(iter(model.buffers()), None))
        self.device = first.device if first is not None else torch.device("cpu")
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.num_classes = predict_eval(model, to_unit_float(x[:1], self.device)).shape[1]
        self.fingerprint = dict(settings, n_examples=len(y), model=digest(sorted(model.state_dict().items())),
                                data=digest([("x", x), ("y", y)]))
        self.n_batches = -(-len(y) // batch_size)
        self.path = Path(state_path) if state_path is not None else None
        self.units: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        self.batches_total = self.batches_resumed = 0
        if self.path is not None and self.path.exists() and not restart:
            self._resume()

    def _resume(self) -> None:
        state = load(self.path)
        theirs = state.get("fingerprint", {})
        differing = sorted(k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k])
        if differing:
            raise ConfigError(f"{self.path} holds an unfinished evaluation with a different {', '.join(differing)}; "
                              f"pass --restart (restart=True) to discard it")
        self.units = state["units"]

    def unit(self, name: str, run_batch: BatchFn) -> Tensor:
        """Flags of unit `name`: the batches not in the state are computed, saving after each."""
        if name in self.seconds:  # already run in this call (AutoAttack variants share components)
            return self.units[name]["flags"].clone()
        unit = self.units.setdefault(name, dict(flags=torch.zeros(len(self.y), dtype=torch.bool), done=0,
                                                seconds=0.0))
        self.batches_total += self.n_batches
        self.batches_resumed += unit["done"]
        with tqdm(total=self.n_batches, initial=unit["done"], desc=name, unit="batch", leave=False,
                  disable=not self.progress) as bar:
            for b in range(unit["done"], self.n_batches):
                start = time.perf_counter()
                key = slice(b * self.batch_size, (b + 1) * self.batch_size)
                xb, yb = to_unit_float(self.x[key], self.device), self.y[key].to(self.device)
                unit["flags"][key] = run_batch(xb, yb, b, key).cpu()
                unit["done"] = b + 1
                unit["seconds"] += time.perf_counter() - start
                if self.path is not None:
                    save(self.path, dict(fingerprint=self.fingerprint, units=self.units))
                bar.update()
        self.seconds[name] = unit["seconds"]
        return unit["flags"].clone()

    def probe(self, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` examples (at most one batch) on the device, for the model checks."""
        n = min(n, self.batch_size)
        return to_unit_float(self.x[:n], self.device), self.y[:n].to(self.device)
