"""`backsmooth export`: a finished run's model as a folder that leaves the run directory (model.safetensors,
config.json, a model card; RobustBench's model_info with --format robustbench), optionally pushed to the Hub."""

import argparse

from backsmooth.publish import export_run, push, what_robustbench_needs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth export`."""
    parser.add_argument("run", metavar="RUN_DIR", help="a finished run directory of `backsmooth train`")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty; nothing is overwritten)")
    parser.add_argument("--checkpoint", choices=("best", "last"),
                        help="which model to export (default: best.pt, else last.pt)")
    parser.add_argument("--name", help="the model's name in the card and model_info (default: the --out folder's)")
    parser.add_argument("--format", choices=("hub", "robustbench"), default="hub",
                        help="hub: weights, config.json and the model card (default); robustbench: also "
                             "RobustBench's model_info JSON, and what a submission still needs")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="upload the folder to this Hugging Face Hub repository (needs huggingface_hub and a "
                             "token; default: no upload)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def main(args: argparse.Namespace) -> int:
    """Export, then print what was written (and pushed)."""
    robustbench = args.format == "robustbench"
    out = export_run(args.run, args.out, which=args.checkpoint, name=args.name, robustbench=robustbench)
    print(f"wrote {out}: model.safetensors, config.json, README.md (the model card)"
          + (", robustbench/model_info/" if robustbench else ""))
    if robustbench:
        print("a RobustBench submission still needs:")
        for need in what_robustbench_needs(out):
            print(f"  - {need}")
    if args.push_to_hub:
        print(f"pushed to {push(out, args.push_to_hub, private=args.private)}")
    print(f"load it with: python -c \"import backsmooth; print(backsmooth.load('{out}'))\"")
    return 0
