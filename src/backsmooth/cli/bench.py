"""`backsmooth bench`: the flags and the command."""

import argparse

from backsmooth.atomic import atomic_write_json
from backsmooth.attacks import norm_name
from backsmooth.config import PRECISIONS, parse_number
from backsmooth.errors import ConfigError
from backsmooth.runtime import Runtime, resolve_device
from backsmooth.training.bench import BenchSetup, bench_table, run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backsmooth bench`, each with its default."""
    add = parser.add_argument
    add("--arch", default="small_cnn", help="architecture to time (default: %(default)s)")
    add("--methods", default="", help="comma-separated method names (default: all, plus trades_reference)")
    add("--batch-size", type=int, default=128, help="training batch (default: %(default)s)")
    add("--image-size", type=int, default=32, help="height and width of the random images (default: %(default)s)")
    add("--channels", type=int, default=3, help="image channels (default: %(default)s)")
    add("--num-classes", type=int, default=10, help="classes of the model's output (default: %(default)s)")
    add("--norm", default="linf", help="threat model of the methods' attacks: linf or l2; at l2 only the methods "
                                       "with an L2 form run (default: %(default)s)")
    add("--eps", default="8/255", help="radius of the methods' attacks, e.g. 0.5 at l2 (default: %(default)s)")
    add("--awp", type=float, default=0.0, help="adversarial weight perturbation of this size around each step; only "
                                                "the methods it applies to run (default: 0, off)")
    add("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: %(default)s)")
    add("--precision", default="fp32", choices=PRECISIONS, help="training precision (default: %(default)s)")
    add("--channels-last", action="store_true", help="channels-last memory format (default: off)")
    add("--compile", action="store_true", help="torch.compile the model; warm-up excluded from timing (default: off)")
    add("--warmup", type=int, default=2, help="untimed steps before timing each method (default: %(default)s)")
    add("--repeats", type=int, default=5, help="timed repetitions; the median is reported (default: %(default)s)")
    add("--steps", type=int, default=3, help="steps per timed repetition (default: %(default)s)")
    add("--epoch-images", type=int, default=50_000,
        help="images in the data-pipeline epoch (0: skip; default: %(default)s)")
    add("--peak-tflops", type=float, help="the device's peak TFLOP/s for the MFU column (default: the table of "
                                         "common GPUs' dense bf16 peaks; none on a CPU)")
    add("--json", help="write all results to this JSON file (default: none, the table only)")


def main(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "image_size", "channels", "num_classes", "repeats", "steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0 or args.epoch_images < 0:
        raise ConfigError("--warmup and --epoch-images must be >= 0")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < float("inf"):
        raise ConfigError(f"--peak-tflops must be a finite number > 0, got {args.peak_tflops}")
    if not 0 <= args.awp < float("inf"):
        raise ConfigError(f"--awp must be a finite number >= 0 (0: off), got {args.awp}")
    _check_sizes(args)
    names = tuple(n.strip() for n in args.methods.split(",") if n.strip())
    setup = BenchSetup(args.arch, args.batch_size, (args.channels, args.image_size, args.image_size),
                       args.num_classes, parse_number(args.eps, "--eps"), args.compile, args.warmup, args.repeats,
                       args.steps, args.epoch_images, norm=norm_name(args.norm), awp=args.awp,
                       peak_tflops=args.peak_tflops)
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
