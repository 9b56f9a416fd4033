"""Robustness evaluation (DESIGN section 5): clean accuracy, attacks on the shared perturbation engine
and AutoAttack, the pointwise worst case, self-checks for gradient masking, and resumable state.

`evaluate(model, x, y, eps, attacks)` is the library entry point; `backsmooth eval` (`main_eval`)
runs it on a trained model and writes RobustBench-style JSON. See docs/evaluation.md.
"""

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from backsmooth import autoattack_adapter
from backsmooth.attacks import Perturbation, attack_mode, cw, fgsm, pgd, predict_eval
from backsmooth.checkpoint import atomic_write_json, load, save
from backsmooth.errors import ConfigError, DataError
from backsmooth.runtime import autocast

# --------------------------------------------------------------------------- per-example correctness


def to_unit_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images -> float32 in [0, 1] on `device`; float images pass through."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def correct_under_attack(model: nn.Module, images: Tensor, labels: Tensor, attack: Perturbation | None = None,
                         *, batch_size: int = 256, device: torch.device | None = None, precision: str = "fp32",
                         generator: torch.Generator | None = None) -> Tensor:
    """A bool per example: still classified correctly after `attack` (clean accuracy when None).

    The model runs in eval mode throughout; its previous mode is restored.
    """
    device = device or next(model.parameters()).device
    flags = []
    for start in range(0, len(labels), batch_size):
        x = to_unit_float(images[start:start + batch_size], device)
        y = labels[start:start + batch_size].to(device)
        with autocast(device, precision):
            if attack is not None:
                x = attack(model, x, y, generator).x_adv
            with attack_mode(model) as net, torch.no_grad():
                flags.append((net(x).argmax(1) == y).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def _mean(flags: Tensor) -> float:
    """The fraction of True flags, computed exactly (0.83, not float32's 0.8299999833)."""
    return int(flags.sum()) / len(flags) if len(flags) else float("nan")


def stratified_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of `n` examples with classes in proportion (all of them when n >= len), seeded."""
    if n >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    # round-robin over classes in random order keeps class proportions within one example
    ranks = torch.empty_like(order)
    shuffled = labels[order]
    for c in shuffled.unique():
        members = (shuffled == c).nonzero().squeeze(1)
        ranks[members] = torch.arange(len(members)) * len(labels) // len(members)
    chosen = order[torch.argsort(ranks, stable=True)[:n]]
    return chosen.sort().values


# --------------------------------------------------------------------------- attack names

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
    """A comma-separated string or a sequence of names, without duplicates."""
    items = [n for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    specs = tuple(parse_attack(n) for n in items)
    seen = [s.name for s in specs]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise ConfigError(f"attack {duplicates[0]!r} is listed twice")
    return specs


def _engine_attack(spec: AttackSpec, eps: float, step_size: float) -> Perturbation:
    if spec.kind == "pgd":
        return pgd(eps, step_size, spec.steps, random_start=spec.random_start)
    if spec.kind == "cw":
        return cw(eps, step_size, spec.steps, random_start=spec.random_start, kappa=CW_KAPPA)
    return fgsm(eps)


# --------------------------------------------------------------------------- self-checks

PROBE_EXAMPLES = 100  # examples used by the cheap model checks
EPS0_EXAMPLES = 256  # examples attacked at eps = 0
NONDETERMINISM_TOLERANCE = 1e-4  # relative change of the logits between two identical eval-mode forwards
MORE_STEPS_TOLERANCE = 0.01  # more PGD steps may not raise robust accuracy by more than 1 point
FGSM_TOLERANCE = 0.01  # one step may not beat the iterative attack by more than 1 point
AUTOATTACK_GAP = 0.05  # AutoAttack more than 5 points below the engine attacks signals masking
SQUARE_TOLERANCE = 0.002  # Square (black box) breaking > 0.2% of points the white-box attacks missed (AutoAttack's rule)


@dataclass(frozen=True)
class Check:
    """One self-check: `flagged` means the evaluation may be unreliable; `value` is compared with `threshold`."""

    name: str
    flagged: bool
    value: float
    threshold: float
    message: str


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


def result_checks(specs: Sequence[AttackSpec], clean_acc: float, per_attack: dict[str, float],
                  accuracy_under_attack: dict[str, float], components: dict[str, float],
                  engine_worst_acc: float | None) -> list[Check]:
    """The checks that compare accuracies (DESIGN section 5); each runs only when its attacks ran."""
    checks = []
    if accuracy_under_attack:
        name, acc = max(accuracy_under_attack.items(), key=lambda item: item[1])
        gap = acc - clean_acc
        checks.append(Check("robust_above_clean", gap > 0, 100 * gap, 0.0,
                            f"accuracy under {name} on all examples exceeds clean accuracy by {100 * gap:.2f} points: "
                            f"the attack makes the model more accurate" if gap > 0
                            else "no attack raises accuracy above clean"))
    iterative = [s for s in specs if s.kind in ("pgd", "cw")]
    pairs = [(a, b) for a in iterative for b in iterative
             if (a.kind, a.random_start, a.restarts) == (b.kind, b.random_start, b.restarts) and a.steps < b.steps]
    if pairs:
        few, many = max(pairs, key=lambda p: per_attack[p[1].name] - per_attack[p[0].name])
        rise = per_attack[many.name] - per_attack[few.name]
        checks.append(Check("more_steps_higher_accuracy", rise > MORE_STEPS_TOLERANCE, 100 * rise,
                            100 * MORE_STEPS_TOLERANCE,
                            f"{many.name} minus {few.name}: {100 * rise:+.2f} points"
                            + (": more steps raised robust accuracy, the attack is not converging (masking?)"
                               if rise > MORE_STEPS_TOLERANCE else " (more steps did not help the model)")))
    fgsm_specs = [s for s in specs if s.kind == "fgsm"]
    pgd_specs = [s for s in specs if s.kind == "pgd"]
    if fgsm_specs and pgd_specs:
        strongest = min(pgd_specs, key=lambda s: per_attack[s.name])
        lead = per_attack[strongest.name] - per_attack["fgsm"]
        checks.append(Check("fgsm_beats_pgd", lead > FGSM_TOLERANCE, 100 * lead, 100 * FGSM_TOLERANCE,
                            f"single-step FGSM is {100 * lead:.2f} points stronger than {strongest.name}: "
                            f"the iterative attack is being misled (masked gradients)" if lead > FGSM_TOLERANCE
                            else f"FGSM is not stronger than {strongest.name}"))
    for spec in (s for s in specs if s.kind == "autoattack"):
        if engine_worst_acc is not None:
            gap = engine_worst_acc - per_attack[spec.name]
            checks.append(Check(f"{spec.name}_far_below_pgd", gap > AUTOATTACK_GAP, 100 * gap, 100 * AUTOATTACK_GAP,
                                f"{spec.name} is {100 * gap:.2f} points below the worst case of the engine attacks "
                                f"(threshold {100 * AUTOATTACK_GAP:g})" + (": PGD is probably masked" if
                                                                           gap > AUTOATTACK_GAP else "")))
        if "square" in spec.components:
            drop = components["fab-t"] - components["square"]
            checks.append(Check("square_beats_white_box", drop > SQUARE_TOLERANCE, 100 * drop, 100 * SQUARE_TOLERANCE,
                                f"black-box Square broke {100 * drop:.2f}% of the points that APGD-CE, APGD-T and FAB-T "
                                f"left robust" + (": the white-box attacks are masked" if drop > SQUARE_TOLERANCE
                                                  else "")))
    return checks


# --------------------------------------------------------------------------- the evaluation


class EvalResult(dict):
    """The JSON-ready summary of `evaluate`; `per_example` holds the bool flags behind every number."""

    per_example: dict[str, Tensor]


def worst_case(clean: Tensor, robust: Iterable[Tensor]) -> Tensor:
    """Pointwise worst case: robust only if classified correctly clean and under every attack."""
    flags = clean.clone()
    for attack_flags in robust:
        flags &= attack_flags
    return flags


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255,
             attacks: str | Sequence[str] = DEFAULT_ATTACKS, batch_size: int = 256, *, seed: int = 0,
             step_size: float | None = None, state_path: str | Path | None = None, restart: bool = False,
             progress: bool | None = None) -> EvalResult:
    """Clean accuracy, per-attack robust accuracy and their pointwise worst case on images `x` in [0, 1].

    Engine attacks (pgd, cw, fgsm) run on every example, so their numbers are true per-attack
    accuracies; AutoAttack runs on the clean-correct examples, its components cumulatively as in
    the package. `step_size` defaults to eps / 4 (2/255 at eps = 8/255). With `state_path`,
    per-example flags are saved after every batch and a killed evaluation resumes from them
    (`restart` discards them). Random starts are seeded per (seed, attack, batch), so a resumed
    evaluation ends with exactly the result of an uninterrupted one.
    """
    specs = parse_attacks(attacks)
    _check_inputs(x, y, eps, batch_size)
    if any(s.kind == "autoattack" for s in specs):
        autoattack_adapter.autoattack_module()  # a missing package fails before any work, with its install hint
    step_size = eps / 4 if step_size is None else float(step_size)
    run = _Run(model, x, y, batch_size, seed, state_path, restart, progress,
               dict(eps=float(eps), step_size=step_size, batch_size=batch_size, seed=seed))
    clean = run.unit("clean", lambda xb, yb, _b, _key: predict_eval(run.model, xb).argmax(1) == yb)
    per_example: dict[str, Tensor] = {"clean": clean}
    raw: dict[str, Tensor] = {}
    components: dict[str, float] = {}
    messages: list[str] = []
    for spec in specs:
        if spec.kind == "autoattack":
            flags = clean
            for component in spec.components:
                flags = run.unit(f"autoattack:{component}", _autoattack_batch(run, component, flags, messages))
                components[component] = _mean(flags)
            per_example[spec.name] = flags
        else:
            raw[spec.name] = run.unit(spec.name, _engine_batch(run, spec, _engine_attack(spec, eps, step_size)))
            per_example[spec.name] = raw[spec.name] & clean
    robust = worst_case(clean, (per_example[s.name] for s in specs))
    engine = [per_example[s.name] for s in specs if s.kind != "autoattack"]
    per_attack = {s.name: _mean(per_example[s.name]) for s in specs}
    checks = run.model_checks(clean) + result_checks(
        specs, _mean(clean), per_attack, {n: _mean(f) for n, f in raw.items()}, components,
        _mean(worst_case(clean, engine)) if engine else None)
    result = EvalResult(
        n_examples=len(y), eps=float(eps), clean_acc=_mean(clean), robust_acc=_mean(robust), per_attack=per_attack,
        attacks={s.name: _attack_report(s, run, per_example, raw, components) for s in specs},
        settings=dict(eps=float(eps), step_size=step_size, batch_size=batch_size, seed=seed,
                      attacks=[s.name for s in specs], device=str(run.device), precision="fp32",
                      worst_case="a point is robust only if it is classified correctly clean and under every attack",
                      per_attack_scope="engine attacks: all examples; AutoAttack: clean-correct examples, "
                                       "components cumulative in the standard order"),
        self_checks=[asdict(c) for c in checks], flags=[c.name for c in checks if c.flagged],
        autoattack_warnings=sorted(set(messages)), batches=dict(total=run.batches_total, resumed=run.batches_resumed),
        seconds=sum(run.seconds.values()),  # including the sessions before a resume
    )
    result.per_example = per_example
    return result


def _attack_report(spec: AttackSpec, run: "_Run", per_example: dict[str, Tensor], raw: dict[str, Tensor],
                   components: dict[str, float]) -> dict[str, Any]:
    report: dict[str, Any] = dict(robust_acc=_mean(per_example[spec.name]),
                                  settings=spec.settings(run.fingerprint["eps"], run.fingerprint["step_size"]))
    if spec.kind == "autoattack":
        report["after_component"] = {c: components[c] for c in spec.components}
        report["seconds"] = sum(run.seconds[f"autoattack:{c}"] for c in spec.components)
    else:
        report["accuracy_under_attack"] = _mean(raw[spec.name])
        report["seconds"] = run.seconds[spec.name]
    return report


def _check_inputs(x: Tensor, y: Tensor, eps: float, batch_size: int) -> None:
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"need images of shape (N, C, H, W) and N labels with N > 0, got {tuple(x.shape)} "
                          f"and {tuple(y.shape)}")
    if not 0 <= eps <= 1:
        raise ConfigError(f"eps must be in [0, 1] in pixel units (8/255 = 0.0314), got {eps}")
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if x.is_floating_point() and (x.min() < 0 or x.max() > 1):
        raise ConfigError("images must be uint8 or floats in [0, 1] (normalisation belongs inside the model)")


def _derived_seed(*parts: object) -> int:
    """A 31-bit seed from (seed, attack, batch, restart): resumable runs redraw the same noise."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


def _digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


BatchFn = Callable[[Tensor, Tensor, int, slice], Tensor]
"""(images in [0, 1] on the device, labels, batch index, slice of the batch) -> bool flags of the batch."""


class _Run:
    """The batches of one evaluation and its resumable state: per unit (clean, each engine attack,
    each AutoAttack component) a flag per example, the batches done and the seconds spent."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int, seed: int,
                 state_path: str | Path | None, restart: bool, progress: bool | None,
                 settings: dict[str, Any]) -> None:
        self.model, self.x, self.y, self.batch_size, self.seed = model, x, y, batch_size, seed
        first = next(iter(model.parameters()), next(iter(model.buffers()), None))
        self.device = first.device if first is not None else torch.device("cpu")
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.num_classes = predict_eval(model, to_unit_float(x[:1], self.device)).shape[1]
        self.fingerprint = dict(settings, n_examples=len(y), model=_digest(sorted(model.state_dict().items())),
                                data=_digest([("x", x), ("y", y)]))
        self.n_batches = -(-len(y) // batch_size)
        self.path = Path(state_path) if state_path is not None else None
        self.units: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        self.batches_total = self.batches_resumed = 0
        if self.path is not None and self.path.exists() and not restart:
            self._resume()

    def _resume(self) -> None:
        state = load(self.path)
        theirs = state.get("fingerprint", {})
        differing = sorted(k for k in self.fingerprint if theirs.get(k) != self.fingerprint[k])
        if differing:
            raise ConfigError(f"{self.path} holds an unfinished evaluation with a different {', '.join(differing)}; "
                              f"pass --restart (restart=True) to discard it")
        self.units = state["units"]

    def unit(self, name: str, run_batch: BatchFn) -> Tensor:
        """Flags of unit `name`: the batches not in the state are computed, saving after each."""
        if name in self.seconds:  # already run in this call (AutoAttack variants share components)
            return self.units[name]["flags"].clone()
        unit = self.units.setdefault(name, dict(flags=torch.zeros(len(self.y), dtype=torch.bool), done=0,
                                                seconds=0.0))
        self.batches_total += self.n_batches
        self.batches_resumed += unit["done"]
        with tqdm(total=self.n_batches, initial=unit["done"], desc=name, unit="batch", leave=False,
                  disable=not self.progress) as bar:
            for b in range(unit["done"], self.n_batches):
                start = time.perf_counter()
                key = slice(b * self.batch_size, (b + 1) * self.batch_size)
                xb, yb = to_unit_float(self.x[key], self.device), self.y[key].to(self.device)
                unit["flags"][key] = run_batch(xb, yb, b, key).cpu()
                unit["done"] = b + 1
                unit["seconds"] += time.perf_counter() - start
                if self.path is not None:
                    save(self.path, dict(fingerprint=self.fingerprint, units=self.units))
                bar.update()
        self.seconds[name] = unit["seconds"]
        return unit["flags"].clone()

    def model_checks(self, clean: Tensor) -> list[Check]:
        """The cheap checks of the model itself, on the first examples (at most one batch)."""
        n = min(PROBE_EXAMPLES, self.batch_size)
        x, y = to_unit_float(self.x[:n], self.device), self.y[:n].to(self.device)
        m = min(EPS0_EXAMPLES, self.batch_size)
        x0, y0 = to_unit_float(self.x[:m], self.device), self.y[:m].to(self.device)
        return [check_probability_outputs(predict_eval(self.model, x)), check_zero_gradients(self.model, x, y),
                check_nondeterminism(self.model, x), check_eps_zero(self.model, x0, y0, clean[:m])]


def _engine_batch(run: _Run, spec: AttackSpec, attack: Perturbation) -> BatchFn:
    """Correct under `attack` on every example of the batch; with restarts, only survivors are retried."""

    def batch(x: Tensor, y: Tensor, b: int, _key: slice) -> Tensor:
        correct = torch.ones(len(y), dtype=torch.bool, device=x.device)
        for restart in range(spec.restarts):
            todo = correct.nonzero().squeeze(1)
            if len(todo) == 0:
                break
            generator = torch.Generator(x.device).manual_seed(_derived_seed(run.seed, spec.name, b, restart))
            x_adv = attack(run.model, x[todo], y[todo], generator).x_adv
            correct[todo] = predict_eval(run.model, x_adv).argmax(1) == y[todo]
        return correct

    return batch


def _autoattack_batch(run: _Run, component: str, before: Tensor, messages: list[str]) -> BatchFn:
    """Robust after `component`, run on the batch's points still robust `before` it (clean or earlier components)."""

    def batch(x: Tensor, y: Tensor, b: int, key: slice) -> Tensor:
        robust = before[key].to(x.device, copy=True)
        todo = robust.nonzero().squeeze(1)
        if len(todo):
            robust[todo] = autoattack_adapter.run_component(
                run.model, component, x[todo], y[todo], run.fingerprint["eps"],
                _derived_seed(run.seed, component, b), run.num_classes, messages)
        return robust

    return batch


# --------------------------------------------------------------------------- reports


def eps_text(eps: float) -> str:
    """RobustBench's eps string: '8/255' when eps is a multiple of 1/255, else the decimal."""
    k = eps * 255
    return f"{round(k)}/255" if round(k) > 0 and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def model_info(result: EvalResult, name: str, architecture: str, dataset: str,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """RobustBench's model_info fields (percent strings, eps like '8/255') plus the full result as 'evaluation'."""
    info: dict[str, Any] = dict(name=name, architecture=architecture, dataset=dataset, eps=eps_text(result["eps"]),
                                clean_acc=f"{100 * result['clean_acc']:.2f}")
    if "autoattack" in result["per_attack"]:
        info["autoattack_acc"] = f"{100 * result['per_attack']['autoattack']:.2f}"
    info.update(extra or {})
    info["evaluation"] = dict(result)
    return info


def format_table(result: EvalResult) -> str:
    """The printed summary: one row per attack, the worst case, then the self-checks."""
    eps, step = result["settings"]["eps"], result["settings"]["step_size"]
    rows = [f"{'attack':<16} {'accuracy':>9}  {'time':>8}  settings",
            f"{'clean':<16} {result['clean_acc']:>9.2%}"]
    for name, report in result["attacks"].items():
        spec = parse_attack(name)
        rows.append(f"{name:<16} {report['robust_acc']:>9.2%}  {report['seconds']:>7.1f}s  {spec.describe(eps, step)}")
    rows.append(f"{'worst case':<16} {result['robust_acc']:>9.2%}  {result['seconds']:>7.1f}s  "
                f"robust only if every attack failed")
    flagged = [c for c in result["self_checks"] if c["flagged"]]
    rows.append(f"self-checks: {len(result['self_checks'])} run, "
                + (f"{len(flagged)} FLAGGED" if flagged else "none flagged"))
    rows += [f"  FLAG {c['name']}: {c['message']}" for c in flagged]
    rows += [f"  AutoAttack warns: {m}" for m in result["autoattack_warnings"]]
    return "\n".join(rows)


# --------------------------------------------------------------------------- command line


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth eval`."""
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--attacks", default="pgd20,cw20",
                        help=f"comma-separated attacks (default pgd20,cw20); forms: {', '.join(ATTACK_FORMS)}")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="dataset folder (default: the run's)")
    parser.add_argument("--eps", help="L-inf radius, e.g. 8/255 (default: the run's)")
    parser.add_argument("--step-size", help="step of pgd/cw attacks (default: eps/4, which is 2/255 at eps 8/255)")
    parser.add_argument("--n-examples", type=int, default=1000, help="stratified test subset size (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice and random starts")
    parser.add_argument("--name", help="model name in the report and file name eval-NAME.json (default: the run's)")
    parser.add_argument("--out", help="folder for eval-NAME.json (default: the run directory)")
    parser.add_argument("--restart", action="store_true", help="discard the state of an interrupted evaluation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main_eval(args: argparse.Namespace) -> int:
    """`backsmooth eval`: the evaluation protocol on a trained model's (stratified) test set; writes eval-NAME.json."""
    from backsmooth.checkpoint import load_model
    from backsmooth.config import parse_number
    from backsmooth.data import load_dataset
    from backsmooth.runtime import resolve_device

    specs = parse_attacks(args.attacks)
    if args.n_examples <= 0:
        raise ConfigError(f"--n-examples must be positive, got {args.n_examples}")
    device = resolve_device(args.device)
    model, meta = load_model(args.target, device)
    target = Path(args.target)
    run_dir = target if target.is_dir() else target.parent
    run_config_path = Path(meta["path"]).parent / "config.json"
    run_config = json.loads(run_config_path.read_text()) if run_config_path.exists() else {}
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise DataError(f"{meta['path']} does not name its dataset; pass --dataset")
    eps = parse_number(args.eps) if args.eps else float(meta["eps"])
    step_size = parse_number(args.step_size) if args.step_size else None
    test = load_dataset(dataset, args.data_dir or run_config.get("data_dir"), val_size=0,
                        cache_dir=run_config.get("cache_dir")).test
    _check_fits(test.images, test.labels, meta, dataset)
    index = stratified_subset(test.labels, args.n_examples, args.seed)
    name = args.name or (target.name if target.is_dir() else target.stem)
    out = Path(args.out) if args.out else run_dir
    state_path = out / f"eval-{name}.state.pt"
    print(f"{meta['path']}: {meta['arch']}" + (f" trained with {meta['method']}" if "method" in meta else "")
          + f"; {len(index)} of {len(test.labels)} {dataset} test examples (stratified, seed {args.seed}); "
            f"eps {eps_text(eps)} = {eps:.4f}", flush=True)
    try:
        result = evaluate(model, test.images[index], test.labels[index], eps, [s.name for s in specs],
                          args.batch_size, seed=args.seed, step_size=step_size, state_path=state_path,
                          restart=args.restart, progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        from backsmooth.train import EXIT_INTERRUPTED

        print(f"interrupted: finished batches are saved in {state_path}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["batches"]["resumed"]:
        print(f"resumed {state_path.name}: {result['batches']['resumed']} of {result['batches']['total']} batches "
              f"were already done")
    print(format_table(result))
    report_path = out / f"eval-{name}.json"
    extra = dict(checkpoint=dict(path=meta["path"], method=meta.get("method"), epoch=meta.get("epoch")),
                 subset=dict(n_examples=len(index), test_size=len(test.labels), seed=args.seed, stratified=True))
    atomic_write_json(report_path, model_info(result, name, meta["arch"], dataset, extra))
    state_path.unlink(missing_ok=True)
    print(f"wrote {report_path}")
    return 0


def _check_fits(images: Tensor, labels: Tensor, meta: dict[str, Any], dataset: str) -> None:
    """The dataset must have the image shape and classes the model was trained for."""
    shape = tuple(meta.get("image_shape") or ())
    if shape and tuple(images.shape[1:]) != shape:
        raise DataError(f"{dataset} images have shape {tuple(images.shape[1:])} but the model was trained on {shape}")
    if len(labels) and int(labels.max()) >= int(meta["num_classes"]):
        raise DataError(f"{dataset} has labels up to {int(labels.max())} but the model has {meta['num_classes']} classes")


__all__ = [
    "ATTACK_FORMS", "AttackSpec", "Check", "EvalResult", "add_eval_arguments", "check_eps_zero",
    "check_nondeterminism", "check_probability_outputs", "check_zero_gradients",
    "correct_under_attack", "eps_text", "evaluate", "format_table", "main_eval", "model_info", "parse_attack",
    "parse_attacks", "result_checks", "stratified_subset", "to_unit_float", "worst_case",
]
