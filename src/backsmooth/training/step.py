"""One optimisation step of a training method on one batch, shared by the trainer and the benchmark."""

from torch import Tensor

from backsmooth.methods import StepContext
from backsmooth.runtime import Runtime
from backsmooth.training.setup import Parts


def training_step(parts: Parts, x: Tensor, y: Tensor, runtime: Runtime, *, context: StepContext | None = None,
                  skip_nonfinite: bool = False) -> dict[str, Tensor] | None:
    """`method.replays` optimisation steps of the method on the batch (one for all but Free-AT), each followed by
    the weight-average update when one is kept; returns the detached statistics of the last (None if a loss was
    not finite and `skip_nonfinite`).

    No host synchronisation unless `skip_nonfinite` (which must inspect the loss).
    """
    method, optimizer, scaler, awp = parts.method, parts.optimizer, parts.scaler, parts.awp
    x = runtime.layout(x)
    extra = {"context": context} if method.takes_context() else {}
    perturbing = awp is not None and awp.active(context.epoch if context is not None else 0)
    for _ in range(method.replays):
        stats: dict[str, Tensor] = {}
        with runtime.autocast():
            if perturbing:  # --awp: the attack, the weights moved against the loss on it, then that loss
                x_adv = method.perturb(parts.model, x, y, parts.generator, stats)
                direction = awp.direction(parts.net, method, x, x_adv, y)
                awp.add(parts.net, direction, +1.0)
                loss = method.loss_on(parts.model, x, x_adv, y, stats)
            else:
                loss = method(parts.model, x, y, generator=parts.generator, stats=stats, **extra)
        if skip_nonfinite and not loss.isfinite():
            if perturbing:
                awp.add(parts.net, direction, -1.0)
            return None
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        method.after_backward()
        scaler.step(optimizer)
        scaler.update()
        if perturbing:  # the step was taken at w + gamma v; the perturbation itself is not kept
            awp.add(parts.net, direction, -1.0)
        if parts.average is not None:  # weight averaging: after every optimiser step
            parts.average.update(parts.net)
    stats["loss"] = loss.detach().float()
    stats["nonfinite"] = (~stats["loss"].isfinite()).float()
    return stats
