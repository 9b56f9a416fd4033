"""Where and how a computation runs (`Runtime`: process, device, precision, memory layout) and the device,
precision and timing helpers shared by training, evaluation and benchmarks."""

import contextlib
import dataclasses
import platform
import time
from collections.abc import Iterator

import torch

from backsmooth.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a torchrun group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass(frozen=True)
class Runtime:
    """One value for what every step, attack and accuracy needs to know about where it runs, instead of four
    loose parameters: the process, its device, the precision (fp32, bf16, fp16) and the memory layout."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    proc: ProcessInfo = ProcessInfo()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for this runtime's precision (a no-op for fp32)."""
        return autocast(self.device, self.precision)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in this runtime's memory layout (channels-last when asked)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


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

    def restart(self) -> None:
        """Forget the time so far and start again (after a compile warm-up, which is not training time)."""
        self.seconds, self._start = 0.0, None
        self.start()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Time the block."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block out of a running watch's time (checks, logging and checkpoints are not training)."""
        self.stop()
        try:
            yield
        finally:
            self.start()


def device_name(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU model and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the processor model here
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu} CPU ({torch.get_num_threads()} threads)"
