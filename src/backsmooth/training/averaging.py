"""Weight averaging: an exponential moving average (EMA) of the weights, updated after every optimiser
step, evaluated and selected instead of the raw weights when switched on.

  avg <- d_t avg + (1 - d_t) w,   d_t = min(tau, (1 + t) / (10 + t))   (t = updates so far)

The warm-up d_t keeps the first averages from being dominated by the initialisation (TensorFlow's
ExponentialMovingAverage rule). BatchNorm running statistics are averaged the same way as the
parameters, not copied: the running statistics are themselves averages of recent batch statistics,
so averaging them with the same decay pairs the averaged weights with statistics from the same
window of models; copying the raw ones would pair them with the statistics of the last few raw
models only. The count of tracked batches is copied. Under torchrun the parameters are identical on
every process after each step (DDP), so their averages are too; the averaged buffers are averaged
over processes whenever the average is used (`synchronise`), so every rank holds the same average.
"""

import copy

import torch
import torch.distributed as torch_dist
from torch import nn

from backsmooth.distributed import group_size


def decay_at(tau: float, updates: int) -> float:
    """The decay of update number `updates` (0-based): the warm-up, then tau."""
    return min(tau, (1 + updates) / (10 + updates))


class WeightAverage:
    """The averaged copy of a model (`module`), its update rule and its checkpoint state."""

    def __init__(self, model: nn.Module, tau: float) -> None:
        self.tau = tau
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights and BatchNorm statistics into the average."""
        decay = decay_at(self.tau, self.updates)
        averaged = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        targets, values, counters, counts = [], [], [], []
        for name, value in (*model.named_parameters(), *model.named_buffers()):
            target = averaged[name]
            floating = target.is_floating_point()
            (targets if floating else counters).append(target)
            (values if floating else counts).append(value.detach())
        # multi-tensor kernels: a few launches per step instead of two per tensor
        if targets:
            torch._foreach_mul_(targets, decay)
            torch._foreach_add_(targets, values, alpha=1 - decay)
        if counters:
            torch._foreach_copy_(counters, counts)
        self.updates += 1

    @torch.no_grad()
    def synchronise(self) -> None:
        """Average the averaged buffers over processes (parameters agree already): one average everywhere."""
        if group_size() == 1:
            return
        for buffer in self.module.buffers():
            if buffer.is_floating_point():
                torch_dist.all_reduce(buffer)
                buffer /= group_size()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
