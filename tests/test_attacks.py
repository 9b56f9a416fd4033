"""The perturbation engine against what it must compute, on tiny models with known answers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backsmooth import attacks
from backsmooth.attacks import (
    AttackSpec,
    Momentum,
    Perturbation,
    SignStep,
    attack_mode,
    ce_loss,
    kl_loss,
    parse_attack,
    project,
    uniform_init,
    zero_init,
)


class Linear(nn.Module):
    """f(x) = W x.flatten() + b, so grad_x CE is known in closed form."""

    def __init__(self, dim: int = 12, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(dim, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, dim, generator=g))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def small_bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    )


def test_fgsm_step_matches_closed_form_on_linear_model():
    model = Linear()
    x = torch.full((4, 3, 2, 2), 0.5)
    y = torch.tensor([0, 1, 2, 0])
    eps = 0.05
    x_adv = attacks.fgsm(eps)(model, x, y).x_adv
    # grad_x CE = W^T (softmax(Wx) - onehot(y))
    probs = F.softmax(model(x), dim=1)
    expected_grad = (probs - F.one_hot(y, 3).float()) @ model.fc.weight
    expected = (x.flatten(1) + eps * expected_grad.sign()).view_as(x)
    torch.testing.assert_close(x_adv, expected)


def test_pgd_increases_loss_and_stays_in_ball_and_box():
    torch.manual_seed(0)
    model = small_bn_model().eval()
    x = torch.rand(8, 3, 8, 8)
    x[:, 0] = 0.0  # pixels on the box boundary
    x[:, 1] = 1.0
    y = torch.randint(0, 5, (8,))
    eps = 8 / 255
    g = torch.Generator().manual_seed(1)
    x_adv = attacks.pgd(eps, 2 / 255, 10)(model, x, y, g).x_adv
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ce_loss(model(x_adv), y).mean() > ce_loss(model(x), y).mean()


def test_random_starts_are_projected_and_seeded():
    x = torch.rand(16, 3, 4, 4)
    x[:4] = 0.0
    for init in (attacks.uniform_init, attacks.gaussian_init(0.5)):
        a = init(None, x, None, 0.1, torch.Generator().manual_seed(3))
        b = init(None, x, None, 0.1, torch.Generator().manual_seed(3))
        c = init(None, x, None, 0.1, torch.Generator().manual_seed(4))
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, c)
        assert (a - x).abs().max() <= 0.1 + 1e-6 and a.min() >= 0 and a.max() <= 1


def test_project_onto_ball_then_box():
    x = torch.tensor([0.0, 0.5, 1.0, 0.98])
    far = torch.tensor([-1.0, 0.9, 2.0, 1.5])
    torch.testing.assert_close(project(far, x, 0.1), torch.tensor([0.0, 0.6, 1.0, 1.0]))


def test_attack_mode_uses_eval_mode_and_restores_state():
    model = small_bn_model().train()
    model[0].weight.requires_grad_(True)
    model[4].bias.requires_grad_(False)  # a frozen parameter stays frozen
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, [p.requires_grad for p in m.parameters()])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    attacks.pgd(0.1, 0.02, 3)(model, x, y)
    assert all(not training and not any(flags) for training, flags in seen)
    assert model.training
    assert model[0].weight.requires_grad and not model[4].bias.requires_grad
    for k, v in model.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_attack_mode_restores_after_exception():
    model = small_bn_model().train()
    with pytest.raises(RuntimeError):
        with attack_mode(model):
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_negative_step_descends_kl():
    torch.manual_seed(0)
    model = small_bn_model().eval()
    x = torch.rand(8, 3, 8, 8)
    target = F.log_softmax(torch.randn(8, 5) * 3, dim=1)
    descend = Perturbation(kl_loss, zero_init, 0.05, -0.05, 1)
    x0 = descend(model, x, target).x_adv
    assert kl_loss(model(x0), target).mean() < kl_loss(model(x), target).mean()


def test_cw_margin_loss_values():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(attacks.cw_margin_loss()(logits, y), torch.tensor([-1.0, 5.0]))
    torch.testing.assert_close(attacks.cw_margin_loss(kappa=2.0)(logits, y), torch.tensor([-1.0, 2.0]))


def test_kl_loss_matches_definition_and_survives_underflow():
    logits = torch.tensor([[100.0, 0.0, -100.0]], requires_grad=True)
    target = F.log_softmax(torch.tensor([[0.0, 200.0, -300.0]]), dim=1)  # probabilities underflow to 0
    loss = kl_loss(logits, target)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    p = torch.tensor([[0.2, 0.5, 0.3]])
    q_logits = torch.tensor([[1.0, 2.0, 0.5]])
    expected = (p * (p.log() - F.log_softmax(q_logits, dim=1))).sum(1)
    torch.testing.assert_close(kl_loss(q_logits, p.log()), expected)


# --------------------------------------------------------------------------- step rules


def test_default_step_rule_is_the_sign_step_bitwise():
    """Without a rule, with the explicit default, and as a hand-written sign-PGD loop: the same bits."""
    torch.manual_seed(0)
    model = small_bn_model().eval()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    eps, step, steps = 8 / 255, 2 / 255, 5
    implicit = Perturbation(ce_loss, uniform_init, eps, step, steps)(model, x, y, torch.Generator().manual_seed(2))
    explicit = Perturbation(ce_loss, uniform_init, eps, step, steps, SignStep())(model, x, y,
                                                                                torch.Generator().manual_seed(2))
    by_hand = uniform_init(model, x, y, eps, torch.Generator().manual_seed(2))
    for _ in range(steps):
        by_hand.requires_grad_(True)
        (grad,) = torch.autograd.grad(ce_loss(model(by_hand), y).sum(), by_hand)
        by_hand = project(by_hand.detach() + step * grad.sign(), x, eps)
    assert torch.equal(implicit.x_adv, explicit.x_adv) and torch.equal(implicit.start_loss, explicit.start_loss)
    assert torch.equal(implicit.x_adv, by_hand)
    assert torch.equal(parse_attack("pgd20").build(eps, step)(model, x, y, torch.Generator().manual_seed(2)).x_adv,
                       Perturbation(ce_loss, uniform_init, eps, step, 20, SignStep())(
                           model, x, y, torch.Generator().manual_seed(2)).x_adv)


def test_momentum_rule_is_mi_fgsm():
    """Momentum(mu) against a hand-written MI-FGSM loop (Dong et al. 2018) on the linear model; with mu = 0 it
    is the sign step again, and with mu = 1 the momentum changes where the attack goes."""
    model = Linear()
    x, y = torch.rand(8, 3, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
    eps, steps, mu = 0.3, 10, 1.0
    alpha = eps / steps
    ours = Perturbation(ce_loss, zero_init, eps, alpha, steps, Momentum(mu))(model, x, y).x_adv
    g, by_hand = torch.zeros_like(x), x.clone()
    for _ in range(steps):
        by_hand.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(by_hand), y, reduction="sum"), by_hand)
        g = mu * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        by_hand = torch.min(torch.max(by_hand.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    sign = Perturbation(ce_loss, zero_init, eps, alpha, steps)(model, x, y).x_adv
    assert torch.equal(Perturbation(ce_loss, zero_init, eps, alpha, steps, Momentum(0.0))(model, x, y).x_adv, sign)
    assert not torch.equal(ours, sign)


def test_momentum_rule_survives_a_zero_gradient():
    model = Linear()
    with torch.no_grad():
        model.fc.weight.zero_()  # constant logits: the input gradient is exactly zero
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    assert torch.equal(Perturbation(ce_loss, zero_init, 0.1, 0.05, 3, Momentum())(model, x, y).x_adv, x)


def test_attack_spec_is_either_built_or_run_through_autoattack():
    assert not parse_attack("pgd20").runs_in_package and parse_attack("autoattack").runs_in_package
    with pytest.raises(ValueError, match="exactly one"):
        AttackSpec("nothing", "none")
    with pytest.raises(ValueError, match="exactly one"):
        AttackSpec("both", "none", components=("apgd-ce",), make=lambda spec, eps, step: None)
