"""The collapse guard: catastrophic overfitting caught while it happens, decided on counts.

Catastrophic overfitting (Wong et al. 2020, Kim et al. 2021, de Jorge et al. 2022) has one signature: the
model stays correct under a single-step attack while a multi-step attack breaks it, a gap between the two on
the same images that grows as the collapse proceeds. Every `every` optimiser steps (default a tenth of an
epoch) after the first quarter epoch, and once before training (the reference of a model that has learnt
nothing), the guard classifies one fixed batch of up to GUARD_EXAMPLES held-out validation images three ways,
in eval mode: clean, under FGSM (one step of eps from the clean image), and under PGD-GUARD_STEPS (step eps/4,
random start, fixed seed). With C the images correct clean, S those of C correct under FGSM too, K those of
S that PGD leaves correct, and G = S minus K the gap, a check shows the signature when three exact one-sided
tests reject at ALPHA:

- FGSM holds: P(Binomial(|C|, HOLD) >= |S|) < ALPHA, HOLD = 1/2 (the model looks robust to the single step:
  FGSM breaks fewer than half of the clean-correct images; an early model at a large eps, which FGSM and
  PGD both break, is not yet robust rather than overfitted to FGSM);
- PGD keeps too few: P(Binomial(|S|, q) <= |K|) < ALPHA, q = --collapse-fraction (a healthy model keeps
  most of what FGSM leaves correct; a collapsed one almost none);
- the gap grew: McNemar's exact test on the same images between this check's gap flags and those of the
  reference (the check with the smallest gap so far, at first the check before training):
  P(Binomial(up + down, 1/2) >= up) < ALPHA, with `up` images in the gap now and not then, `down` the
  reverse.

A collapse is recorded when CONSECUTIVE checks in a row show the signature, for methods that train on one
cross-entropy sign step (`TrainingMethod.single_step_attack`: FGSM-RS, N-FGSM, GradAlign, ELLE, FGSM-PGI,
GAT, NuAT, Free-AT), for which FGSM stands for their own attack. It also catches a run that was never
robust (its gap grows from the untrained model's), which a fall from a best cannot. For methods whose own
attack is multi-step or KL-based (PGD-AT, TRADES, Fast TRADES, Backward Smoothing) FGSM is not the attack
they train on: the signature says only that FGSM overstates the model's robustness (its single-step
gradient is masked), which their early training at a large eps shows and outgrows (Backward Smoothing on
MNIST at eps 0.3, docs/recipe.md). The guard logs their counts and records no collapse.

What follows a collapse is --on-collapse (`response`): warn and go on (the default), stop the run
(best.pt is from before), or roll back: the trainer keeps a copy of the training state from the guard's
best check (the highest PGD accuracy among checks without the signature), restores it, multiplies the
method's attack step size alpha by --rollback-factor and trains on; after MAX_ROLLBACKS it stops.
"""

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from backsmooth.attacks import fgsm, pgd
from backsmooth.evaluation.accuracy import correct_under_attack
from backsmooth.evaluation.checks import binomial_tail

GUARD_EXAMPLES = 256
GUARD_STEPS = 10
ALPHA = 1e-3
HOLD = 0.5  # FGSM holds: it leaves more than this fraction of the clean-correct images correct
CONSECUTIVE = 2
GUARD_START = 4  # checks begin after 1 / GUARD_START of the first epoch
CHECKS_PER_EPOCH = 10  # the default interval (--collapse-every -1): a tenth of an epoch, at least 10 steps
MAX_ROLLBACKS = 3
CHECK_UNITS = 1 + (2 + 1) + (2 * GUARD_STEPS + 1)  # forward passes per image: clean, FGSM, PGD


@dataclasses.dataclass
class GuardState:
    """What the guard remembers (part of the training state, so resuming keeps it)."""

    best: float = -1.0  # the highest PGD accuracy of a check without the signature (the rollback point)
    reference: list[bool] | None = None  # gap flags of the check with the smallest gap so far
    sums: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # train accuracy sum, count
    below: int = 0  # consecutive checks that showed the signature
    collapse: dict[str, Any] | None = None  # the event that ended checking (none after a rollback)
    rollbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the events rolled back from
    alpha: float | None = None  # the method's alpha after the last rollback (None: the configured one)
    seconds: float = 0.0  # time spent checking (not training time; reported beside it)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One check's counts and the two exact tests on them (every number checkable by hand)."""

    examples: int
    clean: int
    single: int  # |S|: correct clean and under FGSM
    kept: int  # |K|: of those, correct under PGD too
    multi: int  # correct clean and under PGD
    up: int  # in the gap now, not at the reference
    down: int  # in the gap at the reference, not now
    p_hold: float
    p_keep: float
    p_grow: float

    @property
    def signature(self) -> bool:
        return signature(self.p_hold, self.p_keep, self.p_grow)


def exact_tests(clean: int, single: int, kept: int, up: int, down: int, keep: float) -> tuple[float, float, float]:
    """(p_hold, p_keep, p_grow) from the counts of a check (see the module docstring): the whole decision is a
    function of these five numbers, so a logged check can be judged again by hand or by a script."""
    return (binomial_tail(single, clean, HOLD), 1.0 - binomial_tail(kept + 1, single, keep),
            binomial_tail(up, up + down, 0.5))


def signature(p_hold: float, p_keep: float, p_grow: float) -> bool:
    """All three tests reject at ALPHA."""
    return max(p_hold, p_keep, p_grow) < ALPHA


def evidence(clean: Tensor, single: Tensor, multi: Tensor, reference: Tensor | None, keep: float) -> Evidence:
    """The counts and tests of a check from its per-example flags (see the module docstring)."""
    single, multi = clean & single, clean & multi
    kept = single & multi
    gap = single & ~multi
    before = reference if reference is not None else torch.zeros_like(gap)
    up, down = int((gap & ~before).sum()), int((before & ~gap).sum())
    n_single, n_kept = int(single.sum()), int(kept.sum())
    n_clean = int(clean.sum())
    tests = exact_tests(n_clean, n_single, n_kept, up, down, keep)
    return Evidence(len(clean), n_clean, n_single, n_kept, int(multi.sum()), up, down, *tests)


class CollapseGuard:
    """Checks a fixed validation batch every `every` steps; see the module docstring."""

    def __init__(self, images: Tensor, labels: Tensor, eps: float, every: int, keep: float,
                 state: GuardState, start_step: int = 0, after_collapse: bool = False, decides: bool = True,
                 norm: str = "linf") -> None:
        self.images, self.labels = images[:GUARD_EXAMPLES], labels[:GUARD_EXAMPLES]
        self.single_step = fgsm(eps, norm)
        self.multi_step = pgd(eps, eps / 4, GUARD_STEPS, random_start=True, norm=norm)
        self.every, self.keep, self.state, self.start_step = every, keep, state, start_step
        self.after_collapse = after_collapse  # keep checking (and logging) after the event (--on-collapse warn)
        self.decides = decides  # False for methods whose own attack is not a single CE step: log, record nothing
        self.pending: list[Tensor] = []  # this interval's accuracies, read from the device only when needed
        self.improved = False  # whether the last check set a new best (the trainer's rollback point)
        self.last: dict[str, Any] = {}  # the last check's counts and tests (metrics.jsonl logs them)

    @property
    def active(self) -> bool:
        return self.every > 0 and len(self.labels) > 0

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

    def due(self, step: int) -> bool:
        """Whether optimiser step `step` (1-based) is a checking step. The event is recorded once; with
        `after_collapse` the checks go on and are logged, else they end with it."""
        return (self.active and step > self.start_step and step % self.every == 0
                and (self.state.collapse is None or self.after_collapse))

    def measure(self, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Per-example flags: correct clean, under FGSM, under PGD (fixed seed), the model in eval mode."""
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(0)
        return (correct_under_attack(model, self.images, self.labels),
                correct_under_attack(model, self.images, self.labels, self.single_step),
                correct_under_attack(model, self.images, self.labels, self.multi_step, generator=generator))

    def reference_check(self, model: nn.Module) -> None:
        """The check before training: the untrained model's gap is the first reference."""
        if self.active and self.state.reference is None:
            clean, single, multi = self.measure(model)
            self.state.reference = (clean & single & ~multi).tolist()

    def check(self, model: nn.Module, step: int, epoch: int) -> dict[str, Any] | None:
        """The collapse event if one happened now, else None (call on the steps `due` names)."""
        clean, single, multi = self.measure(model)
        state = self.state
        reference = torch.tensor(state.reference, dtype=torch.bool) if state.reference is not None else None
        found = evidence(clean, single, multi, reference, self.keep)
        gap = clean & single & ~multi
        if reference is None or int(gap.sum()) < int(reference.sum()):
            state.reference = gap.tolist()
        self.flush()
        total, count = state.sums
        train = total / count if count else float("nan")
        state.sums = [0.0, 0.0]
        robust = found.multi / found.examples
        self.last = dict(dataclasses.asdict(found), signature=found.signature, guard_pgd_acc=robust,
                         guard_fgsm_acc=found.single / found.examples, train_adv_acc=train)
        self.improved = not found.signature and robust > state.best
        if self.improved:
            state.best = robust
        state.below = state.below + 1 if found.signature else 0
        if self.decides and state.below >= CONSECUTIVE and state.collapse is None:
            state.collapse = {"event": "collapse", "epoch": epoch + 1, "step": step, "guard_examples": found.examples,
                              **{k: self.last[k] for k in ("guard_pgd_acc", "guard_fgsm_acc", "p_hold", "p_keep",
                                                           "p_grow", "train_adv_acc")}, "guard_best": state.best}
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
    nan, best = float("nan"), event.get("guard_best", -1.0)
    best = f" (best {best:.1%})" if best >= 0 else " (never robust at a check)"
    return (f"warning: catastrophic overfitting at step {event.get('step')}: on the guard's "
            f"{event.get('guard_examples')} images, FGSM accuracy {event.get('guard_fgsm_acc', nan):.1%} but "
            f"PGD-{GUARD_STEPS} {event.get('guard_pgd_acc', nan):.1%}{best}, "
            f"at {CONSECUTIVE} checks in a row (exact tests p {event.get('p_hold', nan):.1g}, "
            f"{event.get('p_keep', nan):.1g} and {event.get('p_grow', nan):.1g}); {then[event['action']]}")
