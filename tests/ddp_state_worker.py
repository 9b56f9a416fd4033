"""Run under torchrun (2 CPU processes, gloo), or alone as the single-process reference: three steps of
each stateful method on fixed shards of fixed global batches, with a fixed model (no optimiser step, so
no training dynamics amplify float noise). Writes each method's state as it ends (every rank's for
per-rank state) to argv[1] (rank 0 only). tests/test_stateful_methods.py compares the two."""

import sys

import torch
import torch.distributed as dist

from backsmooth import methods, models
from backsmooth.methods import StepContext

distributed = "WORLD_SIZE" in __import__("os").environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
generator = torch.Generator().manual_seed(0)
images = torch.rand(48, 3, 16, 16, generator=generator)
labels = torch.randint(0, 10, (48,), generator=generator)
# three global batches of 16; examples come back in later batches, in other positions (so on other ranks)
batches = [torch.arange(0, 16), torch.arange(8, 24).flip(0), torch.arange(0, 48, 3)]
options = {"fgsm_pgi": {"reset": 10}, "elle_a": {}, "free_at": {"replay": 1}, "fgsm_rs_cs": {}}
states = {}
for name, kw in options.items():
    torch.manual_seed(0)
    model = models.build("small_cnn_gn", 10).train()
    method = methods.build(name, **kw)
    method.setup(len(images), (3, 16, 16), torch.device("cpu"), 0)
    for step, batch in enumerate(batches):
        lo, hi = rank * 16 // world, (rank + 1) * 16 // world
        mine = batch[lo:hi]
        context = StepContext(0, 10, step, mine, (lo, hi, 16), torch.Generator().manual_seed(100 + step))
        loss = method(model, images[mine], labels[mine], generator=torch.Generator().manual_seed(rank),
                      context=context)
        loss.backward()  # parameter gradients are not applied: the model stays fixed
        method.after_backward()
        model.zero_grad()
    state = {k: v.clone() for k, v in method.state.items() if torch.is_tensor(v) and k != "rows"}
    gathered = [None] * world
    if distributed:
        dist.all_gather_object(gathered, state)
    else:
        gathered = [state]
    states[name] = gathered
if rank == 0:
    torch.save(states, sys.argv[1])
if distributed:
    dist.barrier()
    dist.destroy_process_group()
