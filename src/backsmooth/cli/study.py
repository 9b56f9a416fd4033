"""`backsmooth study SPEC.toml [--out DIR] [--dry-run]`: the flags and the command."""

import argparse
import shlex
import sys

from backsmooth.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, Interrupted
from backsmooth.study import check_existing, dry_run, execute, load_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth study`."""
    parser.add_argument("spec", metavar="SPEC.toml", help="the study spec (see benchmarks/studies/ and docs/study.md)")
    parser.add_argument("--out", help="study folder (default runs/study/<spec name>); run it again to resume")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with estimated times from a short bench here; run and write nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing; write the report of the runs finished so far")
    parser.add_argument("--progress", action="store_true", help="progress bars of each run and evaluation")


def main(args: argparse.Namespace) -> int:
    """Check the whole spec, then run (or with --dry-run, estimate) what is left; exit 75 when interrupted."""
    study = load_study(args.spec, args.out)
    check_existing(study)
    if args.dry_run:
        dry_run(study, lambda line: print(line, flush=True))
        return 0
    command = "backsmooth study " + shlex.join([args.spec, *(["--out", args.out] if args.out else [])])
    try:
        result = execute(study, command, progress=True if args.progress else False, report_only=args.report_only,
                         log=lambda line: print(line, flush=True))
    except (Interrupted, KeyboardInterrupt):
        print(f"interrupted: finished work is saved in {study.out}; run the same command again to go on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["report"] is not None:
        print(f"wrote {result['report']}")
    if result["diverged"]:
        print(f"error: {len(result['diverged'])} run(s) diverged: {', '.join(result['diverged'])}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0
