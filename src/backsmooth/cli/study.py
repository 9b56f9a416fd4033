"""`backsmooth study SPEC.toml [--out DIR] [--dry-run] [--executor slurm ...]`: the flags and the command."""

import argparse
import dataclasses
import shlex
import sys

from backsmooth.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, Interrupted
from backsmooth.study import check_existing, dry_run, execute, load_study
from backsmooth.study.executor import execute_jobs
from backsmooth.study.spec import EXECUTORS, Study, executor_settings

EXIT_FAILED = 1  # a job of the study failed with an error (the other runs went on)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth study`."""
    parser.add_argument("spec", metavar="SPEC.toml", help="the study spec (see benchmarks/studies/ and docs/study.md)")
    parser.add_argument("--out", help="study folder (default runs/study/<spec name>); run it again to resume")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with estimated times from a short bench here; run and write nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="train and evaluate nothing; write the report of the runs finished so far")
    parser.add_argument("--progress", action="store_true", help="progress bars of each run and evaluation")
    cluster = parser.add_argument_group("executor", "where the runs execute; each flag overrides the spec's [executor]"
                                                    " key (docs/study.md#running-a-study-on-a-cluster)")
    cluster.add_argument("--executor", choices=EXECUTORS,
                         help="inprocess: this process; local or slurm: one submitit job per run, on this machine or "
                              "SLURM (default: the spec's kind, else inprocess)")
    cluster.add_argument("--partition", help="SLURM partition (default: the spec's, else the cluster's default)")
    cluster.add_argument("--gpus", type=int, help="GPUs per job (default: the spec's gpus_per_node, else none)")
    cluster.add_argument("--time", type=int, metavar="MINUTES",
                         help="a job's time limit; a longer run is requeued and resumes (default: the spec's "
                              "timeout_min, else 240)")
    cluster.add_argument("--account", help="SLURM account to charge (default: the spec's, else your default)")
    cluster.add_argument("--jobs", type=int, help="jobs running at once (default: the spec's max_parallel, else "
                                                  "every run on SLURM, one at a time locally)")


def _with_flags(study: Study, args: argparse.Namespace) -> Study:
    """The study with the executor flags given on the command line in place of its [executor] keys."""
    flags = dict(kind=args.executor, partition=args.partition, gpus_per_node=args.gpus, timeout_min=args.time,
                 account=args.account, max_parallel=args.jobs)
    given = {key: value for key, value in flags.items() if value is not None}
    settings = {**dataclasses.asdict(study.executor), **given}
    return dataclasses.replace(study, executor=executor_settings(settings, "backsmooth study"))


def main(args: argparse.Namespace) -> int:
    """Check the whole spec, then run (or with --dry-run, estimate) what is left; exit 75 when interrupted."""
    study = _with_flags(load_study(args.spec, args.out), args)
    check_existing(study)
    if args.dry_run:
        dry_run(study, lambda line: print(line, flush=True))
        return 0
    command = "backsmooth study " + shlex.join([args.spec, *(["--out", args.out] if args.out else [])])
    progress, log = True if args.progress else False, lambda line: print(line, flush=True)
    try:
        if study.executor.kind == "inprocess" or args.report_only:
            result = execute(study, command, progress=progress, report_only=args.report_only, log=log)
        else:
            result = execute_jobs(study, command, progress=progress, log=log)
    except (Interrupted, KeyboardInterrupt):
        print(f"interrupted: finished work is saved in {study.out}; run the same command again to go on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["report"] is not None:
        print(f"wrote {result['report']}")
    if result["diverged"]:
        print(f"error: {len(result['diverged'])} run(s) diverged: {', '.join(result['diverged'])}", file=sys.stderr)
    if result.get("failed"):
        print(f"error: {len(result['failed'])} job(s) failed: {', '.join(result['failed'])} (their errors and logs "
              f"are above); run the same command again to retry them", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_DIVERGED if result["diverged"] else 0
