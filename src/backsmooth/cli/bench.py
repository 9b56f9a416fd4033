"""`backsmooth bench`: the flags and the command."""

import argparse

from backsmooth.atomic import atomic_write_json
from backsmooth.config import PRECISIONS, parse_number
from backsmooth.errors import ConfigError
from backsmooth.runtime import Runtime, resolve_device
from backsmooth.training.bench import BenchSetup, bench_table, run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--methods", default="", help="comma-separated (default: all, plus trades_reference)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    parser.add_argument("--epoch-images", type=int, default=50_000, help="images in the data-pipeline epoch (0: skip)")
    parser.add_argument("--json", help="write all results to this JSON file")


def main(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "image_size", "channels", "num_classes", "repeats", "steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.epoch_images < 0:
        raise ConfigError("--warmup and --epoch-images must be >= 0")
    _check_sizes(args)
    names = tuple(n.strip() for n in args.methods.split(",") if n.strip())
    setup = BenchSetup(args.arch, args.batch_size, (args.channels, args.image_size, args.image_size),
                       args.num_classes, parse_number(args.eps, "--eps"), args.compile, args.warmup, args.repeats,
                       args.steps, args.epoch_images)
    runtime = Runtime(resolve_device(args.device), args.precision, args.channels_last)
    result = run_benchmark(setup, names, runtime)
    print(bench_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


LIMITS = {"channels": 1024, "image_size": 512, "num_classes": 1_000_000}  # beyond these: a typo, not a benchmark
MAX_BATCH_PIXELS = 2**23  # batch x height x width (128 x 256^2): the activations, not the input, fill memory
MAX_BATCH_GIB, MAX_EPOCH_GIB = 4, 8  # found by the fuzz test: larger values were killed out of memory


def _check_sizes(args: argparse.Namespace) -> None:
    """Refuse sizes whose tensors alone would exhaust memory, before allocating anything."""
    for flag, limit in LIMITS.items():
        if getattr(args, flag) > limit:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is above {limit}; lower it")
    if args.batch_size * args.image_size ** 2 > MAX_BATCH_PIXELS:
        raise ConfigError(f"--batch-size x --image-size^2 = {args.batch_size * args.image_size ** 2} pixels is above "
                          f"{MAX_BATCH_PIXELS} (e.g. 128 x 256^2); the activations would not fit, lower them")
    image = args.channels * args.image_size ** 2
    for what, size, limit in (
            ("the batch (--batch-size x --channels x --image-size^2 floats)", args.batch_size * image * 4,
             MAX_BATCH_GIB),
            ("the data-pipeline epoch (--epoch-images x --channels x --image-size^2 bytes)", args.epoch_images * image,
             MAX_EPOCH_GIB)):
        if size > limit * 2**30:
            raise ConfigError(f"{what} would need {size / 2**30:.3g} GiB, more than {limit} GiB; lower the sizes")
