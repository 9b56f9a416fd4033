"""AutoAttack (Croce & Hein 2020) through its maintained package, one component on one batch at a time,
and its names in the attack registry: `autoattack` (the standard ensemble, what RobustBench reports) and
`autoattack-apgd` (its APGD-CE + APGD-T part, several times faster).

Nothing of AutoAttack's algorithms is copied here: we build the package's own `AutoAttack` object
with its "standard" settings, select one component, and call its `run_standard_evaluation`. Running
components one at a time (in the standard order, each on the points the previous ones left robust)
gives exactly the standard ensemble, while letting `backsmooth.evaluation` save per-example flags
after every batch and report each component's contribution. The package is imported only when an
attack runs (or `autoattack_module()` is asked for it), so registering the names needs nothing installed.
"""

import importlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from backsmooth.attacks.engine import attack_mode, predict_eval
from backsmooth.attacks.norms import NORMS, lp_norms
from backsmooth.attacks.registry import AttackSpec, register
from backsmooth.errors import BacksmoothError
from backsmooth.units import NORM_TEXT

PACKAGES = ("pyautoattack", "autoattack")
"""Import names tried in order: the maintained PyPI package, then the original repository's."""

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
"""The components of AutoAttack "standard", in the order the package runs them."""

AUTOATTACK_VARIANTS = {"autoattack": STANDARD, "autoattack-apgd": STANDARD[:2]}
"""The registered AutoAttack names and the components each runs."""

INSTALL_HINT = ("AutoAttack needs its package: pip install pyautoattack (or pip install 'backsmooth[autoattack]'); "
                "the original `autoattack` package from github.com/fra31/auto-attack works too")


def autoattack_module() -> Any:
    """The installed AutoAttack package (pyautoattack, else autoattack); a one-line hint when neither is."""
    for name in PACKAGES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BacksmoothError(INSTALL_HINT)


def package_description() -> str:
    """'pyautoattack 0.2.0' or similar: which implementation produced the numbers."""
    module = autoattack_module()
    return f"{module.__name__} {getattr(module, '__version__', 'unknown version')}"


@contextmanager
def _captured_messages(into: list[str]) -> Iterator[None]:
    """Collect the package's warnings (logging in pyautoattack, `warnings` in the original) instead of printing them."""

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(record.getMessage())

    logger = logging.getLogger("auto-attack")
    handler, propagate, level = Collect(logging.WARNING), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        into.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


def run_component(model: nn.Module, component: str, x: Tensor, y: Tensor, eps: float, seed: int,
                  num_classes: int, messages: list[str], norm: str = "linf") -> Tensor:
    """A bool per example: still classified correctly after AutoAttack's `component` (standard settings of the
    norm's version: L-inf, L2 or L1).

    The model runs in eval mode without parameter gradients; the package's seeding of the global
    RNG is undone afterwards. Targeted components use the standard number of target classes (9; APGD-T 5 at
    L1), at most classes - 1. Package warnings are appended to `messages`.
    """
    if component not in STANDARD:
        raise ValueError(f"unknown AutoAttack component {component!r}; expected one of {STANDARD}")
    package = autoattack_module()
    constructor = inspect.signature(package.AutoAttack).parameters
    options: dict[str, Any] = dict(norm=NORM_TEXT[norm], eps=eps, version="standard", seed=seed, device=x.device)
    if "verbose" in constructor:  # the original package prints unless told otherwise
        options["verbose"] = False
    devices = [x.device] if x.device.type == "cuda" else []
    with attack_mode(model) as net, torch.random.fork_rng(devices=devices), _captured_messages(messages):
        adversary = package.AutoAttack(net, **options)
        adversary.verbose = False
        adversary.attacks_to_run = [component]
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
        run = adversary.run_standard_evaluation
        if "batch_size" in inspect.signature(run).parameters:  # pyautoattack
            x_adv, _ = run(x, y, batch_size=len(y))
        else:  # the original package
            x_adv = run(x, y, bs=len(y))
    if lp_norms(x_adv - x, norm).amax() > eps * (1 + 1e-4) + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"AutoAttack's {component} returned points outside the {norm} eps ball or the [0, 1] box")
    return predict_eval(model, x_adv).argmax(1) == y


register("|".join(AUTOATTACK_VARIANTS), tuple(AUTOATTACK_VARIANTS),
         lambda m: AttackSpec(m.group(0), "autoattack", components=AUTOATTACK_VARIANTS[m.group(0)], loss="AutoAttack",
                              norms=NORMS))
