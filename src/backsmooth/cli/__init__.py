"""`backsmooth train | eval | bench | report | export | study | presets`: the command-line front end, one module per
subcommand. Library modules do not parse arguments; this package turns flags into their calls.

User mistakes print one line and exit with code 2; an interrupted run exits with code 75 after
saving its state; a diverged run exits with code 3.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from backsmooth.cli import bench, evaluate, export, presets, report, study, train
from backsmooth.errors import EXIT_USAGE, BacksmoothError, one_line

COMMANDS = {
    "train": (train, "train a model (no flags: the CPU demo on digits)"),
    "eval": (evaluate, "evaluate a trained model (run directory or model file)"),
    "bench": (bench, "time every method's training step on one model and batch"),
    "report": (report, "summary table and plots from run directories"),
    "export": (export, "a finished run's model as a folder to publish: safetensors, config and a model card"),
    "study": (study, "a resumable grid of methods x seeds under one protocol, evaluated and reported"),
    "presets": (presets, "list the named presets"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, one_line(f"error: {message} (see `{self.prog} --help`)") + "\n")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of every subcommand; `argv` lets `train` add the flags of a MODULE:CLASS method."""
    parser = Parser(prog="backsmooth", description="Efficient adversarially robust training (Backward Smoothing).")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if module is train:
            train.add_arguments(command, argv)
        else:
            module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv) or ["train"]
    try:
        args = build_parser(argv).parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return COMMANDS[args.command][0].main(args)
    except BacksmoothError as exc:
        print(one_line(f"error: {exc}"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
