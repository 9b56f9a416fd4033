"""The collapse guard: catastrophic overfitting caught while it happens.

Single-step methods can collapse: within an epoch, PGD accuracy falls to near zero while accuracy
on the method's own (single-step) adversarial examples keeps rising. Every `every` optimiser steps after
the first quarter epoch (the first steps are too noisy to judge; on MNIST a collapse can come within the
first epoch) the guard measures PGD-5 (step eps/4, random
start, fixed seed) accuracy of the training model on one fixed batch of held-out validation images. A
collapse is recorded when, at two checks in a row, that accuracy is below `fraction` of the best seen so
far (the best at least MIN_BEST, above chance-level noise) while the mean training accuracy on the
method's adversarial examples over the interval is at least RISE above its value at the best (a run
whose training accuracy falls too is diverging or annealing, not overfitting).

What follows a collapse is --on-collapse (`response`): stop the run (best.pt is from before), warn and go on,
or roll back: the trainer keeps a copy of the training state from the guard's best check, restores it,
multiplies the method's attack step size alpha by --rollback-factor and trains on; after MAX_ROLLBACKS it stops.
"""

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from backsmooth.attacks import pgd
from backsmooth.evaluation.accuracy import correct_under_attack, fraction

GUARD_EXAMPLES = 256
GUARD_STEPS = 5
MIN_BEST = 0.1
RISE = 0.05
CONSECUTIVE = 2
GUARD_START = 4  # checks begin after 1 / GUARD_START of the first epoch
MAX_ROLLBACKS = 3


@dataclasses.dataclass
class GuardState:
    """What the guard remembers (part of TrainState, so resuming keeps it)."""

    best: float = -1.0
    train_at_best: float = 0.0
    sums: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # train accuracy sum, count
    below: int = 0  # consecutive checks that met the collapse condition
    collapse: dict[str, Any] | None = None  # the event that ended checking (none after a rollback)
    rollbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the events rolled back from
    alpha: float | None = None  # the method's alpha after the last rollback (None: the configured one)
    seconds: float = 0.0  # time spent checking (not training time; reported beside it)


class CollapseGuard:
    """Checks a fixed validation batch every `every` steps; see the module docstring."""

    def __init__(self, images: Tensor, labels: Tensor, eps: float, every: int, threshold: float,
                 state: GuardState, start_step: int = 0) -> None:
        self.images, self.labels = images[:GUARD_EXAMPLES], labels[:GUARD_EXAMPLES]
        self.attack = pgd(eps, eps / 4, GUARD_STEPS, random_start=True)
        self.every, self.threshold, self.state, self.start_step = every, threshold, state, start_step
        self.pending: list[Tensor] = []  # this interval's accuracies, read from the device only when needed
        self.improved = False  # whether the last check set a new best (the trainer's rollback point)
        self.last: dict[str, float] = {}  # the last check's guard and training accuracies (metrics.jsonl logs them)

    def observe(self, stats: dict[str, Tensor] | None) -> None:
        """Add one step's training accuracy on the method's adversarial examples (clean for natural)."""
        value = None if stats is None else stats.get("adv_accuracy", stats.get("accuracy"))
        if value is not None and self.every > 0:
            self.pending.append(value.detach())

    def flush(self) -> None:
        """Move the pending accuracies into the state (before a checkpoint, so a resume sees them)."""
        if self.pending:
            self.state.sums = [self.state.sums[0] + float(torch.stack(self.pending).sum()),
                               self.state.sums[1] + len(self.pending)]
            self.pending = []

    def reference_check(self, model: nn.Module) -> None:
        """Nothing to measure before training for this rule."""

    def due(self, step: int) -> bool:
        """Whether optimiser step `step` (1-based) is a checking step (none after a collapse: it fires once)."""
        return (self.every > 0 and step > self.start_step and step % self.every == 0 and len(self.labels) > 0
                and self.state.collapse is None)

    def check(self, model: nn.Module, step: int, epoch: int) -> dict[str, Any] | None:
        """The collapse event if one happened now, else None (call on the steps `due` names)."""
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(0)
        robust = fraction(correct_under_attack(model, self.images, self.labels, self.attack, generator=generator))
        self.flush()
        total, count = self.state.sums
        train = total / count if count else float("nan")
        self.state.sums = [0.0, 0.0]
        state = self.state
        self.last = {"guard_pgd_acc": robust, "train_adv_acc": train}
        self.improved = robust > state.best
        if self.improved:
            state.best, state.train_at_best, state.below = robust, train, 0
            return None
        falling = state.best >= MIN_BEST and robust < self.threshold * state.best
        state.below = state.below + 1 if falling and train >= state.train_at_best + RISE else 0
        if state.below >= CONSECUTIVE:
            state.collapse = {"event": "collapse", "epoch": epoch + 1, "step": step, "guard_pgd_acc": robust,
                              "guard_best": state.best, "train_adv_acc": train, "train_adv_acc_at_best":
                              state.train_at_best, "guard_examples": len(self.labels)}
            return state.collapse
        return None

    def rolled_back(self, alpha: float) -> None:
        """Checking resumes after a rollback to the best check (the event moves to `rollbacks`) with `alpha`."""
        state = self.state
        if state.collapse is not None:
            state.rollbacks.append(state.collapse)
        state.collapse, state.below, state.sums, self.pending = None, 0, [0.0, 0.0], []
        state.alpha = alpha


def response(on_collapse: str, has_snapshot: bool, rollbacks: int) -> str:
    """What the run does about a collapse: --on-collapse, except that a rollback with nothing to roll back to,
    or after MAX_ROLLBACKS lower steps that did not help either, stops."""
    if on_collapse == "rollback" and (not has_snapshot or rollbacks >= MAX_ROLLBACKS):
        return "stop"
    return on_collapse


def warning(event: dict[str, Any], alpha: float) -> str:
    """The line printed when the guard fires (`alpha`: the method's step size before any rollback)."""
    then = {"stop": "stopping, best.pt is from before", "warn": "going on",
            "rollback": f"rolling back to the best check, alpha {alpha:.4g} -> {event.get('alpha', 0):.4g}"}
    return (f"warning: catastrophic overfitting at step {event.get('step')}: guard PGD-5 accuracy "
            f"{event.get('guard_pgd_acc', float('nan')):.1%}, best {event.get('guard_best', float('nan')):.1%}, "
            f"training accuracy on the method's own attacks {event.get('train_adv_acc', float('nan')):.1%}; "
            f"{then[event['action']]}")
