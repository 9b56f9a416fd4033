"""The perturbation engine against what it must compute, on tiny models with known answers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backsmooth import attacks
from backsmooth.attacks import Perturbation, attack_mode, ce_loss, kl_loss, project, zero_init


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
