"""Each training method against what docs/algorithms.md ("The methods") says it must compute, and its pass count."""

import pytest
import torch
import torch.nn.functional as F
from method_checks import CHECKS, ForwardLog, batch, tiny_model

from backsmooth import methods
from backsmooth.attacks import kl_loss, predict_eval
from backsmooth.errors import ConfigError
from backsmooth.methods.backward_smoothing import backward_smoothing_start
from backsmooth.methods.base import trades_loss

EPS = 8 / 255
# (no-grad clean forwards, input-gradient forwards, train-mode forwards): docs/algorithms.md#cost-in-forward-passes;
# tests/test_new_methods.py has the other methods' structure
EXPECTED_PASSES = {
    "natural": (0, 0, 1),
    "pgd_at": (0, 10, 1),
    "trades": (1, 10, 2),
    "fgsm_rs": (0, 1, 1),
    "fast_trades": (1, 1, 2),
    "backward_smoothing": (0, 2, 2),  # the backward step's forward at x also gives the clean target
    "gradalign": (0, 1, 3),
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("name", methods.names())
def test_every_registered_method_passes_the_generic_checks(name, check):
    """tests/method_checks.py: passes against the declared floor, inputs in the ball and box, BatchNorm
    statistics, reproducibility, label smoothing honoured or refused."""
    check(name)


@pytest.mark.parametrize("name", sorted(EXPECTED_PASSES))
def test_pass_structure_of_the_first_methods(name):
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch()
    methods.build(name)(model, x, y, generator=torch.Generator().manual_seed(0))
    assert log.counts() == EXPECTED_PASSES[name]


def test_backward_step_lowers_kl_to_the_smoothed_target():
    model = tiny_model().eval()
    x, _ = batch()
    clean = F.log_softmax(predict_eval(model, x), dim=1)
    x0, target = backward_smoothing_start(model, x, 1.0, EPS, EPS, torch.Generator().manual_seed(7))
    torch.testing.assert_close(target, clean)
    xi = 2 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(7)) - 1
    smoothed = F.log_softmax(clean + xi, dim=1)
    with torch.no_grad():
        assert kl_loss(model(x0), smoothed).mean() < kl_loss(model(x), smoothed).mean()
    assert (x0 - x).abs().max() <= EPS + 1e-6 and not torch.equal(x0, x)


def test_backward_smoothing_with_alpha_eps_moves_each_pixel_by_minus_zero_or_plus_eps():
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch(interior=True)
    methods.build("backward_smoothing", alpha=EPS)(model, x, y, generator=torch.Generator().manual_seed(0))
    x_adv = [seen for training, _, seen in log.calls if training][1]
    delta = (x_adv - x) / EPS
    nearest = delta.round()
    assert torch.allclose(delta, nearest, atol=1e-4)
    assert set(nearest.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (nearest != 0).float().mean() > 0.5


@pytest.mark.parametrize("bad", [dict(gamma=0.0), dict(gamma=-1.0), dict(eps=0.0), dict(eps=1.5), dict(steps=0),
                                 dict(beta=-1.0), dict(alpha=0.0)])
def test_backward_smoothing_rejects_bad_hyperparameters(bad):
    with pytest.raises(ConfigError, match="backward_smoothing"):
        methods.build("backward_smoothing", **bad)


def test_unknown_method_or_hyperparameter_is_rejected():
    with pytest.raises(ConfigError, match="unknown method"):
        methods.build("tradez")
    with pytest.raises(ConfigError, match="does not take gamma"):
        methods.build("trades", gamma=1.0)


def test_defaults_follow_the_paper():
    bs = methods.build("backward_smoothing")
    assert (bs.eps, bs.alpha, bs.beta, bs.gamma, bs.steps) == (EPS, EPS, 10.0, 1.0, 1)
    trades = methods.build("trades")
    assert (trades.alpha, trades.beta, trades.steps) == (0.007, 6.0, 10)
    assert methods.build("fgsm_rs").alpha == pytest.approx(1.25 * EPS)
    assert methods.build("fgsm_rs", eps=16 / 255).alpha == pytest.approx(1.25 * 16 / 255)
    assert methods.build("fast_trades").alpha == EPS
    assert methods.build("pgd_at").alpha == 2 / 255
    assert methods.build("gradalign").grad_align_lambda == 0.2


def test_trades_loss_differentiates_through_both_kl_arguments():
    x, y = batch()
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)

    def param_grads(detach_nat: bool, detach_adv: bool) -> torch.Tensor:
        model = tiny_model().eval()  # eval: identical logits in all three variants
        logits_nat, logits_adv = model(x), model(x_adv)
        nat = logits_nat.detach() if detach_nat else logits_nat
        adv = logits_adv.detach() if detach_adv else logits_adv
        kl = F.kl_div(F.log_softmax(adv, 1), F.log_softmax(nat, 1), reduction="batchmean", log_target=True)
        kl.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model = tiny_model().eval()
    loss = trades_loss(methods.build("trades"), model, x, x_adv, y, beta=1.0, stats=None) - F.cross_entropy(model(x), y)
    loss.backward()
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    both = param_grads(False, False)
    torch.testing.assert_close(ours, both)
    assert not torch.allclose(both, param_grads(True, False))
    assert not torch.allclose(both, param_grads(False, True))


def test_gradalign_regulariser_is_differentiated_through_the_input_gradients():
    x, y = batch()

    def grads(lam: float) -> torch.Tensor:
        model = tiny_model().train()
        stats: dict = {}
        loss = methods.build("gradalign", grad_align_lambda=lam)(model, x, y, torch.Generator().manual_seed(0), stats)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), stats["grad_cosine"]

    without, _ = grads(0.0)
    with_reg, cosine = grads(1.0)
    assert -1 <= cosine <= 1
    assert (with_reg - without).abs().max() > 1e-6  # second-order gradient reached the parameters


def test_stats_are_returned_without_changing_the_loss():
    x, y = batch()
    stats: dict = {}
    a = methods.build("backward_smoothing")(tiny_model(), x, y, torch.Generator().manual_seed(0), stats)
    b = methods.build("backward_smoothing")(tiny_model(), x, y, torch.Generator().manual_seed(0))
    assert a.item() == b.item()
    assert {"ce", "kl", "attack_start_kl", "accuracy", "adv_accuracy"} <= set(stats)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_backward_smoothing_at_10f_matches_the_11f_formulation():
    """The clean target taken from the backward step's own forward (10F) gives the same start and loss as a
    separate no-grad forward (11F, the paper's code) for the same generator, to float tolerance."""
    from backsmooth.attacks import Perturbation, project

    model = tiny_model().train()
    x, y = batch()
    eps = alpha = 8 / 255
    gamma = 1.0
    clean = F.log_softmax(predict_eval(model, x).float(), dim=1)  # 11F: the separate no-grad forward
    generator = torch.Generator().manual_seed(5)
    xi = 2 * torch.rand(clean.shape, generator=generator) - 1
    descent = Perturbation(kl_loss, lambda *_: x.clone(), eps, -alpha, 1)
    x0_reference = descent(model, x, F.log_softmax(clean + gamma * xi, dim=1), generator).x_adv
    x0, target = backward_smoothing_start(model, x, gamma, alpha, eps, torch.Generator().manual_seed(5))
    torch.testing.assert_close(target, clean, rtol=1e-5, atol=1e-6)
    assert (x0 != x0_reference).float().mean() < 1e-3  # a sign may flip where the gradient is ~0
    assert (project(x0, x, eps) == x0).all()
    reference = methods.build("backward_smoothing")
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # the train-mode loss moves BatchNorm stats
    losses = []
    for start in (x0_reference, x0):
        model.load_state_dict(weights)
        attack = Perturbation(kl_loss, lambda *_, start=start: start, eps, alpha, 1)
        x_adv = attack(model, x, clean, torch.Generator().manual_seed(9)).x_adv
        losses.append(trades_loss(reference, model, x, x_adv, y, reference.beta, None).item())
    model.load_state_dict(weights)
    ours = reference(model, x, y, generator=torch.Generator().manual_seed(5)).item()
    assert losses[1] == pytest.approx(ours, rel=1e-5) and losses[0] == pytest.approx(ours, rel=1e-3)

