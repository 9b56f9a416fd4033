"""Typed run configuration: defaults, presets, files (TOML/YAML) and validation with clear messages.

Precedence: dataclass defaults < preset < config file < command-line flags. Every value is
checked once, here, so a mistake costs a one-line error instead of a run.
"""

import dataclasses
import fractions
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from backsmooth import methods, models
from backsmooth.errors import ConfigError

SCHEDULES = ("stage", "stage75", "cyclic", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DATASETS = ("digits", "mnist", "cifar10", "cifar100", "tiny_imagenet", "folder", "synthetic")
METHOD_HYPERPARAMETERS = ("alpha", "beta", "gamma", "steps", "grad_align_lambda")


@dataclasses.dataclass
class RunConfig:
    """Everything a training run depends on; saved as config.json in the run directory."""

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    cache_dir: str | None = None
    val_size: int | None = None  # None: min(1000, 10% of the training set)
    # model
    arch: str = "small_cnn"
    # method; None means the method's own default
    method: str = "backward_smoothing"
    eps: float = 8 / 255
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    steps: int | None = None
    grad_align_lambda: float | None = None
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "stage"
    # validation each epoch: clean and PGD-`val_pgd_steps` (step 2/255) on the validation split
    val_pgd_steps: int = 20
    eval_batch_size: int = 256
    # after training: clean and PGD-20 of the last and best models on a stratified test subset (0: skip)
    final_eval_examples: int = 1000
    # execution
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    log_every: int = 20
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    on_nonfinite: str = "stop"  # "stop" or "skip"
    out: str | None = None  # run directory; None: runs/<method>-<dataset>-<arch>-<time>

    def method_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters to pass to `methods.build`: eps where the method has one, plus set ones."""
        accepted = methods.method_class(self.method).hyperparameter_names()
        chosen = {k: getattr(self, k) for k in METHOD_HYPERPARAMETERS if getattr(self, k) is not None}
        if "eps" in accepted:
            chosen["eps"] = self.eps
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def parse_number(text: str, what: str = "") -> float:
    """A finite float or a fraction such as '8/255'; `what` (a flag or key) names it in the error."""
    try:
        return float(fractions.Fraction(text.strip()))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ConfigError(f"{what + ' ' if what else ''}{text!r} is not a finite number (write 0.0314 or 8/255)") from None


def _coerce(key: str, value: Any) -> Any:
    """Check one value against the field's type; accept fractions like '8/255' for floats."""
    annotation = _FIELDS[key].type
    kinds = set(get_args(annotation)) or {annotation}
    if value is None:
        if type(None) in kinds:
            return None
        raise ConfigError(f"{key} cannot be empty")
    if bool in kinds:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if int in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if float in kinds:
        if isinstance(value, str):
            return parse_number(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def parse_flag(key: str, text: str) -> Any:
    """A command-line string converted to the type of config field `key`."""
    kinds = set(get_args(_FIELDS[key].type)) or {_FIELDS[key].type}
    if int in kinds:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key.replace('_', '-')} must be an integer, got {text!r}") from None
    if float in kinds:
        return parse_number(text, f"--{key.replace('_', '-')}")
    return text


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: RunConfig) -> RunConfig:
    """Range and combination checks; raises ConfigError with a one-line fix-it message."""
    c = config
    _require(c.dataset in DATASETS, f"unknown dataset {c.dataset!r}; choose one of: {', '.join(DATASETS)}")
    _require(c.arch in models.names(), f"unknown architecture {c.arch!r}; choose one of: {', '.join(models.names())}")
    methods.method_class(c.method)
    _require(0 < c.eps <= 1, f"eps must be in (0, 1] in pixel units (8/255 = 0.0314), got {c.eps}")
    _require(c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}")
    _require(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    _require(c.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {c.eval_batch_size}")
    _require(c.lr > 0, f"lr must be > 0, got {c.lr}")
    _require(0 <= c.momentum < 1, f"momentum must be in [0, 1), got {c.momentum}")
    _require(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}")
    _require(c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    _require(c.precision in PRECISIONS, f"unknown precision {c.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    _require(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
             f"device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    _require(c.on_nonfinite in ("stop", "skip"), f"on_nonfinite must be one of stop, skip, got {c.on_nonfinite!r}")
    _require(c.val_size is None or c.val_size >= 0, f"val_size must be >= 0, got {c.val_size}")
    _require(c.val_pgd_steps >= 0, f"val_pgd_steps must be >= 0, got {c.val_pgd_steps}")
    _require(c.final_eval_examples >= 0, f"final_eval_examples must be >= 0, got {c.final_eval_examples}")
    _require(c.log_every >= 1, f"log_every must be >= 1, got {c.log_every}")
    _require(c.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {c.checkpoint_every}")
    _require(c.dataset in ("digits", "synthetic") or c.data_dir is not None or c.download,
             f"dataset {c.dataset} needs --data-dir DIR (or --download for cifar10/cifar100)")
    accepted = methods.method_class(c.method).hyperparameter_names()
    for key in METHOD_HYPERPARAMETERS:
        flag = "--" + key.replace("_", "-")
        _require(getattr(c, key) is None or key in accepted,
                 f"{flag} does not apply to method {c.method} (it takes: {', '.join(accepted) or 'no hyperparameters'})")
    methods.build(c.method, **c.method_hyperparameters())  # the method's own range checks
    return c


def from_mapping(values: Mapping[str, Any], base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Overlay `values` on `base` (default: the defaults), type-checked; unknown keys are errors."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown {source} key {unknown[0]!r}; valid keys: {', '.join(_FIELDS)}")
    merged = dataclasses.asdict(base or RunConfig())
    merged.update({k: _coerce(k, v) for k, v in values.items()})
    return RunConfig(**merged)


def read_file(path: str | Path) -> dict[str, Any]:
    """A TOML (.toml) or YAML (.yaml/.yml) file of config keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("YAML configs need PyYAML: pip install 'backsmooth[yaml]' (or use TOML)") from None
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers' own error types differ
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot parse {path}: {first_line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of keys, not {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- presets

_PAPER = dict(epochs=100, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="stage",
              eps=8 / 255, val_size=1000)


def _paper_presets() -> dict[str, dict[str, Any]]:
    """The paper's settings for every dataset x architecture x method (DESIGN section 3)."""
    presets: dict[str, dict[str, Any]] = {}
    for dataset in ("cifar10", "cifar100", "tiny_imagenet"):
        for arch in ("resnet18", "wrn34_10", "preact_resnet18"):
            for method in methods.names():
                if arch == "preact_resnet18" and method not in ("fgsm_rs", "gradalign"):
                    continue
                values = dict(_PAPER, dataset=dataset, arch=arch, method=method)
                if method == "fgsm_rs":
                    values.update(schedule="cyclic", lr=0.1)  # Fast AT: cyclic schedule peaking at 0.2
                presets[f"{dataset}-{arch}-{method}"] = values
    return presets


def _cpu_presets() -> dict[str, dict[str, Any]]:
    """Small settings that finish in minutes on a laptop CPU with `small_cnn`."""
    presets: dict[str, dict[str, Any]] = {}
    scale = {
        "digits": dict(dataset="digits", eps=0.1, epochs=30, batch_size=64, lr=0.05, val_size=180),
        "mnist": dict(dataset="mnist", eps=0.3, epochs=3, lr=0.05, val_size=1000),
        "cifar10": dict(dataset="cifar10", eps=8 / 255, epochs=5, lr=0.05, val_size=1000),
    }
    for name, values in scale.items():
        for method in methods.names():
            presets[f"cpu-{name}-{method}"] = dict(values, arch="small_cnn", method=method, schedule="cosine")
    presets["demo"] = presets["cpu-digits-backward_smoothing"]
    return presets


PRESETS: dict[str, dict[str, Any]] = {**_cpu_presets(), **_paper_presets()}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run `backsmooth presets` to list them")
    return dict(PRESETS[name])
