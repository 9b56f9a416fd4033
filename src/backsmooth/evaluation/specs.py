"""Attack names of an evaluation: `pgd20`, `pgd20x5`, `pgd20-norand`, the same forms for `cw`, `fgsm`,
`autoattack` and `autoattack-apgd`; each parses to an `AttackSpec` that builds the engine attack and
describes its settings."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backsmooth import autoattack_adapter
from backsmooth.attacks import Perturbation, cw, fgsm, pgd
from backsmooth.errors import ConfigError

CW_KAPPA = 50.0
DEFAULT_ATTACKS = ("pgd20", "cw20", "autoattack")
AUTOATTACK_VARIANTS = {
    "autoattack": autoattack_adapter.STANDARD,  # the standard ensemble: what RobustBench reports
    "autoattack-apgd": autoattack_adapter.STANDARD[:2],  # its APGD-CE + APGD-T part, several times faster
}
_ITERATIVE = re.compile(r"(pgd|cw)([1-9]\d*)(?:x([1-9]\d*))?(-norand)?")
ATTACK_FORMS = ("pgdK", "pgdKxR", "pgdK-norand", "cwK", "cwKxR", "cwK-norand", "fgsm", *AUTOATTACK_VARIANTS)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation, parsed from its name (see `parse_attack`)."""

    name: str
    kind: str  # "pgd", "cw", "fgsm" (the engine) or "autoattack" (the package)
    steps: int = 1
    random_start: bool = False
    restarts: int = 1
    components: tuple[str, ...] = ()

    @property
    def noise_key(self) -> str:
        """What seeds the random starts: the same for attacks that differ only in steps or restarts, so
        `pgd20` and `pgd40` start from the same points and their comparison is free of start noise."""
        return f"{self.kind}-start" if self.random_start else self.kind

    def build(self, eps: float, step_size: float) -> Perturbation:
        """The engine attack of this spec (not for AutoAttack, which runs through its package)."""
        if self.kind == "pgd":
            return pgd(eps, step_size, self.steps, random_start=self.random_start)
        if self.kind == "cw":
            return cw(eps, step_size, self.steps, random_start=self.random_start, kappa=CW_KAPPA)
        if self.kind == "fgsm":
            return fgsm(eps)
        raise ConfigError(f"{self.name} is not an engine attack")

    def settings(self, eps: float, step_size: float) -> dict[str, Any]:
        """Every setting of this attack, for the JSON report."""
        if self.kind == "autoattack":
            return dict(kind=self.kind, eps=eps, norm="Linf", version="standard", components=list(self.components),
                        package=autoattack_adapter.package_description())
        loss = {"pgd": "cross-entropy", "cw": f"CW margin, kappa {CW_KAPPA:g}", "fgsm": "cross-entropy"}[self.kind]
        return dict(kind=self.kind, eps=eps, loss=loss, steps=self.steps,
                    step_size=eps if self.kind == "fgsm" else step_size,
                    random_start=self.random_start, restarts=self.restarts)

    def describe(self, eps: float, step_size: float) -> str:
        """A short human-readable summary of the settings, for the printed table."""
        if self.kind == "autoattack":
            return "AutoAttack " + " + ".join("Square" if c == "square" else c.upper() for c in self.components)
        if self.kind == "fgsm":
            return f"CE, one step of eps ({eps:.4f})"
        loss = "CE" if self.kind == "pgd" else f"CW-inf margin (kappa {CW_KAPPA:g})"
        start = "random start" if self.random_start else "no random start"
        restarts = f", best of {self.restarts} restarts" if self.restarts > 1 else ""
        return f"{loss}, {self.steps} steps of {step_size:.4f}, {start}{restarts}"


def parse_attack(name: str) -> AttackSpec:
    """`pgd20` (random start), `pgd20x5` (5 random restarts), `pgd20-norand`, the same forms for `cw`,
    `fgsm`, `autoattack` (standard) and `autoattack-apgd` (its APGD-CE + APGD-T components)."""
    name = name.strip().lower()
    if name in AUTOATTACK_VARIANTS:
        return AttackSpec(name, "autoattack", components=AUTOATTACK_VARIANTS[name])
    if name == "fgsm":
        return AttackSpec(name, "fgsm")
    match = _ITERATIVE.fullmatch(name)
    if match is None:
        raise ConfigError(f"unknown attack {name!r}; valid forms: {', '.join(ATTACK_FORMS)} "
                          f"(K steps, R random restarts; e.g. pgd20,pgd100,cw20,autoattack)")
    kind, steps, restarts, norand = match.groups()
    if norand and restarts:
        raise ConfigError(f"attack {name!r}: restarts without a random start would repeat the same attack")
    return AttackSpec(name, kind, int(steps), random_start=not norand, restarts=int(restarts or 1))


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
