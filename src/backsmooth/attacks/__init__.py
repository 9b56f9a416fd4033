"""One perturbation engine for every attack: `Perturbation(loss, init, eps, step_size, steps, step_rule)`, and the
registry of evaluation attacks by name (`register`, `parse_attack`), AutoAttack's names included."""

from backsmooth.attacks.autoattack import AUTOATTACK_VARIANTS
from backsmooth.attacks.engine import (
    AttackOutput,
    Initializer,
    LossFn,
    Momentum,
    Perturbation,
    SignStep,
    StepRule,
    attack_mode,
    ball_init,
    bernoulli_init,
    ce_loss,
    cw_margin_loss,
    gaussian_init,
    kl_loss,
    predict_eval,
    project,
    uniform_init,
    uniform_noise_init,
    unwrap,
    zero_init,
)
from backsmooth.attacks.norms import NORMS, SteepestStep, lp_norms, norm_name, steepest_direction, uniform_in_ball
from backsmooth.attacks.registry import (
    DEFAULT_ATTACKS,
    AttackSpec,
    attack_forms,
    parse_attack,
    parse_attacks,
    register,
)


def pgd(eps: float, step_size: float, steps: int, random_start: bool = True, norm: str = "linf") -> Perturbation:
    """PGD on cross-entropy (Madry et al.) in the norm's ball; steps = 1 without random start is FGSM (L-inf)."""
    return Perturbation(ce_loss, ball_init(norm) if random_start else zero_init, eps, step_size, steps, norm=norm)


def fgsm(eps: float, norm: str = "linf") -> Perturbation:
    """One step of size eps from the clean input along the norm's steepest ascent (the signed gradient at L-inf)."""
    return Perturbation(ce_loss, zero_init, eps, eps, 1, norm=norm)


__all__ = [
    "AUTOATTACK_VARIANTS", "DEFAULT_ATTACKS", "NORMS", "SteepestStep", "lp_norms", "norm_name", "steepest_direction",
    "uniform_in_ball", "AttackSpec", "attack_forms", "parse_attack", "parse_attacks", "register",
    "AttackOutput", "Initializer", "LossFn", "Momentum", "Perturbation", "SignStep", "StepRule", "attack_mode",
    "ball_init", "bernoulli_init", "ce_loss", "cw_margin_loss", "fgsm", "gaussian_init", "kl_loss", "pgd",
    "predict_eval", "project", "uniform_init", "uniform_noise_init", "unwrap", "zero_init",
]
