"""Robustness evaluation: attack specs, `evaluate` with the pointwise worst case, self-checks for
gradient masking, resumable per-example state, and the `backsmooth eval` command."""

from backsmooth.attacks import (
    AUTOATTACK_VARIANTS,
    DEFAULT_ATTACKS,
    AttackSpec,
    attack_forms,
    parse_attack,
    parse_attacks,
)
from backsmooth.evaluation.accuracy import correct_under_attack, stratified_subset, to_unit_float, worst_case
from backsmooth.evaluation.checks import (
    Check,
    PairedExcess,
    binomial_tail,
    check_eps_zero,
    check_nondeterminism,
    check_probability_outputs,
    check_zero_gradients,
    paired_excess,
    result_checks,
)
from backsmooth.evaluation.core import EvalResult, eps_text, evaluate, model_info, result_table

__all__ = [
    "attack_forms", "AUTOATTACK_VARIANTS", "DEFAULT_ATTACKS", "AttackSpec", "Check", "EvalResult", "PairedExcess",
    "binomial_tail", "check_eps_zero", "check_nondeterminism", "check_probability_outputs", "check_zero_gradients",
    "correct_under_attack", "eps_text", "evaluate", "model_info", "paired_excess", "parse_attack", "parse_attacks",
    "result_checks", "result_table", "stratified_subset", "to_unit_float", "worst_case",
]
