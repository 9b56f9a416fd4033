"""Threat models: the L-inf, L2 and L1 balls, each with its steepest-ascent step, its projection (onto the ball and
the [0, 1] box) and a random start uniform in the ball. docs/algorithms.md#threat-models states each one.

- L-inf: step sign(g); projection clamps each coordinate to [x - eps, x + eps], then to [0, 1] (exact: both sets
  are boxes); start uniform in the cube.
- L2: step g / ||g||_2 (a zero gradient gives a zero step, never NaN); projection rescales onto the ball, then
  clamps to the box, as torchattacks, AutoAttack's APGD-L2 and the robustness library do. The result lies in
  both sets (clamping only moves a coordinate towards x, which is in the box) but is not always the nearest
  such point; `l2_box_projection` computes the exact one for comparison. Start: a uniform direction times
  eps * U^(1/d), uniform in the ball, then the box.
- L1: the sparse step of SLIDE (Tramèr & Boneh 2019): sign(g) on the k coordinates of largest |g| (k set by the
  `sparsity` quantile, 0.99 keeping the top 1%), each with weight 1/k, so ||step||_1 = 1 (k = 1 is the
  exact steepest ascent of a linear model). Projection: exact onto the intersection of the ball and the box
  (soft-thresholding clipped to the box, its threshold found by bisection to float precision), as APGD-L1 needs.
  Start: exponential spacings with random signs, uniform in the ball, then the box.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from backsmooth.errors import ConfigError

NORMS = ("linf", "l2", "l1")
ALIASES = {"linf": "linf", "l-inf": "linf", "inf": "linf", "l2": "l2", "l1": "l1"}  # RobustBench's Linf / L2 / L1
L1_SPARSITY = 0.99  # SLIDE's default quantile: the step moves the top 1% of coordinates
_BISECTION_STEPS = 60  # halvings of the threshold's bracket: below float32 resolution for any eps <= 1e4


def norm_name(text: str) -> str:
    """'linf', 'l2' or 'l1' from any accepted spelling (RobustBench's 'Linf', 'L2', 'L1' included)."""
    name = ALIASES.get(str(text).strip().lower())
    if name is None:
        raise ConfigError(f"unknown norm {text!r}; choose one of: {', '.join(NORMS)}")
    return name


def max_radius(norm: str, dim: int) -> float:
    """The largest distance between two points of the [0, 1] box in `dim` dimensions: a larger eps means nothing."""
    return {"linf": 1.0, "l2": math.sqrt(dim), "l1": float(dim)}[norm]


def check_radius(eps: float, norm: str, dim: int) -> None:
    """Refuse an eps that is negative, NaN or beyond the box (one line)."""
    largest = max_radius(norm, dim)
    if not 0 <= eps <= largest:  # also refuses NaN
        raise ConfigError(f"eps must be in [0, {largest:g}] for {norm} on inputs of {dim} values (pixel units, "
                          f"e.g. 8/255 at linf, 0.5 at l2), got {eps}")


TYPICAL_RADII = {"linf": (0.001, 0.4), "l2": (0.1, 10.0), "l1": (1.0, 100.0)}  # benchmarks' radii lie inside
BENCHMARKS = {"linf": "8/255 on CIFAR-10, 0.3 on MNIST", "l2": "0.5 on CIFAR-10, 3.0 on ImageNet",
              "l1": "12 on CIFAR-10"}


class RadiusWarning(UserWarning):
    """An eps far from every benchmark radius of its norm (`radius_warning`)."""


def radius_warning(eps: float, norm: str) -> str | None:
    """A one-line warning when eps is far from every benchmark radius of its norm (a norm mix-up, such as 8/255
    at l2 or 0.5 at linf), else None."""
    low, high = TYPICAL_RADII[norm]
    if eps == 0 or low <= eps <= high:
        return None
    likely = next((other for other, (a, b) in TYPICAL_RADII.items() if other != norm and a <= eps <= b), None)
    hint = f"; did you mean --norm {likely}?" if likely else ""
    return f"eps {eps:g} is unusual for {norm} (benchmarks use {BENCHMARKS[norm]}){hint}"


def _per_example(values: Tensor, like: Tensor) -> Tensor:
    """A per-example vector shaped to broadcast against a batch `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def lp_norms(delta: Tensor, norm: str) -> Tensor:
    """Per-example norm of a batch of perturbations."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    return flat.norm(p=2 if norm == "l2" else 1, dim=1)


def steepest_direction(grad: Tensor, norm: str, sparsity: float = L1_SPARSITY) -> Tensor:
    """The unit-norm direction d maximising <grad, d> over the norm's unit ball (L1: over k-sparse
    equal-weight directions, see the module docstring); zero where the gradient is zero."""
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        length = grad.flatten(1).norm(dim=1).clamp(min=torch.finfo(grad.dtype).tiny)
        return grad / _per_example(length, grad)
    flat = grad.flatten(1)
    k = max(1, math.ceil((1.0 - sparsity) * flat.shape[1]))
    top = flat.abs().topk(k, dim=1).indices
    direction = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top).sign() / k)
    return direction.view_as(grad)


def _clip(delta: Tensor, x: Tensor) -> Tensor:
    """A perturbation clipped so that x + delta lies in [0, 1]."""
    return torch.maximum(torch.minimum(delta, 1.0 - x), -x)


def l1_box_projection(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """The exact Euclidean projection of delta onto {||d||_1 <= eps} intersected with {0 <= x + d <= 1}: by the KKT
    conditions d_i = clip(sign(v_i) max(|v_i| - t, 0)) for the smallest t >= 0 with ||d||_1 <= eps, found by
    bisection (the L1 norm of d decreases in t)."""
    clipped = _clip(delta, x)
    inside = lp_norms(clipped, "l1") <= eps
    if bool(inside.all()):
        return clipped
    low = torch.zeros(len(delta), device=delta.device, dtype=delta.dtype)
    high = delta.flatten(1).abs().amax(1)
    for _ in range(_BISECTION_STEPS):
        middle = _per_example((low + high) / 2, delta)
        too_long = lp_norms(_clip(delta.sign() * (delta.abs() - middle).clamp(min=0), x), "l1") > eps
        low, high = torch.where(too_long, middle.flatten(), low), torch.where(too_long, high, middle.flatten())
    shrunk = _clip(delta.sign() * (delta.abs() - _per_example(high, delta)).clamp(min=0), x)
    return torch.where(_per_example(inside, delta), clipped, shrunk)


def l2_box_projection(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """The exact Euclidean projection onto the L2 ball intersected with the box: d_i = clip(v_i / (1 + mu)) for the
    smallest mu >= 0 with ||d||_2 <= eps (bisection). Reference for the standard ball-then-box projection."""
    clipped = _clip(delta, x)
    inside = lp_norms(clipped, "l2") <= eps
    if bool(inside.all()):
        return clipped
    low = torch.zeros(len(delta), device=delta.device, dtype=delta.dtype)
    high = (lp_norms(delta, "l2") / eps).clamp(min=1.0)  # at 1 / (1 + mu) = eps / ||v|| the ball alone holds
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        too_long = lp_norms(_clip(delta / _per_example(1 + middle, delta), x), "l2") > eps
        low, high = torch.where(too_long, middle, low), torch.where(too_long, high, middle)
    shrunk = _clip(delta / _per_example(1 + high, delta), x)
    return torch.where(_per_example(inside, delta), clipped, shrunk)


def project_onto(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """x_adv moved into the norm's eps-ball around x and into the [0, 1] box (see the module docstring)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    delta = x_adv - x
    if norm == "l2":
        length = lp_norms(delta, "l2")
        scale = (eps / length.clamp(min=torch.finfo(delta.dtype).tiny)).clamp(max=1.0)
        return (x + delta * _per_example(scale, delta)).clamp_(0.0, 1.0)
    return x + l1_box_projection(delta, x, eps)


def _rand(shape: Any, like: Tensor, generator: torch.Generator | None, draw: Any = torch.rand) -> Tensor:
    return draw(shape, generator=generator, device=like.device, dtype=like.dtype)


def uniform_in_ball(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A point uniform in the norm's eps-ball around each example, then put into the box (clamping only moves a
    coordinate towards x, so the point stays in the ball)."""
    if norm == "linf":
        return project_onto(x + (2 * _rand(x.shape, x, generator) - 1) * eps, x, eps, norm)
    if norm == "l2":
        direction = _rand(x.shape, x, generator, torch.randn)
        direction = direction / _per_example(direction.flatten(1).norm(dim=1).clamp(min=1e-12), x)
        radius = eps * _rand((len(x),), x, generator) ** (1.0 / x[0].numel())
        delta = direction * _per_example(radius, x)
    else:  # d exponential spacings over d + 1 are uniform in the simplex {u >= 0, sum u <= 1}
        spacings = -torch.log1p(-_rand((len(x), x[0].numel() + 1), x, generator))
        simplex = (spacings[:, :-1] / spacings.sum(1, keepdim=True)).view_as(x)
        signs = torch.where(_rand(x.shape, x, generator) < 0.5, -1.0, 1.0).to(x.dtype)
        delta = eps * simplex * signs
    return (x + delta).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class SteepestStep:
    """The step rule of a norm's steepest ascent (`steepest_direction`); stateless."""

    norm: str = "linf"
    sparsity: float = L1_SPARSITY

    def init(self, x: Tensor) -> None:
        """No state."""
        return None

    def step(self, grad: Tensor, state: None) -> tuple[Tensor, None]:
        """The norm's unit steepest-ascent direction."""
        return steepest_direction(grad, self.norm, self.sparsity), state
