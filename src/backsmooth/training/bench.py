"""`backsmooth bench`: seconds per training step of every method on one model, batch and device.

Reports the median over repetitions after warm-up, images per second, the ratios to natural
training and to our TRADES-10, the passes each step makes (counted with hooks) against the
floor of docs/algorithms.md#cost-in-forward-passes (`?` for a method that declares none), and peak
memory. A benchmark-only row, `trades_reference`, recreates the pass structure of the TRADES
reference code (clean forward recomputed in every attack step and in the loss) so both comparisons
of the paper can be read off one table. Each row also gives the TFLOP/s the step does and its model FLOPs
utilisation (training/flops.py).
"""

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth import methods, models
from backsmooth.data import ArrayDataset, DeviceLoader
from backsmooth.errors import ConfigError
from backsmooth.methods import TRADES
from backsmooth.methods.base import Stats, StepContext, TrainingMethod
from backsmooth.runtime import Runtime, device_name, resolve_device, synchronize
from backsmooth.training.awp import WeightPerturbation
from backsmooth.training.flops import achieved_tflops, device_peak_tflops, forward_flops
from backsmooth.training.setup import Parts
from backsmooth.training.step import training_step
from backsmooth.units import threat_model_text

REFERENCE = "trades_reference"  # the benchmark-only row below


@dataclasses.dataclass(frozen=True)
class TRADESReference(TRADES):
    """TRADES-10 with the reference code's pass structure, for timing only: each attack step runs the
    clean forward again beside the adversarial one, and the loss runs the clean forward twice."""

    name = REFERENCE
    summary = "benchmark only: TRADES-10 as the reference code computes it (about 40F)"
    norms = ("linf",)  # its sign steps and clamps are L-inf's

    def floor_units(self) -> int:
        return 39  # 10 x (2 forwards + an input backward) + 3 forwards + their backward: "about 40F"
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 stats: Stats | None = None, context: StepContext | None = None) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (x + 0.001 * noise).clamp(0, 1)
        model.eval()  # as the reference code: eval mode, parameters still require gradients
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + self.alpha * grad.sign(), x - self.eps), x + self.eps)
            x_adv = x_adv.clamp(0, 1)
        model.train()
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * kl


@dataclasses.dataclass
class PassCount:
    """Forward calls of one training step, split by what their backward costs
    (docs/algorithms.md#cost-in-forward-passes)."""

    clean_forward: int = 0  # eval-mode forwards whose input needs no gradient (targets): 1F
    input_gradient: int = 0  # eval-mode forwards differentiated w.r.t. the input (attack steps): 2F
    training: int = 0  # train-mode forwards sharing the one full backward: 3F
    double_backprop: int = 0  # train-mode forwards whose input gradient is itself differentiated: about 5F

    @property
    def f_units(self) -> int:
        """Cost in units of one forward pass."""
        return self.clean_forward + 2 * self.input_gradient + 3 * self.training + 5 * self.double_backprop


def count_passes(model: nn.Module, method: TrainingMethod, x: Tensor, y: Tensor, awp: bool = False) -> PassCount:
    """Classify every forward call of one training step with a pre-hook, in units of the batch (a forward
    of 3B images counts three times). A method with several replays per batch (Free-AT) makes one. With `awp`,
    the passes of --awp's proxy step (the method's loss on the batch, on a copy of the model) are added."""
    counts = _count(model, method, x, lambda: method(model, x, y, generator=torch.Generator(x.device).manual_seed(0)))
    if awp:
        extra = _count(model, method, x, lambda: method.loss_on(model, x, x, y))
        counts = PassCount(*(a + b for a, b in zip(dataclasses.astuple(counts), dataclasses.astuple(extra))))
    return counts


def _count(model: nn.Module, method: TrainingMethod, x: Tensor, loss: Callable[[], Tensor]) -> PassCount:
    """The forward calls made while `loss()` is computed and differentiated, classified by their backward cost."""
    counts = PassCount()

    def hook(module: nn.Module, args: Any) -> None:
        input_needs_grad = torch.is_grad_enabled() and args[0].requires_grad
        batches = -(-len(args[0]) // len(x))  # a forward of 3B images (ELLE's) costs three of B
        if module.training:
            if input_needs_grad and method.double_backprop:  # Free-AT's input gradient rides the one backward
                counts.double_backprop += batches
            else:
                counts.training += batches
        elif input_needs_grad:
            counts.input_gradient += batches
        else:
            counts.clean_forward += batches

    handle = model.register_forward_pre_hook(hook)
    try:
        loss().backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return counts


def _method(name: str, eps: float, norm: str = "linf") -> TrainingMethod:
    if name == REFERENCE:
        return TRADESReference(eps=eps, norm=norm)
    takes_eps = "eps" in methods.method_class(name).hyperparameter_names()
    return methods.build(name, norm=norm, **({"eps": eps} if takes_eps else {}))


def default_names(norm: str) -> tuple[str, ...]:
    """Every method defined for `norm`, plus the reference TRADES-10 at L-inf."""
    chosen = tuple(n for n in methods.names() if norm in methods.method_class(n).norms)
    return chosen + ((REFERENCE,) if norm in TRADESReference.norms else ())


def time_steps(model: nn.Module, method: TrainingMethod, x: Tensor, y: Tensor, runtime: Runtime, warmup: int,
               repeats: int, steps: int, awp: float = 0.0) -> list[float]:
    """Seconds per step for each repetition (each the mean of `steps` steps), after `warmup` steps; with `awp`,
    steps with adversarial weight perturbation of that size."""
    device = runtime.device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    perturbation = WeightPerturbation(model, awp, 0, runtime.proc) if awp else None
    parts = Parts(model, model, method, optimizer, scaler, torch.Generator(device).manual_seed(0), awp=perturbation)

    def step() -> None:
        training_step(parts, x, y, runtime)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000 / steps)
        else:
            begin = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - begin) / steps)
    return times


def time_data_pipeline(n_images: int, image_shape: tuple[int, int, int], batch_size: int, device: torch.device,
                       augment: str = "crop_flip") -> float:
    """Seconds for one epoch of the device-resident loader (shuffle + augmentation) over n_images."""
    images = torch.randint(0, 256, (n_images, *image_shape), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_images,))
    loader = DeviceLoader(ArrayDataset(images, labels), batch_size, augment=augment, device=device)
    for _ in loader.epoch(0):  # warm-up
        pass
    synchronize(device)
    begin = time.perf_counter()
    for x, _ in loader.epoch(1):
        x.sum()  # make sure the batch is materialised
    synchronize(device)
    return time.perf_counter() - begin


@dataclasses.dataclass(frozen=True)
class BenchSetup:
    """What every method is timed on: the model, one random batch, and the timing protocol."""

    arch: str = "small_cnn"
    batch_size: int = 128
    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    eps: float = 8 / 255
    compile: bool = False
    warmup: int = 2
    repeats: int = 5
    steps: int = 3  # steps per timed repetition
    epoch_images: int = 50_000  # images of the data-pipeline epoch (0: skip it)
    seed: int = 0
    norm: str = "linf"  # the threat model the methods attack in
    awp: float = 0.0  # adversarial weight perturbation around each method's step (0: off)
    peak_tflops: float | None = None  # the device's peak for MFU (None: the table's, flops.PEAK_TFLOPS)


def run_benchmark(setup: BenchSetup = BenchSetup(), method_names: tuple[str, ...] = (),
                  runtime: Runtime | None = None) -> dict[str, Any]:
    """Time every method on the same model, batch and device (`runtime`, default: the CPU, fp32); see the
    module docstring."""
    runtime = runtime or Runtime(resolve_device("cpu"))
    dev, precision, channels_last = runtime.device, runtime.precision, runtime.channels_last
    batch_size, image_shape, num_classes = setup.batch_size, setup.image_shape, setup.num_classes
    names = method_names or tuple(n for n in default_names(setup.norm)
                                  if not setup.awp or (n != REFERENCE and methods.method_class(n).splits()))
    built = {name: _method(name, setup.eps, setup.norm) for name in names}  # unknown names fail here, before any timing
    for name, method in built.items():
        if setup.awp and method.awp_units() is None:
            raise ConfigError(f"--awp needs methods whose step is an attack then a loss on it; {name} is not one")
    generator = torch.Generator().manual_seed(setup.seed)
    x = torch.rand(batch_size, *image_shape, generator=generator).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(dev)
    torch.manual_seed(setup.seed)
    flops = forward_flops(models.build(setup.arch, num_classes, in_channels=image_shape[0]), image_shape)
    peak = device_peak_tflops(device_name(dev), setup.peak_tflops)
    rows = []
    for name in names:
        torch.manual_seed(setup.seed)
        net = models.build(setup.arch, num_classes, in_channels=image_shape[0]).to(dev)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        method = built[name]
        passes = count_passes(net, method, x, y, awp=bool(setup.awp))
        floor = method.floor_units()
        floor = floor + method.awp_units() if setup.awp and floor is not None else floor
        model = torch.compile(net) if setup.compile else net
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = time_steps(model, method, x, y, runtime, setup.warmup, setup.repeats, setup.steps, setup.awp)
        median = statistics.median(times)
        rows.append({
            "method": name, "seconds_per_step": median, "seconds_per_repeat": times,
            "images_per_second": batch_size / median,
            "tflops": achieved_tflops(flops, passes.f_units, batch_size / median),
            "mfu": achieved_tflops(flops, passes.f_units, batch_size / median) / peak if peak else None,
            "passes": dataclasses.asdict(passes), "f_units": passes.f_units, "floor_f_units": floor,
            "peak_memory_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        })
    by_name = {row["method"]: row for row in rows}
    for row in rows:
        for reference in ("natural", "fgsm_rs", "trades"):
            if reference in by_name:
                row[f"ratio_to_{reference}"] = row["seconds_per_step"] / by_name[reference]["seconds_per_step"]
    result: dict[str, Any] = {
        "arch": setup.arch, "batch_size": batch_size, "image_shape": list(image_shape), "num_classes": num_classes,
        "eps": setup.eps, "norm": setup.norm, "awp": setup.awp, "device": str(dev), "device_name": device_name(dev),
        "precision": precision,
        "channels_last": channels_last, "compile": setup.compile, "warmup": setup.warmup, "repeats": setup.repeats,
        "steps_per_repeat": setup.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "forward_flops": flops, "peak_tflops": peak, "rows": rows,
    }
    epoch_images = setup.epoch_images
    if epoch_images and "natural" in by_name:
        data_seconds = time_data_pipeline(epoch_images, image_shape, batch_size, dev)
        natural_epoch = (epoch_images // batch_size) * by_name["natural"]["seconds_per_step"]
        result["data_pipeline"] = {"images": epoch_images, "seconds_per_epoch": data_seconds,
                                   "natural_epoch_seconds": natural_epoch,
                                   "fraction_of_natural_epoch": data_seconds / natural_epoch}
    return result




def bench_table(result: dict[str, Any]) -> str:
    lines = [f"{result['arch']}, batch {result['batch_size']}, {'x'.join(map(str, result['image_shape']))}, "
             f"{threat_model_text(result.get('norm', 'linf'), result['eps'])}, {result['device_name']}, "
             f"{result['precision']}"
             f"{', channels_last' if result['channels_last'] else ''}{', compiled' if result['compile'] else ''}"
             + (f", AWP gamma {result['awp']:g} (its proxy step in F and floor)" if result.get("awp") else ""),
             f"{'method':<20} {'s/step':>8} {'img/s':>8} {'x natural':>9} {'x FGSM-RS':>9} {'x TRADES-10':>11} "
             f"{'passes (c/ig/tr/db)':>19} {'F':>4} {'floor':>5} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6}"]
    for row in result["rows"]:
        p = row["passes"]
        passes = f"{p['clean_forward']}/{p['input_gradient']}/{p['training']}/{p['double_backprop']}"
        memory = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] is not None else "n/a"
        floor = "?" if row["floor_f_units"] is None else row["floor_f_units"]  # a method without floor_units()
        ratios = " ".join(f"{row.get(f'ratio_to_{r}', float('nan')):>{w}.{d}f}"
                          for r, w, d in (("natural", 9, 2), ("fgsm_rs", 9, 2), ("trades", 11, 3)))
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
        lines.append(f"{row['method']:<20} {row['seconds_per_step']:>8.4f} {row['images_per_second']:>8.0f} "
                     f"{ratios} {passes:>19} {row['f_units']:>4} {floor:>5} {memory:>9} "
                     f"{row.get('tflops', float('nan')):>8.3f} {mfu:>6}")
    if "forward_flops" in result:
        peak = result["peak_tflops"]
        lines.append(f"one forward: {result['forward_flops'] / 1e9:.3f} GFLOP per image; TFLOP/s = that x F x img/s; "
                     + (f"MFU against a peak of {peak:g} TFLOP/s (dense bf16)" if peak else
                        "MFU n/a: no peak known for this device (--peak-tflops)"))
    if "data_pipeline" in result:
        d = result["data_pipeline"]
        lines.append(f"data pipeline: {d['seconds_per_epoch']:.3f} s per epoch of {d['images']} images = "
                     f"{d['fraction_of_natural_epoch']:.2%} of a natural training epoch "
                     f"({d['natural_epoch_seconds']:.1f} s)")
    return "\n".join(lines)
