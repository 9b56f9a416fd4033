"""The single-step and stateful methods (N-FGSM, GAT, NuAT, FGSM-PGI, ELLE, ELLE-A, Free-AT) against the
algorithm each module's docstring states: pass structure and floor cost, the region every input lies in,
attack mode and BatchNorm statistics, hyperparameter checks, and each method's own arithmetic recomputed
here from the same generator draws."""

import copy
import dataclasses
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backsmooth import methods
from backsmooth.errors import ConfigError
from backsmooth.methods import StepContext, guided
from backsmooth.methods import elle as elle_module
from backsmooth.methods import fgsm_pgi as pgi_module
from backsmooth.runtime import Runtime
from backsmooth.training import Parts, training_step
from backsmooth.training.bench import count_passes

EPS = 8 / 255
NEW = ("n_fgsm", "gat", "nuat", "fgsm_pgi", "elle", "elle_a", "free_at")
# (eval no-grad forwards, eval forwards differentiated w.r.t. the input, train-mode forwards), in batches of B
STRUCTURE = {
    "n_fgsm": (0, 1, 1),
    "gat": (1, 1, 2),
    "nuat": (1, 1, 2),
    "fgsm_pgi": (0, 1, 2),
    "elle": (0, 1, 4),  # FGSM step; training forward on x_adv plus one forward of the 3B regulariser points
    "elle_a": (0, 1, 4),
    "free_at": (0, 0, 1),  # per optimiser step
}
FLOORS = {"n_fgsm": 5, "gat": 9, "nuat": 9, "fgsm_pgi": 8, "elle": 14, "elle_a": 14, "free_at": 3}


# --------------------------------------------------------------------------- helpers


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10)
    )


def batch(n: int = 16, interior: bool = False, edges: bool = False, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    if interior:
        x = 0.25 + 0.5 * x  # far from the box so clamping never acts
    if edges:
        x[:, 0] = 0.0
        x[:, 1] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat_grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """The L-inf ball around x, then the [0, 1] box (written out here, independent of the engine's)."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def soft_ce(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Per-example CE against 1 - s on the true class and s / (C - 1) on each other class."""
    classes = logits.shape[1]
    target = torch.where(F.one_hot(y, classes).bool(), torch.tensor(1.0 - smoothing),
                         torch.tensor(smoothing / (classes - 1)))
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(1)


def input_grad(model: nn.Module, x: Tensor, loss_fn) -> Tensor:
    """d loss_fn(model(x)) / dx with the model as given (mode, weights)."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(model(x)), x)
    return grad


@dataclasses.dataclass
class Call:
    training: bool
    grad_enabled: bool
    input_needs_grad: bool
    params_need_grad: bool
    input: Tensor


class ForwardLog:
    """Every forward call of a model: its mode, whether its input and parameters need gradients, its input."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[Call] = []
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        inp = args[0]
        grad = torch.is_grad_enabled()
        self.calls.append(Call(module.training, grad, grad and inp.requires_grad,
                               any(p.requires_grad for p in module.parameters()), inp.detach().clone()))

    def units(self, batch_size: int) -> tuple[int, int, int, int]:
        """(eval no-grad, eval input-gradient, train-mode, anything else) forwards, in units of the batch."""
        counts = [0, 0, 0, 0]
        for call in self.calls:
            assert len(call.input) % batch_size == 0
            units = len(call.input) // batch_size
            if call.training:
                counts[2] += units
            elif call.input_needs_grad:
                counts[1] += units
            elif not call.grad_enabled:
                counts[0] += units
            else:
                counts[3] += units  # an eval forward building a graph for nothing
        return tuple(counts)

    def train_inputs(self) -> list[Tensor]:
        return [call.input for call in self.calls if call.training]


def run_method(name: str, model: nn.Module, x: Tensor, y: Tensor, seed: int = 0, stats: dict | None = None,
               context: StepContext | None = None, **hyperparameters) -> Tensor:
    return methods.build(name, **hyperparameters)(model, x, y, generator=gen(seed), stats=stats, context=context)


def no_grad_replay(model: nn.Module, inputs: list[Tensor]) -> None:
    with torch.no_grad():
        for seen in inputs:
            model(seen)


# --------------------------------------------------------------------------- 1. pass structure and floor cost


@pytest.mark.parametrize("name", NEW)
def test_pass_structure_matches_the_declared_floor(name):
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    method = methods.build(name)
    loss = method(model, x, y, generator=gen(0))
    no_grad, attack, train, other = log.units(len(x))
    assert (no_grad, attack, train, other) == (*STRUCTURE[name], 0)
    assert no_grad + 2 * attack + 3 * train == FLOORS[name] == method.floor_units()
    calls = len(log.calls)
    loss.backward()
    assert len(log.calls) == calls  # the backward adds no forward
    assert all(p.grad is not None for p in model.parameters())
    log.handle.remove()
    passes = count_passes(tiny_model().train(), methods.build(name), x, y)
    assert (passes.clean_forward, passes.input_gradient, passes.training, passes.double_backprop) == (
        *STRUCTURE[name], 0)
    assert passes.f_units == methods.build(name).floor_units() == FLOORS[name]


def test_elle_regulariser_is_one_forward_of_three_batches():
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    run_method("elle", model, x, y)
    assert [len(seen) for seen in log.train_inputs()] == [len(x), 3 * len(x)]


def test_free_at_replay_count_is_declared():
    assert methods.build("free_at").replays == 8
    assert methods.build("free_at", replay=3).replays == 3
    assert all(methods.build(name).replays == 1 for name in NEW if name != "free_at")


# --------------------------------------------------------------------------- 2. region of every input


# (method, hyperparameters, allowed distance from x in units of eps)
REGIONS = [
    ("n_fgsm", {}, 3.0),
    ("n_fgsm", {"noise": 1.0, "alpha": 0.5 * EPS}, 1.5),
    ("gat", {}, 1.0),
    ("nuat", {}, 1.0),
    ("fgsm_pgi", {}, 1.0),
    ("elle", {}, 1.0),
    ("elle_a", {}, 1.0),
    ("free_at", {"replay": 4}, 1.0),
]


@pytest.mark.parametrize("name,hyperparameters,radius", REGIONS)
def test_every_input_lies_in_the_box_and_the_region_of_its_algorithm(name, hyperparameters, radius):
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch(edges=True)
    method = methods.build(name, **hyperparameters)
    if name == "free_at":  # the perturbation grows over the replays of a batch and is carried to the next
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(2):
            training_step(Parts(model, model, method, optimizer, scaler, gen(0)), x, y, Runtime(torch.device("cpu")))
    else:
        method(model, x, y, generator=gen(0))
    if name == "n_fgsm":
        assert method.radius == pytest.approx(radius * EPS)
    farthest = 0.0
    for call in log.calls:
        seen = call.input
        reference = x.repeat(len(seen) // len(x), 1, 1, 1)  # ELLE's 3B forward
        distance = (seen - reference).abs().max().item()
        assert distance <= radius * EPS + 1e-6
        assert seen.min() >= 0 and seen.max() <= 1
        farthest = max(farthest, distance)
    assert farthest > 0.5 * radius * EPS  # the inputs really move


def test_n_fgsm_is_not_projected_onto_the_eps_ball():
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch(edges=True)
    run_method("n_fgsm", model, x, y, seed=1)
    distances = [(call.input - x).abs().max().item() for call in log.calls]
    assert max(distances) > 1.5 * EPS


def test_n_fgsm_steps_from_uniform_noise_of_2_eps_by_alpha_without_ball_projection():
    model = tiny_model().train()
    reference = tiny_model().eval()
    log = ForwardLog(model)
    x, y = batch(edges=True)
    run_method("n_fgsm", model, x, y, seed=1)
    start = log.calls[0].input
    assert not log.calls[0].training and log.calls[0].input_needs_grad
    noise = torch.rand(x.shape, generator=gen(1))  # the generator's first draw: U(-2 eps, 2 eps)
    torch.testing.assert_close(start, (x + (2 * noise - 1) * 2 * EPS).clamp(0, 1))
    grad = input_grad(reference, start, lambda logits: F.cross_entropy(logits, y, reduction="sum"))
    (x_adv,) = log.train_inputs()
    torch.testing.assert_close(x_adv, (start + EPS * grad.sign()).clamp(0, 1))


# --------------------------------------------------------------------------- 3. attack mode, BatchNorm statistics


@pytest.mark.parametrize("name", NEW)
def test_attack_forwards_run_in_eval_mode_with_frozen_parameters(name):
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    run_method(name, model, x, y)
    differentiated = [call for call in log.calls if call.input_needs_grad]
    assert differentiated
    if name == "free_at":  # by design: the perturbation's gradient comes from the training pass itself
        assert all(call.training and call.params_need_grad for call in differentiated)
    else:
        assert all(not call.training and not call.params_need_grad for call in differentiated)
    assert all(call.params_need_grad for call in log.calls if call.training)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored afterwards


@pytest.mark.parametrize("name", NEW)
def test_attacks_leave_batchnorm_statistics_to_the_training_forwards(name):
    model = tiny_model().train()
    replay = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    run_method(name, model, x, y)
    no_grad_replay(replay, log.train_inputs())
    torch.testing.assert_close(model[1].running_mean, replay[1].running_mean)
    torch.testing.assert_close(model[1].running_var, replay[1].running_var)
    assert model[1].num_batches_tracked == replay[1].num_batches_tracked == len(log.train_inputs())


# --------------------------------------------------------------------------- 4. hyperparameter checks


BAD = [
    ("n_fgsm", {"noise": -1.0}, "noise"),
    ("n_fgsm", {"alpha": 0.0}, "alpha"),
    ("n_fgsm", {"eps": 0.0}, "eps"),
    ("gat", {"start": 2.0}, "start"),
    ("gat", {"gat_weight": -1.0}, "gat_weight"),
    ("gat", {"boost": -1.0}, "boost"),
    ("gat", {"eps": 1.5}, "eps"),
    ("nuat", {"ramp": 0.0}, "ramp"),
    ("nuat", {"ramp": 1.5}, "ramp"),
    ("nuat", {"nuclear_weight": -1.0}, "nuclear_weight"),
    ("nuat", {"start": -0.5}, "start"),
    ("fgsm_pgi", {"reset": 0}, "reset"),
    ("fgsm_pgi", {"reset": 2.5}, "reset"),
    ("fgsm_pgi", {"smoothing": 1.0}, "smoothing"),
    ("fgsm_pgi", {"smoothing": -0.1}, "smoothing"),
    ("fgsm_pgi", {"momentum_decay": -1.0}, "momentum_decay"),
    ("fgsm_pgi", {"pgi_weight": -1.0}, "pgi_weight"),
    ("fgsm_pgi", {"alpha": -1.0}, "alpha"),
    ("elle", {"elle_weight": -1.0}, "elle_weight"),
    ("elle", {"alpha": 0.0}, "alpha"),
    ("elle_a", {"decay": 2.0}, "decay"),
    ("elle_a", {"decay": -0.5}, "decay"),
    ("elle_a", {"sensitivity": -1.0}, "sensitivity"),
    ("elle_a", {"elle_weight": -1.0}, "elle_weight"),
    ("free_at", {"replay": 0}, "replay"),
    ("free_at", {"replay": 2.5}, "replay"),
    ("free_at", {"eps": 0.0}, "eps"),
]


@pytest.mark.parametrize("name,bad,field", BAD)
def test_bad_hyperparameters_raise_a_one_line_config_error_naming_the_field(name, bad, field):
    with pytest.raises(ConfigError) as error:
        methods.build(name, **bad)
    message = str(error.value)
    assert re.match(rf"{re.escape(name)}: {re.escape(field)} must ", message), message
    assert "\n" not in message


def test_defaults_follow_the_papers():
    nfgsm = methods.build("n_fgsm")
    assert (nfgsm.eps, nfgsm.alpha, nfgsm.noise) == (EPS, EPS, 2.0)
    assert methods.build("n_fgsm", eps=16 / 255).alpha == 16 / 255
    gat = methods.build("gat")
    assert (gat.start, gat.gat_weight, gat.boost) == (0.5, 10.0, 4.0)
    nuat = methods.build("nuat")
    assert (nuat.start, nuat.nuclear_weight, nuat.ramp) == (0.5, 4.5, 0.9)
    pgi = methods.build("fgsm_pgi")
    assert (pgi.alpha, pgi.momentum_decay, pgi.pgi_weight, pgi.reset, pgi.smoothing) == (EPS, 0.3, 10.0, 40, 0.4)
    assert methods.build("elle").elle_weight == 1000.0
    elle_a = methods.build("elle_a")
    assert (elle_a.elle_weight, elle_a.sensitivity, elle_a.decay) == (4000.0, 2.0, 0.99)
    assert methods.build("free_at").replay == 8
    assert methods.build("fgsm_pgi").needs_index and not methods.build("gat").needs_index


# --------------------------------------------------------------------------- 5. GAT and NuAT


def test_softmax_distance_on_a_hand_made_pair():
    clean = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    adversarial = [[0.0, 0.0, 0.0], [2.0, -1.0, 0.0]]

    def softmax(row: list[float]) -> list[float]:
        exps = [float(np.exp(v)) for v in row]
        return [e / sum(exps) for e in exps]

    expected = np.mean([sum((a - b) ** 2 for a, b in zip(softmax(c), softmax(d)))
                        for c, d in zip(clean, adversarial)])
    ours = guided.softmax_distance(torch.tensor(clean), torch.tensor(adversarial))
    assert ours.item() == pytest.approx(expected, rel=1e-6)
    assert guided.softmax_distance(torch.tensor(clean), torch.tensor(clean)).item() == 0.0


def test_nuclear_distance_is_the_sum_of_singular_values_over_the_batch():
    g = gen(3)
    clean, adversarial = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    expected = torch.linalg.svdvals(clean - adversarial).sum() / 6
    torch.testing.assert_close(guided.nuclear_distance(clean, adversarial), expected)
    # rank one by hand: the difference (3, 4)^T (1, 0, 0) has the single singular value 5
    hand = torch.tensor([[3.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    assert guided.nuclear_distance(hand, torch.zeros(2, 3)).item() == pytest.approx(5 / 2, rel=1e-6)


@pytest.mark.parametrize("epochs", [1, 7, 30, 50, 100, 110])
def test_gat_weight_is_10_then_40_from_epoch_int_086_epochs(epochs):
    gat = methods.build("gat")
    for epoch in range(epochs):
        expected = 40.0 if epoch >= int(0.86 * epochs) else 10.0
        assert gat.weight(StepContext(epoch=epoch, epochs=epochs)) == pytest.approx(expected)
    assert gat.weight(None) == 10.0
    custom = methods.build("gat", gat_weight=2.0, boost=3.0)
    assert custom.weight(StepContext(epoch=99, epochs=100)) == pytest.approx(6.0)
    assert custom.weight(StepContext(epoch=0, epochs=100)) == pytest.approx(2.0)


@pytest.mark.parametrize("epochs", [1, 10, 30, 100])
def test_nuat_weight_ramps_from_0_over_90_percent_of_the_epochs(epochs):
    nuat = methods.build("nuat")
    assert nuat.weight(StepContext(epoch=0, epochs=epochs)) == 0.0
    for epoch in range(epochs):
        expected = min(4.5 * epoch / (0.9 * epochs), 4.5)
        assert nuat.weight(StepContext(epoch=epoch, epochs=epochs)) == pytest.approx(expected)
    if epochs == 100:
        assert nuat.weight(StepContext(epoch=1, epochs=100)) == pytest.approx(0.05)
        assert nuat.weight(StepContext(epoch=95, epochs=100)) == pytest.approx(4.5)
    half = methods.build("nuat", ramp=0.5, nuclear_weight=2.0)
    assert half.weight(StepContext(epoch=epochs // 4, epochs=epochs)) == pytest.approx(
        min(2.0 * (epochs // 4) / (0.5 * epochs), 2.0))


GUIDED_STRONG = {"gat": {"gat_weight": 1000.0}, "nuat": {"nuclear_weight": 1000.0}}  # so the guide matters


def guided_run(name: str, step_in_epoch: int) -> tuple[Tensor, Tensor, Tensor]:
    """(start of the attack, x_adv the training sees, the clean target) of one call at the last epoch."""
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch(interior=True)
    context = StepContext(epoch=9, epochs=10, step_in_epoch=step_in_epoch)
    run_method(name, model, x, y, seed=3, context=context, **GUIDED_STRONG[name])
    clean_call, attack_call = log.calls[0], log.calls[1]
    assert not clean_call.training and not clean_call.grad_enabled
    assert not attack_call.training and attack_call.input_needs_grad
    train = log.train_inputs()
    torch.testing.assert_close(train[0], x)
    return attack_call.input, train[1], clean_call.input


def reference_step(name: str, start: Tensor, weight: float) -> Tensor:
    """One sign step of eps from `start` on per-example CE + weight * R(clean, f(start)) (eval mode)."""
    model = tiny_model().eval()
    x, y = batch(interior=True)
    with torch.no_grad():
        clean = model(x)
    regulariser = guided.softmax_distance if name == "gat" else guided.nuclear_distance

    def loss(logits: Tensor) -> Tensor:
        losses = F.cross_entropy(logits, y, reduction="none")
        if weight:
            losses = losses + weight * regulariser(clean, logits)
        return losses.sum()

    return project(start + EPS * input_grad(model, start, loss).sign(), x, EPS)


@pytest.mark.parametrize("name", ["gat", "nuat"])
def test_guided_attack_starts_at_a_bernoulli_half_eps_point(name):
    start, _, clean_input = guided_run(name, 1)
    x, _ = batch(interior=True)
    torch.testing.assert_close(clean_input, x)
    offset = (start - x) / (0.5 * EPS)
    torch.testing.assert_close(offset.abs(), torch.ones_like(offset), atol=1e-4, rtol=0)
    assert 0.4 < (offset > 0).float().mean() < 0.6


@pytest.mark.parametrize("name", ["gat", "nuat"])
def test_guided_attack_is_plain_ce_on_even_steps_and_guided_on_odd_steps(name):
    method = methods.build(name, **GUIDED_STRONG[name])
    weight = method.weight(StepContext(epoch=9, epochs=10))
    assert weight == pytest.approx(1000.0 * (4.0 if name == "gat" else 1.0))
    start_even, x_adv_even, _ = guided_run(name, 0)
    start_odd, x_adv_odd, _ = guided_run(name, 1)
    torch.testing.assert_close(start_even, start_odd)  # same generator, same start
    plain = reference_step(name, start_even, 0.0)
    assert torch.equal(x_adv_even, plain)
    assert torch.equal(x_adv_odd, reference_step(name, start_odd, weight))
    assert (x_adv_odd != plain).float().mean() > 0.05  # the guide really changes the step
    _, x_adv_two, _ = guided_run(name, 2)
    assert torch.equal(x_adv_two, plain)


@pytest.mark.parametrize("name", ["gat", "nuat"])
def test_guided_training_loss_is_clean_ce_plus_weighted_regulariser_through_both_sides(name):
    x, y = batch()
    context = StepContext(epoch=5, epochs=10, step_in_epoch=1)
    model = tiny_model().train()
    log = ForwardLog(model)
    method = methods.build(name)
    loss = method(model, x, y, generator=gen(0), context=context)
    loss.backward()
    _, x_adv = log.train_inputs()
    weight = method.weight(context)
    assert weight > 0
    regulariser = guided.softmax_distance if name == "gat" else guided.nuclear_distance

    def reference(detach_clean: bool, detach_adversarial: bool) -> tuple[float, Tensor]:
        net = tiny_model().train()
        clean, adversarial = net(x), net(x_adv)
        total = F.cross_entropy(clean, y) + weight * regulariser(
            clean.detach() if detach_clean else clean, adversarial.detach() if detach_adversarial else adversarial)
        total.backward()
        return total.item(), flat_grads(net)

    value, both = reference(False, False)
    assert loss.item() == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(flat_grads(model), both)
    assert not torch.allclose(both, reference(True, False)[1])
    assert not torch.allclose(both, reference(False, True)[1])


# --------------------------------------------------------------------------- FGSM-PGI


def test_soft_cross_entropy_is_the_formula():
    logits = torch.randn(5, 4, generator=gen(1))
    y = torch.tensor([0, 3, 1, 1, 2])
    s = 0.4
    expected = []
    for row, label in zip(logits.tolist(), y.tolist()):
        log_z = float(np.log(sum(np.exp(v) for v in row)))
        expected.append(-sum(((1 - s) if j == label else s / 3) * (v - log_z) for j, v in enumerate(row)))
    ours = pgi_module.soft_cross_entropy(logits, y, s, reduction="none")
    torch.testing.assert_close(ours, torch.tensor(expected))
    assert pgi_module.soft_cross_entropy(logits, y, s).item() == pytest.approx(float(np.mean(expected)), rel=1e-6)
    torch.testing.assert_close(pgi_module.soft_cross_entropy(logits, y, 0.0), F.cross_entropy(logits, y))


N_TRAIN = 10
INDEX = torch.tensor([7, 2, 5, 0])
OTHERS = torch.tensor([1, 3, 4, 6, 8, 9])


def pgi_method(seed: int = 0, **hyperparameters) -> methods.TrainingMethod:
    method = methods.build("fgsm_pgi", **hyperparameters)
    method.setup(N_TRAIN, (3, 8, 8), torch.device("cpu"), seed)
    return method


def test_fgsm_pgi_updates_only_its_rows_with_the_momentum_rule():
    x, y = batch(n=4, edges=True)
    method = pgi_method()
    model = tiny_model().train()
    context = StepContext(epoch=0, epochs=5, index=INDEX)
    method(model, x, y, generator=gen(0), context=context)  # first visit: fresh corners, then one update
    old_delta, old_momentum = method.state["delta"].clone(), method.state["momentum"].clone()
    assert old_momentum[INDEX].abs().max() > 0  # so the mu * old momentum term below is exercised
    reference = copy.deepcopy(model).eval()
    log = ForwardLog(model)
    method(model, x, y, generator=gen(0), context=context)  # the visit under test
    delta, momentum = method.state["delta"], method.state["momentum"]
    assert torch.equal(delta[OTHERS], old_delta[OTHERS])
    assert torch.equal(momentum[OTHERS], old_momentum[OTHERS])

    x_start = project(x + old_delta[INDEX], x, EPS)
    grad = input_grad(reference, x_start, lambda logits: soft_ce(logits, y, 0.4).mean())
    expected_momentum = grad / grad.abs().sum() + 0.3 * old_momentum[INDEX]  # L1 norm of the whole batch
    torch.testing.assert_close(momentum[INDEX], expected_momentum)
    torch.testing.assert_close(delta[INDEX], project(x_start + EPS * expected_momentum.sign(), x, EPS) - x)
    assert (delta[INDEX] != old_delta[INDEX]).any()
    stored = x + delta[INDEX]
    assert delta.abs().max() <= EPS + 1e-6 and stored.min() >= 0 and stored.max() <= 1

    attack, adversarial, start = log.calls
    assert not attack.training and attack.input_needs_grad
    torch.testing.assert_close(attack.input, x_start)
    torch.testing.assert_close(adversarial.input, project(x_start + EPS * grad.sign(), x, EPS))
    torch.testing.assert_close(start.input, x_start)


def test_fgsm_pgi_memory_resets_to_eps_corners_at_epoch_0_and_every_reset_epochs():
    x, y = batch(n=4, edges=True)

    def visits(seed: int) -> list[tuple[Tensor, Tensor]]:
        method, model = pgi_method(seed, reset=2), tiny_model().train()
        snapshots = []
        for epoch in (0, 1, 2):
            method(model, x, y, generator=gen(0), context=StepContext(epoch=epoch, epochs=6, index=INDEX))
            snapshots.append((method.state["delta"].clone(), method.state["momentum"].clone()))
        return snapshots

    first, again, other_seed = visits(0), visits(0), visits(1)
    corners = torch.full_like(first[0][0][OTHERS], EPS)
    for epoch in (0, 2):  # reset epochs: the rows not visited hold fresh +-eps corners and no momentum
        delta, momentum = first[epoch]
        torch.testing.assert_close(delta[OTHERS].abs(), corners, rtol=0, atol=0)
        assert 0.4 < (delta[OTHERS] > 0).float().mean() < 0.6
        assert (momentum[OTHERS] == 0).all()
        # the visited rows' momentum is the fresh normalised gradient alone (old momentum zeroed): L1 norm 1
        assert momentum[INDEX].abs().sum().item() == pytest.approx(1.0, rel=1e-4)
    assert momentum[INDEX].abs().sum().item() == pytest.approx(1.0, rel=1e-4)
    # epoch 1: no reset; the other rows keep the epoch-0 corners, the visited rows carry momentum
    torch.testing.assert_close(first[1][0][OTHERS], first[0][0][OTHERS], rtol=0, atol=0)
    assert first[1][1][INDEX].abs().sum().item() > 1.01
    assert not torch.equal(first[2][0][OTHERS], first[0][0][OTHERS])  # a new draw each period
    for (delta_a, momentum_a), (delta_b, momentum_b) in zip(first, again):
        assert torch.equal(delta_a, delta_b) and torch.equal(momentum_a, momentum_b)
    assert not torch.equal(first[0][0][OTHERS], other_seed[0][0][OTHERS])


def test_fgsm_pgi_loss_is_soft_ce_plus_prior_term_through_both_forwards():
    x, y = batch(n=8)
    model = tiny_model().train()
    log = ForwardLog(model)
    loss = run_method("fgsm_pgi", model, x, y)
    loss.backward()
    x_adv, x_start = log.train_inputs()
    assert not torch.equal(x_adv, x_start)

    def reference(weight: float = 10.0, detach_adversarial: bool = False, detach_start: bool = False):
        net = tiny_model().train()
        adversarial, start = net(x_adv), net(x_start)
        prior = ((adversarial.detach() if detach_adversarial else adversarial)
                 - (start.detach() if detach_start else start)).pow(2).mean()
        total = soft_ce(adversarial, y, 0.4).mean() + weight * prior
        total.backward()
        return total.item(), flat_grads(net)

    value, both = reference()
    assert loss.item() == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(flat_grads(model), both)
    assert not torch.allclose(both, reference(detach_start=True)[1])
    assert not torch.allclose(both, reference(detach_adversarial=True)[1])
    without = tiny_model().train()
    run_method("fgsm_pgi", without, x, y, pgi_weight=0.0).backward()
    torch.testing.assert_close(flat_grads(without), reference(weight=0.0)[1])
    assert not torch.allclose(flat_grads(without), both)


# --------------------------------------------------------------------------- 6. ELLE and ELLE-A


def elle_points(x: Tensor, eps: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_a, x_b, x_c and t, drawn in that order (x_a, x_b, t) from a generator seeded `seed`."""
    g = gen(seed)
    x_a = project(x + eps * (2 * torch.rand(x.shape, generator=g) - 1), x, eps)
    x_b = project(x + eps * (2 * torch.rand(x.shape, generator=g) - 1), x, eps)
    t = torch.rand(len(x), 1, 1, 1, generator=g)
    return x_a, x_b, (1 - t) * x_a + t * x_b, t.flatten()


def test_linearity_error_is_the_formula_on_the_generator_draws():
    model = tiny_model().eval()
    with torch.no_grad():
        model[4].weight.mul_(10)  # sharper logits: a linearity error far above rounding
    x, y = batch(edges=True)
    eps = 0.3
    ours = elle_module.linearity_error(model, x, y, eps, gen(11))
    x_a, x_b, x_c, t = elle_points(x, eps, 11)
    with torch.no_grad():
        loss_a, loss_b, loss_c = F.cross_entropy(model(torch.cat([x_a, x_b, x_c])), y.repeat(3),
                                                 reduction="none").chunk(3)
    expected = (loss_c - (1 - t) * loss_a - t * loss_b).pow(2).mean()
    torch.testing.assert_close(ours, expected)
    assert ours.item() > 1e-5  # a ReLU network's cross-entropy is not affine on the segment
    assert not torch.allclose(ours, elle_module.linearity_error(model, x, y, eps, gen(12)))


def test_linearity_error_draws_the_global_batch_points_for_a_shard():
    """Within a run the points are drawn for the global batch from context.batch_generator and sliced, so
    the shards of any number of processes together compute the single-process error."""
    model = tiny_model().eval()
    with torch.no_grad():
        model[4].weight.mul_(10)
    x, y = batch(n=8, edges=True)
    eps = 0.3

    def shard(lo: int, hi: int) -> Tensor:
        context = StepContext(shard=(lo, hi, 8), batch_generator=gen(21))
        return elle_module.linearity_error(model, x[lo:hi], y[lo:hi], eps, gen(99), context)

    x_a, x_b, x_c, t = elle_points(x, eps, 21)  # global draws, in order x_a, x_b, t
    lo, hi = 2, 5
    with torch.no_grad():
        losses = F.cross_entropy(model(torch.cat([x_a[lo:hi], x_b[lo:hi], x_c[lo:hi]])), y[lo:hi].repeat(3),
                                 reduction="none")
    loss_a, loss_b, loss_c = losses.chunk(3)
    expected = (loss_c - (1 - t[lo:hi]) * loss_a - t[lo:hi] * loss_b).pow(2).mean()
    torch.testing.assert_close(shard(lo, hi), expected)
    torch.testing.assert_close((shard(0, 4) + shard(4, 8)) / 2, shard(0, 8))


def test_linearity_error_vanishes_when_the_loss_is_constant_in_the_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.linspace(-1, 1, 10))
    x, y = batch()
    assert elle_module.linearity_error(model, x, y, EPS, gen(0)).item() < 1e-10


def test_elle_loss_is_fgsm_ce_plus_1000_times_the_linearity_error():
    x, y = batch(edges=True)
    model = tiny_model().train()
    log = ForwardLog(model)
    stats: dict = {}
    loss = run_method("elle", model, x, y, seed=5, stats=stats)
    reference = tiny_model().eval()
    grad = input_grad(reference, x, lambda logits: F.cross_entropy(logits, y, reduction="sum"))
    x_adv = project(x + EPS * grad.sign(), x, EPS)
    x_a, x_b, x_c, _ = elle_points(x, EPS, 5)  # FGSM from x draws nothing: the regulariser's are the first
    attack, adversarial, points = log.calls
    torch.testing.assert_close(attack.input, x)
    torch.testing.assert_close(adversarial.input, x_adv)
    torch.testing.assert_close(points.input, torch.cat([x_a, x_b, x_c]))
    reference.train()
    expected_ce = F.cross_entropy(reference(x_adv), y)
    expected_error = elle_module.linearity_error(reference, x, y, EPS, gen(5))
    expected = expected_ce + 1000.0 * expected_error
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["linearity_error"].item() == pytest.approx(expected_error.item(), rel=1e-5)
    assert stats["weight"].item() == 1000.0
    loss.backward()
    expected.backward()
    torch.testing.assert_close(flat_grads(model), flat_grads(reference))
    ce_only = tiny_model().train()
    F.cross_entropy(ce_only(x_adv), y).backward()
    assert not torch.allclose(flat_grads(model), flat_grads(ce_only))  # the regulariser reaches the weights


def authors_rule(errors: list[float], maximum: float = 4000.0, sensitivity: float = 2.0,
                 decay: float = 0.99) -> tuple[list[float], float]:
    """The weight after each error (np.mean / np.std over every previous error), and the smallest distance
    of an error from its threshold (so the test can insist that no decision rides on rounding)."""
    weight, history, weights, margin = 0.0, [], [], float("inf")
    for error in errors:
        if len(history) > 2:
            threshold = np.mean(history) + sensitivity * np.std(history)
            margin = min(margin, abs(error - threshold))
            weight = maximum if error > threshold else weight * decay
        else:
            weight *= decay
        history.append(error)
        weights.append(weight)
    return weights, margin


SEQUENCES = {
    "third_error_never_switches": [1.0, 2.0, 100.0, 0.5],
    "fourth_error_switches": [1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0],
    "population_std": [0.0, 0.0, 0.0, 3.0, 3.55, 0.1, 0.2],  # 3.55 passes mean + 2 pop std, not 2 sample std
    "random": np.concatenate([np.random.default_rng(0).lognormal(0, 0.3, 40), [9.0, 1.0, 1.1, 12.0],
                              np.random.default_rng(1).lognormal(0, 0.3, 20)]).tolist(),
}


@pytest.mark.parametrize("sequence", sorted(SEQUENCES))
def test_elle_a_weight_follows_the_authors_rule(sequence):
    errors = SEQUENCES[sequence]
    expected, margin = authors_rule(errors)
    assert margin > 1e-3
    method = methods.build("elle_a")
    method.setup(0, (), torch.device("cpu"))
    assert method.weight() == 0.0
    weights = []
    for error in errors:
        method.observe(torch.tensor(error))
        weights.append(method.weight())
    assert weights == pytest.approx(expected, rel=1e-9, abs=1e-12)
    if sequence == "third_error_never_switches":
        assert max(weights) == 0.0
    elif sequence == "fourth_error_switches":
        assert weights[:3] == [0.0] * 3 and weights[3] == 4000.0
        assert weights[4:] == pytest.approx([4000.0 * 0.99 ** k for k in range(1, 5)])
    elif sequence == "population_std":
        assert weights[4] == 4000.0  # np.std(ddof=1) would have decayed it to 3960
    else:
        assert 4000.0 in weights and 0 < min(w for w in weights[41:]) < 4000.0


def test_elle_a_uses_the_weight_before_the_step_and_observes_each_call_once():
    method = methods.build("elle_a")
    method.setup(0, (), torch.device("cpu"))
    history = [1.0, 1.0, 1.0, 100.0]
    for error in history:
        method.observe(torch.tensor(error))
    assert method.weight() == 4000.0
    x, y = batch()
    stats: dict = {}
    loss = method(tiny_model().train(), x, y, generator=gen(0), stats=stats)
    error = stats["linearity_error"].item()
    assert stats["weight"].item() == 4000.0
    assert loss.item() == pytest.approx(stats["ce"].item() + 4000.0 * error, rel=1e-5)
    assert int(method.state["count"]) == len(history) + 1
    expected, margin = authors_rule([*history, error])
    assert margin > 1e-3
    assert method.weight() == pytest.approx(expected[-1])
    assert method.weight() == pytest.approx(3960.0)


# --------------------------------------------------------------------------- 8. Free-AT


def test_free_at_makes_replay_steps_and_carries_the_perturbation_across_batches():
    replay = 3
    x1, y1 = batch(n=8, edges=True, seed=1)
    x2, y2 = batch(n=8, edges=True, seed=2)
    model = tiny_model().train()
    method = methods.build("free_at", replay=replay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps: list[tuple[dict, Tensor]] = []  # (weights that computed the backward, the perturbation after it)
    real_step = optimizer.step

    def counting_step(*args, **kwargs):
        steps.append(({k: v.clone() for k, v in model.state_dict().items()}, method.state["delta"].clone()))
        return real_step(*args, **kwargs)

    optimizer.step = counting_step
    log = ForwardLog(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    training_step(Parts(model, model, method, optimizer, scaler, gen(0)), x1, y1, Runtime(torch.device("cpu")))
    assert len(steps) == replay
    training_step(Parts(model, model, method, optimizer, scaler, gen(0)), x2, y2, Runtime(torch.device("cpu")))
    assert len(steps) == 2 * replay and len(log.calls) == 2 * replay
    log.handle.remove()

    assert torch.equal(log.calls[0].input, x1)  # the perturbation starts at zero
    old = torch.zeros_like(x1)
    for k, (weights, delta) in enumerate(steps):
        x, y = (x1, y1) if k < replay else (x2, y2)
        torch.testing.assert_close(log.calls[k].input, (x + old).clamp(0, 1))  # carried, also into batch 2
        net = tiny_model().train()
        net.load_state_dict(weights)
        rows = old.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net((x + rows).clamp(0, 1)), y), rows)
        torch.testing.assert_close(delta, (old + EPS * grad.sign()).clamp(-EPS, EPS))
        assert not torch.equal(delta, old)
        old = delta
    assert torch.equal(method.state["delta"], steps[-1][1])
    assert steps[0][1].abs().max().item() == pytest.approx(EPS)
