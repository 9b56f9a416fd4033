"""torch.distributed plumbing for `torchrun -m backsmooth train`: process group, rank facts, reductions.

One process per device. The backend follows the device: NCCL on CUDA, gloo on CPU. Without
torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op.
"""

import os
from typing import Any

import torch
import torch.distributed as dist

from backsmooth.runtime import ProcessInfo, Runtime, resolve_device


def setup(device_name: str) -> tuple[ProcessInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessInfo(), resolve_device(device_name)
    info = ProcessInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def runtime(device_name: str, precision: str = "fp32", channels_last: bool = False) -> Runtime:
    """`setup`, as the Runtime every step, attack and accuracy of the run takes."""
    proc, device = setup(device_name)
    return Runtime(device, precision, channels_last, proc)


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), readable after the group is shut down."""
    return int(os.environ.get("RANK", "0"))


def group_size() -> int:
    """Processes in the running process group (1 without one): for code that has no ProcessInfo at hand
    (methods sharing state, the weight average)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, info: ProcessInfo) -> torch.Tensor:
    """Sum over processes (in place); the identity in a single process."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag: bool, info: ProcessInfo, device: torch.device) -> bool:
    """True on every process if `flag` is true on any (keeps stop decisions in lock-step)."""
    if not info.distributed:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), info).item() > 0)


def gather_objects(obj: Any, info: ProcessInfo) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: ProcessInfo) -> Any:
    """Rank 0's `obj` on every process."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: ProcessInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear down the running process group, if any (a clean exit code under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
