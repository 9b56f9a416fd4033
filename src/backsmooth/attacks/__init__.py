"""One perturbation engine for every attack: `Perturbation(loss, init, eps, step_size, steps)`, and the
registry of evaluation attacks by name (`register`, `parse_attack`)."""

from backsmooth.attacks.engine import (
    AttackOutput,
    Initializer,
    LossFn,
    Perturbation,
    attack_mode,
    bernoulli_init,
    ce_loss,
    cw_margin_loss,
    gaussian_init,
    kl_loss,
    predict_eval,
    project,
    sign_step,
    uniform_init,
    uniform_noise_init,
    unwrap,
    zero_init,
)
from backsmooth.attacks.registry import AttackSpec, attack_forms, parse_attack, parse_attacks, register  # noqa: E402


def pgd(eps: float, step_size: float, steps: int, random_start: bool = True) -> Perturbation:
    """PGD on cross-entropy (Madry et al.); steps = 1 without random start is FGSM."""
    return Perturbation(ce_loss, uniform_init if random_start else zero_init, eps, step_size, steps)


def cw(eps: float, step_size: float, steps: int, random_start: bool = False, kappa: float = 50.0) -> Perturbation:
    """CW-inf: PGD on the margin loss max(z_y - max_{j != y} z_j, -kappa)."""
    return Perturbation(cw_margin_loss(kappa), uniform_init if random_start else zero_init, eps, step_size, steps)


def fgsm(eps: float) -> Perturbation:
    """One signed-gradient step of size eps from the clean input."""
    return Perturbation(ce_loss, zero_init, eps, eps, 1)


__all__ = [
    "AttackSpec", "attack_forms", "parse_attack", "parse_attacks", "register",
    "AttackOutput", "Initializer", "LossFn", "Perturbation", "attack_mode", "bernoulli_init", "ce_loss", "cw",
    "cw_margin_loss", "fgsm", "gaussian_init", "kl_loss", "pgd", "predict_eval", "project", "sign_step", "uniform_init",
    "uniform_noise_init", "unwrap", "zero_init",
]
