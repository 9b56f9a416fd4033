"""One optimisation step of a training method, shared by the trainer and the benchmark."""

import torch
from torch import Tensor, nn

from backsmooth.methods import TrainingMethod
from backsmooth.runtime import autocast


def training_step(model: nn.Module, method: TrainingMethod, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, x: Tensor, y: Tensor, generator: torch.Generator,
                  device: torch.device, precision: str = "fp32", channels_last: bool = False,
                  skip_nonfinite: bool = False) -> dict[str, Tensor] | None:
    """One optimisation step of `method`; returns detached statistics (None if skipped as non-finite).

    No host synchronisation unless `skip_nonfinite` (which must inspect the loss).
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stats: dict[str, Tensor] = {}
    with autocast(device, precision):
        loss = method(model, x, y, generator=generator, stats=stats)
    if skip_nonfinite and not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    stats["loss"] = loss.detach().float()
    stats["nonfinite"] = (~torch.isfinite(stats["loss"])).float()
    return stats
