"""One optimisation step of a training method on one batch, shared by the trainer and the benchmark."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from backsmooth.methods import StepContext, TrainingMethod
from backsmooth.runtime import autocast


def training_step(model: nn.Module, method: TrainingMethod, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, x: Tensor, y: Tensor, generator: torch.Generator,
                  device: torch.device, precision: str = "fp32", channels_last: bool = False,
                  skip_nonfinite: bool = False, context: StepContext | None = None,
                  after_step: Callable[[], None] | None = None) -> dict[str, Tensor] | None:
    """`method.replays` optimisation steps of `method` on the batch (one for all but Free-AT); returns the
    detached statistics of the last (None if a loss was not finite and `skip_nonfinite`).

    No host synchronisation unless `skip_nonfinite` (which must inspect the loss).
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    extra = {"context": context} if method.takes_context() else {}
    for _ in range(method.replays):
        stats: dict[str, Tensor] = {}
        with autocast(device, precision):
            loss = method(model, x, y, generator=generator, stats=stats, **extra)
        if skip_nonfinite and not torch.isfinite(loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        method.after_backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:  # weight averaging: after every optimiser step
            after_step()
    stats["loss"] = loss.detach().float()
    stats["nonfinite"] = (~torch.isfinite(stats["loss"])).float()
    return stats
