"""`backsmooth eval`: the evaluation protocol on a trained model's stratified test subset; writes
eval-NAME.json (RobustBench's model_info fields plus the full result) next to the run."""

import argparse
import sys

from backsmooth.attacks import attack_forms
from backsmooth.config import parse_number
from backsmooth.errors import EXIT_INTERRUPTED, ConfigError, one_line
from backsmooth.evaluation.saved import EvaluationInterrupted, SavedProtocol, evaluate_saved

# RobustBench's ImageNet Linf protocol: standard AutoAttack at 4/255 on 5,000 validation images at 224 px
# (their fixed list of 5,000; ours is stratified, 5 per class, seeded: a different but equally sized sample)
PROTOCOLS = {"robustbench-imagenet": dict(attacks="autoattack", n_examples=5000, eps=4 / 255, norm="linf",
                                          dataset="imagenet", image_size=224)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth eval`."""
    parser.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory of `backsmooth train` (its best.pt, else last.pt) or a model file")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS),
                        help="a named protocol that sets the attacks, examples, threat model, dataset and image size: "
                             "robustbench-imagenet = standard AutoAttack, Linf 4/255, 5,000 stratified validation "
                             "images of --dataset imagenet at 224 px (resize 256, central crop)")
    parser.add_argument("--attacks", help=f"comma-separated attacks (default pgd20,cw20); forms: "
                                          f"{', '.join(attack_forms())}")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data-dir", help="dataset folder (default: the run's)")
    parser.add_argument("--norm", help="threat model: linf, l2 or l1 (RobustBench's Linf, L2, L1 too; default: the "
                                       "run's, linf); another norm than the run's needs --eps")
    parser.add_argument("--eps", help="radius in the norm, e.g. 8/255 at linf, 0.5 at l2 (default: the run's)")
    parser.add_argument("--step-size", help="step of pgd/cw attacks (default: eps/4, which is 2/255 at eps 8/255)")
    parser.add_argument("--n-examples", type=int, help="stratified test subset size (default 1000)")
    parser.add_argument("--image-size", type=int, help="streamed data: side of the evaluation view in pixels "
                                                       "(default: the run's)")
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
    chosen = dict(attacks=args.attacks, n_examples=args.n_examples, eps=eps, norm=args.norm, dataset=args.dataset,
                  image_size=args.image_size)
    named = PROTOCOLS.get(args.protocol or "", {})
    clash = [key for key, value in chosen.items() if key in named and value is not None and value != named[key]]
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        value = named[clash[0]]
        shown = f"{round(value * 255)}/255" if clash[0] == "eps" else value
        raise ConfigError(f"--protocol {args.protocol} sets {flag} to {shown}; drop {flag} or the protocol")
    chosen = {key: named.get(key, value) if value is None else value for key, value in chosen.items()}
    try:
        protocol = SavedProtocol("pgd20,cw20" if chosen["attacks"] is None else chosen["attacks"],
                                 1000 if chosen["n_examples"] is None else chosen["n_examples"], args.batch_size,
                                 args.seed, chosen["eps"], step_size, chosen["dataset"], args.data_dir,
                                 chosen["norm"], chosen["image_size"], args.protocol or "")
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
