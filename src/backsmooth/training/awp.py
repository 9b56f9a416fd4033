"""Adversarial weight perturbation (Wu, Xia, Wang, "Adversarial Weight Perturbation Helps Robust Generalization",
NeurIPS 2020), around any method whose step is an attack and then a loss on it (`TrainingMethod.splits`), as the
authors' utils_awp.py computes it (AT-AWP's `AdvWeightPerturb`, TRADES-AWP's `TradesAWP`).

After the attack, a proxy copy of the network (weights and BatchNorm buffers loaded from it, train mode) takes one
SGD step of lr 0.01 *up* the method's loss on the batch and its adversarial input. For every weight tensor of two or
more dimensions whose name holds 'weight', the change d = w_proxy - w is rescaled to the weight's own norm,
v = ||w|| / (||d|| + 1e-20) d. The network's weights move to w + gamma v, the ordinary step (loss, backward,
optimiser step) runs there, and then gamma v is taken away again. Under torchrun the proxy's gradient is averaged
over the processes first, so every process perturbs with the global batch's direction, as the authors' single
DataParallel model did. The proxy's BatchNorm statistics never reach the network.
"""

import copy

import torch
from torch import Tensor, nn

from backsmooth import distributed as dist
from backsmooth.methods import TrainingMethod
from backsmooth.runtime import ProcessInfo

PROXY_LR = 0.01  # AT-AWP's proxy optimiser (TRADES-AWP's uses the run's lr): the rescaling makes it matter only
NORM_FLOOR = 1e-20  # through the 1e-20 guard against a zero change


class WeightPerturbation:
    """AWP of size `gamma` from epoch `warmup` (0-based) on; stateless between steps, so resuming stays exact."""

    def __init__(self, net: nn.Module, gamma: float, warmup: int, proc: ProcessInfo) -> None:
        self.gamma, self.warmup, self.proc = gamma, warmup, proc
        self.proxy = copy.deepcopy(net)

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup

    def direction(self, net: nn.Module, method: TrainingMethod, x: Tensor, x_adv: Tensor,
                  y: Tensor) -> dict[str, Tensor]:
        """v per perturbed weight name: the proxy's ascent step on `method.loss_on`, rescaled to each weight."""
        proxy = self.proxy
        proxy.load_state_dict(net.state_dict())
        proxy.train()
        params = dict(proxy.named_parameters())
        loss = -method.loss_on(proxy, x, x_adv, y)
        grads = torch.autograd.grad(loss, list(params.values()))
        if self.proc.distributed:  # the global batch's direction on every process
            flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), self.proc) / self.proc.world_size
            grads = tuple(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads))
        weights = net.state_dict()
        result = {}
        with torch.no_grad():
            for (name, param), grad in zip(params.items(), grads):
                old = weights[name]
                if old.dim() <= 1 or "weight" not in name:
                    continue
                change = (param - PROXY_LR * grad) - old  # the proxy's SGD step, as its optimiser takes it
                result[name] = old.norm() / (change.norm() + NORM_FLOOR) * change
        return result

    def add(self, net: nn.Module, direction: dict[str, Tensor], sign: float) -> None:
        """w <- w + sign * gamma * v for the perturbed weights (sign -1 restores them)."""
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name in direction:
                    param.add_(sign * self.gamma * direction[name])
