"""`backsmooth report RUN_DIR... --out DIR`: the flags and the command."""

import argparse

from backsmooth.report import PLOTS, build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth report`."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `backsmooth train`")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the PNG plots")


def main(args: argparse.Namespace) -> int:
    """Build the report and say where it is."""
    path = build_report(args.runs, args.out)
    print(f"wrote {path}, report.json and {len(PLOTS)} plots ({', '.join(PLOTS)}) in {path.parent}")
    return 0
