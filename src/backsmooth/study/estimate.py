"""Time estimates for a study, in forward-pass units (F) per example: a training step of a method costs its
`floor_units()` for each replay of the batch (a method that declares no floor: the passes of one step, counted),
an attack step on one example costs 2 F (forward and input gradient) and scoring 1 F. One rate (seconds per F
per example) for each architecture turns units into time: `--dry-run` measures it with a short `bench` of every
method, a running study from its finished runs."""

import dataclasses
import functools
import statistics
from collections.abc import Iterable
from typing import Any

import torch

from backsmooth import methods, models
from backsmooth.attacks import parse_attacks
from backsmooth.config import RunConfig
from backsmooth.data import load_dataset
from backsmooth.runtime import Runtime, resolve_device
from backsmooth.study.spec import PlannedRun, Study
from backsmooth.training.bench import count_passes, time_steps
from backsmooth.training.setup import default_val_size

# gradient steps per example of AutoAttack's components in their standard settings (APGD-T and FAB-T: 9
# target classes x 100 iterations; Square: 5,000 queries, each a forward pass, so a third of a step)
AUTOATTACK_STEPS = {"apgd-ce": 100, "apgd-t": 900, "fab-t": 900, "square": 5000 / 3}
AUTOATTACK_REACH = 0.5  # the fraction of examples assumed still robust when AutoAttack's components run


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the estimate needs to know of a run's training data."""

    train_size: int
    image_shape: tuple[int, ...]
    num_classes: int


def data_facts(config: RunConfig) -> DataFacts:
    """Training-set size, image shape and classes of a run's dataset (read from the dataset cache)."""
    data = load_dataset(config.dataset, config.data_dir, val_size=default_val_size(config), seed=config.seed,
                        cache_dir=config.cache_dir, loader=config.loader, image_size=config.image_size,
                        workers=config.decode_workers())
    return DataFacts(len(data.train), tuple(data.image_shape), data.num_classes)


def step_units(config: RunConfig) -> int:
    """F per example of one training batch: the method's floor (plus --awp's proxy step) for each replay; for a
    method whose `floor_units()` is None (unknown), the passes of one step counted by `counted_units`."""
    method = methods.build(config.method, **config.method_hyperparameters())
    floor = method.floor_units()
    if floor is None:
        floor = counted_units(config.method, tuple(sorted(config.method_hyperparameters().items())))
    if config.awp:  # --awp's proxy step: the method's loss and its backward once more
        floor += method.awp_units() or 0
    return floor * method.replays


@functools.cache
def counted_units(method: str, hyperparameters: tuple[tuple[str, Any], ...]) -> int:
    """F of one training step of `method`, counted with bench's hooks on a probe: small_cnn on a CPU batch of
    eight random 3x8x8 images. Passes are counted in units of the batch, so the count does not depend on the
    run's model or images, and the probe costs milliseconds without the dataset; cached, since a running study
    asks at every progress line. The global random state is left as it was."""
    built = methods.build(method, **dict(hyperparameters))
    with torch.random.fork_rng(devices=()):
        torch.manual_seed(0)
        probe = models.build("small_cnn", 10)
        x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
        built.setup(len(x), tuple(x.shape[1:]), x.device)
        return count_passes(probe, built, x, y).f_units


def train_units(config: RunConfig, facts: DataFacts) -> float:
    """F per example summed over the whole run (full batches only, as the loader drops the last)."""
    batches = facts.train_size // config.batch_size
    batches = min(batches, config.steps_per_epoch) if config.steps_per_epoch else batches
    return float(step_units(config) * batches * config.batch_size * config.epochs)


def eval_units(attacks: Iterable[str], n_examples: int, checkpoints: int) -> float:
    """F for evaluating `checkpoints` models with `attacks` on `n_examples` each (AutoAttack: see REACH)."""
    per_example = 1.0  # clean
    for spec in parse_attacks(list(attacks)):
        if spec.components:
            per_example += AUTOATTACK_REACH * sum(2 * AUTOATTACK_STEPS.get(c, 100) for c in spec.components)
        else:
            per_example += spec.restarts * (2 * spec.steps + 1)
    return per_example * n_examples * checkpoints


def run_units(run: PlannedRun, study: Study, facts: DataFacts) -> tuple[float, float]:
    """(training F, evaluation F) of one planned run."""
    return (train_units(run.config, facts),
            eval_units(run.attacks, study.evaluation.n_examples, len(run.checkpoints)))


def bench_rate(config: RunConfig, facts: DataFacts) -> float:
    """Seconds per F per example of `config`'s method on its model and batch: a few eager steps on this machine."""
    device = resolve_device(config.device)
    torch.manual_seed(0)
    net = models.build(config.arch, facts.num_classes, in_channels=facts.image_shape[0]).to(device)
    method = methods.build(config.method, **config.method_hyperparameters())
    method.setup(config.batch_size, facts.image_shape, device, 0)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(config.batch_size, *facts.image_shape, generator=generator).to(device)
    y = torch.randint(0, facts.num_classes, (config.batch_size,), generator=generator).to(device)
    times = time_steps(net, method, x, y, Runtime(device, config.precision, config.channels_last), warmup=1, repeats=2,
                       steps=1)
    return statistics.median(times) / (step_units(config) * config.batch_size)


def measured_rate(train_seconds: float, config: RunConfig, facts: DataFacts, epochs_done: int) -> float | None:
    """Seconds per F per example that a finished (or partly trained) run took; None before its first epoch."""
    if epochs_done <= 0 or train_seconds <= 0:
        return None
    done = dataclasses.replace(config, epochs=epochs_done)
    return train_seconds / train_units(done, facts)
