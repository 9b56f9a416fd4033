"""A study spec: one protocol, one evaluation and a list of entries (a method, its overrides, its seeds),
read from TOML and checked whole before anything runs.

    title = "smoke"                    # optional
    seeds = [0, 1]                     # default seeds of every entry
    [protocol]                         # RunConfig keys every run shares (see `backsmooth train --help`)
    preset = "cpu-digits-{method}"     # optional: each entry starts from this preset for its method
    dataset = "digits"
    epochs = 1
    [evaluation]
    attacks = ["pgd10"]                # `backsmooth eval` attack names
    n_examples = 100                   # stratified test examples
    checkpoints = ["last", "best"]     # which models of each run
    [[entries]]
    method = "backward_smoothing"      # name = "bs" to tell two entries of one method apart
    [[entries]]
    method = "fgsm_rs"
    alpha = "10/255"                   # any RunConfig key or method option overrides the protocol
    attacks = ["pgd20", "autoattack"]  # an entry may also evaluate other attacks or checkpoints
    [executor]                         # optional: where the runs execute (not what they compute)
    kind = "slurm"                     # inprocess (default), local or slurm: one submitit job per run

Values are layered preset < protocol < entry. Epochs count passes over the data: when they come from the
protocol, a method that replays each batch m times (Free-AT) trains ceil(epochs / m) epochs, as its presets do.
"""

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from backsmooth import config as cfg
from backsmooth import methods
from backsmooth.attacks import parse_attacks
from backsmooth.errors import ConfigError
from backsmooth.plugins import is_import_path
from backsmooth.presets import PRESETS, preset

TOP_KEYS = ("title", "seeds", "protocol", "evaluation", "entries", "executor")
EVALUATION_KEYS = ("attacks", "n_examples", "checkpoints", "batch_size", "seed")
ENTRY_KEYS = ("method", "name", "seeds", "attacks", "checkpoints")  # besides RunConfig keys and method options
SET_BY_STUDY = ("method", "seed", "out")  # every run's own: not protocol keys
CHECKPOINTS = ("last", "best")
EXECUTORS = ("inprocess", "local", "slurm")
EXECUTOR_FLAGS = {"kind": "--executor", "partition": "--partition", "gpus_per_node": "--gpus", "cpus_per_task": None,
                  "timeout_min": "--time", "account": "--account", "max_parallel": "--jobs", "folder": None}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `backsmooth eval` runs on each planned checkpoint."""

    attacks: tuple[str, ...]
    n_examples: int
    checkpoints: tuple[str, ...] = CHECKPOINTS
    batch_size: int = 256
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Executor:
    """Where the runs execute ([executor], or the flags of `backsmooth study`): in this process, or one submitit job
    per run, locally or on SLURM. It says nothing about what a run computes, so changing it changes no run."""

    kind: str = "inprocess"
    partition: str | None = None
    gpus_per_node: int | None = None  # None: ask for none
    cpus_per_task: int | None = None
    timeout_min: int = 240  # a job's time limit; a run that needs longer is requeued and resumes
    account: str | None = None
    max_parallel: int | None = None  # jobs at once; None: every run on SLURM, one at a time locally
    folder: str | None = None  # submitit's job files and logs; None: OUT/jobs


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One (entry, seed): an ordinary run directory under the study's runs/ folder."""

    entry: str
    seed: int
    config: cfg.RunConfig
    attacks: tuple[str, ...]
    checkpoints: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.entry}-seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Study:
    """A checked spec: its runs in the order they train (entries in spec order, then seeds)."""

    title: str
    spec_path: Path
    spec_text: str
    out: Path
    evaluation: Evaluation
    runs: tuple[PlannedRun, ...]
    executor: Executor = Executor()

    def entries(self) -> list[str]:
        return list(dict.fromkeys(run.entry for run in self.runs))

    def checkpoints(self) -> list[str]:
        """Every checkpoint some run evaluates, in the evaluation's order."""
        return list(dict.fromkeys(c for c in (*self.evaluation.checkpoints, *CHECKPOINTS)
                                  if any(c in r.checkpoints for r in self.runs)))


def _fail(spec: Path, message: str) -> ConfigError:
    return ConfigError(f"{spec}: {message}")


def _seeds(value: Any, spec: Path, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                       for s in value):
        raise _fail(spec, f"{where} seeds must be a non-empty list of integers >= 0, e.g. seeds = [0, 1, 2], "
                          f"got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(spec, f"{where} seeds list a seed twice: {value!r}")
    return tuple(value)


def _attacks(value: Any, spec: Path, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _fail(spec, f"{where} attacks must be a list of attack names, e.g. attacks = [\"pgd20\", \"cw20\"]")
    try:
        return tuple(s.name for s in parse_attacks(value))
    except ConfigError as error:
        raise _fail(spec, f"{where}: {error}") from None


def _table(data: dict[str, Any], key: str, spec: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _fail(spec, f"[{key}] must be a table of key = value lines")
    return value


def _evaluation(data: dict[str, Any], spec: Path) -> Evaluation:
    table = _table(data, "evaluation", spec)
    unknown = sorted(set(table) - set(EVALUATION_KEYS))
    if unknown:
        raise _fail(spec, f"unknown [evaluation] key {unknown[0]!r}; valid keys: {', '.join(EVALUATION_KEYS)}")
    if "attacks" not in table or "n_examples" not in table:
        raise _fail(spec, "[evaluation] needs attacks (e.g. [\"pgd20\", \"cw20\"]) and n_examples (e.g. 1000)")
    for key in ("n_examples", "batch_size"):
        value = table.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _fail(spec, f"[evaluation] {key} must be a positive integer, got {value!r}")
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _fail(spec, f"[evaluation] seed must be an integer >= 0, got {seed!r}")
    return Evaluation(_attacks(table["attacks"], spec, "[evaluation]"), table["n_examples"],
                      _checkpoints(table.get("checkpoints", list(CHECKPOINTS)), spec, "[evaluation]"),
                      table.get("batch_size", 256), seed)


def _checkpoints(value: Any, spec: Path, where: str) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value or any(c not in CHECKPOINTS for c in value)
            or len(set(value)) != len(value)):
        raise _fail(spec, f"{where} checkpoints must list some of {', '.join(CHECKPOINTS)} once each, got {value!r}")
    return tuple(value)


def executor_settings(values: dict[str, Any], where: str) -> Executor:
    """The checked settings of an [executor] table's keys (or of it with the flags applied); ConfigError names
    `where`, the spec or the command."""
    for key, value in values.items():
        flag = f" ({EXECUTOR_FLAGS[key]})" if EXECUTOR_FLAGS[key] else ""
        if value is None:  # not set (TOML has no null): the default
            continue
        if key == "kind" and value not in EXECUTORS:
            raise ConfigError(f"{where}: [executor] kind{flag} must be one of {', '.join(EXECUTORS)}, got {value!r}"
                              f"{_did_you_mean(str(value), EXECUTORS)}")
        least = 0 if key == "gpus_per_node" else 1
        if key in ("gpus_per_node", "cpus_per_task", "timeout_min", "max_parallel") and (
                isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{where}: [executor] {key}{flag} must be an integer >= {least}, got {value!r}")
        if key in ("partition", "account", "folder") and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}: [executor] {key}{flag} must be a non-empty string, got {value!r}")
    return dataclasses.replace(Executor(), **values)


def _did_you_mean(word: str, names: Iterable[str]) -> str:
    """' (did you mean 'X'?)' when `word` is close to one of `names`, else ''."""
    close = difflib.get_close_matches(word, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(table: dict[str, Any], allowed: Sequence[str], spec: Path, where: str) -> None:
    """Refuse the first key of `table` that is not in `allowed`, naming `where` and the nearest valid key."""
    unknown = sorted(str(key) for key in table if key not in allowed)
    if unknown:
        hint = _did_you_mean(unknown[0], allowed) or f"; valid keys: {', '.join(allowed)}"
        raise _fail(spec, f"{where}: unknown key {unknown[0]!r}{hint}")


def _config_keys() -> tuple[str, ...]:
    """RunConfig fields and method options (of every method registered so far), less what the study sets."""
    fields = (f.name for f in dataclasses.fields(cfg.RunConfig))
    return tuple(k for k in (*fields, *cfg.option_names()) if k not in SET_BY_STUDY)


def _method(entry: dict[str, Any], spec: Path, where: str) -> str:
    """The entry's method, a registered name (or MODULE:CLASS, imported here so its options count)."""
    method = entry.get("method")
    if not isinstance(method, str):
        raise _fail(spec, f"{where} needs method = \"NAME\" (one of: {', '.join(methods.names())})")
    if method not in methods.names() and not is_import_path(method):
        hint = _did_you_mean(method, methods.names()) or f"; choose one of: {', '.join(methods.names())}"
        raise _fail(spec, f"{where}: unknown method {method!r}{hint}")
    try:
        methods.method_class(method)
    except ConfigError as error:
        raise _fail(spec, f"{where}: {error}") from None
    return method


def _is_template(template: Any) -> bool:
    """Whether `template` is a preset name with {method} (and no other {field}) in it."""
    if not isinstance(template, str) or "{method}" not in template:
        return False
    try:
        template.format(method="")
    except (KeyError, IndexError, ValueError):
        return False
    return True


def _preset(template: str | None, method: str, spec: Path, where: str) -> dict[str, Any]:
    """The values of [protocol]'s preset for the entry's method ({} without a preset)."""
    if template is None:
        return {}
    name = template.format(method=method)
    if name not in PRESETS:
        templates = {p.replace(method, "{method}") for p in PRESETS if method in p}
        raise _fail(spec, f"[protocol]: preset {template!r} gives {name!r} for {where}, which is not a preset"
                          f"{_did_you_mean(template, sorted(templates))}; run `backsmooth presets` to list them")
    return preset(name)


def _validated(values: dict[str, Any]) -> cfg.RunConfig:
    """`values` as a checked RunConfig (ConfigError when a key or value is wrong)."""
    return cfg.validate(cfg.from_mapping(values, source="study"))


def _run_config(values: dict[str, Any], protocol: dict[str, Any], overrides: dict[str, Any], method: str,
                seed: int, out: Path, spec: Path, where: str) -> cfg.RunConfig:
    """The run's config: preset < protocol < entry, then the study's own method, seed and folder. An invalid value
    is blamed on [protocol] when the preset and protocol alone fail the same way, else on the entry."""
    own = dict(method=method, seed=seed, out=str(out))
    try:
        config = _validated({**values, **protocol, **overrides, **own})
    except ConfigError as error:
        try:
            _validated({**values, **protocol, **own})
            place = where
        except ConfigError as alone:
            place = "[protocol]" if str(alone) == str(error) else where
        raise _fail(spec, f"{place}: {error}") from None
    if "epochs" in protocol and "epochs" not in overrides:
        replays = methods.build(config.method, **config.method_hyperparameters()).replays
        config = dataclasses.replace(config, epochs=math.ceil(protocol["epochs"] / replays))
    return config


def _entries(data: dict[str, Any], spec: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(where, name, method, table) of every [[entries]] table: a known method and a unique, valid name."""
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise _fail(spec, "list at least one [[entries]] table with a method, e.g. [[entries]] method = \"trades\"")
    checked: list[tuple[str, str, str, dict[str, Any]]] = []
    for number, entry in enumerate(entries, 1):
        label = entry.get("name", entry.get("method"))
        where = f"entry {number}" + (f" ({label})" if isinstance(label, str) else "")
        method = _method(entry, spec, where)
        name = entry.get("name", method.replace(":", "."))
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _fail(spec, f"{where}: name {name!r} must be letters, digits and _.+- (it names run folders)")
        if any(name == other for _, other, _, _ in checked):
            raise _fail(spec, f"{where}: two entries are named {name!r}; give one a name = \"...\"")
        checked.append((where, name, method, entry))
    return checked


def load_study(spec_path: str | Path, out: str | Path | None = None) -> Study:
    """Read and check the spec at `spec_path`; every run goes under `out` (default runs/study/<spec name>)."""
    spec = Path(spec_path)
    if not spec.is_file():
        raise ConfigError(f"study spec {spec} not found")
    try:
        text = spec.read_text(encoding="utf-8")
        data = cfg.parse_toml(text)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read study spec {spec} ({error}); save it as UTF-8 TOML") from None
    except cfg.TOMLDecodeError as error:
        raise _fail(spec, f"not valid TOML ({error})") from None
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        hint = _did_you_mean(unknown[0], TOP_KEYS) or f"; valid top-level keys: {', '.join(TOP_KEYS)}"
        raise _fail(spec, f"unknown key {unknown[0]!r}{hint}")
    title = data.get("title", spec.stem)
    if not isinstance(title, str):
        raise _fail(spec, f"title must be a string, got {title!r}")
    default_seeds = _seeds(data.get("seeds", [0]), spec, "top-level")
    entries = _entries(data, spec)  # first: a MODULE:CLASS method's options are valid keys once it is imported
    protocol = dict(_table(data, "protocol", spec))
    fixed = sorted(set(protocol) & set(SET_BY_STUDY))
    if fixed:
        raise _fail(spec, f"[protocol] cannot set {fixed[0]!r}: the study sets it for each run (method and seeds "
                          f"go in [[entries]], the folder is --out)")
    _check_keys(protocol, ("preset", *_config_keys()), spec, "[protocol]")
    template = protocol.pop("preset", None)
    if template is not None and not _is_template(template):
        raise _fail(spec, f"[protocol] preset must be a name with {{method}} in it, e.g. \"cpu-cifar10-{{method}}\", "
                          f"got {template!r}")
    evaluation = _evaluation(data, spec)
    folder = Path(out) if out is not None else Path("runs") / "study" / spec.stem
    runs: list[PlannedRun] = []
    for where, name, method, entry in entries:
        overrides = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        fixed = sorted(set(overrides) & set(SET_BY_STUDY))
        if fixed:
            raise _fail(spec, f"{where} cannot set {fixed[0]!r} (the study sets it; use seeds = [...])")
        _check_keys(overrides, (*ENTRY_KEYS, *_config_keys()), spec, where)
        attacks = _attacks(entry["attacks"], spec, where) if "attacks" in entry else evaluation.attacks
        checkpoints = (_checkpoints(entry["checkpoints"], spec, where) if "checkpoints" in entry
                       else evaluation.checkpoints)
        values = _preset(template, method, spec, where)
        for seed in _seeds(entry.get("seeds", list(default_seeds)), spec, where):
            run_out = folder / "runs" / f"{name}-seed{seed}"
            config = _run_config(values, protocol, overrides, method, seed, run_out, spec, where)
            runs.append(PlannedRun(name, seed, config, attacks, checkpoints))
    executor = _table(data, "executor", spec)
    _check_keys(executor, tuple(EXECUTOR_FLAGS), spec, "[executor]")
    return Study(title, spec, text, folder, evaluation, tuple(runs), executor_settings(executor, str(spec)))
