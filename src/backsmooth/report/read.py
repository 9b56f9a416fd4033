"""Reading run directories: config.json, metrics.jsonl, summary.json and eval-*.json, each checked once here
so that the rest of the report can rely on their shape."""

import json
import math
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from backsmooth.errors import DataError

# method hyperparameters that runs written before `method_options` kept as top-level keys (null when unset)
LEGACY_METHOD_KEYS = ("alpha", "beta", "gamma", "steps", "grad_align_lambda")
_CONFIG_TYPES = {"method": str, "arch": str, "dataset": str, "eps": (int, float), "epochs": int, "batch_size": int,
                 "seed": int}


def finite_or_none(value: Any) -> float | None:
    """A float, or None for missing/NaN values (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def method_options(config: dict[str, Any]) -> dict[str, Any]:
    """The method hyperparameters a run set: config.json's `method_options`, plus the top-level keys of older runs."""
    options = {key: config.get(key) for key in LEGACY_METHOD_KEYS} | (config.get("method_options") or {})
    return {key: value for key, value in options.items() if value is not None}


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as one flat dict, the same for old and new runs: method options as top-level keys, nulls dropped."""
    rest = {k: v for k, v in config.items() if k != "method_options" and k not in LEGACY_METHOD_KEYS and v is not None}
    return rest | method_options(config)


@dataclass
class RunData:
    """The checked files of one run directory."""

    path: Path
    config: dict[str, Any]  # config.json as written; read `settings` for the flat view
    metrics: list[dict[str, Any]]  # the epoch rows of metrics.jsonl (empty only for a run stopped in epoch 1)
    summary: dict[str, Any] | None
    evals: dict[str, dict[str, Any]]  # eval-*.json file name -> contents
    events: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows with an "event" key, in order

    @property
    def collapse(self) -> dict[str, Any] | None:
        """The collapse guard's event: summary.json's `collapse`, else the first collapse event of metrics.jsonl;
        None when the guard saw none (or the run predates it). Its `action` ("stop" or "warn") comes from the
        metrics.jsonl event of the same step (summary.json's lacks it), else from config.json's `on_collapse`."""
        logged = [e for e in self.events if e["event"] == "collapse"]
        event = (self.summary or {}).get("collapse") or (logged[0] if logged else None)
        if event is None:
            return None
        same = next((e for e in logged if e.get("step") == event.get("step")), logged[0] if logged else {})
        action = event.get("action") or same.get("action") or self.config.get("on_collapse")
        return event | {"action": action}

    @cached_property
    def settings(self) -> dict[str, Any]:
        """The configuration with method options flattened in (see `flat_config`), for labels and comparisons."""
        return flat_config(self.config)

    @property
    def data_note(self) -> str | None:
        """What the trainer noted about the dataset copy (summary.json `data_note`); None for older runs."""
        return (self.summary or {}).get("data_note") or None

    @property
    def val_key(self) -> str:
        """The metrics key of the per-epoch validation robust accuracy."""
        return f"val_pgd{self.settings.get('val_pgd_steps', 20)}_acc"

    @property
    def epochs_done(self) -> int:
        """Completed epochs (0 for a run the collapse guard stopped in its first epoch)."""
        return int(self.metrics[-1]["epoch"]) if self.metrics else 0

    @property
    def train_seconds(self) -> float:
        """Cumulative training time after the last recorded epoch (or summary.json's), evaluation excluded."""
        if self.metrics:
            return float(self.metrics[-1]["total_train_seconds"])
        return float((self.summary or {}).get("train_seconds") or 0.0)

    @property
    def seconds_per_epoch(self) -> float:
        """Median epoch training time (a slow first epoch, warm-up or compilation, does not distort it); NaN
        for a run without a completed epoch."""
        return statistics.median(float(row["train_seconds"]) for row in self.metrics) if self.metrics else math.nan


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path} not found; is {path.parent} a run directory of `backsmooth train`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; {what} is damaged, rewrite or remove it") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected a JSON object ({what})")
    return data


def _require(data: dict[str, Any], types: dict[str, type | tuple[type, ...]], source: str) -> None:
    for key, kind in types.items():
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{source} lacks a valid {key!r} (got {value!r})")


def _require_optional(data: dict[str, Any], key: str, kind: type, source: str) -> None:
    if data.get(key) is not None and not isinstance(data[key], kind):
        raise DataError(f"{source} has an invalid {key!r} (got {data[key]!r}, expected a {kind.__name__})")


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(epoch rows, event rows) of metrics.jsonl: a row with an "event" key (e.g. the collapse guard's) is an event,
    not an epoch."""
    if not path.is_file():
        raise DataError(f"{path.parent} has no metrics.jsonl; is it a run directory of `backsmooth train`?")
    rows, events = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number} is not a JSON object")
        if "event" in row:
            _require(row, {"event": str, "epoch": int}, f"{path} line {number} (an event)")
            events.append(row)
            continue
        _require(row, {"epoch": int, "train_seconds": (int, float), "total_train_seconds": (int, float)},
                 f"{path} line {number}")
        rows.append(row)
    return rows, events


def read_run(path: str | Path) -> RunData:
    """Read and check config.json, metrics.jsonl, summary.json (optional) and eval-*.json of a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run directory {path} not found" if not path.exists()
                        else f"{path} is a file, not a run directory")
    config = _read_json(path / "config.json", "the run's configuration")
    _require(config, _CONFIG_TYPES, f"{path / 'config.json'}")
    _require_optional(config, "method_options", dict, f"{path / 'config.json'}")
    metrics, events = _read_metrics(path / "metrics.jsonl")
    if not metrics and not (path / "summary.json").exists():
        raise DataError(f"{path / 'metrics.jsonl'} has no epochs yet; report a run after its first epoch")
    summary = None
    if (path / "summary.json").exists():
        summary = _read_json(path / "summary.json", "the final test summary")
        _require(summary, {"best": dict, "test_examples": int}, f"{path / 'summary.json'}")
        _require_optional(summary, "data_note", str, f"{path / 'summary.json'}")
        _require_optional(summary, "collapse", dict, f"{path / 'summary.json'}")
        if summary.get("collapse") is not None:
            _require(summary["collapse"], {"epoch": int}, f"{path / 'summary.json'} collapse")
    evals = {}
    for file in sorted(path.glob("eval-*.json")):
        info = _read_json(file, "a `backsmooth eval` report")
        evaluation = info.get("evaluation")
        if not isinstance(evaluation, dict):
            raise DataError(f"{file} has no 'evaluation' object; is it a `backsmooth eval` report?")
        _require(evaluation, {"clean_acc": (int, float), "per_attack": dict, "n_examples": int, "eps": (int, float)},
                 f"{file} evaluation")
        evals[file.name] = info
    return RunData(path, config, metrics, summary, evals, events)


# the collapse guard's --on-collapse, as the collapse text says it
ACTIONS = {"stop": "stopped", "warn": "went on", "rollback": "rolled back"}


def collapse_text(event: dict[str, Any] | None) -> str | None:
    """'epoch 3 (step 120): guard FGSM 85.0% vs PGD 4.0%, stopped' for a collapse event (runs from before the
    FGSM/PGD rule: 'guard PGD-5 4.0% vs best 31.0%'); None for none."""
    if event is None:
        return None
    text = f"epoch {event['epoch']}" + (f" (step {event['step']})" if event.get("step") is not None else "")
    robust, best = finite_or_none(event.get("guard_pgd_acc")), finite_or_none(event.get("guard_best"))
    single = finite_or_none(event.get("guard_fgsm_acc"))
    if robust is not None and single is not None:
        text += f": guard FGSM {100 * single:.1f}% vs PGD {100 * robust:.1f}%"
    elif robust is not None:
        text += f": guard PGD-5 {100 * robust:.1f}%" + (f" vs best {100 * best:.1f}%" if best is not None else "")
    action = event.get("action") if isinstance(event.get("action"), str) else None
    return text + (f", {ACTIONS.get(action, action)}" if action else "")
