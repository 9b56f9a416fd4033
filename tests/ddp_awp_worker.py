"""Run under torchrun (2 CPU processes, gloo), or alone as the single-process reference: the AWP direction of
PGD-AT's and TRADES' losses on fixed clean and adversarial inputs, each rank on its half of the global batch, with
a batch-independent model (small_cnn_gn). Writes the directions to argv[1] (rank 0). tests/test_authors.py compares
them: averaged over the processes, the proxy's gradient is the global batch's, so every rank perturbs as one
process would."""

import os
import sys

import torch
import torch.distributed as dist

from backsmooth import methods, models
from backsmooth.distributed import setup
from backsmooth.training.awp import WeightPerturbation

proc, _ = setup("cpu")
generator = torch.Generator().manual_seed(0)
x = torch.rand(16, 3, 16, 16, generator=generator)
x_adv = (x + (2 * torch.rand(x.shape, generator=generator) - 1) * 8 / 255).clamp(0, 1)
y = torch.randint(0, 10, (16,), generator=generator)
lo, hi = proc.rank * 16 // proc.world_size, (proc.rank + 1) * 16 // proc.world_size
found = {}
for name in ("pgd_at", "trades"):
    torch.manual_seed(0)
    net = models.build("small_cnn_gn", 10).train()
    awp = WeightPerturbation(net, 0.01, 0, proc)
    found[name] = awp.direction(net, methods.build(name), x[lo:hi], x_adv[lo:hi], y[lo:hi])
if proc.is_main:
    torch.save(found, sys.argv[1])
if "WORLD_SIZE" in os.environ:
    dist.barrier()
    dist.destroy_process_group()
