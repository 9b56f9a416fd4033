"""Learning-rate schedules, stepped per iteration and derived from the global step alone
(so a resumed run needs no scheduler state)."""

import math

SCHEDULES = ("stage", "stage75", "cyclic", "cosine", "constant")


def learning_rate(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate for iteration `step` (0-based) of `total_steps`.

    stage: x0.1 at 50% and 75% of all iterations (the paper's code); stage75: at 75% and 90%;
    cyclic: linear ramp 0 -> 2*lr over the first 40%, then linear decay to 0 (Fast AT);
    cosine: half-cosine from lr to 0; constant: lr.
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
    raise ValueError(f"unknown schedule {schedule!r}")
