"""What every training method must do, whoever wrote it. tests/test_methods.py runs these checks on every name
in `methods.names()` and tests/test_extending.py on a method registered from outside the package, so a new
method is checked without touching a test file:

- one step makes exactly the passes its `floor_units()` declares (when it declares a floor), the loss comes
  from a train-mode forward, its backward adds no forward and reaches every parameter;
- every input the model sees lies in the [0, 1] box and within the method's radius of x (its `radius`, else
  its `eps`; 0 without one);
- attacks leave BatchNorm statistics to the training forwards;
- a seeded generator makes the loss reproducible;
- --label-smoothing changes the loss, or the method declares `label_smoothing_applies = False` and is refused
  when built with it.
"""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from backsmooth import methods
from backsmooth.errors import ConfigError
from backsmooth.training.bench import count_passes


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10)
    )


def batch(n: int = 16, interior: bool = False, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    if interior:
        x = 0.25 + 0.5 * x  # far from the box so clamping never acts
    return x, torch.randint(0, 10, (n,), generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ForwardLog:
    """Records every forward call: (train mode?, grad enabled?, input)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[bool, bool, Tensor]] = []
        model.register_forward_pre_hook(
            lambda m, args: self.calls.append((m.training, torch.is_grad_enabled(), args[0].detach().clone()))
        )

    def counts(self) -> tuple[int, int, int]:
        """(eval forwards without grad, eval forwards with grad, train-mode forwards)."""
        no_grad = sum(1 for t, g, _ in self.calls if not t and not g)
        attack = sum(1 for t, g, _ in self.calls if not t and g)
        train = sum(1 for t, _, _ in self.calls if t)
        return no_grad, attack, train


def check_passes(name: str) -> None:
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    method = methods.build(name)
    loss = method(model, x, y, generator=gen(0))
    assert log.counts()[2] >= 1, "the loss must come from a train-mode forward"
    calls = len(log.calls)
    loss.backward()
    assert len(log.calls) == calls  # the backward adds no forward
    assert all(p.grad is not None for p in model.parameters())
    counted = count_passes(tiny_model().train(), methods.build(name), x, y).f_units
    assert method.floor_units() in (None, counted), f"counted {counted}F, declared {method.floor_units()}F"


def check_inputs_in_the_ball_and_box(name: str) -> None:
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    method = methods.build(name)
    radius = getattr(method, "radius", getattr(method, "eps", 0.0))
    method(model, x, y, generator=gen(0))
    for _, _, seen in log.calls:
        assert seen.min() >= 0 and seen.max() <= 1
        if len(seen) % len(x) == 0:  # k whole batches at once (ELLE's 3B); a part of the batch has no rows to match
            assert (seen.reshape(-1, *x.shape) - x).abs().max() <= radius + 1e-6


def check_batchnorm_statistics(name: str) -> None:
    """Running stats change only through the train-mode forwards: replaying those alone gives the same stats."""
    model = tiny_model().train()
    replay = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    methods.build(name)(model, x, y, generator=gen(0))
    with torch.no_grad():
        for training, _, seen in log.calls:
            if training:
                replay(seen)
    torch.testing.assert_close(model[1].running_mean, replay[1].running_mean)
    torch.testing.assert_close(model[1].running_var, replay[1].running_var)
    assert model[1].num_batches_tracked == replay[1].num_batches_tracked


def check_reproducible(name: str) -> None:
    x, y = batch()
    losses = [methods.build(name)(tiny_model(), x, y, generator=gen(5)).item() for _ in range(2)]
    assert losses[0] == losses[1]


def check_label_smoothing(name: str) -> None:
    """0.4 moves the loss clearly (by about 0.04 on this near-uniform model), or is refused at construction."""
    if not methods.method_class(name).label_smoothing_applies:
        with pytest.raises(ConfigError, match="--label-smoothing 0.4 would be ignored") as refused:
            methods.build(name, label_smoothing=0.4)
        assert "\n" not in str(refused.value)
        return
    x, y = batch()
    plain = methods.build(name)(tiny_model(), x, y, generator=gen(0)).item()
    smoothed = methods.build(name, label_smoothing=0.4)(tiny_model(), x, y, generator=gen(0)).item()
    assert abs(smoothed - plain) > 0.01, (plain, smoothed)


CHECKS: tuple[Callable[[str], None], ...] = (check_passes, check_inputs_in_the_ball_and_box,
                                             check_batchnorm_statistics, check_reproducible, check_label_smoothing)
