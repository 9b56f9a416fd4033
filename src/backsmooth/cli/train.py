"""`backsmooth train`: flags from the RunConfig fields and the registered methods' options."""

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backsmooth import config as cfg
from backsmooth import distributed as dist
from backsmooth import methods
from backsmooth.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, Interrupted, TrainingDiverged, one_line
from backsmooth.plugins import is_import_path
from backsmooth.presets import preset
from backsmooth.training import DEFAULT_RUNS, train
from backsmooth.training.tensorboard import DEFAULT as TENSORBOARD_DEFAULT


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _named_method(argv: Sequence[str]) -> str | None:
    """The value of --method in `argv`, so a MODULE:CLASS method's options get flags too."""
    for i, word in enumerate(argv):
        if word == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--method="):
            return word.split("=", 1)[1]
    return None


def add_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    """One flag per RunConfig field and per method option, all defaulting to 'not given'."""
    method = _named_method(argv)
    if method is not None and is_import_path(method):
        methods.method_class(method)  # imports and registers it, so its options are listed below
    parser.add_argument("--config", help="TOML, YAML or JSON file of config keys (flags override it)")
    parser.add_argument("--preset", help="named settings (see `backsmooth presets`); file and flags override it")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = ("Defaults are shown per flag; with no --preset, --config or --dataset the demo preset "
                     "(cpu-digits-backward_smoothing: digits, small_cnn, eps 0.1, 30 epochs) applies first.")
    names = [f.name for f in dataclasses.fields(cfg.RunConfig) if f.name != "method_options"]
    for name in (*names, *cfg.option_names()):
        kinds = {f.type for f in dataclasses.fields(cfg.RunConfig) if f.name == name}
        is_bool = bool in kinds or "bool" in kinds or (name not in names and methods.options()[name].kind is bool)
        text = _with_default(name, cfg.field_help(name)).replace("%", "%%")
        if is_bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name == "tensorboard":  # its value is optional
            parser.add_argument(_flag(name), dest=name, nargs="?", const=TENSORBOARD_DEFAULT, default=None,
                                metavar="DIR", help=text)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar=name.upper(), help=text)


def _with_default(name: str, text: str) -> str:
    """A flag's help with its default: RunConfig's value, or the chosen method's own for a method option (the
    flags themselves default to 'not given', so that presets and files can set them)."""
    if "default" in text:
        return text
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.RunConfig)}
    if name not in defaults:
        return f"{text}; default: the method's own"
    value = defaults[name]
    shown = "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} (default: {shown})"


def resolve_config(args: argparse.Namespace) -> cfg.RunConfig:
    """Defaults < preset < config file < flags. With no preset, file or dataset: the demo preset."""
    values: dict[str, Any] = {}
    chosen = args.preset or (None if (args.config or args.dataset) else "demo")
    if chosen:
        values.update(preset(chosen))
    if args.config:
        values.update(cfg.read_file(args.config))
    names = [f.name for f in dataclasses.fields(cfg.RunConfig) if f.name != "method_options"]
    for name in (*names, *cfg.option_names()):
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given if isinstance(given, bool) else cfg.parse_flag(name, given)
    return cfg.validate(cfg.from_mapping(values))


def main(args: argparse.Namespace) -> int:
    """Train, print the last / best summary; exit 75 when interrupted, 3 when the loss diverged."""
    config = resolve_config(args)
    print(f"training {config.method} on {config.dataset} with {config.arch} (eps {config.eps:.4f}, "
          f"{config.epochs} epochs)", flush=True)
    try:
        summary = train(config, resume=args.resume, overwrite=args.overwrite,
                        progress=False if args.no_progress else None)
        dist.shutdown()
    except Interrupted as stop:
        print(f"interrupted: checkpoint saved in {stop}; continue with the same command plus --resume "
              f"(--out {stop} --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        print(one_line(f"error: {exc}"), file=sys.stderr)
        return EXIT_DIVERGED
    print()
    print(f"{'model':<6} {'epoch':>5} {'clean':>7} {'PGD-20':>7}   ({summary['test_examples']} {summary['dataset']} "
          f"test examples, eps {summary['eps']:.4f})")
    for which in ("last", "best"):
        r = summary[which]
        print(f"{which:<6} {r['epoch']:>5} {r['clean_acc']:>7.2%} {r['pgd20_acc']:>7.2%}")
    print(f"training time {summary['train_seconds']:.1f} s (evaluation and the collapse guard's "
          f"{summary['guard_seconds']:.1f} s excluded); run directory {summary['run_dir']}")
    if dist.launched_rank() == 0:
        print(next_steps(Path(summary["run_dir"]), link_latest(Path(summary["run_dir"]))))
    return 0


def link_latest(run_dir: Path) -> Path | None:
    """Point runs/latest at a run written to the default place (runs/NAME); returns the link, or None when the
    run is elsewhere or a `latest` that is not our link is in the way (it is never replaced)."""
    latest = run_dir.parent / "latest"
    if run_dir.parent != Path(DEFAULT_RUNS) or (latest.exists() and not latest.is_symlink()):
        return None
    try:
        temporary = run_dir.parent / f".latest.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        temporary.replace(latest)  # atomic: a reader sees the old run or the new one
    except OSError:  # a filesystem without symbolic links
        return None
    return latest


def next_steps(run_dir: Path, latest: Path | None) -> str:
    """What to run next on this run, with its directory filled in (copy and paste)."""
    where = shlex.quote(str(latest if latest is not None else run_dir))
    named = f" ({latest} names this run)" if latest is not None else ""
    return "\n".join([
        f"next{named}:",
        f"  backsmooth eval {where}   # PGD-20 and CW-20 on best.pt (--attacks pgd20,cw20,autoattack: AutoAttack too)",
        f"  backsmooth report {where} --out {where}/report   # table and plots",
        f"  python -c \"import backsmooth; model, meta = backsmooth.load_model('{run_dir}'); print(meta)\"",
    ])
