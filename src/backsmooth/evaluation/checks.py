"""Self-checks for gradient masking and unreliable attacks (docs/evaluation.md, "Self-checks").

Model checks look at the model itself (probability outputs, zero input gradients, randomness,
PGD at eps = 0). Comparative checks compare two sets of per-example flags and decide on evidence:
a comparison flags only when the excess is larger than its tolerance *and* unlikely under the
random-start noise of the attacks, judged by an exact paired test (McNemar's, one-sided) at level
`SIGNIFICANCE`. A fixed margin alone flags healthy models now and then on a few hundred examples.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import AttackSpec, attack_mode, pgd, predict_eval

NONDETERMINISM_TOLERANCE = 1e-4  # relative change of the logits between two identical eval-mode forwards
SIGNIFICANCE = 0.01  # one-sided level of every comparative check (Bonferroni-split over compared pairs)
MORE_STEPS_TOLERANCE = 0.01  # more steps may not change robust accuracy by more than 1 point, either way
FGSM_TOLERANCE = 0.01  # one step may not beat the iterative attack by more than 1 point
AUTOATTACK_GAP = 0.05  # AutoAttack more than 5 points below the engine attacks signals masking
SQUARE_TOLERANCE = 0.002  # Square breaking > 0.2% of points the white-box attacks missed (AutoAttack's rule)


@dataclass(frozen=True)
class Check:
    """One self-check: `flagged` means the evaluation may be unreliable; `value` is compared with `threshold`."""

    name: str
    flagged: bool
    value: float
    threshold: float
    message: str


# --------------------------------------------------------------------------- exact tests


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (sums in log space, so n of a few 10,000 is fine)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


@dataclass(frozen=True)
class PairedExcess:
    """How much more often `first` holds than `second`, example by example.

    `only_first` counts examples where the first flag is set and the second is not, `only_second`
    the reverse; under the null hypothesis that the two are exchangeable (the same attack up to
    random-start noise) each discordant example is a fair coin, so `p_value` is McNemar's exact
    one-sided p-value P(Binomial(only_first + only_second, 1/2) >= only_first).
    """

    n: int
    only_first: int
    only_second: int

    @property
    def excess(self) -> float:
        """(only_first - only_second) / n: the difference of the two accuracies."""
        return (self.only_first - self.only_second) / self.n if self.n else 0.0

    @property
    def p_value(self) -> float:
        return binomial_tail(self.only_first, self.only_first + self.only_second, 0.5)

    def significant(self, tolerance: float, level: float = SIGNIFICANCE) -> bool:
        """Excess above `tolerance` and unlikely under noise at `level`."""
        return self.excess > tolerance and self.p_value < level

    def describe(self) -> str:
        return f"{self.only_first} vs {self.only_second} discordant of {self.n}, exact McNemar p = {self.p_value:.2g}"


def paired_excess(first: Tensor, second: Tensor) -> PairedExcess:
    """Compare two bool flag vectors over the same examples (see `PairedExcess`)."""
    first, second = first.bool().cpu(), second.bool().cpu()
    return PairedExcess(len(first), int((first & ~second).sum()), int((second & ~first).sum()))


# --------------------------------------------------------------------------- model checks


def check_probability_outputs(logits: Tensor) -> Check:
    """Outputs that are already probabilities (softmax inside the model) make CE attacks saturate."""
    row_error = (logits.float().sum(1) - 1).abs().amax().item()
    probabilities = logits.min().item() >= -1e-5 and logits.max().item() <= 1 + 1e-5 and row_error < 1e-5
    return Check("outputs_probabilities", probabilities, row_error, 1e-5,
                 "the model outputs probabilities, not logits: attacks on CE and margins are weakened"
                 if probabilities else "the model outputs logits")


def check_zero_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Check:
    """Examples whose CE input gradient is exactly zero: gradient attacks cannot move them."""
    with attack_mode(model) as net, torch.enable_grad():
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(x).float(), y, reduction="sum"), x)
    fraction = (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    return Check("zero_input_gradients", fraction > 0, fraction, 0.0,
                 f"{fraction:.0%} of {len(y)} probed examples have an all-zero input gradient (a non-differentiable "
                 f"or saturated model masks gradients; trust black-box and AutoAttack numbers over PGD)"
                 if fraction > 0 else f"all {len(y)} probed examples have non-zero input gradients")


def check_nondeterminism(model: nn.Module, x: Tensor) -> Check:
    """Two eval-mode forwards of the same batch must agree: randomness defeats fixed-seed attacks."""
    first, second = predict_eval(model, x), predict_eval(model, x)
    change = ((first - second).abs().amax() / first.abs().amax().clamp(min=1e-12)).item()
    flagged = change > NONDETERMINISM_TOLERANCE or bool((first.argmax(1) != second.argmax(1)).any())
    return Check("nondeterministic", flagged, change, NONDETERMINISM_TOLERANCE,
                 f"two eval-mode forwards differ (relative change {change:.1e}): a randomised model needs "
                 f"EOT attacks, and these numbers overstate its robustness" if flagged
                 else "eval-mode outputs are deterministic")


def check_eps_zero(model: nn.Module, x: Tensor, y: Tensor, clean: Tensor) -> Check:
    """PGD with eps = 0 must leave every prediction as it was: otherwise attack or model is broken."""
    x_adv = pgd(0.0, 2 / 255, 2, random_start=True)(model, x, y, torch.Generator(x.device).manual_seed(0)).x_adv
    changed = ((predict_eval(model, x_adv).argmax(1) == y).cpu() != clean).float().mean().item()
    return Check("eps0_not_clean", changed > 0, changed, 0.0,
                 f"PGD at eps = 0 changes the correctness of {changed:.1%} of {len(y)} examples" if changed > 0
                 else f"PGD at eps = 0 reproduces clean correctness on {len(y)} examples")


# --------------------------------------------------------------------------- comparative checks


def result_checks(specs: Sequence[AttackSpec], clean: Tensor, per_example: dict[str, Tensor],
                  raw: dict[str, Tensor], components: dict[str, Tensor]) -> list[Check]:
    """The checks that compare attacks, each on per-example flags; each runs only when its attacks ran.

    `clean`: correct without attack; `per_example[name]`: robust (clean-correct and correct under
    the attack); `raw[name]`: correct under an engine attack on every example, clean-wrong ones
    included; `components[c]`: robust after AutoAttack component `c` (cumulative).
    """
    checks = []
    if raw:
        checks.append(_robust_above_clean(clean, raw))
    iterative = [s for s in specs if s.iterative]
    pairs = [(a, b) for a in iterative for b in iterative
             if (a.kind, a.random_start, a.restarts) == (b.kind, b.random_start, b.restarts) and a.steps < b.steps]
    if pairs:
        checks += _more_steps(pairs, per_example)
    single = [s for s in specs if s.single_step]
    references = [s for s in specs if s.single_step_reference]
    if single and references:
        checks.append(_fgsm_beats_pgd(single, references, per_example))
    engine = [per_example[s.name] for s in specs if not s.runs_in_package]
    for spec in (s for s in specs if s.runs_in_package):
        if engine:
            engine_worst = clean.clone()
            for flags in engine:
                engine_worst &= flags
            comparison = paired_excess(engine_worst, per_example[spec.name])
            flagged = comparison.significant(AUTOATTACK_GAP)
            checks.append(Check(f"{spec.name}_far_below_pgd", flagged, 100 * comparison.excess, 100 * AUTOATTACK_GAP,
                                f"{spec.name} is {100 * comparison.excess:.2f} points below the worst case of the "
                                f"engine attacks (threshold {100 * AUTOATTACK_GAP:g}; {comparison.describe()})"
                                + (": PGD is probably masked" if flagged else "")))
        if "square" in spec.components:
            checks.append(_square_beats_white_box(components["fab-t"], components["square"]))
    return checks


def _robust_above_clean(clean: Tensor, raw: dict[str, Tensor]) -> Check:
    comparisons = {name: paired_excess(flags, clean) for name, flags in raw.items()}
    name, comparison = min(comparisons.items(), key=lambda item: (item[1].p_value, -item[1].excess))
    flagged = comparison.significant(0.0, SIGNIFICANCE / len(comparisons))
    return Check("robust_above_clean", flagged, 100 * comparison.excess, 0.0,
                 f"accuracy under {name} on all examples exceeds clean accuracy by {100 * comparison.excess:.2f} "
                 f"points ({comparison.describe()}): the attack makes the model more accurate" if flagged
                 else f"no attack raises accuracy above clean significantly (closest: {name}, "
                      f"{100 * comparison.excess:+.2f} points, {comparison.describe()})")


def _more_steps(pairs: list[tuple[AttackSpec, AttackSpec]], per_example: dict[str, Tensor]) -> list[Check]:
    """Two checks over every (fewer, more steps) pair: more steps must neither raise robust accuracy
    significantly (masking) nor lower it significantly (the attack has not converged)."""
    level = SIGNIFICANCE / len(pairs)
    higher = [(few, many, paired_excess(per_example[many.name], per_example[few.name])) for few, many in pairs]
    lower = [(few, many, paired_excess(per_example[few.name], per_example[many.name])) for few, many in pairs]
    checks = []
    for name, found, verdict, quiet in (
            ("more_steps_higher_accuracy", higher, "more steps raised robust accuracy: the attack is not converging "
                                                   "(masked or noisy gradients?)", "more steps did not help the model"),
            ("attack_not_converged", lower, "more steps lowered robust accuracy: the attack had not converged at "
                                            "fewer steps; add steps or restarts until the number stops falling",
             "more steps did not lower robust accuracy significantly")):
        few, many, comparison = min(found, key=lambda item: (item[2].p_value, -item[2].excess))
        flagged = comparison.significant(MORE_STEPS_TOLERANCE, level)
        change = comparison.excess if name == "more_steps_higher_accuracy" else -comparison.excess
        checks.append(Check(name, flagged, 100 * comparison.excess, 100 * MORE_STEPS_TOLERANCE,
                            f"{many.name} minus {few.name}: {100 * change:+.2f} points ({comparison.describe()})"
                            + (f": {verdict}" if flagged else f"; {quiet}")))
    return checks


def _fgsm_beats_pgd(single: list[AttackSpec], references: list[AttackSpec], per_example: dict[str, Tensor]) -> Check:
    """Every single-step attack against every reference attack; the most significant pair decides."""
    comparisons = {(one.name, reference.name): paired_excess(per_example[reference.name], per_example[one.name])
                   for one in single for reference in references}
    (one, name), comparison = min(comparisons.items(), key=lambda item: (item[1].p_value, -item[1].excess))
    flagged = comparison.significant(FGSM_TOLERANCE, SIGNIFICANCE / len(comparisons))
    return Check("fgsm_beats_pgd", flagged, 100 * comparison.excess, 100 * FGSM_TOLERANCE,
                 f"single-step {one.upper()} is {100 * comparison.excess:.2f} points stronger than {name} "
                 f"({comparison.describe()})" + (": the iterative attack is being misled (masked gradients)"
                                                 if flagged else ""))


def _square_beats_white_box(after_fab: Tensor, after_square: Tensor) -> Check:
    """Square runs after the white-box components, on the points they left robust, so it can only lower
    accuracy: the count it broke is tested against AutoAttack's tolerated rate with an exact binomial tail."""
    n = len(after_fab)
    broken = int((after_fab & ~after_square).sum())
    p_value = binomial_tail(broken, n, SQUARE_TOLERANCE)
    flagged = broken / n > SQUARE_TOLERANCE and p_value < SIGNIFICANCE
    return Check("square_beats_white_box", flagged, 100 * broken / n, 100 * SQUARE_TOLERANCE,
                 f"black-box Square broke {broken} of {n} points ({100 * broken / n:.2f}%) that APGD-CE, APGD-T and "
                 f"FAB-T left robust (exact binomial p = {p_value:.2g} against a {100 * SQUARE_TOLERANCE:g}% rate)"
                 + (": the white-box attacks are masked" if flagged else ""))
