"""`evaluate(model, x, y, eps, attacks)`: clean accuracy, attacks on the shared perturbation engine and
AutoAttack, the pointwise worst case, self-checks for gradient masking, and resumable state
(docs/evaluation.md)."""

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from backsmooth.attacks import (
    DEFAULT_ATTACKS,
    AttackSpec,
    autoattack,
    parse_attack,
    parse_attacks,
    predict_eval,
    project,
)
from backsmooth.attacks.norms import RadiusWarning, check_radius, max_radius, norm_name, radius_warning
from backsmooth.errors import ConfigError
from backsmooth.evaluation.accuracy import fraction, worst_case
from backsmooth.evaluation.checks import (
    Check,
    check_eps_zero,
    check_nondeterminism,
    check_probability_outputs,
    check_zero_gradients,
    result_checks,
)
from backsmooth.evaluation.state import BatchFn, EvaluationState, derived_seed
from backsmooth.units import NORM_TEXT, eps_text, threat_model_text

PROBE_EXAMPLES = 100  # examples used by the cheap model checks
EPS0_EXAMPLES = 256  # examples attacked at eps = 0


@dataclass
class EvalResult:
    """What `evaluate` found: accuracies are fractions of `n_examples`; `per_example` holds the bool flags
    behind every number (by "clean" and attack name), which `to_json` leaves out."""

    n_examples: int
    eps: float
    clean_acc: float
    robust_acc: float
    """The pointwise worst case: clean-correct and correct under every attack."""
    per_attack: dict[str, float]
    attacks: dict[str, dict[str, Any]]
    """Per attack: its robust accuracy, settings, seconds, and accuracy under attack or after each component."""
    settings: dict[str, Any]
    self_checks: list[dict[str, Any]]
    flags: list[str]
    """The names of the flagged self-checks."""
    autoattack_warnings: list[str]
    batches: dict[str, int]
    """{"total": ..., "resumed": ...}: batches of every unit, and those taken from a saved state."""
    seconds: float
    norm: str = "linf"
    """The threat model's norm (attacks/norms.py); eps is its radius."""
    per_example: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A plain dict of JSON values: what `backsmooth eval` writes under "evaluation"."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_example"}))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EvalResult":
        """The result that `to_json` wrote (an eval report's "evaluation"), without the per-example flags."""
        return cls(**data)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255,
             attacks: str | Sequence[str] = DEFAULT_ATTACKS, batch_size: int = 256, *, seed: int = 0,
             step_size: float | None = None, state_path: str | Path | None = None, restart: bool = False,
             progress: bool | None = None, norm: str = "linf") -> EvalResult:
    """Clean accuracy, per-attack robust accuracy and their pointwise worst case on images `x` in [0, 1], in the
    `norm` ball of radius eps ("linf", "l2", "l1"; RobustBench's "Linf", "L2", "L1" too).

    Engine attacks (pgd, cw, fgsm) run on every example, so their numbers are true per-attack
    accuracies; AutoAttack runs on the clean-correct examples, its components cumulatively as in
    the package. `step_size` defaults to eps / 4 (2/255 at eps = 8/255). With `state_path`,
    per-example flags are saved after every batch and a killed evaluation resumes from them
    (`restart` discards them). Random starts are seeded per (seed, start kind, batch, restart), so a
    resumed evaluation ends with exactly the result of an uninterrupted one, and attacks that differ
    only in their number of steps start from the same points.
    """
    specs = parse_attacks(attacks)
    norm = norm_name(norm)
    for spec in specs:
        spec.check_norm(norm)
    step_size = eps / 4 if step_size is None else float(step_size)
    check_inputs(x, y, eps, batch_size, step_size, norm)
    if (unusual := radius_warning(eps, norm)) is not None:
        warnings.warn(unusual, RadiusWarning, stacklevel=2)
    if any(s.runs_in_package for s in specs):
        autoattack.autoattack_module()  # a missing package fails before any work, with its install hint
    run = EvaluationState(model, x, y, batch_size, seed, state_path, restart, progress,
                          dict(eps=float(eps), norm=norm, step_size=step_size, batch_size=batch_size, seed=seed))
    clean = run.unit("clean", lambda xb, yb, _b, _key: predict_eval(run.model, xb).argmax(1) == yb)
    per_example: dict[str, Tensor] = {"clean": clean}
    raw: dict[str, Tensor] = {}
    components: dict[str, Tensor] = {}
    messages: list[str] = []
    for spec in specs:
        if spec.runs_in_package:
            flags = clean
            for component in spec.components:
                flags = run.unit(f"autoattack:{component}", _autoattack_batch(run, component, flags, messages))
                components[component] = flags
            per_example[spec.name] = flags
        else:
            raw[spec.name] = run.unit(spec.name, _engine_batch(run, spec, spec.build(eps, step_size, norm)))
            per_example[spec.name] = raw[spec.name] & clean
    robust = worst_case(clean, (per_example[s.name] for s in specs))
    per_attack = {s.name: fraction(per_example[s.name]) for s in specs}
    checks = _model_checks(run, clean) + result_checks(specs, clean, per_example, raw, components)
    return EvalResult(
        n_examples=len(y), eps=float(eps), clean_acc=fraction(clean), robust_acc=fraction(robust),
        per_attack=per_attack,
        attacks={s.name: _attack_report(s, run, per_example, raw, components) for s in specs},
        settings=dict(eps=float(eps), norm=norm, step_size=step_size, batch_size=batch_size, seed=seed,
                      attacks=[s.name for s in specs], device=str(run.device), precision="fp32",
                      worst_case="a point is robust only if it is classified correctly clean and under every attack",
                      per_attack_scope="engine attacks: all examples; AutoAttack: clean-correct examples, "
                                       "components cumulative in the standard order"),
        self_checks=[asdict(c) for c in checks], flags=[c.name for c in checks if c.flagged],
        autoattack_warnings=sorted(set(messages)), batches=dict(total=run.batches_total, resumed=run.batches_resumed),
        seconds=sum(run.seconds.values()),  # including the sessions before a resume
        norm=norm,
        per_example=per_example,
    )


def _model_checks(run: EvaluationState, clean: Tensor) -> list[Check]:
    """The cheap checks of the model itself, on the first examples (at most one batch)."""
    x, y = run.probe(PROBE_EXAMPLES)
    x0, y0 = run.probe(EPS0_EXAMPLES)
    return [check_probability_outputs(predict_eval(run.model, x)), check_zero_gradients(run.model, x, y),
            check_nondeterminism(run.model, x), check_eps_zero(run.model, x0, y0, clean[:len(y0)])]


def _attack_report(spec: AttackSpec, run: EvaluationState, per_example: dict[str, Tensor], raw: dict[str, Tensor],
                   components: dict[str, Tensor]) -> dict[str, Any]:
    report: dict[str, Any] = dict(robust_acc=fraction(per_example[spec.name]),
                                  settings=spec.settings(run.fingerprint["eps"], run.fingerprint["step_size"],
                                                         run.fingerprint["norm"]))
    if spec.runs_in_package:
        report["settings"].update(version="standard", package=autoattack.package_description())
        report["after_component"] = {c: fraction(components[c]) for c in spec.components}
        report["seconds"] = sum(run.seconds[f"autoattack:{c}"] for c in spec.components)
    else:
        report["accuracy_under_attack"] = fraction(raw[spec.name])
        report["seconds"] = run.seconds[spec.name]
    return report


def check_inputs(x: Tensor, y: Tensor, eps: float, batch_size: int, step_size: float, norm: str = "linf") -> None:
    """Refuse inputs that would make the evaluation meaningless, before any work."""
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"need images of shape (N, C, H, W) and N labels with N > 0, got {tuple(x.shape)} "
                          f"and {tuple(y.shape)}")
    check_radius(eps, norm, x[0].numel())
    largest = max_radius(norm, x[0].numel())
    if not (0 < step_size <= largest or eps == step_size == 0):  # a zero step is a null attack: only at eps 0
        raise ConfigError(f"attack step size must be in (0, {largest:g}] at {norm} (default eps/4), got {step_size}")
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if x.is_floating_point() and not (x.min() >= 0 and x.max() <= 1):
        raise ConfigError("images must be uint8 or floats in [0, 1] (normalisation belongs inside the model)")


def _engine_batch(run: EvaluationState, spec: AttackSpec, attack: Callable[..., Any]) -> BatchFn:
    """Correct under `attack` on every example of the batch; with restarts, only survivors are retried.
    The attack's images are projected onto the eps-ball and the box first (a no-op for engine attacks)."""

    def batch(x: Tensor, y: Tensor, b: int, _key: slice) -> Tensor:
        correct = torch.ones(len(y), dtype=torch.bool, device=x.device)
        for restart in range(spec.restarts):
            todo = correct.nonzero().squeeze(1)
            if len(todo) == 0:
                break
            generator = torch.Generator(x.device).manual_seed(derived_seed(run.seed, spec.noise_key, b, restart))
            out = attack(run.model, x[todo], y[todo], generator)
            x_adv = project(getattr(out, "x_adv", out).detach(), x[todo], run.fingerprint["eps"],
                            run.fingerprint["norm"])
            correct[todo] = predict_eval(run.model, x_adv).argmax(1) == y[todo]
        return correct

    return batch


def _autoattack_batch(run: EvaluationState, component: str, before: Tensor, messages: list[str]) -> BatchFn:
    """Robust after `component`, run on the batch's points still robust `before` it (clean or earlier components)."""

    def batch(x: Tensor, y: Tensor, b: int, key: slice) -> Tensor:
        robust = before[key].to(x.device, copy=True)
        todo = robust.nonzero().squeeze(1)
        if len(todo):
            robust[todo] = autoattack.run_component(
                run.model, component, x[todo], y[todo], run.fingerprint["eps"],
                derived_seed(run.seed, component, b), run.num_classes, messages, run.fingerprint["norm"])
        return robust

    return batch


# --------------------------------------------------------------------------- reports


def model_info(result: EvalResult | Mapping[str, Any], name: str, architecture: str, dataset: str,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """RobustBench's model_info fields (percent strings, eps like '8/255') plus the full result as 'evaluation'.
    A plain dict of the same keys (a result's `to_json()`, as eval reports hold it) works as well as the result."""
    if not isinstance(result, EvalResult):
        result = EvalResult.from_json(result)
    info: dict[str, Any] = dict(name=name, architecture=architecture, dataset=dataset, eps=eps_text(result.eps),
                                threat_model=NORM_TEXT[result.norm], clean_acc=f"{100 * result.clean_acc:.2f}")
    if "autoattack" in result.per_attack:
        info["autoattack_acc"] = f"{100 * result.per_attack['autoattack']:.2f}"
    info.update(extra or {})
    info["evaluation"] = result.to_json()
    return info


def result_table(result: EvalResult) -> str:
    """The printed summary: one row per attack, the worst case, then the self-checks."""
    eps, step, norm = result.settings["eps"], result.settings["step_size"], result.norm
    rows = [f"threat model: {threat_model_text(norm, eps)}", f"{'attack':<16} {'accuracy':>9}  {'time':>8}  settings",
            f"{'clean':<16} {result.clean_acc:>9.2%}"]
    for name, report in result.attacks.items():
        spec = parse_attack(name)
        rows.append(f"{name:<16} {report['robust_acc']:>9.2%}  {report['seconds']:>7.1f}s  "
                    f"{spec.describe(eps, step, norm)}")
    rows.append(f"{'worst case':<16} {result.robust_acc:>9.2%}  {result.seconds:>7.1f}s  "
                f"robust only if every attack failed")
    flagged = [c for c in result.self_checks if c["flagged"]]
    rows.append(f"self-checks: {len(result.self_checks)} run, "
                + (f"{len(flagged)} FLAGGED" if flagged else "none flagged"))
    rows += [f"  FLAG {c['name']}: {c['message']}" for c in flagged]
    rows += [f"  AutoAttack warns: {m}" for m in result.autoattack_warnings]
    return "\n".join(rows)
