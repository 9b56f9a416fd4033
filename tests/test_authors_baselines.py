"""Our baselines' training steps against transcriptions of their authors' released code (the companion of
tests/test_authors.py, which does this for MART, AWP and LIET): TRADES, Backward Smoothing, PGD-AT (Madry et al.),
FGSM-RS (Fast AT), N-FGSM and GradAlign. Each side gets an identical copy of the same small BatchNorm model
(`tiny_model()`), the same batch of 8 and the same random draw (ours from the seeded generator, handed to theirs in
place of their own draw); then every input the model sees (start, attack points, adversarial input), the loss, every
parameter gradient and the BatchNorm buffers are compared to float tolerance.

Each transcription names its repository, commit, file, function and lines; it keeps the authors' arithmetic and
drops only `.cuda()`, `Variable`, apex's loss scaling (fp32 here), the optimiser (their `opt.zero_grad()` is
`model.zero_grad()` where a backward of theirs filled parameter gradients) and their loaders' normalisation (mean 0,
std 1 here, so their limits are 0 and 1: docs/algorithms.md#conventions). Our side is the method as its paper
preset builds it (`cifar10-ARCH-METHOD`, the trainer's path), and the tests check that the preset's options are the
authors' defaults.

Where docs/algorithms.md documents a difference, the tests compare everything else and assert the difference itself:
- TRADES (#trades): their third clean train-mode forward (running statistics = ours plus one update on x); their
  start is not clamped into the box; and, from the KL's softmax target against our log-space one, rounding that can
  flip the sign of a near-zero gradient component in the first attack step (from x + 0.001 N(0, I)), compared step
  by step.
- Backward Smoothing (#backward_smoothing): their separate clean-target forward (one eval forward more); all else
  equal, BatchNorm buffers included.
- PGD-AT, FGSM-RS, N-FGSM (#pgd_at, #fgsm_rs, #n_fgsm): their attack forwards run in train mode. With our attacks
  switched to train mode (`train_mode_attacks`) everything, BatchNorm statistics included, is theirs; in our eval
  mode the point moves and only the training forward updates the statistics.
- GradAlign (#gradalign): the same, plus their detached g_1 (the FGSM step's gradient, reused): ours = theirs + the
  gradient through g_1, computed separately; and the order of the train-mode forwards (x_1, x, eta here; x, x_1, eta
  there)."""

import contextlib
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from method_checks import ForwardLog, batch, gen, tiny_model
from torch import Tensor, nn

from backsmooth import methods
from backsmooth.attacks import engine
from backsmooth.config import from_mapping
from backsmooth.presets import preset

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8  # batch size


def paper_method(name: str) -> methods.TrainingMethod:
    """Our method as `backsmooth train --preset cifar10-ARCH-NAME` builds it (ARCH: the paper's own, else ResNet-18)."""
    arch = methods.method_class(name).paper_arch or "resnet18"
    config = from_mapping(preset(f"cifar10-{arch}-{name}"))
    return methods.build(config.method, **config.method_hyperparameters())


def uniform(shape: Sequence[int], a: float, seed: int) -> Tensor:
    """U(-a, a) as our engine draws it from a generator seeded `seed` (`(2 * rand - 1) * a`): handed to the authors'
    code in place of their `uniform_(-a, a)`."""
    return (2 * torch.rand(tuple(shape), generator=gen(seed)) - 1) * a


def train_inputs(log: ForwardLog) -> list[Tensor]:
    """The inputs of the train-mode forwards, in order: what BatchNorm's running statistics saw."""
    return [seen for training, _, seen in log.calls if training]


def eval_inputs(log: ForwardLog) -> list[Tensor]:
    return [seen for training, _, seen in log.calls if not training]


def assert_inputs_equal(ours: Sequence[Tensor], theirs: Sequence[Tensor], what: str) -> None:
    assert len(ours) == len(theirs), f"{what}: {len(ours)} forwards here, {len(theirs)} there"
    for k, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, msg=f"{what}: forward {k}")


def assert_stats_are_replay(model: nn.Module, inputs: Sequence[Tensor]) -> None:
    """The model's BatchNorm buffers are those of a fresh copy that ran exactly `inputs`, in order, in train mode."""
    replay = tiny_model().train()
    with torch.no_grad():
        for seen in inputs:
            replay(seen)
    assert_buffers(model, replay)


def assert_buffers(ours: nn.Module, theirs: nn.Module) -> None:
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


def assert_gradients(ours: nn.Module, theirs: nn.Module, extra: nn.Module | None = None) -> None:
    """Every parameter gradient equal (ours = theirs + extra's, where `extra` holds a documented extra term)."""
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        expected = b.grad if extra is None else b.grad + dict(extra.named_parameters())[name].grad
        torch.testing.assert_close(a.grad, expected, msg=name)


def compare(ours: nn.Module, theirs: nn.Module, our_loss: Tensor, their_loss: Tensor, buffers: bool = True) -> None:
    """Loss, every parameter gradient and (unless told) every BatchNorm buffer equal to float tolerance."""
    torch.testing.assert_close(our_loss, their_loss)
    assert all(p.grad is None for p in (*ours.parameters(), *theirs.parameters())), "gradients before the backward"
    our_loss.backward()
    their_loss.backward()
    assert_gradients(ours, theirs)
    if buffers:
        assert_buffers(ours, theirs)


@pytest.fixture
def train_mode_attacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our attacks with the model left in the mode it was in (train, in a step), parameter gradients still off: the
    documented difference of Madry et al., Fast AT, N-FGSM and GradAlign undone, so the rest must be theirs."""
    real = engine.attack_mode

    @contextlib.contextmanager
    def keep_mode(model: nn.Module) -> Iterator[nn.Module]:
        training = model.training
        with real(model) as net:
            net.train(training)
            yield net

    monkeypatch.setattr(engine, "attack_mode", keep_mode)


# --------------------------------------------------------------------------- TRADES (yaodongyu/TRADES)


def authors_trades_attack_step(model: nn.Module, x_adv: Tensor, x_natural: Tensor, step_size: float,
                               epsilon: float) -> Tensor:
    """yaodongyu/TRADES @ 6e8e11b, trades.py, `trades_loss`, lines 34-41: one step of the 'l_inf' attack (the model
    in eval mode, line 28); `nn.KLDivLoss(size_average=False)` (line 27) is reduction "sum"."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    x_adv.requires_grad_()
    with torch.enable_grad():
        loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
    grad = torch.autograd.grad(loss_kl, [x_adv])[0]
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def authors_trades_robust_loss(model: nn.Module, x_natural: Tensor, x_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """yaodongyu/TRADES @ 6e8e11b, trades.py, `trades_loss`, lines 73-84: the loss, in train mode."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    batch_size = len(x_natural)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust


def authors_trades_loss(model: nn.Module, x_natural: Tensor, y: Tensor, noise: Tensor, step_size: float,
                        epsilon: float, perturb_steps: int, beta: float) -> Tensor:
    """yaodongyu/TRADES @ 6e8e11b, trades.py, `trades_loss`, lines 17-84 with distance 'l_inf' (the two functions
    above are its loop body and its last lines); `noise` is their torch.randn(x_natural.shape) (line 31). Their loop
    (train_trades_cifar10.py, `train`, lines 73-90) calls it with the model in train mode."""
    model.eval()
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(perturb_steps):
        x_adv = authors_trades_attack_step(model, x_adv, x_natural, step_size, epsilon)
    return authors_trades_robust_loss(model, x_natural, x_adv, y, beta)


def kl_attack_gradient(x_k: Tensor, x: Tensor) -> Tensor:
    """Our attack's gradient at x_k: grad KL(s(f_eval(x)) || s(f_eval(x_k))), summed over the batch."""
    from backsmooth.attacks import kl_loss
    model = tiny_model().eval()
    with torch.no_grad():
        target = F.log_softmax(model(x), dim=1)
    x_k = x_k.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kl_loss(model(x_k), target).sum(), x_k)
    return grad


def test_trades_settings_are_the_authors():
    method = paper_method("trades")
    # their train_trades_cifar10.py defaults (lines 30-37): --num-steps 10, --step-size 0.007, --beta 6.0, and
    # --epsilon 0.031 where we take 8/255 (docs/algorithms.md#trades)
    assert (method.eps, method.alpha, method.steps, method.beta) == (8 / 255, 0.007, 10, 6.0)


def test_trades_attack_is_the_authors_step_by_step():
    """From each of our attack points, their step gives our next point to float tolerance, except where a component
    of the KL gradient is rounding noise (within 1e-3 of the largest): the KL's gradient is a difference of nearly
    equal probabilities, which their softmax target and our log-space one (docs/algorithms.md#conventions) round
    differently, so such a component's sign may flip. Seen: only in the first step, from x + 0.001 N(0, I) where
    the KL is about 1e-6, in 0 to 2 of 1536 components, at up to 1e-4 of the largest."""
    method = paper_method("trades")
    x, y = batch(N, interior=True)  # their start is not clamped into the box: see the last TRADES test
    for seed in (3, 4):
        ours = tiny_model().train()
        log = ForwardLog(ours)
        method(ours, x, y, generator=gen(seed))
        target, *points = eval_inputs(log)  # the clean target's no-grad forward, then x_0 .. x_{K-1}
        assert torch.equal(target, x) and len(points) == method.steps
        torch.testing.assert_close(points[0], x + 0.001 * torch.randn(x.shape, generator=gen(seed)))
        points.append(train_inputs(log)[1])  # x_K, the loss's adversarial forward
        theirs, flips = tiny_model().eval(), 0
        for k in range(method.steps):
            their_next = authors_trades_attack_step(theirs, points[k].clone(), x, method.alpha, method.eps)
            grad = kl_attack_gradient(points[k], x).abs()
            noise = grad <= 1e-3 * grad.max()
            apart = (their_next - points[k + 1]).abs() > 1e-6
            assert not (apart & ~noise).any(), f"step {k} differs where the gradient is not rounding noise"
            torch.testing.assert_close(their_next[~noise], points[k + 1][~noise], msg=f"step {k}")
            flips += int(apart.sum())
        assert flips <= 3


def test_trades_loss_is_the_authors_on_the_same_point():
    """Their loss (lines 73-84) on our step's point: the loss and every gradient equal. docs/algorithms.md#trades:
    their third clean train-mode forward is one more BatchNorm update on x, so their running statistics weigh clean
    inputs 2:1; ours, followed by that forward, are theirs."""
    method = paper_method("trades")
    x, y = batch(N, interior=True)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    our_loss = method(ours, x, y, generator=gen(3))
    x_adv = method.perturb(tiny_model().train(), x, y, gen(3))  # the step's own (eval mode: no statistics)
    their_loss = authors_trades_robust_loss(theirs, x, x_adv, y, method.beta)
    assert_inputs_equal(train_inputs(our_log), [x, x_adv], "our loss's forwards")
    assert_inputs_equal(train_inputs(their_log), [x, x_adv, x], "their loss's forwards")
    compare(ours, theirs, our_loss, their_loss, buffers=False)
    assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (2, 3)
    assert not torch.allclose(ours[1].running_mean, theirs[1].running_mean)
    with torch.no_grad():
        ours(x)
    assert_buffers(ours, theirs)


def test_trades_whole_step_is_the_authors_up_to_the_rounding_flips():
    """Their whole `trades_loss` against our step from the same draw: the rounding flips of the first attack step
    (previous tests) move a few coordinates of x_K (seen: 0 to 10 of 1536) and the loss by up to about 1e-4 of
    itself (seen: 9e-5); without a flip the loss agrees to 1e-7."""
    method = paper_method("trades")
    x, y = batch(N, interior=True)
    for seed in (3, 4, 5):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        our_loss = method(ours, x, y, generator=gen(seed))
        their_loss = authors_trades_loss(theirs, x, y, torch.randn(x.shape, generator=gen(seed)), method.alpha,
                                         method.eps, method.steps, method.beta)
        apart = (train_inputs(our_log)[1] - train_inputs(their_log)[1]).abs() > 1e-6
        assert apart.sum() <= 0.02 * apart.numel()
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-3 if apart.any() else 1e-6, atol=0)


def test_trades_start_is_theirs_clamped_into_the_box():
    """docs/algorithms.md#trades: the reference code's start x + 0.001 N(0, I) leaves [0, 1] where x is at its
    edge; ours is that point clamped into the box."""
    method = paper_method("trades")
    x, y = batch(N)
    x[:, 0] = 0.0
    x[:, 1] = 1.0
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(3))
    authors_trades_loss(theirs, x, y, torch.randn(x.shape, generator=gen(3)), method.alpha, method.eps, 1,
                        method.beta)
    our_start, their_start = eval_inputs(our_log)[1], eval_inputs(their_log)[0]
    assert their_start.min() < 0 and their_start.max() > 1
    assert torch.equal(our_start, their_start.clamp(0, 1))


# --------------------------------------------------------------------------- Backward Smoothing


def authors_backward_smoothing_loss(model: nn.Module, x_natural: Tensor, y: Tensor, uniform_draw: Tensor,
                                    step_size: float, epsilon: float, perturb_steps: int, beta: float,
                                    gamma: float) -> Tensor:
    """jinghuichen/BackwardSmoothing @ 6ad21f8, trades_backward.py, `training_loss`, lines 8-58; `uniform_draw` is
    their torch.FloatTensor(*logits_nat.shape).uniform_(-1., 1.) (line 29); `nn.KLDivLoss(size_average=False)` is
    reduction "sum". Their loop (train_trades_backward.py, `train`, lines 133-150) calls it in train mode with
    --alpha, --epsilon, --num-steps, --beta, --gamma (README: 0.031, 0.031, 1, 10.0, 1.0)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    batch_size = len(x_natural)
    model.eval()
    x_adv = x_natural.detach()
    x_adv.requires_grad_()
    logits_nat = model(x_natural).detach()
    rand_vector = gamma * uniform_draw
    loss_os = -(1.0 / len(x_natural)) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                     F.softmax(logits_nat + rand_vector, dim=1))
    grad = torch.autograd.grad(loss_os, [x_adv])[0]
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_inner = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                           F.softmax(logits_nat, dim=1))
        grad = torch.autograd.grad(loss_inner, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    logits_nat = model(x_natural)
    loss_natural = F.cross_entropy(logits_nat, y)
    loss_robust = beta * (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                           F.softmax(logits_nat, dim=1))
    return loss_natural + loss_robust


def test_backward_smoothing_is_the_authors_training_loss():
    method = paper_method("backward_smoothing")
    assert (method.eps, method.alpha, method.steps, method.beta, method.gamma) == (8 / 255, 8 / 255, 1, 10.0, 1.0)
    x, y = batch(N)
    for seed, steps in ((1, 1), (2, 1), (3, 3)):  # K = 1 (the paper's) and K = 3
        run = methods.build("backward_smoothing", eps=method.eps, steps=steps)
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        x_adv = run.perturb(tiny_model().train(), x, y, gen(seed))
        our_loss = run(ours, x, y, generator=gen(seed))
        draw = uniform((N, 10), 1.0, seed)
        their_loss = authors_backward_smoothing_loss(theirs, x, y, draw, run.alpha, run.eps, steps, run.beta,
                                                     run.gamma)
        # their attack forwards: x (the clean target), x (the backward step), x_0 .. x_{K-1}; ours take the target
        # from the backward step's own forward (docs/algorithms.md#backward_smoothing): one forward fewer
        assert_inputs_equal(eval_inputs(our_log), eval_inputs(their_log)[1:], "attack points")
        assert torch.equal(eval_inputs(their_log)[0], x)
        # the loss: x then x_K in train mode on both sides, so the BatchNorm statistics are equal too
        assert_inputs_equal(train_inputs(our_log), train_inputs(their_log), "loss forwards")
        torch.testing.assert_close(train_inputs(their_log)[1], x_adv)
        assert not torch.equal(x_adv, x)
        compare(ours, theirs, our_loss, their_loss)


# --------------------------------------------------------------------------- PGD-AT (MadryLab/cifar10_challenge)


def authors_madry_perturb(model: nn.Module, x_nat: Tensor, y: Tensor, noise: Tensor, epsilon: float,
                          num_steps: int, step_size: float) -> Tensor:
    """MadryLab/cifar10_challenge @ f15682d, pgd_attack.py, `LinfPGDAttack.perturb`, lines 43-61, with loss_func
    'xent' (line 27: model.xent, the batch's summed cross-entropy, model.py line 96) and self.grad =
    tf.gradients(loss, model.x_input) (line 41), in torch and in [0, 1] units (their pixels are 0-255 and
    np.clip(x, lo, hi) is clamp). `noise` is their np.random.uniform(-epsilon, epsilon, x_nat.shape) (line 47). It
    runs the model in whatever mode it was built in: train.py builds Model(mode='train') (line 41), so the attack's
    forwards use batch statistics and, with updates_collections=None (model.py lines 100-110), update the running
    averages; their evaluation (pgd_attack.py line 80) runs it on Model(mode='eval')."""
    x = x_nat + noise
    x = torch.clamp(x, 0, 1)
    for _ in range(num_steps):
        x_input = x.detach().requires_grad_(True)
        xent = F.cross_entropy(model(x_input), y, reduction="sum")
        grad = torch.autograd.grad(xent, x_input)[0]
        x = x + step_size * torch.sign(grad)
        x = torch.clamp(x, x_nat - epsilon, x_nat + epsilon)
        x = torch.clamp(x, 0, 1)
    return x.detach()


def authors_madry_step(model: nn.Module, x_batch: Tensor, y_batch: Tensor, noise: Tensor, epsilon: float,
                       num_steps: int, step_size: float) -> tuple[Tensor, Tensor]:
    """MadryLab/cifar10_challenge @ f15682d, train.py, the training loop, lines 97-137: x_batch_adv =
    attack.perturb(...) (line 103), then sess.run(train_step, feed_dict=adv_dict) (line 137) on total_loss =
    model.mean_xent + weight_decay * model.weight_decay_loss (line 51); the weight decay is the optimiser's here (SGD
    weight_decay). Returns (loss, x_batch_adv)."""
    x_batch_adv = authors_madry_perturb(model, x_batch, y_batch, noise, epsilon, num_steps, step_size)
    mean_xent = F.cross_entropy(model(x_batch_adv), y_batch)
    return mean_xent, x_batch_adv


def test_pgd_at_settings_are_madrys_config():
    """config.json @ f15682d (the training and attack configuration, unchanged since the first commit): epsilon 8.0,
    num_steps 10, step_size 2.0 on 0-255 pixels, random_start true, loss_func xent. (docs/algorithms.md#pgd_at quotes
    the paper's 7 steps; the released configuration has 10, as our preset.)"""
    method = paper_method("pgd_at")
    assert (method.eps, method.alpha, method.steps) == (8 / 255, 2 / 255, 10)


def test_pgd_at_with_train_mode_attacks_is_madrys_step(train_mode_attacks):
    """docs/algorithms.md#pgd_at: with our attack forwards in train mode, as theirs, every attack point, the loss,
    the gradients and the BatchNorm statistics (K + 1 updates) are theirs."""
    method = paper_method("pgd_at")
    x, y = batch(N)
    for seed in (1, 2):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        our_loss = method(ours, x, y, generator=gen(seed))
        their_loss, _ = authors_madry_step(theirs, x, y, uniform(x.shape, method.eps, seed), method.eps,
                                           method.steps, method.alpha)
        assert not eval_inputs(our_log) and not eval_inputs(their_log)
        assert_inputs_equal(train_inputs(our_log), train_inputs(their_log), "attack points and x_K")
        assert ours[1].num_batches_tracked == method.steps + 1
        compare(ours, theirs, our_loss, their_loss)


def test_pgd_at_differs_from_madrys_step_by_the_attack_mode_alone():
    """docs/algorithms.md#pgd_at: our attack runs in eval mode, theirs in train mode. Their attack run in eval mode
    (as their evaluation runs it) is ours; in train mode it moves the point and adds K BatchNorm updates."""
    method = paper_method("pgd_at")
    x, y = batch(N)
    noise = uniform(x.shape, method.eps, 1)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    our_loss = method(ours, x, y, generator=gen(1))
    their_loss, their_x_adv = authors_madry_step(theirs, x, y, noise, method.eps, method.steps, method.alpha)
    (our_x_adv,) = train_inputs(our_log)
    in_eval_mode = authors_madry_perturb(tiny_model().eval(), x, y, noise, method.eps, method.steps, method.alpha)
    torch.testing.assert_close(our_x_adv, in_eval_mode)
    assert (our_x_adv - their_x_adv).abs().max() > method.alpha  # the mode changes the attack, by whole steps
    # running statistics: ours saw the training forward only; theirs also every attack point
    assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (1, method.steps + 1)
    assert_stats_are_replay(ours, [our_x_adv])
    assert_stats_are_replay(theirs, train_inputs(their_log))
    assert_inputs_equal(train_inputs(their_log)[-1:], [their_x_adv], "their training forward")
    # the loss is the same function of the point: CE of the train-mode forward
    torch.testing.assert_close(our_loss, F.cross_entropy(tiny_model().train()(our_x_adv), y))
    torch.testing.assert_close(their_loss, F.cross_entropy(tiny_model().train()(their_x_adv), y))


# --------------------------------------------------------------------------- FGSM-RS (locuslab/fast_adversarial)


def clamp(X: Tensor, lower_limit: Tensor, upper_limit: Tensor) -> Tensor:
    """locuslab/fast_adversarial, CIFAR10/utils.py, `clamp`, lines 18-19; pdejorge/N-FGSM's utils/attack_utils.py
    `AttackUtils.clamp` (lines 16-17) is the same, and so is tml-epfl/understanding-fast-adv-training's utils.py
    `clamp` (lines 20-31), which first makes scalar bounds 1-element tensors (`bound` below)."""
    return torch.max(torch.min(X, upper_limit), lower_limit)


# their loaders' limits (0 - mu) / std and (1 - mu) / std, per channel, at mu = 0, std = 1
LOWER_LIMIT, UPPER_LIMIT = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)


def bound(value: float) -> Tensor:
    """GradAlign's utils.py `clamp`: a scalar bound as torch.FloatTensor(1).fill_(value)."""
    return torch.full((1,), value)


def per_channel(value: float) -> Tensor:
    """Their (value / 255.) / std: a (3, 1, 1) tensor."""
    return torch.full((3, 1, 1), value)


def authors_fast_at_step(model: nn.Module, X: Tensor, y: Tensor, noise: Tensor, eps: float,
                         step: float) -> tuple[Tensor, Tensor]:
    """locuslab/fast_adversarial @ 54f7287, CIFAR10/train_fgsm.py, `main`, the batch loop, lines 105-124 with
    --delta-init random (the default); `noise` is their per-channel delta[:, j, :, :].uniform_(-epsilon[j],
    epsilon[j]) (lines 108-109). The model is in train mode throughout (line 73). Returns (loss, X + delta)."""
    epsilon, alpha = per_channel(eps), per_channel(step)
    lower_limit, upper_limit = LOWER_LIMIT, UPPER_LIMIT
    delta = noise.clone()
    delta.data = clamp(delta, lower_limit - X, upper_limit - X)
    delta.requires_grad = True
    output = model(X + delta[:X.size(0)])
    loss = F.cross_entropy(output, y)
    loss.backward()
    grad = delta.grad.detach()
    delta.data = clamp(delta + alpha * torch.sign(grad), -epsilon, epsilon)
    delta.data[:X.size(0)] = clamp(delta[:X.size(0)], lower_limit - X, upper_limit - X)
    delta = delta.detach()
    output = model(X + delta[:X.size(0)])
    loss = nn.CrossEntropyLoss()(output, y)
    model.zero_grad()  # their opt.zero_grad(): the FGSM backward filled the parameter gradients
    return loss, X + delta


# --------------------------------------------------------------------------- N-FGSM (pdejorge/N-FGSM)


def authors_n_fgsm_step(model: nn.Module, X: Tensor, y: Tensor, noise: Tensor, eps: float,
                        step: float) -> tuple[Tensor, Tensor]:
    """pdejorge/N-FGSM @ 0a9e4f0, train.py, `main`, the batch loop, lines 216-242, with --unif 2 and --clip -1 (the
    defaults: no projection onto the eps-ball); `noise` is their per-channel eta[:, j, :, :].uniform_(-args.unif *
    epsilon[j], args.unif * epsilon[j]) (lines 219-220). The model is in train mode throughout (line 173). Returns
    (loss, X + delta)."""
    alpha = per_channel(step)
    lower_limit, upper_limit = LOWER_LIMIT, UPPER_LIMIT
    eta = noise.clone()
    eta = clamp(eta, lower_limit - X, upper_limit - X)
    eta.requires_grad = True
    output = model(X + eta)
    loss = F.cross_entropy(output, y)
    grad = torch.autograd.grad(loss, eta)[0]
    grad = grad.detach()
    delta = eta + alpha * torch.sign(grad)
    delta = clamp(delta, lower_limit - X, upper_limit - X)
    delta = delta.detach()
    output = model(X + delta)
    loss = F.cross_entropy(output, y)
    return loss, X + delta


SINGLE_STEP = {  # method: (their step, their noise radius in eps, their step in eps, their defaults' source)
    "fgsm_rs": (authors_fast_at_step, 1.0, 1.25, "train_fgsm.py: --epsilon 8, --alpha 10"),
    "n_fgsm": (authors_n_fgsm_step, 2.0, 1.0, "train.py / experiments.sh: --epsilon 8 --alpha 8 --unif 2"),
}


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_single_step_settings_are_the_authors(name):
    _, noise, step, source = SINGLE_STEP[name]
    method = paper_method(name)
    assert method.eps == 8 / 255 and method.alpha == pytest.approx(step * method.eps), source
    assert getattr(method, "noise", 1.0) == noise, source


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_single_step_with_train_mode_attacks_is_the_authors_step(name, train_mode_attacks):
    """docs/algorithms.md#fgsm_rs, #n_fgsm: with our FGSM forward in train mode, as theirs, the start, the point,
    the loss, the gradients and the BatchNorm statistics (two updates) are theirs; the full box, so their clamps
    act."""
    authors_step, radius, _, _ = SINGLE_STEP[name]
    method = paper_method(name)
    x, y = batch(N)
    x[:, 0, :2] = 0.0
    x[:, 1, :2] = 1.0
    for seed in (1, 2):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        our_loss = method(ours, x, y, generator=gen(seed))
        their_loss, their_x_adv = authors_step(theirs, x, y, uniform(x.shape, radius * method.eps, seed),
                                               method.eps, method.alpha)
        assert_inputs_equal(train_inputs(our_log), train_inputs(their_log), "start and point")
        torch.testing.assert_close(train_inputs(our_log)[1], their_x_adv)
        reach = (their_x_adv - x).abs().max()
        assert reach > (2.5 * method.eps if name == "n_fgsm" else 0.99 * method.eps)  # beyond the ball for N-FGSM
        compare(ours, theirs, our_loss, their_loss)


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_single_step_differs_from_the_authors_by_the_attack_mode_alone(name):
    """docs/algorithms.md#fgsm_rs, #n_fgsm: our FGSM forward runs in eval mode, theirs in train mode. From the same
    start the points differ; our running statistics saw the training forward only, theirs the start too."""
    authors_step, radius, _, _ = SINGLE_STEP[name]
    method = paper_method(name)
    x, y = batch(N)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(1))
    _, their_x_adv = authors_step(theirs, x, y, uniform(x.shape, radius * method.eps, 1), method.eps, method.alpha)
    (our_start,), (their_start, their_point) = eval_inputs(our_log), train_inputs(their_log)
    torch.testing.assert_close(our_start, their_start)
    (our_x_adv,) = train_inputs(our_log)
    torch.testing.assert_close(their_point, their_x_adv)
    assert (our_x_adv - their_x_adv).abs().max() > method.alpha  # some signs differ: a whole step apart
    assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (1, 2)
    assert_stats_are_replay(ours, [our_x_adv])
    assert_stats_are_replay(theirs, [their_start, their_x_adv])


# --------------------------------------------------------------------------- GradAlign


def authors_get_input_grad(model: nn.Module, X: Tensor, y: Tensor, eps: float, delta_init: str, backprop: bool,
                           uniform_draw: Tensor | None = None) -> Tensor:
    """tml-epfl/understanding-fast-adv-training @ ceed494, utils.py, `get_input_grad`, lines 70-91 (fp32: no
    --half_prec), branches 'none' and 'random_uniform'; `uniform_draw` is `get_uniform_delta(X.shape, eps)` (lines
    147-151: torch.zeros(shape).uniform_(-eps, eps))."""
    if delta_init == "none":
        delta = torch.zeros_like(X, requires_grad=True)
    elif delta_init == "random_uniform":
        delta = uniform_draw.clone().requires_grad_(True)
    else:
        raise ValueError("wrong delta init")
    output = model(X + delta)
    loss = F.cross_entropy(output, y)
    grad = torch.autograd.grad(loss, delta, create_graph=True if backprop else False)[0]
    if not backprop:
        grad, delta = grad.detach(), delta.detach()
    return grad


def authors_gradalign_step(model: nn.Module, X: Tensor, y: Tensor, uniform_draw: Tensor, eps: float,
                           fgsm_alpha: float, grad_align_cos_lambda: float) -> tuple[Tensor, Tensor, Tensor]:
    """tml-epfl/understanding-fast-adv-training @ ceed494, train.py, `main`, the batch loop, lines 141-170 (--attack
    fgsm, --attack_init zero, --minibatch_replay 1) and 186-202 (the loss with --grad_align_cos_lambda), as the README
    runs it: `--attack=fgsm --eps=8 --attack_init=zero --grad_align_cos_lambda=0.2` (fgsm_alpha: the default 1.25);
    utils.py's `clamp` (lines 20-31), `sign` (161-163) and `l2_norm_batch` (312-314). The model is in train mode
    throughout (line 91). Returns (loss, X + delta, the mask of examples kept in the cosine's mean)."""
    delta = torch.zeros_like(X, requires_grad=True)
    X_adv = clamp(X + delta, bound(0), bound(1))
    output = model(X_adv)
    loss = F.cross_entropy(output, y)
    grad = torch.autograd.grad(loss, delta, create_graph=True)[0]
    grad = grad.detach()
    argmax_delta = eps * torch.sign(grad)  # utils.sign
    delta.data = clamp(delta.data + fgsm_alpha * argmax_delta, bound(-eps), bound(eps))
    delta.data = clamp(X + delta.data, bound(0), bound(1)) - X
    delta = delta.detach()
    output = model(X + delta)
    loss = nn.CrossEntropyLoss()(output, y)
    reg = torch.zeros(1)[0]
    grad2 = authors_get_input_grad(model, X, y, eps, "random_uniform", True, uniform_draw)
    grads_nnz_idx = ((grad**2).sum([1, 2, 3])**0.5 != 0) * ((grad2**2).sum([1, 2, 3])**0.5 != 0)
    grad1, grad2 = grad[grads_nnz_idx], grad2[grads_nnz_idx]
    grad1_norms, grad2_norms = (grad1 ** 2).sum([1, 2, 3]) ** 0.5, (grad2 ** 2).sum([1, 2, 3]) ** 0.5
    grad1_normalized = grad1 / grad1_norms[:, None, None, None]
    grad2_normalized = grad2 / grad2_norms[:, None, None, None]
    cos = torch.sum(grad1_normalized * grad2_normalized, (1, 2, 3))
    reg += grad_align_cos_lambda * (1.0 - cos.mean())
    loss += reg
    return loss, X + delta, grads_nnz_idx


def grad1_path(x: Tensor, y: Tensor, noisy: Tensor, grad_align_lambda: float) -> nn.Module:
    """A fresh copy of the model holding the gradient of lambda (1 - mean cos(g_1, g_2)) through g_1 alone (g_2
    held fixed): the term our double backpropagation through g_1 adds to theirs, whose g_1 is detached."""
    model = tiny_model().train()
    clean = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(clean), y), clean, create_graph=True)
    noisy = noisy.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(noisy), y), noisy)
    cosine = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
    (grad_align_lambda * (1.0 - cosine.mean())).backward()
    return model


def test_gradalign_settings_are_the_authors():
    method = paper_method("gradalign")
    assert (method.eps, method.alpha, method.grad_align_lambda, method.random_start) == (8 / 255, 8 / 255, 0.2, False)


def test_gradalign_with_a_train_mode_fgsm_is_the_authors_step_but_for_g1s_gradient(train_mode_attacks):
    """docs/algorithms.md#gradalign. With our FGSM forward in train mode, as theirs: the point, g_2's noisy point, the
    loss and the regulariser's value are theirs. The gradient differs by the documented term: they reuse the FGSM
    step's gradient as g_1, detached; we recompute g_1 (a train-mode forward at x) and differentiate through it, so
    ours = theirs + the gradient through g_1 alone. Their statistics saw x, x_1, eta; ours x, x_1, x, eta."""
    method = paper_method("gradalign")
    x, y = batch(N, interior=True)  # their noisy point is not clamped into the box (documented)
    for seed in (1, 2):
        ours, theirs = tiny_model().train(), tiny_model().train()
        our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
        our_loss = method(ours, x, y, generator=gen(seed))
        draw = uniform(x.shape, method.eps, seed)
        their_loss, their_x_adv, kept = authors_gradalign_step(theirs, x, y, draw, method.eps, 1.25,
                                                               method.grad_align_lambda)
        assert kept.all()  # no all-zero gradient here, so their mean over the kept examples is over all of them
        fgsm, x_adv, clean, noisy = train_inputs(our_log)
        assert_inputs_equal([fgsm, x_adv, noisy], train_inputs(their_log), "x, x_1, eta")
        assert torch.equal(fgsm, x) and torch.equal(clean, x)
        torch.testing.assert_close(x_adv, their_x_adv)
        torch.testing.assert_close(noisy, x + draw)
        torch.testing.assert_close(our_loss, their_loss)
        our_loss.backward()
        their_loss.backward()
        extra = grad1_path(x, y, noisy, method.grad_align_lambda)
        assert max(p.grad.abs().max() for p in extra.parameters()) > 1e-4  # the term is not negligible
        assert_gradients(ours, theirs, extra)
        assert_stats_are_replay(ours, [x, x_adv, x, noisy])
        assert_stats_are_replay(theirs, [x, their_x_adv, x + draw])


def test_gradalign_differs_from_the_authors_in_the_fgsm_mode_and_the_order_of_forwards():
    """docs/algorithms.md#gradalign: in eval mode our FGSM point differs from their train-mode one; both make three
    train-mode forwards, ours at x_1, x, eta and theirs at x, x_1, eta, so the running statistics differ."""
    method = paper_method("gradalign")
    x, y = batch(N, interior=True)
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log = ForwardLog(ours)
    method(ours, x, y, generator=gen(1))
    draw = uniform(x.shape, method.eps, 1)
    _, their_x_adv, _ = authors_gradalign_step(theirs, x, y, draw, method.eps, 1.25, method.grad_align_lambda)
    our_x_adv, clean, noisy = train_inputs(our_log)
    assert torch.equal(eval_inputs(our_log)[0], x) and torch.equal(clean, x)
    assert (our_x_adv - their_x_adv).abs().max() > method.alpha
    assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (3, 3)
    assert not torch.allclose(ours[1].running_mean, theirs[1].running_mean)
    assert_stats_are_replay(ours, [our_x_adv, x, noisy])
    assert_stats_are_replay(theirs, [x, their_x_adv, x + draw])
