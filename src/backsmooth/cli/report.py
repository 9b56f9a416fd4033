"""`backsmooth report RUN_DIR... --out DIR`: the flags and the command."""

import argparse
import json

from backsmooth.report import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth report`."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of `backsmooth train`")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the PNG plots")


def main(args: argparse.Namespace) -> int:
    """Build the report and say where it is, naming the plots it drew."""
    path = build_report(args.runs, args.out)
    plots = json.loads((path.parent / "report.json").read_text())["plots"]
    print(f"wrote {path}, report.json and {len(plots)} plots ({', '.join(plots)}) in {path.parent}")
    return 0
