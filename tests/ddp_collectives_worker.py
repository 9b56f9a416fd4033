"""Run under torchrun (2 CPU processes, gloo): count the collectives one training step of each method makes.

Gradient all-reduces are counted with a DDP communication hook (called once per bucket), buffer
broadcasts by wrapping DDP's coalesced broadcast, train-mode forwards with a hook on the wrapped model;
the method's replays per batch are recorded beside them. Rank 0 writes the counts as JSON to argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from backsmooth import methods, models
from backsmooth.runtime import Runtime
from backsmooth.training import Parts, training_step

dist.init_process_group("gloo")
rank = dist.get_rank()
counts = {}
for name in methods.names():
    torch.manual_seed(0)
    net = models.build("small_cnn", 10)
    ddp = nn.parallel.DistributedDataParallel(net, bucket_cap_mb=1)
    method = methods.build(name)
    calls = {"allreduce": 0, "broadcast": 0, "training_forwards": 0, "replays": method.replays}

    def hook(state, bucket, calls=calls):
        calls["allreduce"] += 1
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    original = ddp._distributed_broadcast_coalesced

    def counting_broadcast(*args, calls=calls, original=original, **kwargs):
        calls["broadcast"] += 1
        return original(*args, **kwargs)

    ddp._distributed_broadcast_coalesced = counting_broadcast

    def count_training_forward(module, args, calls=calls):
        calls["training_forwards"] += module.training

    net.register_forward_pre_hook(count_training_forward)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    training_step(Parts(net, ddp, method, optimizer, scaler, g), x, y, Runtime(torch.device("cpu")))
    counts[name] = calls
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(counts, f)
dist.barrier()  # both ranks finished before the process group is torn down
dist.destroy_process_group()
