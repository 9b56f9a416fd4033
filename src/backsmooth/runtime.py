"""Device, precision and timing helpers shared by training, evaluation and benchmarks."""

import contextlib
import time
from collections.abc import Iterator

import torch

from backsmooth.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; an unavailable device is a clear error, not a crash later.

    On CUDA, cuDNN autotuning is switched on (fixed shapes: each layer's fastest kernel is found once).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} requested but CUDA is not available; use --device cpu or auto")
        torch.backends.cudnn.benchmark = True
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16; a no-op for fp32. Losses cast logits to fp32 themselves."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds with device synchronisation at start and stop (honest GPU timing)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._start: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> float:
        """Add the time since start() and return the total."""
        if self._start is not None:
            synchronize(self.device)
            self.seconds += time.perf_counter() - self._start
            self._start = None
        return self.seconds

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()
