"""What every training method shares: the call signature, declared hyperparameters and cost, the
hyperparameter checks, the training cross-entropy with the run's label smoothing (checked: a method cannot
silently ignore --label-smoothing), and the losses several methods use (TRADES, cross-entropy)."""

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth.attacks import Initializer, Perturbation, kl_loss, norm_name, predict_eval
from backsmooth.errors import ConfigError

Stats = dict[str, Tensor]
RUN_LEVEL = ("eps", "label_smoothing", "norm")  # dataclass fields set by the run (--eps, --label-smoothing, --norm)


def hyperparameter(default: Any, help: str) -> Any:
    """A method's dataclass field with the help text the CLI shows for its flag."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Option:
    """One hyperparameter as the config and the CLI see it: its name, value type and help."""

    name: str
    kind: type  # bool, int, float or str
    help: str


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where training stands when a method is called: for methods whose weights follow the epoch
    (NuAT, GAT) and methods that remember each training example (FGSM-PGI: `index`)."""

    epoch: int = 0  # 0-based
    epochs: int = 1
    step_in_epoch: int = 0
    index: Tensor | None = None  # dataset indices of the batch's examples, when the method asks for them
    # this process's rows [lo, hi) of a global batch of `size`, and a generator seeded by (run seed, epoch,
    # step), the same on every process: noise drawn for the global batch and sliced is independent of the
    # number of processes (ELLE's)
    shard: tuple[int, int, int] | None = None
    batch_generator: torch.Generator | None = None

    def global_rand(self, shape: tuple[int, ...], like: Tensor, fallback: torch.Generator | None) -> Tensor:
        """U(0, 1) of `shape` (first dimension: this process's rows), drawn for the global batch when known."""
        if self.shard is None or self.batch_generator is None:
            return torch.rand(shape, generator=fallback, device=like.device, dtype=like.dtype)
        lo, hi, size = self.shard
        full = torch.rand((size, *shape[1:]), generator=self.batch_generator, device=like.device, dtype=like.dtype)
        return full[lo:hi]


@dataclasses.dataclass(frozen=True)
class TrainingMethod:
    """A training loss: `loss = method(model, x, y, generator=g)`, model in train mode.

    A subclass is a frozen dataclass that declares `name`, `summary`, its hyperparameters as fields
    (with `hyperparameter(default, help)`; `eps` is the run's radius) and, optionally, `floor_units()`,
    the cost of one training step in forward passes. Its training cross-entropy goes through
    `self.cross_entropy`, which applies the run's label smoothing: with --label-smoothing > 0, a call
    that never used it raises ConfigError (the check wraps every subclass's `__call__`), and a class
    that sets `label_smoothing_applies = False` is refused at construction. Pass `stats={}` to receive
    detached per-batch statistics (no host synchronisation) and `context` for epoch-dependent methods.

    Stateful methods (per-example memory, running statistics, a carried perturbation) keep their
    tensors in `self.state` (a dict, not a hyperparameter): the trainer calls `setup` once, saves
    `state` in every checkpoint and restores it, so resuming stays exact. A method that needs the
    training backward itself (Free-AT) sets `replays` and updates its state in `after_backward`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    adversarial: ClassVar[bool] = True  # trains on attacks (the collapse guard watches only such methods)
    # trains on one cross-entropy sign step (the FGSM family): catastrophic overfitting, FGSM-robust but
    # PGD-broken, is its known failure and the collapse guard decides on it. False for multi-step or KL-based
    # attacks (PGD-AT, TRADES, Backward Smoothing), whose early training at a large eps shows the same gap
    # without overfitting: the guard logs its counts but records no collapse
    single_step_attack: ClassVar[bool] = True
    needs_index: ClassVar[bool] = False  # the trainer passes context.index (loader indices)
    image_state: ClassVar[bool] = False  # keeps tensors of the image's shape across steps (no progressive resizing)
    shared_state: ClassVar[bool] = True  # state identical on every process (else each rank's own is saved)
    double_backprop: ClassVar[bool] = False  # differentiates input gradients of training forwards (GradAlign)
    # the authors' CIFAR-10 protocol where it differs from the common one (epochs, lr, schedule, batch, ...),
    # and the architecture they report besides ResNet-18 and WRN-34-10 (for the presets)
    paper_settings: ClassVar[dict[str, Any]] = {}
    paper_arch_settings: ClassVar[dict[str, dict[str, Any]]] = {}  # per architecture, over paper_settings
    paper_arch: ClassVar[str | None] = None
    loss_forwards: ClassVar[int] = 1  # train-mode forwards in `loss_on` (the TRADES family and MART: 2)
    small_scale_options: ClassVar[dict[str, Any]] = {}  # option values the CPU presets need (see presets.py)
    # False: the method sets its own training targets (FGSM-PGI's soft labels) and refuses --label-smoothing > 0
    label_smoothing_applies: ClassVar[bool] = True
    # the threat models the method is defined for (its authors' forms; docs/algorithms.md#threat-models)
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    state: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)
    # the run's label smoothing, on the cross-entropy term of the training loss (not inside attacks)
    label_smoothing: float = 0.0
    norm: str = "linf"  # the run's threat model: the norm of every attack step, start and projection

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap the subclass's own `__call__` and `__post_init__` in the label-smoothing checks."""
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:
            cls.__call__ = _check_cross_entropy_used(cls.__dict__["__call__"])
        if "__post_init__" in cls.__dict__:
            cls.__post_init__ = _check_label_smoothing_first(cls.__dict__["__post_init__"])

    def __post_init__(self) -> None:
        """Refuse label smoothing where it does not apply and a norm the method has no form for (a subclass's own
        `__post_init__` gets these checks first)."""
        self._check_run_level()

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        raise NotImplementedError

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                stats: Stats | None = None) -> Tensor:
        """The adversarial input of a step that is an attack and then a loss on its result (PGD-AT, the TRADES
        family, MART): `loss_on(model, x, perturb(...), y)` is the step's loss, and `--awp` perturbs the weights
        against `loss_on` between the two. Methods whose step does not split this way raise."""
        raise NotImplementedError(f"{self.name}'s step is not an attack followed by a loss on its result")

    def loss_on(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, stats: Stats | None = None) -> Tensor:
        """The step's training loss (train mode) on the clean batch and its adversarial input; see `perturb`."""
        raise NotImplementedError(f"{self.name}'s step is not an attack followed by a loss on its result")

    def awp_units(self) -> int | None:
        """F that --awp adds to a step: its proxy computes `loss_on` and its backward once more, 3F for each of
        the train-mode forwards `loss_forwards` declares (None for a method that does not split)."""
        return 3 * self.loss_forwards if self.splits() else None

    @classmethod
    def splits(cls) -> bool:
        """Whether the step is `loss_on(perturb(...))`, which adversarial weight perturbation (--awp) needs."""
        return cls.perturb is not TrainingMethod.perturb and cls.loss_on is not TrainingMethod.loss_on

    def cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """The training loss's cross-entropy (in float32) with the run's label smoothing. Every method's
        training CE goes through here: that is what the label-smoothing check of `__call__` looks for."""
        object.__setattr__(self, "_cross_entropy_calls", self.__dict__.get("_cross_entropy_calls", 0) + 1)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def floor_units(self) -> int | None:
        """The floor cost of one step in forward-pass units F (docs/algorithms.md#cost-in-forward-passes);
        None (the default) when unknown: `bench` and the study estimates then use the passes counted in a step."""
        return None

    @classmethod
    def takes_context(cls) -> bool:
        """Whether `__call__` accepts `context=` (methods written without it keep working)."""
        return "context" in inspect.signature(cls.__call__).parameters

    @property
    def replays(self) -> int:
        """Optimiser steps per batch: the trainer calls the method, backpropagates and steps this often."""
        return 1

    def setup(self, train_size: int, image_shape: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        """Allocate state for a training set of `train_size` images (per-example memory); default: none.
        `seed` is the run's, for state that must be drawn identically on every process."""

    def after_backward(self) -> None:
        """Called after each training backward, before the optimiser step; default: nothing."""

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        """Every constructor field: the options, eps and label_smoothing."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def options(cls) -> tuple[Option, ...]:
        """The hyperparameters a run may set (every field but eps), with their types and help."""
        hints = typing.get_type_hints(cls)
        return tuple(Option(f.name, _value_type(hints[f.name]), f.metadata.get("help", ""))
                     for f in dataclasses.fields(cls) if f.init and f.name not in RUN_LEVEL)

    def set_step_size(self, alpha: float) -> None:
        """Change the attack step size alpha during a run (the collapse guard's rollback lowers it)."""
        if not self.has_step_size():
            raise ConfigError(f"{self.name} has no attack step size alpha to change")
        self._set("alpha", alpha)

    @classmethod
    def has_step_size(cls) -> bool:
        """Whether the method takes an attack step size alpha (what a rollback lowers)."""
        return "alpha" in cls.hyperparameter_names()

    def _set(self, field: str, value: float) -> None:
        """Resolve a default that depends on another field (frozen dataclass)."""
        object.__setattr__(self, field, value)

    def _check(self, ok: bool, field: str, requirement: str) -> None:
        if not ok:
            raise ConfigError(f"{self.name}: {field} must be {requirement}, got {getattr(self, field)!r}")

    def _check_eps_alpha(self, default_multiple: float = 1.0) -> None:
        """Resolve an unset `alpha` to default_multiple x eps (so --eps alone gives the authors' step), then check."""
        if self.alpha is None:
            self._set("alpha", default_multiple * self.eps)
        if self.norm == "linf":
            self._check(0 < self.eps <= 1, "eps", "in (0, 1] (pixel units: 8/255 = 0.0314)")
        self._check(0 < self.eps < float("inf"), "eps", "a finite number > 0")
        self._check(self.alpha > 0, "alpha", "> 0")

    def reach_warning(self) -> str | None:
        """A one-line warning when the attack's K steps of alpha cannot travel eps (an absolute default alpha,
        such as TRADES' 0.007, kept at a larger eps: the attack stays deep inside the ball), else None."""
        alpha, steps, eps = (getattr(self, name, None) for name in ("alpha", "steps", "eps"))
        if not all(isinstance(v, int | float) for v in (alpha, steps, eps)) or alpha * steps >= eps:
            return None
        return (f"{self.name}: {steps} steps of alpha {alpha:g} travel at most {alpha * steps:g}, less than eps "
                f"{eps:g}, so its attack cannot reach the edge of the ball; set --alpha, e.g. 2.5 eps / steps = "
                f"{2.5 * eps / steps:.4g} (PGD-AT's 2/255 at 8/255 travels 2.5 eps)")

    def _check_steps(self) -> None:
        self._check(isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1")

    def _check_run_level(self) -> None:
        """Refuse a norm the method has no form for, and --label-smoothing > 0 for a method that declares it would
        not use it."""
        self._set("norm", norm_name(self.norm))
        if self.norm not in self.norms:
            raise ConfigError(f"{self.name} is defined for {' and '.join(self.norms)} only, not {self.norm} (its "
                              f"authors give no {self.norm} form); choose a method that takes --norm {self.norm}")
        if self.label_smoothing and not self.label_smoothing_applies:
            raise ConfigError(f"{self.name} sets its own training targets (label_smoothing_applies = False), so "
                              f"--label-smoothing {self.label_smoothing:g} would be ignored; set --label-smoothing 0")


def _check_cross_entropy_used(call: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`call`, raising ConfigError when label smoothing is on and the call never used `cross_entropy` (a loss
    written with F.cross_entropy would silently train without it)."""

    @functools.wraps(call)
    def checked(self: TrainingMethod, *args: Any, **kwargs: Any) -> Tensor:
        if not self.label_smoothing:
            return call(self, *args, **kwargs)
        before = self.__dict__.get("_cross_entropy_calls", 0)
        loss = call(self, *args, **kwargs)
        if self.__dict__.get("_cross_entropy_calls", 0) == before:
            raise ConfigError(f"{self.name} computes its loss without TrainingMethod.cross_entropy, so "
                              f"--label-smoothing {self.label_smoothing:g} would be ignored; use "
                              f"self.cross_entropy(logits, y) for its cross-entropy, or set --label-smoothing 0")
        return loss

    return checked


def _check_label_smoothing_first(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    """A subclass's `__post_init__`, preceded by the base class's label-smoothing check."""

    @functools.wraps(post_init)
    def checked(self: TrainingMethod) -> None:
        self._check_run_level()
        post_init(self)

    return checked


def _value_type(annotation: Any) -> type:
    """float for `float | None`, int for `int`, and so on."""
    kinds = [k for k in typing.get_args(annotation) if k is not type(None)] if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    return kinds[0] if kinds and kinds[0] in (bool, int, float, str) else str


def record(stats: Stats | None, **values: Tensor) -> None:
    """Store detached scalar statistics if the caller asked for them."""
    if stats is not None:
        stats.update({k: v.detach().float().mean() for k, v in values.items()})


def trades_loss(method: TrainingMethod, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, beta: float,
                stats: Stats | None) -> Tensor:
    """CE(f(x), y) + beta * KL(s(f(x)) || s(f(x_adv))), train mode, gradients through both sides; the CE term
    is `method.cross_entropy` (the run's label smoothing)."""
    logits_nat = model(x)
    logits_adv = model(x_adv)
    ce = method.cross_entropy(logits_nat, y)
    kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.log_softmax(logits_nat.float(), dim=1),
                  reduction="batchmean", log_target=True)
    record(stats, ce=ce, kl=kl, accuracy=(logits_nat.argmax(1) == y).float(),
           adv_accuracy=(logits_adv.argmax(1) == y).float())
    return ce + beta * kl


def ce_training_loss(method: TrainingMethod, model: nn.Module, x: Tensor, y: Tensor, stats: Stats | None) -> Tensor:
    """`method.cross_entropy` on x in train mode (natural, PGD-AT, FGSM-RS and the single-step methods)."""
    logits = model(x)
    loss = method.cross_entropy(logits, y)
    record(stats, ce=loss, accuracy=(logits.argmax(1) == y).float())
    return loss


def trades_attack(method: TrainingMethod, model: nn.Module, x: Tensor, init: Initializer, alpha: float, steps: int,
                  generator: torch.Generator | None, stats: Stats | None) -> Tensor:
    """One no-grad clean forward, then K KL ascent steps from `init` in the method's norm ball: the TRADES point."""
    clean_log_probs = F.log_softmax(predict_eval(model, x).float(), dim=1)
    attack = Perturbation(kl_loss, init, method.eps, alpha, steps, norm=method.norm)
    x_adv, start_kl = attack(model, x, clean_log_probs, generator)
    record(stats, attack_start_kl=start_kl)
    return x_adv
