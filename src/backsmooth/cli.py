"""`backsmooth train | eval | bench | report | presets`: the command-line front end.

User mistakes print one line and exit with code 2; an interrupted run exits with code 75 after
saving a checkpoint; a diverged run exits with code 3.
"""

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from backsmooth import config as cfg
from backsmooth.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE, BacksmoothError, one_line


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, one_line(f"error: {message} (see `{self.prog} --help`)") + "\n")


_HELP = {
    "dataset": "digits (embedded demo), mnist, cifar10, cifar100, tiny_imagenet, folder, synthetic",
    "data_dir": "folder holding the dataset files (see docs/data.md)",
    "download": "download CIFAR-10/100 into --data-dir (checksum verified)",
    "val_size": "validation examples held out from the training set (default: 1000, 150 for digits)",
    "arch": "small_cnn, resnet18, preact_resnet18, wrn34_10",
    "method": "backward_smoothing, trades, fast_trades, pgd_at, fgsm_rs, gradalign, natural",
    "eps": "L-inf radius in [0, 1] pixel units; fractions like 8/255 are accepted",
    "alpha": "attack step size (default: the method's own)",
    "beta": "weight of the KL term (trades, fast_trades, backward_smoothing)",
    "gamma": "output-noise scale of backward smoothing (> 0)",
    "steps": "attack steps K (pgd_at, trades, backward_smoothing)",
    "grad_align_lambda": "weight of the GradAlign regulariser",
    "schedule": "stage, stage75, cyclic, cosine, constant (stepped per iteration)",
    "precision": "fp32, bf16 or fp16 (fp16 on GPU, with a gradient scaler)",
    "device": "auto (CUDA if present), cpu, cuda, cuda:N",
    "out": "run directory (default: runs/<method>-<dataset>-<arch>-<time>)",
    "checkpoint_every": "also checkpoint every N steps (0: at epoch ends only)",
    "on_nonfinite": "stop (default) or skip steps whose loss is not finite",
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, all defaulting to 'not given' so files and presets can fill them."""
    for field in dataclasses.fields(cfg.RunConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool or field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(field.name))
        else:
            parser.add_argument(flag, default=None, metavar=field.name.upper(), help=_HELP.get(field.name))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="backsmooth", description="Efficient adversarially robust training (Backward Smoothing).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser("train", help="train a model (no flags: the CPU demo on digits)")
    train.add_argument("--config", help="TOML or YAML file of config keys (flags override it)")
    train.add_argument("--preset", help="named settings (see `backsmooth presets`); file and flags override it")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(train)
    from backsmooth.evaluation.command import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="evaluate a trained model (run directory or model file)"))
    from backsmooth.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="time every method's training step on one model and batch"))
    from backsmooth.report import add_report_arguments

    add_report_arguments(sub.add_parser("report", help="summary table and plots from run directories"))
    sub.add_parser("presets", help="list the named presets")
    return parser


def resolve_train_config(args: argparse.Namespace) -> cfg.RunConfig:
    """Defaults < preset < config file < flags. With no preset, file or dataset: the demo preset."""
    values: dict[str, Any] = {}
    preset = args.preset or (None if (args.config or args.dataset) else "demo")
    if preset:
        values.update(cfg.preset(preset))
    if args.config:
        values.update(cfg.read_file(args.config))
    for field in dataclasses.fields(cfg.RunConfig):
        given = getattr(args, field.name)
        if given is not None:
            values[field.name] = given if isinstance(given, bool) else cfg.parse_flag(field.name, given)
    return cfg.validate(cfg.from_mapping(values))


def _train(args: argparse.Namespace) -> int:
    from backsmooth.train import Interrupted, TrainingDiverged, train

    config = resolve_train_config(args)
    print(f"training {config.method} on {config.dataset} with {config.arch} (eps {config.eps:.4f}, "
          f"{config.epochs} epochs)", flush=True)
    try:
        summary = train(config, resume=args.resume, overwrite=args.overwrite,
                        progress=False if args.no_progress else None)
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
    print(f"training time {summary['train_seconds']:.1f} s (evaluation excluded); run directory {summary['run_dir']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from backsmooth.evaluation.command import main_eval

    return main_eval(args)


def _presets() -> int:
    print(f"{'preset':<44} {'dataset':<13} {'arch':<16} {'method':<19} {'epochs':>6}")
    for name, values in cfg.PRESETS.items():
        print(f"{name:<44} {values['dataset']:<13} {values['arch']:<16} {values['method']:<19} {values['epochs']:>6}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv or ["train"])
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "bench":
            from backsmooth.bench import main_bench

            return main_bench(args)
        if args.command == "report":
            from backsmooth.report import main_report

            return main_report(args)
        if args.command == "presets":
            return _presets()
        parser.print_help()
        return EXIT_USAGE
    except BacksmoothError as exc:
        print(one_line(f"error: {exc}"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
