"""`backsmooth eval`: the evaluation protocol on a trained model's stratified test subset; writes
eval-NAME.json (RobustBench's model_info fields plus the full result) next to the run."""

import argparse
import sys

from backsmooth.attacks import attack_forms
from backsmooth.config import parse_number
from backsmooth.errors import EXIT_INTERRUPTED, one_line
from backsmooth.evaluation.saved import EvaluationInterrupted, SavedProtocol, evaluate_saved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth eval`."""
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory of `backsmooth train` (its best.pt, else last.pt) or a model file")
    parser.add_argument("--attacks", default="pgd20,cw20",
                        help=f"comma-separated attacks (default pgd20,cw20); forms: {', '.join(attack_forms())}")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="dataset folder (default: the run's)")
    parser.add_argument("--norm", help="threat model: linf, l2 or l1 (RobustBench's Linf, L2, L1 too; default: the "
                                       "run's, linf); another norm than the run's needs --eps")
    parser.add_argument("--eps", help="radius in the norm, e.g. 8/255 at linf, 0.5 at l2 (default: the run's)")
    parser.add_argument("--step-size", help="step of pgd/cw attacks (default: eps/4, which is 2/255 at eps 8/255)")
    parser.add_argument("--n-examples", type=int, default=1000, help="stratified test subset size (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice and random starts (default: 0)")
    parser.add_argument("--name", help="model name in the report and file name eval-NAME.json (default: the run's)")
    parser.add_argument("--out", help="folder for eval-NAME.json (default: the run directory)")
    parser.add_argument("--restart", action="store_true", help="discard the state of an interrupted evaluation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """`backsmooth eval`: the evaluation protocol on a trained model's (stratified) test set; writes eval-NAME.json."""
    step_size = parse_number(args.step_size, "--step-size") if args.step_size else None
    eps = parse_number(args.eps, "--eps") if args.eps else None
    try:
        protocol = SavedProtocol(args.attacks, args.n_examples, args.batch_size, args.seed, eps, step_size,
                                 args.dataset, args.data_dir, args.norm)
        path, _ = evaluate_saved(args.target, protocol, name=args.name, out=args.out, device=args.device,
                                 restart=args.restart, progress=False if args.no_progress else None,
                                 log=lambda line: print(line, flush=True))
    except EvaluationInterrupted as stop:
        print(one_line(str(stop)), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted while no attack was running, so no finished batch was lost; run the same command again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {path}")
    return 0
