"""Learning-rate schedules, stepped per iteration and derived from the global step alone
(so a resumed run needs no scheduler state).

Named schedules, plus `piecewise:F=M,F=M,...`: the multiplier M of the base lr at fraction F of
training, linear in between; two points at the same F make a step. The presets use it for the
authors' schedules (NuAT's, GAT's and FGSM-PGI's drops, N-FGSM's and ELLE's triangle).
"""

import math

from backsmooth.errors import ConfigError

SCHEDULES = ("stage", "stage75", "cyclic", "cosine", "constant", "onecycle", "piecewise:F=M,...")
ONECYCLE_RISE, ONECYCLE_START, ONECYCLE_END = 0.3, 1 / 25, 1 / 25 / 1e4  # torch.optim.lr_scheduler.OneCycleLR's
PIECEWISE = "piecewise:"


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The multiplier of a linear warm-up over `warmup_steps` iterations: (step + 1) / warmup_steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def learning_rate(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate for iteration `step` (0-based) of `total_steps`.

    stage: x0.1 at 50% and 75% of all iterations (the paper's code); stage75: at 75% and 90%;
    cyclic: linear ramp 0 -> 2*lr over the first 40%, then linear decay to 0 (Fast AT);
    cosine: half-cosine from lr to 0; constant: lr; onecycle: cosine rise from lr/25 to lr over the
    first 30%, then cosine anneal to lr/25/1e4 (PyTorch's OneCycleLR defaults, per iteration);
    piecewise: see the module docstring.
    """
    progress = step / max(total_steps, 1)
    if schedule == "stage":
        return base_lr * (0.1 if progress >= 0.5 else 1.0) * (0.1 if progress >= 0.75 else 1.0)
    if schedule == "stage75":
        return base_lr * (0.1 if progress >= 0.75 else 1.0) * (0.1 if progress >= 0.9 else 1.0)
    if schedule == "cyclic":
        peak = 2 * base_lr
        return peak * progress / 0.4 if progress < 0.4 else peak * (1 - progress) / 0.6
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "constant":
        return base_lr
    if schedule == "onecycle":  # phase ends at steps 0.3 T - 1 and T - 1, as in PyTorch
        peak = max(ONECYCLE_RISE * total_steps - 1, 1)
        if step <= peak:
            return base_lr * _cosine_between(ONECYCLE_START, 1.0, step / peak)
        return base_lr * _cosine_between(1.0, ONECYCLE_END, (step - peak) / max(total_steps - 1 - peak, 1))
    return base_lr * _interpolate(parse_piecewise(schedule), progress)


def parse_piecewise(schedule: str) -> list[tuple[float, float]]:
    """The (fraction, multiplier) points of a piecewise schedule; one-line errors for anything else."""
    if not schedule.startswith(PIECEWISE):
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    points = []
    for item in schedule[len(PIECEWISE):].split(","):
        fraction, _, multiplier = item.partition("=")
        try:
            point = (float(fraction), float(multiplier))
        except ValueError:
            raise ConfigError(f"schedule {schedule!r}: {item!r} is not FRACTION=MULTIPLIER, e.g. "
                              f"piecewise:0=0,0.5=1,1=0") from None
        if not (0 <= point[0] <= 1 and 0 <= point[1] < math.inf):
            raise ConfigError(f"schedule {schedule!r}: fractions must be in [0, 1] and multipliers >= 0")
        points.append(point)
    if len(points) < 2 or points[0][0] != 0 or points[-1][0] != 1 or any(
            b[0] < a[0] for a, b in zip(points, points[1:])):
        raise ConfigError(f"schedule {schedule!r}: give points from fraction 0 to 1 in order, e.g. "
                          f"piecewise:0=0,0.5=1,1=0")
    return points


def check(schedule: str) -> None:
    """Refuse an unknown schedule name or a malformed piecewise spec."""
    if schedule not in SCHEDULES[:-1]:
        parse_piecewise(schedule)


def _cosine_between(start: float, end: float, fraction: float) -> float:
    """From `start` at fraction 0 to `end` at 1 along half a cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * fraction))


def _interpolate(points: list[tuple[float, float]], progress: float) -> float:
    """The multiplier at `progress`; at a step (two points at one fraction) the later point holds."""
    value = points[0][1]
    for (f0, m0), (f1, m1) in zip(points, points[1:]):
        if progress >= f1:
            value = m1
        elif progress >= f0:
            return m0 + (m1 - m0) * (progress - f0) / (f1 - f0) if f1 > f0 else m1
    return value


def stage_drops(epochs: int, drops: dict[int, float]) -> str:
    """A piecewise schedule string of lr multipliers that change at the start of given 1-based epochs, as the
    authors' adjust_learning_rate (`if epoch >= E: lr = base * m`) applies them."""
    points, current = ["0=1"], 1.0
    for epoch, multiplier in sorted(drops.items()):
        if epoch > epochs:
            break
        fraction = (epoch - 1) / epochs
        points += [f"{fraction!r}={current:g}", f"{fraction!r}={multiplier:g}"]
        current = multiplier
    return "piecewise:" + ",".join([*points, f"1={current:g}"])


def parse_resize_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """Progressive resizing `EPOCH=SIZE,...` (0-based epochs, increasing) as ((epoch, size), ...); '' is none."""
    if not text.strip():
        return ()
    pairs = []
    for part in text.split(","):
        epoch, _, size = part.partition("=")
        try:
            pairs.append((int(epoch), int(size)))
        except ValueError:
            raise ConfigError(f"resize_schedule must be EPOCH=SIZE pairs such as 0=128,6=192,12=224, got "
                              f"{part!r}") from None
    epochs = [e for e, _ in pairs]
    if epochs != sorted(set(epochs)) or epochs[0] < 0 or any(size < 1 for _, size in pairs):
        raise ConfigError(f"resize_schedule needs increasing epochs from 0 and sizes >= 1 pixel, got {text!r}")
    return tuple(pairs)


def size_at(schedule: tuple[tuple[int, int], ...], epoch: int, default: int) -> int:
    """The training image size of `epoch`: the last schedule entry at or before it, else `default`."""
    return next((size for start, size in reversed(schedule) if start <= epoch), default)
