"""The registry of evaluation attacks: a name pattern, the forms it documents, and a parser that turns
a matching name (`pgd20x5`) into an `AttackSpec` that builds the attack and describes its settings.

    backsmooth.attacks.register(r"mine([1-9]\\d*)", ("mineK",), lambda m: AttackSpec(
        m.group(0), "mine", int(m.group(1)), make=lambda spec, eps, step: MyAttack(eps, step, spec.steps)))

A built attack is called as `attack(model, x, y, generator)` and returns the adversarial images (or
an object with `.x_adv`, as the engine's `Perturbation` does); evaluation projects them onto the
eps-ball and the [0, 1] box before scoring, so no attack can cheat by leaving them.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backsmooth.attacks.engine import Perturbation, ball_init, ce_loss, cw_margin_loss, zero_init
from backsmooth.attacks.norms import NORMS
from backsmooth.errors import ConfigError
from backsmooth.units import NORM_TEXT

CW_KAPPA = 50.0
Builder = Callable[..., Callable[..., Any]]
"""(spec, eps, step size) -> attack(model, x, y, generator) returning x_adv or an object with .x_adv; a family
whose `norms` name more than L-inf is also given the keyword `norm` ("l2", "l1") for the other threat models."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation, parsed from its name by a registered family.

    Either `make` builds the attack (from the engine, or any callable), or `components` names the
    AutoAttack components that the evaluation runs through that package. The last three fields say
    which comparative self-checks the attack takes part in (docs/evaluation.md, "Self-checks"); an
    attack takes part in none unless its family sets them.
    """

    name: str
    kind: str  # the family: "pgd", "cw", "fgsm", "autoattack", or a user's own
    steps: int = 1
    random_start: bool = False
    restarts: int = 1
    components: tuple[str, ...] = ()  # AutoAttack's, run through its package
    loss: str = "cross-entropy"
    make: Builder | None = None  # None: run by the evaluation through AutoAttack's package (`components`)
    iterative: bool = False
    """More steps of the same kind, start and restarts must neither raise nor lower its accuracy
    significantly (the more-steps checks compare every such pair that ran)."""
    single_step: bool = False
    """One step of size eps from the clean input (FGSM): reported so, and it must not beat the
    `single_step_reference` attacks (the fgsm_beats_pgd check)."""
    single_step_reference: bool = False
    """An iterative attack that a single-step attack must not beat (PGD on CE)."""
    norms: tuple[str, ...] = ("linf",)
    """The threat models the family can attack (attacks/norms.py); another norm is refused in one line."""

    def __post_init__(self) -> None:
        if (self.make is None) == (not self.components):
            raise ValueError(f"attack {self.name!r}: give exactly one of `make` (an attack to build) and "
                             f"`components` (AutoAttack's, run through its package)")

    @property
    def runs_in_package(self) -> bool:
        """Run by the evaluation through AutoAttack's package, component by component, instead of built by `make`."""
        return self.make is None

    @property
    def noise_key(self) -> str:
        """What seeds the random starts: the same for attacks that differ only in steps or restarts, so
        `pgd20` and `pgd40` start from the same points and their comparison is free of start noise."""
        return f"{self.kind}-start" if self.random_start else self.kind

    def check_norm(self, norm: str) -> None:
        """Refuse a threat model the family cannot attack, in one line."""
        if norm not in self.norms:
            raise ConfigError(f"attack {self.name!r} is for {', '.join(self.norms)} only, not {norm}; choose another "
                              f"attack or --norm")

    def build(self, eps: float, step_size: float, norm: str = "linf") -> Callable[..., Any]:
        """The attack callable for this spec, in the norm's ball."""
        if self.make is None:
            raise ConfigError(f"{self.name} is not built from the engine (it runs through its own package)")
        self.check_norm(norm)
        return self.make(self, eps, step_size) if norm == "linf" else self.make(self, eps, step_size, norm=norm)

    def settings(self, eps: float, step_size: float, norm: str = "linf") -> dict[str, Any]:
        """Every setting of this attack, for the JSON report."""
        if self.runs_in_package:
            return dict(kind=self.kind, eps=eps, norm=NORM_TEXT[norm], components=list(self.components))
        return dict(kind=self.kind, eps=eps, norm=NORM_TEXT[norm], loss=self.loss, steps=self.steps,
                    step_size=eps if self.single_step else step_size, random_start=self.random_start,
                    restarts=self.restarts)

    def describe(self, eps: float, step_size: float, norm: str = "linf") -> str:
        """A short human-readable summary of the settings, for the printed table."""
        if self.runs_in_package:
            return "AutoAttack " + " + ".join("Square" if c == "square" else c.upper() for c in self.components)
        if self.single_step:
            return f"{self.loss}, one step of eps ({eps:.4f})" + ("" if norm == "linf" else f" along the {norm} "
                                                                                      "steepest ascent")
        start = "random start" if self.random_start else "no random start"
        restarts = f", best of {self.restarts} restarts" if self.restarts > 1 else ""
        return f"{self.loss}, {self.steps} steps of {step_size:.4f}, {start}{restarts}"


@dataclass(frozen=True)
class AttackFamily:
    pattern: re.Pattern[str]
    forms: tuple[str, ...]
    parse: Callable[[re.Match[str]], AttackSpec]


_FAMILIES: list[AttackFamily] = []


def register(pattern: str, forms: Sequence[str], parse: Callable[[re.Match[str]], AttackSpec]) -> None:
    """Add an attack family: names that fully match `pattern` (lower case) parse with `parse`;
    `forms` are the documented name forms shown in help texts and errors."""
    _FAMILIES.append(AttackFamily(re.compile(pattern), tuple(forms), parse))


def attack_forms() -> tuple[str, ...]:
    """Every documented name form, in registration order."""
    return tuple(form for family in _FAMILIES for form in family.forms)


def parse_attack(name: str) -> AttackSpec:
    """The spec of attack `name` (see `attack_forms()`); one-line error for an unknown name."""
    name = name.strip().lower()
    for family in _FAMILIES:
        match = family.pattern.fullmatch(name)
        if match is not None:
            return family.parse(match)
    raise ConfigError(f"unknown attack {name!r}; valid forms: {', '.join(attack_forms())} "
                      f"(K steps, R random restarts; e.g. pgd20,pgd100,cw20,autoattack)")


def parse_attacks(names: str | Sequence[str]) -> tuple[AttackSpec, ...]:
    """A comma-separated string or a sequence of names, without duplicates; at least one."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise ConfigError("no attack given; name at least one, e.g. --attacks pgd20,cw20")
    specs = tuple(parse_attack(n) for n in items)
    seen = [s.name for s in specs]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise ConfigError(f"attack {duplicates[0]!r} is listed twice")
    return specs


# --------------------------------------------------------------------------- the engine's attacks


def _pgd(spec: AttackSpec, eps: float, step_size: float, norm: str = "linf") -> Perturbation:
    return Perturbation(ce_loss, ball_init(norm) if spec.random_start else zero_init, eps, step_size, spec.steps,
                        norm=norm)


def _cw(spec: AttackSpec, eps: float, step_size: float, norm: str = "linf") -> Perturbation:
    return Perturbation(cw_margin_loss(CW_KAPPA), ball_init(norm) if spec.random_start else zero_init, eps, step_size,
                        spec.steps, norm=norm)


def _fgsm(spec: AttackSpec, eps: float, step_size: float, norm: str = "linf") -> Perturbation:
    return Perturbation(ce_loss, zero_init, eps, eps, 1, norm=norm)


_ITERATIVE = {"pgd": ("CE", _pgd, True), "cw": (f"CW margin (kappa {CW_KAPPA:g})", _cw, False)}
"""The engine's iterative families by the kind in their name: (the loss as reported, the builder, whether a
single-step attack must not beat it)."""


def _parse_iterative(match: re.Match[str]) -> AttackSpec:
    kind, steps, restarts, norand = match.groups()
    if norand and restarts:
        raise ConfigError(f"attack {match.group(0)!r}: restarts without a random start would repeat the same attack")
    loss, make, reference = _ITERATIVE[kind]
    return AttackSpec(match.group(0), kind, int(steps), random_start=not norand, restarts=int(restarts or 1),
                      loss=loss, make=make, iterative=True, single_step_reference=reference, norms=NORMS)


register(r"(pgd|cw)([1-9]\d*)(?:x([1-9]\d*))?(-norand)?", ("pgdK", "pgdKxR", "pgdK-norand", "cwK", "cwKxR",
                                                          "cwK-norand"), _parse_iterative)
register(r"fgsm", ("fgsm",), lambda m: AttackSpec("fgsm", "fgsm", loss="CE", make=_fgsm, single_step=True,
                                                 norms=NORMS))

DEFAULT_ATTACKS = ("pgd20", "cw20", "autoattack")
"""What `evaluate` runs unless told otherwise (AutoAttack's names are registered in attacks/autoattack.py)."""
