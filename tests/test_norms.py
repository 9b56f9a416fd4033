"""The threat models of attacks/norms.py against what they must compute: the steepest ascent of a linear model,
projections that land in the ball and the box (exact ones satisfying the projection's optimality condition),
random starts uniform in the ball (radius distribution), and L2 PGD equal to torchattacks' PGDL2."""

import math

import pytest
import torch
from torch import nn

from backsmooth.attacks import NORMS, Perturbation, ce_loss, lp_norms, norm_name, pgd, steepest_direction, zero_init
from backsmooth.attacks.norms import l1_box_projection, l2_box_projection, project_onto, uniform_in_ball
from backsmooth.errors import ConfigError

DUAL = {"linf": 1, "l2": 2, "l1": math.inf}  # <w, d> over the unit ball of a norm is the dual norm of w


@pytest.mark.parametrize("norm", NORMS)
def test_the_step_is_the_steepest_ascent_of_a_linear_model(norm):
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5, 5)
    d = steepest_direction(w, norm, sparsity=1.0)  # L1 with k = 1: the exact steepest ascent
    assert torch.allclose(lp_norms(d, norm), torch.ones(4))
    gain = (w * d).flatten(1).sum(1)
    assert torch.allclose(gain, w.flatten(1).norm(p=DUAL[norm], dim=1), rtol=1e-5)
    for _ in range(50):  # no other unit direction does better
        other = torch.randn_like(w)
        other = other / lp_norms(other, norm).view(-1, 1, 1, 1)
        assert ((w * other).flatten(1).sum(1) <= gain + 1e-4).all()


def test_the_l1_step_spreads_over_the_top_coordinates():
    g = torch.tensor([[0.1, -3.0, 2.0, 0.5, -0.2, 0.0, 0.3, 1.0, -0.05, 0.01]])
    d = steepest_direction(g, "l1", sparsity=0.8)  # the top 20%: two coordinates
    assert torch.equal(d, torch.tensor([[0.0, -0.5, 0.5, 0, 0, 0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("norm", NORMS)
def test_a_zero_gradient_gives_a_zero_step_not_nan(norm):
    d = steepest_direction(torch.zeros(2, 1, 4, 4), norm)
    assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_projection_lands_in_the_ball_and_the_box_and_is_idempotent(norm, eps):
    torch.manual_seed(1)
    x = torch.rand(16, 3, 6, 6)
    x[:4] = x[:4].round()  # pixels at the box's faces
    x_adv = x + 2 * torch.randn_like(x)
    p = project_onto(x_adv, x, eps, norm)
    assert (lp_norms(p - x, norm) <= eps * (1 + 1e-5)).all()
    assert p.min() >= 0 and p.max() <= 1
    assert torch.allclose(project_onto(p, x, eps, norm), p, atol=1e-6)
    inside = x + (p - x) * 0.5
    assert torch.allclose(project_onto(inside, x, eps, norm), inside, atol=1e-6)  # a point inside stays


@pytest.mark.parametrize("projection,norm", [(l1_box_projection, "l1"), (l2_box_projection, "l2")])
def test_exact_projections_onto_ball_and_box_are_the_nearest_point(projection, norm):
    """The projection p of v onto a convex set C satisfies <v - p, z - p> <= 0 for every z in C."""
    torch.manual_seed(2)
    x = torch.rand(8, 50).round(decimals=1)
    v = torch.randn(8, 50) * 0.4
    eps = 1.5
    p = projection(v, x, eps)
    assert (lp_norms(p, norm) <= eps * (1 + 1e-5)).all() and ((x + p) >= -1e-7).all() and ((x + p) <= 1 + 1e-7).all()
    for _ in range(200):
        z = uniform_in_ball(x, eps, norm, None) - x
        assert (((v - p) * (z - p)).sum(1) <= 1e-4).all()


def test_the_standard_l2_projection_is_feasible_and_exact_when_the_box_is_not_touched():
    torch.manual_seed(3)
    x = torch.full((4, 100), 0.5)
    v = torch.randn(4, 100) * 0.01 * 10  # radius about 1, coordinates far from the box's faces
    assert torch.allclose(project_onto(x + v, x, 0.5, "l2") - x, l2_box_projection(v, x, 0.5), atol=1e-6)


def _ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the sample and a continuous distribution function."""
    ordered = samples.sort().values.double()
    n = len(ordered)
    model = cdf(ordered)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum((steps - model).abs(), (model - (steps - 1 / n)).abs()).max())


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("dim", [2, 5, 3072])
def test_the_random_start_is_uniform_in_the_ball(norm, dim):
    """Uniform in a d-dimensional ball: P(||delta|| <= t eps) = t^d, for both norms (Kolmogorov-Smirnov at 0.1%)."""
    n, eps = 4000, 0.3
    x = torch.full((n, dim), 0.5)  # the box is out of reach, so the start is the ball's alone
    radius = lp_norms(uniform_in_ball(x, eps, norm, torch.Generator().manual_seed(0)) - x, norm) / eps
    assert radius.max() <= 1 + 1e-5
    assert _ks_statistic(radius.clamp(max=1.0), lambda t: t ** dim) < 1.95 / math.sqrt(n)
    assert _ks_statistic(radius.clamp(max=1.0), lambda t: t) > 1.95 / math.sqrt(n)  # the test can tell


def test_l2_directions_are_isotropic():
    x = torch.full((4000, 3), 0.5)
    delta = uniform_in_ball(x, 0.2, "l2", torch.Generator().manual_seed(1)) - x
    unit = delta / delta.norm(dim=1, keepdim=True)
    assert unit.mean(0).abs().max() < 0.06 and (unit ** 2).mean(0).sub(1 / 3).abs().max() < 0.03


def test_norm_names_accept_robustbench_spellings_and_refuse_others():
    assert [norm_name(n) for n in ("Linf", "L2", "L1", "linf")] == ["linf", "l2", "l1", "linf"]
    with pytest.raises(ConfigError, match="unknown norm 'l3'; choose one of: linf, l2, l1"):
        norm_name("l3")


def _model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


@pytest.mark.parametrize("norm", NORMS)
def test_every_pgd_point_lies_in_the_ball_and_the_box(norm):
    model, x = _model(), torch.rand(32, 3, 8, 8)
    y = torch.randint(0, 10, (32,))
    eps = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}[norm]
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    pgd(eps, eps / 4, 10, norm=norm)(model, x, y, torch.Generator().manual_seed(0))
    assert len(seen) == 10
    for point in seen:
        assert (lp_norms(point - x, norm) <= eps * (1 + 1e-5)).all() and point.min() >= 0 and point.max() <= 1


def test_l2_pgd_equals_torchattacks_pgdl2():
    torchattacks = pytest.importorskip("torchattacks")
    model, x = _model().eval(), torch.rand(64, 3, 8, 8)
    y = model(x).argmax(1)
    ours = Perturbation(ce_loss, zero_init, 0.5, 0.1, 20, norm="l2")(model, x, y).x_adv
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=20, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (model(ours).argmax(1) != y).any()  # the attack did something
