"""Typed run configuration: defaults, files (TOML/YAML/JSON) and validation with clear messages.

Precedence: dataclass defaults < preset < config file < command-line flags. Every value is
checked once, here, so a mistake costs a one-line error instead of a run. The lists of valid
names (datasets, architectures, methods and their options) come from their registries.
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

from backsmooth import methods, models, schedules
from backsmooth.attacks.norms import norm_name, radius_warning
from backsmooth.data import dataset_kind, dataset_names
from backsmooth.data.load import check_streaming
from backsmooth.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
LOADERS = ("auto", "device", "stream")


def _field(default: Any, help: str = "") -> Any:
    """A RunConfig field with the help text of its command-line flag."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class RunConfig:
    """Everything a training run depends on; saved as config.json in the run directory."""

    # data
    dataset: str = _field("digits", "dataset name (see `backsmooth presets` and docs/data.md)")
    data_dir: str | None = _field(None, "folder holding the dataset files (see docs/data.md)")
    download: bool = _field(False, "download CIFAR-10/100 into --data-dir (checksum verified)")
    cache_dir: str | None = _field(None, "folder of decoded datasets (default $BACKSMOOTH_CACHE or ~/.cache)")
    val_size: int | None = _field(None, "validation examples held out from the training set (default: the "
                                        "dataset's, 1000 for the large ones)")
    loader: str = _field("auto", "device: the whole dataset decoded in device memory; stream: worker processes "
                                 "decode each batch (image folders, imagenet, tiny_imagenet); auto: stream when the "
                                 "images differ in size, would not fit in memory, or the dataset is imagenet")
    image_size: int = _field(0, "side in pixels of streamed images, square (0: the dataset's own, 224 for imagenet "
                                "and for folders of mixed sizes)")
    workers: int = _field(-1, "processes that decode streamed images (-1: the CPUs this process may use, at most 8)")
    resize_schedule: str = _field("", "progressive resizing of streamed training images, EPOCH=SIZE,... such as "
                                      "0=128,6=192,12=224 (0-based epochs; validation and test stay at --image-size; "
                                      "default: none)")
    # model
    arch: str = _field("small_cnn", "architecture name, or MODULE:FUNCTION for your own model factory")
    init_from: str | None = _field(None, "start from trained weights (fine-tuning): a run directory (its best.pt, "
                                         "else last.pt), a model file or a folder of `backsmooth export`, of the same "
                                         "architecture and classes; its normalisation comes with it (default: none, "
                                         "random initialisation)")
    pretrained: bool = _field(False, "start a timm:NAME or torchvision:NAME backbone from its library's pretrained "
                                     "weights (downloaded by the library; a head for this dataset's classes is new)")
    weights: str | None = _field(None, "start a timm:NAME or torchvision:NAME backbone from this local state dict of "
                                       "the library's model (.pt/.pth or .safetensors; a head of other classes is new)")
    freeze_epochs: int = _field(0, "fine-tuning: train only the classifier head for this many epochs first (the "
                                   "rest keeps its weights; BatchNorm statistics still adapt)")
    warmup_epochs: float = _field(0.0, "fine-tuning: ramp the learning rate linearly from 0 over this many epochs, "
                                       "then follow --schedule")
    # method: the run's radius; the method's own options go to method_options (flat keys in files and flags)
    method: str = _field("backward_smoothing", "training method name, or MODULE:CLASS for your own method")
    eps: float = _field(8 / 255, "radius of the threat model in [0, 1] pixel units (8/255 at linf, 0.5 at l2); "
                                 "fractions like 8/255 are accepted")
    norm: str = _field("linf", "threat model of training, validation and the guard: linf or l2 (RobustBench's Linf "
                               "and L2 too); l2 for the methods with an L2 form (docs/algorithms.md)")
    method_options: dict[str, Any] = _field({}, "the method's hyperparameters (each is also a flag)")
    # optimisation
    epochs: int = _field(10, "passes over the training set")
    batch_size: int = _field(128, "global batch (split evenly across torchrun processes)")
    steps_per_epoch: int = _field(0, "end every epoch after this many batches of its shuffled order (0: the whole "
                                     "training set); for short runs on large data, the schedule counts these steps")
    lr: float = _field(0.1, "peak learning rate of the schedule")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(5e-4, "SGD weight decay (L2 on every parameter)")
    # the modern recipe (docs/recipe.md)
    label_smoothing: float = _field(0.0, "label smoothing of the training loss's cross-entropy term (0: off)")
    awp: float = _field(0.0, "adversarial weight perturbation of relative size gamma around the method's step (the "
                             "authors' 0.005 with TRADES, 0.01 with PGD-AT; 0: off; for methods whose step is an "
                             "attack then a loss on it)")
    awp_warmup: int = _field(0, "epochs trained before --awp starts (TRADES-AWP's authors: 9, i.e. from epoch 10)")
    weight_averaging: float = _field(0.0, "EMA decay tau of the weights, e.g. 0.9995; validation, selection, "
                                          "last.pt and best.pt use the average (0: off)")
    collapse_every: int = _field(-1, "steps between collapse-guard checks (-1, the default: a tenth of an epoch, "
                                     "at least 10 steps; 0: off). A check costs 25 forward passes on each of 256 "
                                     "validation images, by default 13% of a Backward Smoothing CIFAR-10 epoch, 26% of "
                                     "an FGSM-RS one; its time is shown beside the training time. docs/recipe.md")
    collapse_fraction: float = _field(0.4, "collapse evidence: PGD keeps fewer than this fraction of the guard "
                                            "images FGSM leaves correct (an exact test at p < 0.001)")
    on_collapse: str = _field("warn", "warn and go on (default), stop keeping the last good best.pt, or rollback: "
                                      "restore the state of the guard's best check and lower alpha by "
                                      "--rollback-factor")
    rollback_factor: float = _field(0.5, "--on-collapse rollback: factor on the method's attack step size alpha")
    schedule: str = _field("stage", f"learning-rate schedule, stepped per iteration: "
                                    f"{', '.join(schedules.SCHEDULES)}")
    # validation each epoch: clean and PGD-`val_pgd_steps` (step eps/4) on the validation split
    val_pgd_steps: int = _field(20, "PGD steps of the per-epoch validation (0: clean accuracy only)")
    eval_batch_size: int = _field(256, "batch of validation, the guard and the final test evaluation")
    # after training: clean and PGD-20 of the last and best models on a stratified test subset (0: skip)
    final_eval_examples: int = _field(1000, "test examples of the final clean / PGD-20 check (0: skip)")
    # runtime
    seed: int = _field(0, "seed of every random draw (data order, split, init, attacks)")
    device: str = _field("auto", "auto (CUDA if present), cpu, cuda, cuda:N")
    precision: str = _field("fp32", f"one of {', '.join(PRECISIONS)} (fp16 on GPU, with a gradient scaler)")
    channels_last: bool = _field(False, "channels-last memory format (faster convolutions on GPU)")
    compile: bool = _field(False, "torch.compile the model (pays on long runs)")
    sync_bn: bool = _field(False, "synchronised BatchNorm under torchrun (CUDA only)")
    log_every: int = _field(20, "steps between progress updates and loss finiteness checks")
    checkpoint_every: int = _field(0, "also checkpoint every N steps (0: at epoch ends only)")
    on_nonfinite: str = _field("stop", "stop (default) or skip steps whose loss is not finite")
    out: str | None = _field(None, "run directory (default: runs/<method>-<dataset>-<arch>-<time>)")
    tensorboard: str | None = _field(None, "also write every number of metrics.jsonl as TensorBoard events into "
                                           "folder DIR (RUN_DIR/... is inside the run directory; the flag alone: "
                                           "RUN_DIR/tensorboard; needs pip install tensorboard) (default: none, off)")

    def method_hyperparameters(self) -> dict[str, Any]:
        """The keyword arguments of `methods.build`: the set options, plus eps where the method has one."""
        chosen = dict(self.method_options)
        accepted = methods.method_class(self.method).hyperparameter_names()
        if "eps" in accepted:
            chosen["eps"] = self.eps
        if self.norm != "linf" and "norm" in accepted:
            chosen["norm"] = self.norm
        if self.label_smoothing and "label_smoothing" in accepted:
            chosen["label_smoothing"] = self.label_smoothing
        return chosen

    def decode_workers(self) -> int | None:
        """--workers as the data layer takes it (None: its default)."""
        return None if self.workers < 0 else self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def field_help(name: str) -> str:
    """The help of a RunConfig field or method option, with the registries' current names."""
    if name == "dataset":
        return f"one of: {', '.join(dataset_names())}"
    if name == "arch":
        return f"one of: {', '.join(models.names())}, or MODULE:FUNCTION"
    if name == "method":
        return f"one of: {', '.join(methods.names())}, or MODULE:CLASS"
    if name in _FIELDS:
        return _FIELDS[name].metadata.get("help", "")
    option = methods.options()[name]
    return f"{option.help} ({', '.join(methods.takers(name))})"


def option_names() -> tuple[str, ...]:
    """Every method option name that config files and flags accept at the top level."""
    return tuple(methods.options())


def parse_number(text: str, what: str = "") -> float:
    """A finite float or a fraction such as '8/255'; `what` (a flag or key) names it in the error."""
    try:
        return float(fractions.Fraction(text.strip()))
    except (ValueError, ZeroDivisionError, OverflowError):
        named = f"{what} " if what else ""
        raise ConfigError(f"{named}{text!r} is not a finite number (write 0.0314 or 8/255)") from None


def _kinds(key: str) -> set[Any]:
    """The accepted value types of field or option `key` (NoneType included where it may be empty)."""
    if key in _FIELDS:
        annotation = _FIELDS[key].type
        return set(get_args(annotation)) or {annotation}
    return {methods.options()[key].kind, type(None)}


def _coerce(key: str, value: Any) -> Any:
    """Check one value against the field's type; accept fractions like '8/255' for floats."""
    kinds = _kinds(key)
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
    kinds = _kinds(key)
    if int in kinds:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key.replace('_', '-')} must be an integer, got {text!r}") from None
    if float in kinds:
        return parse_number(text, f"--{key.replace('_', '-')}")
    return text


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: RunConfig) -> RunConfig:
    """Range and combination checks; raises ConfigError with a one-line fix-it message."""
    c = config
    kind = dataset_kind(c.dataset)
    models.factory(c.arch)
    cls = methods.method_class(c.method)
    c = dataclasses.replace(c, norm=norm_name(c.norm))
    _check(0 < c.eps <= 1 if c.norm == "linf" else 0 < c.eps < math.inf,
           f"eps must be in (0, 1] in pixel units (8/255 = 0.0314), got {c.eps}" if c.norm == "linf"
           else f"eps must be a finite number > 0 at {c.norm} (e.g. 0.5), got {c.eps}")
    _check(c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}")
    _check(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    _check(c.steps_per_epoch >= 0, f"steps_per_epoch must be >= 0 (0: whole epochs), got {c.steps_per_epoch}")
    _check(c.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {c.eval_batch_size}")
    _check(c.lr > 0, f"lr must be > 0, got {c.lr}")
    _check(0 <= c.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    _check(c.weight_averaging == 0 or 0 < c.weight_averaging < 1,
           f"weight_averaging must be 0 (off) or a decay in (0, 1) such as 0.9995, got {c.weight_averaging}")
    _check(c.collapse_every >= -1,
           f"collapse_every must be >= 0, or -1 for a tenth of an epoch, got {c.collapse_every}")
    _check(0 < c.collapse_fraction < 1, f"collapse_fraction must be in (0, 1), got {c.collapse_fraction}")
    _check(c.on_collapse in ("warn", "stop", "rollback"),
           f"on_collapse must be stop, warn or rollback, got {c.on_collapse!r}")
    _check(0 < c.rollback_factor < 1, f"rollback_factor must be in (0, 1), got {c.rollback_factor}")
    _check(c.on_collapse != "rollback" or cls.has_step_size(),
           f"--on-collapse rollback lowers the attack step size alpha, which {c.method} does not take; "
           f"use --on-collapse stop or warn")
    _check(0 <= c.awp < math.inf, f"awp must be a finite number >= 0 (0: off; the authors' 0.005 or 0.01), "
                                  f"got {c.awp}")
    _check(c.awp_warmup >= 0, f"awp_warmup must be >= 0 epochs, got {c.awp_warmup}")
    _check(not c.awp or cls.splits(), f"--awp needs a method whose step is an attack and then a loss on it "
                                      f"({', '.join(n for n in methods.names() if methods.method_class(n).splits())}"
                                      f"), not {c.method}")
    _check(0 <= c.momentum < 1, f"momentum must be in [0, 1), got {c.momentum}")
    _check(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay}")
    schedules.check(c.schedule)
    _check(c.precision in PRECISIONS, f"unknown precision {c.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    _check(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
             f"device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
    _check(c.on_nonfinite in ("stop", "skip"), f"on_nonfinite must be one of stop, skip, got {c.on_nonfinite!r}")
    _check(c.val_size is None or c.val_size >= 0, f"val_size must be >= 0, got {c.val_size}")
    _check(not (c.pretrained or c.weights) or models.is_backbone(c.arch),
           f"--pretrained and --weights apply to timm:NAME and torchvision:NAME architectures, not {c.arch} (start "
           f"our own architectures from a run with --init-from)")
    _check(not (c.pretrained and c.weights), "give --pretrained or --weights, not both")
    _check(not c.init_from or not (c.pretrained or c.weights),
           "--init-from starts from a whole trained model; drop --pretrained/--weights")
    _check(0 <= c.freeze_epochs < c.epochs, f"freeze_epochs must be in 0..epochs-1 ({c.epochs - 1}), got "
                                            f"{c.freeze_epochs}")
    _check(0 <= c.warmup_epochs <= c.epochs, f"warmup_epochs must be in [0, epochs], got {c.warmup_epochs}")
    resize = schedules.parse_resize_schedule(c.resize_schedule)
    _check(not resize or (kind.streams and c.loader != "device"),
           f"--resize-schedule resizes streamed images: use a dataset that streams, not {c.dataset} with --loader "
           f"{c.loader}")
    last_start = resize[-1][0] if resize else 0
    _check(last_start < c.epochs, f"--resize-schedule starts a size at epoch {last_start}, after the last epoch "
                                  f"({c.epochs - 1})")
    _check(not resize or not cls.image_state, f"{c.method} keeps perturbations of the image's shape from step to "
                                              f"step, which cannot change size: drop --resize-schedule")
    _check(c.loader in LOADERS, f"loader must be one of {', '.join(LOADERS)}, got {c.loader!r}")
    _check(c.image_size >= 0, f"image_size must be >= 0 pixels (0: the dataset's own), got {c.image_size}")
    _check(c.workers >= -1, f"workers must be >= 0, or -1 for the default, got {c.workers}")
    check_streaming(c.dataset, c.loader, c.image_size)
    _check(c.val_pgd_steps >= 0, f"val_pgd_steps must be >= 0, got {c.val_pgd_steps}")
    _check(c.final_eval_examples >= 0, f"final_eval_examples must be >= 0, got {c.final_eval_examples}")
    _check(c.log_every >= 1, f"log_every must be >= 1, got {c.log_every}")
    _check(c.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {c.checkpoint_every}")
    _check(not kind.needs_files or c.data_dir is not None or c.download,
             f"dataset {c.dataset} needs --data-dir DIR (or --download for cifar10/cifar100)")
    accepted = [o.name for o in cls.options()]
    for key in c.method_options:
        _check(key in accepted, f"--{key.replace('_', '-')} does not apply to method {c.method} "
                                  f"(it takes: {', '.join(accepted) or 'no hyperparameters'})")
    methods.build(c.method, **c.method_hyperparameters())  # the method's own range checks
    return c


def setting_warnings(config: RunConfig) -> list[str]:
    """One line each for settings that run but look like mistakes: an eps far from every benchmark radius of its
    norm, and an attack whose steps cannot travel eps (the trainer prints them as it starts)."""
    method = methods.build(config.method, **config.method_hyperparameters())
    return [line for line in (radius_warning(config.eps, config.norm), method.reach_warning()) if line]


def from_mapping(values: Mapping[str, Any], base: RunConfig | None = None, source: str = "config") -> RunConfig:
    """Overlay `values` on `base` (default: the defaults), type-checked; unknown keys are errors.

    Method options may be given flat (`beta = 6`) or as a `method_options` table; an empty (None)
    option means "the method's default". A MODULE:CLASS method is imported first so its options count.
    """
    if isinstance(values.get("method"), str):
        methods.method_class(values["method"])
    values = dict(values)
    nested = values.pop("method_options", None) or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"method_options must be a table of option = value, got {nested!r}")
    options = option_names()
    unknown = sorted(str(k) for k in (*values, *nested)
                     if (k not in _FIELDS or k == "method_options") and k not in options)
    if unknown:
        raise ConfigError(f"unknown {source} key {unknown[0]!r}; valid keys: {', '.join(_FIELDS)} and the "
                          f"method options {', '.join(options)}")
    merged = dataclasses.asdict(base or RunConfig())
    chosen = dict(merged.pop("method_options"))
    for key, value in (*values.items(), *nested.items()):
        if key in _FIELDS:
            merged[key] = _coerce(key, value)
        elif value is None:
            chosen.pop(key, None)
        else:
            chosen[key] = _coerce(key, value)
    return RunConfig(**merged, method_options=chosen)


TOMLDecodeError = tomllib.TOMLDecodeError
"""What `parse_toml` raises for text that is not TOML."""


def parse_toml(text: str) -> dict[str, Any]:
    """TOML text as a dict: tomllib from Python 3.11, its backport tomli on 3.10 (this module is the one place that
    chooses, so config files and study specs read the same on both)."""
    return tomllib.loads(text)


def read_file(path: str | Path) -> dict[str, Any]:
    """A TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file of config keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path} ({error}); save it as UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            data = parse_toml(text)
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
