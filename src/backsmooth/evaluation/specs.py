"""AutoAttack's names in the attack registry: `autoattack` (the standard ensemble, what RobustBench
reports) and `autoattack-apgd` (its APGD-CE + APGD-T part, several times faster). They run through the
package, component by component, on the points still robust (core.py)."""

from backsmooth import autoattack_adapter
from backsmooth.attacks.registry import AttackSpec, register

DEFAULT_ATTACKS = ("pgd20", "cw20", "autoattack")
AUTOATTACK_VARIANTS = {
    "autoattack": autoattack_adapter.STANDARD,
    "autoattack-apgd": autoattack_adapter.STANDARD[:2],
}

register("|".join(AUTOATTACK_VARIANTS), tuple(AUTOATTACK_VARIANTS),
         lambda m: AttackSpec(m.group(0), "autoattack", components=AUTOATTACK_VARIANTS[m.group(0)], loss="AutoAttack"))
