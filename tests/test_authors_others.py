"""Our single-step and stateful methods' training steps against transcriptions of their authors' released code (the
companion of tests/test_authors.py and tests/test_authors_baselines.py, whose conventions and helpers this file
uses): Fast TRADES, ELLE, ELLE-A, FGSM-PGI, GAT, NuAT and Free-AT. Each side gets an identical copy of the same
small BatchNorm model (`tiny_model()`), the same batch of 8 and the same random draws (ours from the seeded
generator, handed to theirs in place of their own draw); then every input the model sees, the adversarial input,
the loss, every parameter gradient and the BatchNorm buffers are compared to float tolerance. The stateful methods
are run over consecutive steps so their state is exercised: FGSM-PGI's per-example memory (revisits, a reset),
ELLE-A's running statistics of its regulariser (the weight switching on and decaying), GAT's and NuAT's alternation
of guided and plain steps and their epoch schedules (NuAT's ramp), and Free-AT's replays (its carried perturbation
and the optimiser steps between them).

Each transcription names its repository, commit, file, function and lines; it keeps the authors' arithmetic and
drops only `.cuda()`, `Variable`, `zero_gradients` on a fresh leaf (a no-op), the optimiser (their
`opt.zero_grad()` is `model.zero_grad()` where a backward of theirs filled parameter gradients) and their loaders'
normalisation (mean 0, std 1 here, so their limits are 0 and 1: docs/algorithms.md#conventions). Our side is the
method as its paper preset builds it (`paper_method`); their side gets their own defaults as constants (FAST_TRADES,
ELLE, PGI, ...), so a changed option on our side fails the comparison as well as the settings test.

Where docs/algorithms.md documents a difference, the tests compare everything else and assert the difference itself:
- Fast TRADES (#fast_trades): their start is not clamped into the box; their extra eval-mode forward at x_1 (a
  metric) changes nothing.
- ELLE, ELLE-A (#elle): their FGSM forward runs in train mode (undone by `train_mode_attacks`), their extra
  train-mode clean forward (a metric), their points not clamped into the box, their second optimizer.step().
- FGSM-PGI (#fgsm_pgi): their attack forward runs in train mode and is also their regulariser's second branch
  (ours a separate training forward at x_0); their forward at x + d is not clipped into the box.
- GAT, NuAT (#gat, #nuat): their clean target comes from a train-mode forward (undone by
  `train_mode_clean_target`), whose BatchNorm update their eval-mode attack then sees; their training forwards run
  at x_adv then x, ours at x then x_adv, so the running statistics differ even with the clean target in train mode:
  each side's are the replay of its own order.
- Free-AT (#free_at): the TensorFlow code decays the kernels only.
"""

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_checks import ForwardLog, batch, gen, tiny_model
from test_authors_baselines import (
    LOWER_LIMIT,
    UPPER_LIMIT,
    assert_buffers,
    assert_inputs_equal,
    assert_stats_are_replay,
    clamp,
    compare,
    eval_inputs,
    paper_method,
    per_channel,
    train_inputs,
    train_mode_attacks,  # noqa: F401  (a fixture, used by name)
    uniform,
)
from torch import Tensor, nn

from backsmooth import methods
from backsmooth.attacks import engine
from backsmooth.distributed import runtime
from backsmooth.methods import StepContext, fgsm_pgi, guided
from backsmooth.training.setup import Parts
from backsmooth.training.step import training_step

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8  # batch size
EPS = 8 / 255


def assert_scaled(ours: Tensor, theirs: Tensor, rtol: float = 1e-5, msg: str = "") -> None:
    """Equal to float tolerance relative to the tensor's own scale (for values far below the default atol of 1e-5:
    FGSM-PGI's normalised momentum, ELLE's linearity error, about 1e-6, which their MSE and our expression round
    apart by up to 2e-5 of itself)."""
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()), msg=msg or None)


def assert_parameters(ours: nn.Module, theirs: nn.Module, what: str = "") -> None:
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, msg=f"{name} {what}")


def train_step(model: nn.Module, method: methods.TrainingMethod, optimizer: torch.optim.Optimizer, x: Tensor,
               y: Tensor, seed: int = 0) -> Tensor:
    """The trainer's step (backsmooth.training.step.training_step) on CPU in fp32: `method.replays` times the loss,
    zero_grad, backward, `after_backward` and one optimiser step. Returns the last replay's loss."""
    parts = Parts(model, model, method, optimizer, torch.amp.GradScaler("cpu", enabled=False), gen(seed))
    return training_step(parts, x, y, runtime("cpu", "fp32", False))["loss"]


def compare_elle(ours: nn.Module, theirs: nn.Module, our_loss: Tensor, their_loss: Tensor) -> None:
    """`compare` without the buffers, each gradient to 1e-4 of the largest gradient of the model: the linearity error
    is the square of a difference of nearly equal losses (about 1e-3 between losses of about 2.3, E about 1e-6), which
    their MSE and our expression round differently; lambda (1000 to 4000) carries that into the weights' gradients
    (seen: up to 4e-5 of the largest at lambda = 4000, on the first convolution; its bias, before BatchNorm, has a
    zero gradient up to rounding). At lambda = 0 the two sides' gradients are bitwise equal."""
    torch.testing.assert_close(our_loss, their_loss)
    our_loss.backward()
    their_loss.backward()
    scale = max(float(p.grad.abs().max()) for p in theirs.parameters())
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def zero_grads(*models: nn.Module) -> None:
    for model in models:
        model.zero_grad(set_to_none=True)


@pytest.fixture
def train_mode_fgsm_pgi(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train_mode_attacks` for FGSM-PGI, whose module imported `attack_mode` by name."""
    request.getfixturevalue("train_mode_attacks")
    monkeypatch.setattr(fgsm_pgi, "attack_mode", engine.attack_mode)


@pytest.fixture
def train_mode_clean_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """GAT's and NuAT's clean target from a train-mode forward, as their authors' (no gradients: theirs carries some
    into the weights, wiped by their zero_grad before the training backward); the attack itself stays in eval mode,
    as theirs. The documented difference of docs/algorithms.md#gat and #nuat undone, so the rest must be theirs."""

    def train_mode_target(model: nn.Module, x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x)

    monkeypatch.setattr(guided, "predict_eval", train_mode_target)


# --------------------------------------------------------------------------- Fast TRADES (BackwardSmoothing)


def authors_fast_trades_loss(model: nn.Module, x_natural: Tensor, y: Tensor, uniform_draw: Tensor,
                             step_size: float, epsilon: float, perturb_steps: int, beta: float) -> Tensor:
    """jinghuichen/BackwardSmoothing @ 6ad21f8, trades_fast.py, `training_loss`, lines 8-54; `uniform_draw` is their
    torch.FloatTensor(*x_natural.shape).uniform_(-epsilon, epsilon) (lines 24-25); `nn.KLDivLoss(size_average=False)`
    is reduction "sum"; their unused `gamma` and the returned metrics dropped (the metric's forward at x_adv, line 42,
    is kept: eval mode, no effect). Their loop (train_trades_fast.py, `train`, lines 134-154) calls it in train mode
    with --epsilon 0.031, --alpha 0.031, --num-steps 1, --beta 6.0 (lines 33-40)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    batch_size = len(x_natural)
    model.eval()
    x_adv = x_natural.detach() + uniform_draw
    logits_nat = model(x_natural).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_inner = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                           F.softmax(logits_nat, dim=1))
        grad = torch.autograd.grad(loss_inner, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(logits_nat, dim=1)).detach()
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    logits_nat = model(x_natural)
    loss_natural = F.cross_entropy(logits_nat, y)
    loss_robust = beta * (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                           F.softmax(logits_nat, dim=1))
    return loss_natural + loss_robust


# their train_trades_fast.py defaults (lines 33-40), with 8/255 for their 0.031 (as for Backward Smoothing)
FAST_TRADES = {"step_size": EPS, "epsilon": EPS, "perturb_steps": 1, "beta": 6.0}


def test_fast_trades_settings_are_the_authors():
    method = paper_method("fast_trades")
    # their --epsilon and --alpha 0.031 where we take 8/255 (as for Backward Smoothing); one step (no `steps`)
    assert (method.eps, method.alpha, method.beta) == (FAST_TRADES["epsilon"], FAST_TRADES["step_size"], 6.0)
    assert "steps" not in method.hyperparameter_names()


def test_fast_trades_is_the_authors_training_loss():
    """Their `training_loss` with our draw: the start, the point, the loss, the gradients and the BatchNorm buffers
    (x then x_1 in train mode on both sides). Their extra eval forward at x_1 (a metric) changes nothing."""
    method = paper_method("fast_trades")
    x, y = batch(N, interior=True)  # their start is not clamped into the box: see the next test
    for seed in (1, 2, 3):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        our_loss = method(ours, x, y, generator=gen(seed))
        their_loss = authors_fast_trades_loss(theirs, x, y, uniform(x.shape, EPS, seed), **FAST_TRADES)
        target, start = eval_inputs(our_log)
        assert torch.equal(target, x)
        *their_attack, their_metric = eval_inputs(their_log)
        assert_inputs_equal([target, start], their_attack, "clean target and start")
        assert_inputs_equal(train_inputs(our_log), train_inputs(their_log), "x and x_1")
        x_adv = train_inputs(our_log)[1]
        torch.testing.assert_close(their_metric, x_adv)
        assert (x_adv - x).abs().max() > 0.99 * method.eps
        compare(ours, theirs, our_loss, their_loss)


def test_fast_trades_start_is_theirs_clamped_into_the_box():
    """docs/algorithms.md#fast_trades: their x + U(-eps, eps) leaves [0, 1] where x is at its edge; ours is that
    point clamped into the box."""
    method = paper_method("fast_trades")
    x, y = batch(N)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(3))
    authors_fast_trades_loss(theirs, x, y, uniform(x.shape, EPS, 3), **FAST_TRADES)
    our_start, their_start = eval_inputs(our_log)[1], eval_inputs(their_log)[1]
    assert their_start.min() < 0 and their_start.max() > 1
    assert torch.equal(our_start, their_start.clamp(0, 1))


# --------------------------------------------------------------------------- ELLE, ELLE-A (LIONS-EPFL/ELLE)


def authors_elle_fgsm(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, attack_eps: float, attack_step: float,
                      attack_iter: int = 1, input_noise_rate: float = 0.0, clamp_ball: bool = False) -> Tensor:
    """LIONS-EPFL/ELLE @ 0f16c0e, core/utils/train.py, `Trainer.loss`, lines 295-307: the attack, with the scripts'
    (scripts/run_elle_cifar10.sh, run_elle-a_cifar10.sh) --attack-iter 1, --attack-step = --attack-eps and the
    parser's defaults --input_noise_rate 0 and --clamp False (parser.py lines 54, 63). `noise` is their torch.rand
    (line 295), multiplied by 0. It runs the model in the mode it is in: train mode in their loop (line 137)."""
    criterion = nn.CrossEntropyLoss()
    x_adv = copy.deepcopy(x) + input_noise_rate * attack_eps * (2 * noise - 1)
    for _ in range(attack_iter):
        x_adv.requires_grad = True
        outputs = model(x_adv)
        criterion(outputs, y).backward(retain_graph=True)
        grads_input = copy.deepcopy(x_adv.grad)
        x_adv = x_adv + attack_step * torch.sign(grads_input)
        if clamp_ball:
            x_adv = torch.min(torch.max(x_adv, x - attack_eps), x + attack_eps).detach()
        model.zero_grad()
    x_adv.detach()
    return x_adv


def authors_elle_loss(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, ab_draw: Tensor, alpha_draw: Tensor,
                      attack_eps: float, attack_step: float, lin_reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """LIONS-EPFL/ELLE @ 0f16c0e, core/utils/train.py, `Trainer.loss`, lines 288-364 with --reg ELLE (lines
    325-339): the attack above, CE at x_adv, the linearity error, and the metrics' clean forward (line 362, train
    mode). `ab_draw` and `alpha_draw` are their torch.rand(x_ab.shape) (line 327) and torch.rand([bs, 1, 1, 1])
    (line 328). Returns (loss, lin_err, x_adv)."""
    criterion = nn.CrossEntropyLoss()
    bs = x.shape[0]
    model.zero_grad()  # their self.optimizer.zero_grad() (line 294)
    x_adv = authors_elle_fgsm(model, x, y, noise, attack_eps, attack_step)
    out2 = model(x_adv)
    loss = criterion(out2, y)
    x_ab = x.repeat([2, 1, 1, 1])
    x_ab = x_ab + attack_eps * (2 * ab_draw - 1)
    alpha = alpha_draw
    x_c = (1 - alpha) * x_ab[:bs] + alpha * x_ab[bs:]
    alpha = alpha.squeeze()
    criterion_none = torch.nn.CrossEntropyLoss(reduction="none")
    losses = criterion_none(model(torch.cat((x_ab, x_c), dim=0)), y.repeat([3]))
    mse = torch.nn.MSELoss()
    lin_err = mse(losses[2 * bs:], (1 - alpha) * losses[:bs] + alpha * losses[bs:2 * bs])
    loss += lin_reg * lin_err
    model(x).detach()  # preds_clean, for their metrics
    return loss, lin_err, x_adv


class AuthorsOnOff:
    """ELLE-A's weight as their code keeps it: LIONS-EPFL/ELLE @ 0f16c0e, train.py, lines 124-127 (lambda_aux =
    --lin_reg, lin_reg = 0, elle_values = []), and core/utils/train.py, `Trainer.train`, lines 216-227 (after each
    backward, with --sensitivity 2 and --decay_rate 0.99, parser.py lines 76-77)."""

    def __init__(self, lin_reg: float, sensitivity: float = 2.0, decay_rate: float = 0.99) -> None:
        self.elle_values: list[float] = []
        self.lambda_aux, self.lin_reg = lin_reg, 0.0
        self.sensitivity, self.decay_rate = sensitivity, decay_rate

    def update(self, lin_err: float) -> None:
        if (len(self.elle_values) > 2) and (lin_err > np.mean(self.elle_values)
                                            + self.sensitivity * np.std(self.elle_values)):
            self.lin_reg = self.lambda_aux
        else:
            self.lin_reg *= self.decay_rate
        self.elle_values.append(lin_err)


def elle_draws(x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Our step's draws (its FGSM draws nothing): U(0, 1) for x_a, then x_b, then t, handed to their code as their
    torch.rand(x_ab.shape) (x_a's and x_b's rows, in that order) and torch.rand([bs, 1, 1, 1])."""
    g = gen(seed)
    a, b = torch.rand(x.shape, generator=g), torch.rand(x.shape, generator=g)
    return torch.cat([a, b]), torch.rand((len(x), 1, 1, 1), generator=g)


# the scripts' settings at 8/255 (scripts/run_elle_cifar10.sh, run_elle-a_cifar10.sh)
ELLE = {"attack_eps": EPS, "attack_step": EPS}
ELLE_LIN_REG, ELLE_A_LIN_REG = 1000.0, 4000.0


def unused_noise(x: Tensor) -> Tensor:
    return torch.rand(x.shape, generator=gen(99))


def test_elle_settings_are_the_authors():
    elle, elle_a = paper_method("elle"), paper_method("elle_a")
    # run_elle_cifar10.sh at 8/255: --attack-step 8/255 --attack-eps 8/255 --lin_reg 1000 --lambda_schedule constant
    assert (elle.eps, elle.alpha, elle.elle_weight) == (ELLE["attack_eps"], ELLE["attack_step"], ELLE_LIN_REG)
    # run_elle-a_cifar10.sh: --lin_reg 4000 --lambda_schedule onoff, with the parser's --sensitivity and --decay_rate
    authors = AuthorsOnOff(ELLE_A_LIN_REG)
    assert (elle_a.eps, elle_a.alpha) == (ELLE["attack_eps"], ELLE["attack_step"])
    assert (elle_a.elle_weight, elle_a.sensitivity, elle_a.decay) == (authors.lambda_aux, authors.sensitivity,
                                                                       authors.decay_rate)
    assert elle_a.weight() == 0.0 == authors.lin_reg


@pytest.mark.usefixtures("train_mode_attacks")
def test_elle_with_a_train_mode_fgsm_is_the_authors_loss():
    """docs/algorithms.md#elle: with our FGSM forward in train mode, as theirs, the FGSM point, the regulariser's
    points (one forward of 3n), the linearity error, the loss and the gradients are theirs. Their extra train-mode
    clean forward (a metric) is one more BatchNorm update at x: ours, followed by it, are theirs."""
    method = paper_method("elle")
    x, y = batch(N, interior=True)  # their points are not clamped into the box: see the last ELLE test
    for seed in (1, 2):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        stats: dict[str, Tensor] = {}
        our_loss = method(ours, x, y, generator=gen(seed), stats=stats)
        ab, t = elle_draws(x, seed)
        their_loss, lin_err, their_x_adv = authors_elle_loss(theirs, x, y, unused_noise(x), ab, t, **ELLE,
                                                             lin_reg=ELLE_LIN_REG)
        fgsm, x_adv, points = train_inputs(our_log)
        assert torch.equal(fgsm, x) and not eval_inputs(our_log)
        assert_inputs_equal([fgsm, x_adv, points], train_inputs(their_log)[:3], "x, x_adv, the 3n points")
        torch.testing.assert_close(x_adv, their_x_adv.detach())
        assert (x_adv - x).abs().max() > 0.99 * method.eps
        assert_scaled(stats["linearity_error"], lin_err.detach(), rtol=1e-4)
        assert ELLE_LIN_REG * lin_err > 1e-4  # the regulariser is not negligible in the loss
        compare_elle(ours, theirs, our_loss, their_loss)
        assert train_inputs(their_log)[3].equal(x)
        assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (3, 4)
        with torch.no_grad():
            ours(x)
        assert_buffers(ours, theirs)


def test_elle_differs_from_the_authors_by_the_fgsm_mode_alone():
    """docs/algorithms.md#elle: our FGSM forward runs in eval mode, theirs in train mode. Their attack run on the
    model in eval mode is ours; in train mode it moves the point by whole steps and updates the statistics."""
    method = paper_method("elle")
    x, y = batch(N, interior=True)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(1))
    ab, t = elle_draws(x, 1)
    _, _, their_x_adv = authors_elle_loss(theirs, x, y, unused_noise(x), ab, t, **ELLE, lin_reg=ELLE_LIN_REG)
    (fgsm,) = eval_inputs(our_log)
    our_x_adv, points = train_inputs(our_log)
    assert torch.equal(fgsm, x)
    in_eval_mode = authors_elle_fgsm(tiny_model().eval(), x, y, unused_noise(x), **ELLE)
    torch.testing.assert_close(our_x_adv, in_eval_mode.detach())
    assert (our_x_adv - their_x_adv).abs().max() > method.alpha
    torch.testing.assert_close(points, train_inputs(their_log)[2])  # the regulariser's points do not depend on it
    assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (2, 4)
    assert_stats_are_replay(ours, [our_x_adv, points])
    assert_stats_are_replay(theirs, [x, their_x_adv.detach(), points, x])


def test_elle_points_are_theirs_clamped_into_the_box():
    """docs/algorithms.md#elle (and #conventions): their FGSM point and random points are not clamped into [0, 1];
    ours are: x_a and x_b are theirs clamped, x_c the same convex combination of the clamped x_a and x_b."""
    method = paper_method("elle")
    x, y = batch(N)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(1))
    ab, t = elle_draws(x, 1)
    authors_elle_loss(theirs, x, y, unused_noise(x), ab, t, **ELLE, lin_reg=ELLE_LIN_REG)
    _, their_points, _ = train_inputs(their_log)[1:]
    our_points = train_inputs(our_log)[1]
    their_ab = their_points[:2 * N]
    assert their_ab.min() < 0 and their_ab.max() > 1
    torch.testing.assert_close(our_points[:2 * N], their_ab.clamp(0, 1))
    x_a, x_b = their_ab.clamp(0, 1).chunk(2)
    torch.testing.assert_close(our_points[2 * N:], (1 - t) * x_a + t * x_b)
    assert not torch.allclose(our_points[2 * N:], their_points[2 * N:])
    their_x_adv = authors_elle_fgsm(tiny_model().eval(), x, y, unused_noise(x), **ELLE).detach()
    assert their_x_adv.min() < 0 and their_x_adv.max() > 1
    torch.testing.assert_close(train_inputs(our_log)[0], their_x_adv.clamp(0, 1))


@pytest.mark.usefixtures("train_mode_attacks")
def test_elle_a_weight_and_statistics_are_the_authors_over_steps():
    """ELLE-A over eight consecutive steps (new random points each, the same weights: the state is the weight and
    the statistics of the errors): each step's linearity error, the weight it uses, its loss and gradients are
    theirs, and so is the rule after it (count, mean and variance of the errors, the new weight). On these draws no
    rule acts before three errors are known, the fourth error stays below the mean + 2 std of the first three, the
    fifth is above that of the first four (the weight switches on: 4000 from the sixth step) and the weight then
    decays by 0.99 a step."""
    method = paper_method("elle_a")
    authors = AuthorsOnOff(ELLE_A_LIN_REG)
    x, y = batch(N, interior=True)
    ours, theirs = tiny_model().train(), tiny_model().train()
    used = []
    for seed in range(8):
        stats: dict[str, Tensor] = {}
        our_loss = method(ours, x, y, generator=gen(seed), stats=stats)
        ab, t = elle_draws(x, seed)
        their_loss, lin_err, _ = authors_elle_loss(theirs, x, y, unused_noise(x), ab, t, **ELLE,
                                                   lin_reg=authors.lin_reg)
        assert float(stats["weight"]) == pytest.approx(authors.lin_reg, rel=1e-6)
        used.append(authors.lin_reg)
        assert_scaled(stats["linearity_error"], lin_err.detach(), rtol=1e-4)
        compare_elle(ours, theirs, our_loss, their_loss)  # not the buffers: their extra clean forward
        zero_grads(ours, theirs)
        authors.update(lin_err.item())
        assert method.weight() == pytest.approx(authors.lin_reg, rel=1e-12)
        assert int(method.state["count"]) == len(authors.elle_values)
        assert float(method.state["mean"]) == pytest.approx(np.mean(authors.elle_values), rel=1e-4)
        assert float(method.state["m2"]) / len(authors.elle_values) == pytest.approx(np.var(authors.elle_values),
                                                                                     rel=1e-3)
    assert used == pytest.approx([0, 0, 0, 0, 0, 4000, 3960, 3920.4])


def test_elle_a_rule_is_the_authors_at_its_boundaries():
    """ELLE-A's rule (`observe`, after each step) against theirs on a sequence of errors made to sit at its
    boundaries: a jump in the third error is ignored (fewer than three earlier values), the fourth is between mean +
    2 std and mean + 2.5 std of the earlier ones (switches on), the fifth between mean + 1.5 std and mean + 2 std
    (does not), then the weight decays by 0.99 a step."""
    method = paper_method("elle_a")
    method.setup(0, (), torch.device("cpu"))
    authors = AuthorsOnOff(ELLE_A_LIN_REG)
    used = []
    for error in (1.0, 1.0, 9.0, 12.0, 14.0, 2.0, 3.0):
        assert method.weight() == pytest.approx(authors.lin_reg, rel=1e-12)
        used.append(authors.lin_reg)
        method.observe(torch.tensor(error))
        authors.update(error)
    assert used == pytest.approx([0, 0, 0, 0, 4000, 3960, 3920.4])
    assert method.weight() == pytest.approx(authors.lin_reg, rel=1e-12)
    assert float(method.state["mean"]) == pytest.approx(np.mean(authors.elle_values), rel=1e-12)
    assert float(method.state["m2"]) / 7 == pytest.approx(np.var(authors.elle_values), rel=1e-12)


@pytest.mark.usefixtures("train_mode_attacks")
def test_elle_authors_step_the_optimiser_twice():
    """docs/algorithms.md#elle: their loop (core/utils/train.py, `Trainer.train`, lines 210 and 229-237, no
    --clip_grad) calls optimizer.step() twice with the same gradient, scheduler.step() between (the learning rate is
    held here); the trainer's step (backsmooth.training.step) steps once. With our FGSM in train mode (so the
    gradients are theirs, previous tests), their weights are ours stepped a second time with the same gradient (a
    second momentum update included)."""
    method = paper_method("elle")
    x, y = batch(N, interior=True)
    ours, theirs = tiny_model().train(), tiny_model().train()
    # their `init_optimizer` (core/utils/train.py lines 92-93; parser.py: --weight-decay 5e-4, --nesterov False)
    sgd = {"lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}
    our_opt, their_opt = torch.optim.SGD(ours.parameters(), **sgd), torch.optim.SGD(theirs.parameters(), **sgd)
    train_step(ours, method, our_opt, x, y, seed=1)
    ab, t = elle_draws(x, 1)
    their_loss, _, _ = authors_elle_loss(theirs, x, y, unused_noise(x), ab, t, **ELLE, lin_reg=ELLE_LIN_REG)
    their_loss.backward()
    their_opt.step()
    assert_parameters(ours, theirs)  # one step each: equal
    their_opt.step()
    assert any(not torch.allclose(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    our_opt.step()  # the same gradient again, from where the trainer's step left it
    assert_parameters(ours, theirs)


# --------------------------------------------------------------------------- FGSM-PGI (jiaxiaojunQAQ/FGSM-PGI)


def authors_label_smoothing(label: Tensor, factor: float) -> Tensor:
    """jiaxiaojunQAQ/FGSM-PGI @ fc15cfe, FGSM_MEP.py, `_label_smoothing`, lines 47-52, and its use at line 233."""
    one_hot = np.eye(10)[label.numpy()]
    result = one_hot * factor + (one_hot - 1.) * ((factor - 1) / float(10 - 1))
    return torch.tensor(result).float()


def authors_label_smooth_loss(input: Tensor, target: Tensor) -> Tensor:
    """FGSM_MEP.py, `LabelSmoothLoss`, lines 56-59."""
    log_prob = F.log_softmax(input, dim=-1)
    loss = (-target * log_prob).sum(dim=-1).mean()
    return loss


def authors_fgsm_pgi_reset(uniform_draw: Tensor, epsilon: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """FGSM_MEP.py, `main`, lines 187-197 with --delta-init random: `uniform_draw` is their all_delta[:, j, :,
    :].uniform_(-epsilon[j], epsilon[j]) (lines 193-194). Returns (all_delta, all_momentum)."""
    all_delta = torch.zeros_like(uniform_draw)
    all_momentum = torch.zeros_like(uniform_draw)
    all_delta.copy_(uniform_draw)
    all_delta.data = clamp(alpha * torch.sign(all_delta), -epsilon, epsilon)
    return all_delta, all_momentum


def authors_fgsm_pgi_step(model: nn.Module, X: Tensor, y: Tensor, delta: Tensor, momentum: Tensor, epsilon: Tensor,
                          alpha: Tensor, decay: float, factor: float,
                          lamda: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FGSM_MEP.py, `main`, the batch loop, lines 217-220 and 233-277 (`delta`, `next_delta` and `momentum` are the
    batch's rows of all_delta and all_momentum; X is after their crop and flip), with utils.py's `clamp` and limits
    (lines 19-29: mean 0, std 1) and --factor 0.6, --lamda 10, --momentum_decay 0.3, --epsilon 8, --alpha 8 (lines
    29-42). The model is in train mode throughout (line 117). Returns (loss, X + delta_adv, the rows to store as
    all_delta (line 293), the rows to store as all_momentum (line 289))."""
    lower_limit, upper_limit = LOWER_LIMIT, UPPER_LIMIT
    next_delta = delta.clone().detach()
    momentum = momentum.clone().detach()
    delta = delta.clone().detach()
    label_smoothing = authors_label_smoothing(y, factor)
    delta.requires_grad = True
    ori_output = model(X + delta[:X.size(0)])
    ori_loss = authors_label_smooth_loss(ori_output, label_smoothing.float())
    ori_loss.backward(retain_graph=True)
    x_grad = delta.grad.detach()
    grad_norm = torch.norm(x_grad, p=1)
    momentum = x_grad / grad_norm + momentum * decay
    next_delta.data = clamp(delta + alpha * torch.sign(momentum), -epsilon, epsilon)
    next_delta.data[:X.size(0)] = clamp(next_delta[:X.size(0)], lower_limit - X, upper_limit - X)
    delta.data = clamp(delta + alpha * torch.sign(x_grad), -epsilon, epsilon)
    delta.data[:X.size(0)] = clamp(delta[:X.size(0)], lower_limit - X, upper_limit - X)
    delta = delta.detach()
    output = model(X + delta[:X.size(0)])
    loss_fn = torch.nn.MSELoss()
    loss = authors_label_smooth_loss(output, (label_smoothing).float()) + lamda * loss_fn(output.float(),
                                                                                          ori_output.float())
    model.zero_grad()  # their opt.zero_grad() (line 278): the attack's backward filled the parameter gradients
    return loss, X + delta, next_delta, momentum


# FGSM_MEP.py's defaults (lines 29-42): their epsilon and alpha, (args.epsilon / 255.) / std and (args.alpha / 255.)
# / std (lines 98-99) at --epsilon 8, --alpha 8, std 1; --momentum_decay 0.3, --factor 0.6, --lamda 10
PGI = {"epsilon": per_channel(8 / 255.), "alpha": per_channel(8 / 255.), "decay": 0.3, "factor": 0.6, "lamda": 10.0}


def test_fgsm_pgi_settings_are_the_authors():
    method = paper_method("fgsm_pgi")
    # FGSM_MEP.py's defaults: --epsilon 8 --alpha 8 --momentum_decay 0.3 --lamda 10 --epochs_reset 40 --factor 0.6
    assert (method.eps, method.alpha, method.momentum_decay, method.pgi_weight, method.reset) == (EPS, EPS, 0.3, 10.0,
                                                                                                  40)
    assert method.smoothing == pytest.approx(1 - PGI["factor"])
    y = torch.arange(10)
    labels = authors_label_smoothing(y, PGI["factor"])
    ours = F.one_hot(y, 10) * (1 - method.smoothing) + (1 - F.one_hot(y, 10)) * method.smoothing / 9
    torch.testing.assert_close(ours.float(), labels)
    logits = torch.randn(10, 10, generator=gen(0))
    torch.testing.assert_close(fgsm_pgi.soft_cross_entropy(logits, y, method.smoothing),
                               authors_label_smooth_loss(logits, labels))


@pytest.mark.usefixtures("train_mode_fgsm_pgi")
def test_fgsm_pgi_with_train_mode_attacks_is_the_authors_step_over_visits():
    """docs/algorithms.md#fgsm_pgi. With our attack forward in train mode, as theirs, over six steps of a memory of
    12 examples (epoch 0: rows 0-7, then 4-11, half of them revisited; epoch 1: 0-7 shuffled; epoch 40: the reset,
    then 2-9, then 6-11 with 0-1; epoch 41: 0-7), each on a new batch (their memory lives in the augmented frame),
    the weights fixed (the state is the memory): the attack's input x + d, the point, the loss, the gradients and
    the whole memory (d and m of every row) after each step are theirs. Their regulariser's second branch is the
    attack forward; ours is a separate training forward at x_0 (documented), so our BatchNorm statistics saw x_0,
    x_1, x_0 at each step where theirs saw x_0, x_1."""
    method = paper_method("fgsm_pgi")
    rows = 12
    method.setup(rows, (3, 8, 8), torch.device("cpu"), seed=0)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    visits = ((0, 0, list(range(8))), (0, 1, list(range(4, 12))), (1, 0, [5, 2, 7, 0, 3, 6, 1, 4]),
              (40, 0, list(range(2, 10))), (40, 1, [6, 7, 8, 9, 10, 11, 0, 1]), (41, 0, list(range(8))))
    all_delta = all_momentum = None
    interleaved = []
    for visit, (epoch, step, rows_seen) in enumerate(visits):
        index = torch.tensor(rows_seen)
        if epoch % method.reset == 0 and step == 0:  # their reset at the start of epochs 0, 40, 80 (line 187)
            before = method.state["delta"].clone()
            method._reset_if_due(epoch)  # our draw (the step's first act, made here to hand it over: only its
            # signs matter to their code, which draws U(-eps, eps) and keeps alpha * sign)
            all_delta, all_momentum = authors_fgsm_pgi_reset(method.state["delta"].clone(), PGI["epsilon"],
                                                             PGI["alpha"])
            assert torch.equal(method.state["delta"], all_delta) and not method.state["momentum"].any()
            assert not torch.equal(before, all_delta)
            assert set(all_delta.unique().tolist()) == {-PGI["epsilon"][0, 0, 0].item(), PGI["epsilon"][0, 0, 0].item()}
            assert 0.45 < (all_delta > 0).float().mean() < 0.55  # fair signs
        x, y = batch(N, interior=True, seed=visit)  # their x + d is not clipped into the box: see the last test
        our_loss = method(ours, x, y, generator=gen(0), context=StepContext(epoch, 110, step, index))
        their_loss, their_x_adv, next_delta, momentum = authors_fgsm_pgi_step(theirs, x, y, all_delta[index],
                                                                              all_momentum[index], **PGI)
        all_momentum[index] = momentum
        all_delta[index] = next_delta
        our_start, our_x_adv, our_branch = train_inputs(our_log)[-3:]
        their_start, their_point = train_inputs(their_log)[-2:]
        torch.testing.assert_close(our_start, their_start)
        torch.testing.assert_close(our_x_adv, their_x_adv)
        torch.testing.assert_close(their_point, their_x_adv)
        assert torch.equal(our_branch, our_start)
        assert (our_x_adv - our_start).abs().max() > 0.99 * method.alpha
        interleaved += [our_start, our_x_adv, our_start]
        compare(ours, theirs, our_loss, their_loss, buffers=False)
        zero_grads(ours, theirs)
        torch.testing.assert_close(method.state["delta"], all_delta, msg=f"memory d after visit {visit}")
        assert_scaled(method.state["momentum"], all_momentum, msg=f"memory m after visit {visit}")
        assert (all_momentum[index] != 0).any()
    assert_inputs_equal(train_inputs(our_log), interleaved, "x_0, x_1, x_0 at each step")
    assert_inputs_equal([seen for k, seen in enumerate(interleaved) if k % 3 != 2], train_inputs(their_log),
                        "their x_0, x_1 at each step")
    assert_stats_are_replay(ours, train_inputs(our_log))
    assert_stats_are_replay(theirs, train_inputs(their_log))


def test_fgsm_pgi_differs_from_the_authors_by_the_attack_mode_alone():
    """docs/algorithms.md#fgsm_pgi: our attack forward runs in eval mode. From the same memory their step run on
    the model in eval mode gives our point and our new memory; in train mode (theirs) the point moves by whole
    steps. Our loss is their loss's formula at our points from train-mode forwards; the statistics saw x_1 then x_0
    here, x_0 then x_1 there."""
    method = paper_method("fgsm_pgi")
    method.setup(N, (3, 8, 8), torch.device("cpu"), seed=0)
    method._reset_if_due(0)
    delta, momentum = method.state["delta"].clone(), method.state["momentum"].clone()
    x, y = batch(N, interior=True)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    our_loss = method(ours, x, y, generator=gen(0), context=StepContext(0, 110, 0, torch.arange(N)))
    _, their_x_adv, _, _ = authors_fgsm_pgi_step(theirs, x, y, delta, momentum, **PGI)
    their_start = train_inputs(their_log)[0]
    in_eval = authors_fgsm_pgi_step(tiny_model().eval(), x, y, delta, momentum, **PGI)
    (our_start,) = eval_inputs(our_log)
    our_x_adv, our_branch = train_inputs(our_log)
    torch.testing.assert_close(our_start, their_start)
    torch.testing.assert_close(our_x_adv, in_eval[1])
    torch.testing.assert_close(method.state["delta"], in_eval[2])
    assert_scaled(method.state["momentum"], in_eval[3])
    assert (our_x_adv - their_x_adv).abs().max() > method.alpha
    fresh, labels = tiny_model().train(), authors_label_smoothing(y, PGI["factor"])
    adversarial, start = fresh(our_x_adv), fresh(our_branch)
    torch.testing.assert_close(our_loss, authors_label_smooth_loss(adversarial, labels)
                               + PGI["lamda"] * F.mse_loss(adversarial, start))
    assert_stats_are_replay(ours, [our_x_adv, our_start])
    assert_stats_are_replay(theirs, [their_start, their_x_adv])


def test_fgsm_pgi_start_is_theirs_clipped_into_the_box():
    """docs/algorithms.md#fgsm_pgi: their forward at x + d is not clipped into [0, 1] (after a new crop the memory
    can push pixels out); ours is that point clipped."""
    method = paper_method("fgsm_pgi")
    method.setup(N, (3, 8, 8), torch.device("cpu"), seed=0)
    method._reset_if_due(0)
    delta, momentum = method.state["delta"].clone(), method.state["momentum"].clone()
    x, y = batch(N)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(0), context=StepContext(0, 110, 0, torch.arange(N)))
    authors_fgsm_pgi_step(theirs, x, y, delta, momentum, **PGI)
    their_start = train_inputs(their_log)[0]
    assert their_start.min() < 0 and their_start.max() > 1
    torch.testing.assert_close(eval_inputs(our_log)[0], their_start.clamp(0, 1))


# --------------------------------------------------------------------------- GAT and NuAT (val-iisc)


def authors_guided_attack(model: nn.Module, loss: nn.Module, image: Tensor, target: Tensor, eps: float = 8 / 255,
                          bounds: tuple[float, float] = (0, 1), steps: int = 1, P_out: Tensor | None = None,
                          l2_reg: float = 10, alt: int = 1) -> Tensor:
    """val-iisc/GAMA-GAT @ 6b69e89, CIFAR10/GAT_cifar10.py, `Guided_Attack`, lines 90-104."""
    tar = target
    img = image
    eps = eps / steps
    for _ in range(steps):
        img = img.detach().requires_grad_(True)
        out = model(img)
        R_out = nn.Softmax(dim=1)(out)
        cost = loss(out, tar) + alt * l2_reg * (((P_out - R_out)**2.0).sum(1)).mean(0)
        cost.backward()
        per = eps * torch.sign(img.grad.data)
        adv = img.data + per
        img = torch.clamp(adv, bounds[0], bounds[1])
    return img


def authors_nuc_attack(model: nn.Module, loss: nn.Module, image: Tensor, target: Tensor, eps: float = 8 / 255,
                       bounds: tuple[float, float] = (0, 1), steps: int = 1, out: Tensor | None = None,
                       Nuc_reg: float = 4, alt: int = 1, TRAIN_BATCH_SIZE: int = 64) -> Tensor:
    """val-iisc/NuAT @ 8962290, CIFAR10/NuAT_cifar10.py, `NucAttack`, lines 102-119 (TRAIN_BATCH_SIZE: their
    global, 64, the batch size)."""
    tar = target
    img = image
    eps = eps / steps
    for _ in range(steps):
        img = img.detach().requires_grad_(True)
        rout = model(img)
        if alt:
            cost = loss(rout, tar) + Nuc_reg * torch.norm(out - rout, "nuc") / TRAIN_BATCH_SIZE
        else:
            cost = loss(rout, tar)
        cost.backward()
        per = eps * torch.sign(img.grad.data)
        adv = img.data + per
        img = torch.clamp(adv, bounds[0], bounds[1])
    return img


def authors_gat_point(model: nn.Module, data: Tensor, target: Tensor, rand_draw: Tensor, clean: Tensor,
                      l2_reg: float, counter: int, B_val: float = 4.0, Feps: float = 8.0) -> Tensor:
    """GAT_cifar10.py, the batch loop, lines 189-200 (`clean` is their `out`, line 188; `rand_draw` their
    torch.rand_like(data), line 191), with the defaults -B_val 4, -Feps 8 (lines 47-48)."""
    loss = nn.CrossEntropyLoss()
    P_out = nn.Softmax(dim=1)(clean)
    adv_data = data + ((B_val / 255.0) * torch.sign(torch.tensor([0.5]) - rand_draw))
    adv_data = torch.clamp(adv_data, 0.0, 1.0)
    model.eval()
    adv_data = authors_guided_attack(model, loss, adv_data, target, eps=Feps / 255.0, steps=1, P_out=P_out,
                                     l2_reg=l2_reg, alt=(counter % 2))
    delta = adv_data - data
    delta = torch.clamp(delta, -8.0 / 255.0, 8.0 / 255)
    adv_data = data + delta
    adv_data = torch.clamp(adv_data, 0.0, 1.0)
    return adv_data


def authors_gat_loss(model: nn.Module, data: Tensor, target: Tensor, adv_data: Tensor, l2_reg: float,
                     l_ce: float = 1.0) -> Tensor:
    """GAT_cifar10.py, the batch loop, lines 202-216 (model.zero_grad() is their optimizer.zero_grad())."""
    loss = nn.CrossEntropyLoss()
    model.train()
    model.zero_grad()
    adv_out = model(adv_data)
    out = model(data)
    Q_out = nn.Softmax(dim=1)(adv_out)
    P_out = nn.Softmax(dim=1)(out)
    closs = loss(out, target)
    reg_loss = ((P_out - Q_out)**2.0).sum(1).mean(0)
    cost = l_ce * closs + l2_reg * reg_loss
    return cost


def authors_nuat_point(model: nn.Module, data: Tensor, target: Tensor, rand_draw: Tensor, clean: Tensor,
                       Nuc_reg: float, counter: int, B_val: float = 4.0, Feps: float = 8.0) -> Tensor:
    """NuAT_cifar10.py, the batch loop, lines 210-220 (`clean` is their `out`, line 208; `rand_draw` their
    torch.rand_like(data), line 210), with the defaults -B_val 4, -Feps 8 (lines 38-39); their TRAIN_BATCH_SIZE is
    the batch size (documented: 64 there, the actual batch here)."""
    loss = nn.CrossEntropyLoss()
    adv_data = data + ((B_val / 255.0) * torch.sign(torch.tensor([0.5]) - rand_draw))
    adv_data = torch.clamp(adv_data, 0.0, 1.0)
    model.eval()
    adv_data = authors_nuc_attack(model, loss, adv_data, target, eps=Feps / 255.0, steps=1, out=clean,
                                  Nuc_reg=Nuc_reg, alt=(counter % 2), TRAIN_BATCH_SIZE=len(data))
    delta = adv_data - data
    delta = torch.clamp(delta, -8.0 / 255.0, 8.0 / 255)
    adv_data = data + delta
    adv_data = torch.clamp(adv_data, 0.0, 1.0)
    return adv_data


def authors_nuat_loss(model: nn.Module, data: Tensor, target: Tensor, adv_data: Tensor, Nuc_reg: float,
                      l_ce: float = 1.0) -> Tensor:
    """NuAT_cifar10.py, the batch loop, lines 222-233 (model.zero_grad() is their optimizer.zero_grad())."""
    loss = nn.CrossEntropyLoss()
    model.train()
    model.zero_grad()
    adv_out = model(adv_data)
    out = model(data)
    closs = loss(out, target)
    reg_loss = torch.norm(out - adv_out, "nuc") / len(data)
    cost = l_ce * closs + Nuc_reg * reg_loss
    return cost


def authors_gat_weights(epochs: int = 100, l2_reg: float = 10.0, mul: float = 4.0) -> list[float]:
    """GAT_cifar10.py: l2_reg during each epoch; lines 44-45 (defaults), 249-254 (after epoch 85: l2_reg * mul)."""
    weights = []
    for epoch in range(epochs):
        weights.append(l2_reg)
        if epoch == 85:
            l2_reg = l2_reg * mul
    return weights


def authors_nuat_weights(epochs: int = 100, Nuc_max: float = 4.5) -> list[float]:
    """NuAT_cifar10.py: Nuc_reg during each epoch; lines 36, 197 (Nuc_reg = 0.0 before training), 274-275 (after
    each epoch below epochs - 10: += Nuc_max / (epochs - 10))."""
    Nuc_reg, weights = 0.0, []
    for epoch in range(epochs):
        weights.append(Nuc_reg)
        if epoch < (epochs - 10):
            Nuc_reg += Nuc_max / (epochs - 10)
    return weights


def authors_guided_step(name: str, model: nn.Module, data: Tensor, target: Tensor, rand_draw: Tensor, weight: float,
                        counter: int) -> tuple[Tensor, Tensor]:
    """Their batch loop body: the clean train-mode forward (GAT line 188, NuAT line 208), the point, the loss.
    Returns (loss, adv_data)."""
    point, loss = (authors_gat_point, authors_gat_loss) if name == "gat" else (authors_nuat_point, authors_nuat_loss)
    out = model(data)
    adv_data = point(model, data, target, rand_draw, out, weight, counter)
    return loss(model, data, target, adv_data, weight), adv_data


GUIDED: dict[str, Callable[[], list[float]]] = {"gat": authors_gat_weights, "nuat": authors_nuat_weights}


def guided_batch() -> tuple[Tensor, Tensor]:
    """A batch with pixels at both edges of the box, so their clamps act."""
    x, y = batch(N)
    x[:, 0, :2] = 0.0
    x[:, 1, :2] = 1.0
    return x, y


def test_guided_settings_and_weight_schedules_are_the_authors():
    """GAT: l2_reg 10, times mul 4 after epoch 85 (epochs 86-99 of 100); NuAT: Nuc_reg from 0 up by 4.5/90 after
    each of the first 90 epochs. Both: the start -B_val 4 (/255) = eps/2, the step -Feps 8 = eps."""
    for name, schedule in GUIDED.items():
        method = paper_method(name)
        assert (method.eps, method.start * method.eps) == (EPS, 4 / 255)
        weights = schedule()
        ours = [method.weight(StepContext(epoch, 100)) for epoch in range(100)]
        assert ours == pytest.approx(weights, rel=1e-12, abs=1e-12), name
    assert authors_nuat_weights()[:3] == pytest.approx([0, 0.05, 0.1]) and authors_gat_weights()[85:87] == [10, 40]


@pytest.mark.parametrize("name", GUIDED)
@pytest.mark.usefixtures("train_mode_clean_target")
def test_guided_with_a_train_mode_target_is_the_authors_step(name):
    """docs/algorithms.md#gat, #nuat: with our clean target from a train-mode forward, as theirs, over consecutive
    steps (the plain step 0 and the guided step 1 of an epoch, at a mid-training and a late epoch): the start, the
    point, the loss and the gradients are theirs. Their training forwards run at x_adv then x, ours at x then x_adv,
    so the BatchNorm statistics differ (documented): each side's are the replay of its own order."""
    method = paper_method(name)
    schedule = GUIDED[name]
    x, y = guided_batch()
    for epoch in (30, 95):
        for step in (0, 1):
            seed = 10 * epoch + step
            ours, theirs = tiny_model().train(), tiny_model().train()
            our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
            our_loss = method(ours, x, y, generator=gen(seed), context=StepContext(epoch, 100, step))
            their_loss, their_x_adv = authors_guided_step(name, theirs, x, y, torch.rand(x.shape, generator=gen(seed)),
                                                          schedule()[epoch], step)
            assert_inputs_equal(eval_inputs(our_log), eval_inputs(their_log), "the start")
            target, clean, x_adv = train_inputs(our_log)
            assert torch.equal(target, x) and torch.equal(clean, x)
            torch.testing.assert_close(x_adv, their_x_adv)
            assert (x_adv - x).abs().max() > 0.99 * method.eps
            compare(ours, theirs, our_loss, their_loss, buffers=False)
            assert_inputs_equal(train_inputs(their_log), [x, x_adv, x], "their target, x_adv, x")
            assert_stats_are_replay(ours, [x, x, x_adv])
            assert_stats_are_replay(theirs, [x, x_adv, x])



@pytest.mark.parametrize("name", GUIDED)
def test_guided_differs_from_the_authors_by_the_clean_target_alone(name):
    """docs/algorithms.md#gat, #nuat: our clean target comes from an eval-mode forward, theirs from a train-mode one,
    which also updates the BatchNorm statistics that their eval-mode attack then uses. Their point computation run
    on a model that did not see that update, with our eval-mode target, is ours, on a plain (even) step as on a
    guided (odd) one; their own point differs by whole steps in some coordinates, on both."""
    method = paper_method(name)
    schedule = GUIDED[name]
    point = authors_gat_point if name == "gat" else authors_nuat_point
    x, y = guided_batch()
    for step in (0, 1):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        method(ours, x, y, generator=gen(step), context=StepContext(95, 100, step))
        draw = torch.rand(x.shape, generator=gen(step))
        _, their_x_adv = authors_guided_step(name, theirs, x, y, draw, schedule()[95], step)
        target, start = eval_inputs(our_log)
        assert torch.equal(target, x)
        assert_inputs_equal([start], eval_inputs(their_log), "the start")
        our_x_adv = train_inputs(our_log)[1]
        with torch.no_grad():
            eval_target = tiny_model().eval()(x)
        torch.testing.assert_close(our_x_adv, point(tiny_model().eval(), x, y, draw, eval_target, schedule()[95],
                                                    step))
        assert (our_x_adv - their_x_adv).abs().max() > method.eps
        assert_stats_are_replay(ours, [x, our_x_adv])
        assert_stats_are_replay(theirs, [x, their_x_adv, x])


# --------------------------------------------------------------------------- Free-AT


def authors_free_replay(model: nn.Module, input: Tensor, target: Tensor, global_noise_data: Tensor,
                        optimizer: torch.optim.Optimizer, fgsm_step: float, clip_eps: float) -> Tensor:
    """mahyarnajibi/FreeAdversarialTraining @ e185c84, main_free.py, `train`, one replay j of the batch, lines
    181-202, with lib/utils.py's `fgsm` (lines 36-37: step_size * sign); their normalisation (line 184) at mean 0,
    std 1. `global_noise_data` (line 159: zeros of the batch's shape, once) is updated in place. The CIFAR-10 code
    (ashafahi/free_adv_train, TensorFlow) makes the same step (free_train.py lines 51-64) with fgsm_step = clip_eps
    = --epsilon. Returns the replay's loss."""
    criterion = nn.CrossEntropyLoss()
    noise_batch = global_noise_data[0:input.size(0)].detach().requires_grad_(True)
    in1 = input + noise_batch
    in1.clamp_(0, 1.0)
    output = model(in1)
    loss = criterion(output, target)
    optimizer.zero_grad()
    loss.backward()
    pert = fgsm_step * torch.sign(noise_batch.grad)
    global_noise_data[0:input.size(0)] += pert.data
    global_noise_data.clamp_(-clip_eps, clip_eps)
    optimizer.step()
    return loss


# ashafahi/free_adv_train config.py: --replay_m 8, --epsilon 8 (the step on d and its clip, free_train.py lines 56-58)
FREE_M, FREE_EPS = 8, EPS


def test_free_at_settings_are_the_authors():
    method = paper_method("free_at")
    # config.py: --epsilon 8, --replay_m 8, --weight_decay 0.0002; the step on d is epsilon (free_train.py line 57)
    assert (method.eps, method.replay, method.replays) == (FREE_EPS, FREE_M, FREE_M)
    from backsmooth.presets import preset
    assert preset("cifar10-resnet18-free_at")["weight_decay"] == 2e-4


def test_free_at_is_the_authors_free_training_over_batches_and_replays():
    """Three batches (the last one smaller, which uses the first rows of the carried perturbation) of m = 8 replays
    each, with the same SGD on both sides (their main_free.py decays every parameter, as ours): every replay's
    input clip(x + d, 0, 1), the last replay's loss, the carried perturbation, the weights and the BatchNorm
    buffers after each batch are theirs."""
    method = paper_method("free_at")
    batches = [batch(N, seed=0), batch(N, seed=1), tuple(t[:5] for t in batch(N, seed=2))]
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4}
    our_opt, their_opt = torch.optim.SGD(ours.parameters(), **sgd), torch.optim.SGD(theirs.parameters(), **sgd)
    global_noise_data = torch.zeros(N, 3, 8, 8)
    for k, (x, y) in enumerate(batches):
        our_loss = train_step(ours, method, our_opt, x, y)
        for _ in range(FREE_M):
            their_loss = authors_free_replay(theirs, x, y, global_noise_data, their_opt, FREE_EPS, FREE_EPS)
        torch.testing.assert_close(our_loss, their_loss.detach(), msg=f"batch {k}")
        assert_inputs_equal(train_inputs(our_log), train_inputs(their_log), f"replays up to batch {k}")
        torch.testing.assert_close(method.state["delta"], global_noise_data, msg=f"perturbation after batch {k}")
        assert_parameters(ours, theirs, f"after batch {k}")
        assert_buffers(ours, theirs)
    assert len(train_inputs(our_log)) == 3 * FREE_M
    assert (global_noise_data.abs() == FREE_EPS).float().mean() > 0.5  # the perturbation is carried and grows
    assert ours[1].num_batches_tracked == 3 * FREE_M


def test_free_at_differs_from_the_tensorflow_code_by_the_kernels_only_decay():
    """docs/algorithms.md#free_at: ashafahi/free_adv_train @ c42cac2 decays the kernels only (free_train.py line 51:
    total_loss = mean_xent + weight_decay * weight_decay_loss, free_model.py lines 151-157: the l2_loss, sum w^2 / 2,
    of the variables named DW: convolution and linear kernels; tf.train.MomentumOptimizer is SGD with momentum). After
    one replay from the same weights the kernels and the perturbation are ours; every other parameter (BatchNorm's
    scale and shift, the biases) is ours plus lr * weight_decay * its value."""
    method = paper_method("free_at")
    lr, wd = 0.1, 2e-4
    x, y = batch(N)
    ours, theirs = tiny_model().train(), tiny_model().train()
    before = copy.deepcopy(theirs)
    once = methods.build("free_at", eps=method.eps, replay=1)  # one replay: one optimiser step
    our_opt = torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    train_step(ours, once, our_opt, x, y)
    # their replay: free_model.py lines 47-51 (the perturbation variable, clip into the box), free_train.py 51-64
    pert = torch.zeros(N, 3, 8, 8, requires_grad=True)
    final_input = torch.clamp(x + pert, 0.0, 1.0)
    mean_xent = F.cross_entropy(theirs(final_input), y)
    kernels = [p for name, p in theirs.named_parameters() if name.endswith("weight") and p.dim() > 1]
    weight_decay_loss = sum((p**2).sum() / 2 for p in kernels)
    total_loss = mean_xent + wd * weight_decay_loss
    their_opt = torch.optim.SGD(theirs.parameters(), lr=lr, momentum=0.9)
    their_opt.zero_grad()
    total_loss.backward()
    new_pert = torch.clamp(pert + FREE_EPS * torch.sign(pert.grad), -FREE_EPS, FREE_EPS)
    their_opt.step()
    torch.testing.assert_close(once.state["delta"], new_pert.detach())
    assert {name for name, p in theirs.named_parameters() if p.dim() > 1} == {"0.weight", "4.weight"}
    decayed_apart = []
    with torch.no_grad():
        for (name, a), (_, b), (_, start) in zip(ours.named_parameters(), theirs.named_parameters(),
                                                 before.named_parameters()):
            decay = torch.zeros_like(b) if b.dim() > 1 else lr * wd * start  # up to 2e-5: below the default atol
            torch.testing.assert_close(a - b, -decay, rtol=0, atol=2.5e-7 * float(b.abs().max()), msg=name)  # 2 ulp
            decayed_apart.append(float(decay.abs().max()))
    assert sorted(decayed_apart)[-1] > 1e-5  # BatchNorm's scale (about 1): apart by 2e-5

