"""Our training steps against transcriptions of the authors' released code: the same small BatchNorm model, inputs
and random draws on both sides, then the loss, every parameter gradient and the BatchNorm buffers compared to
float tolerance. Each transcription names its repository, file and function; it keeps the authors' arithmetic
and drops only what ties it to CUDA or to their loop (`.cuda()`, `Variable`, `optimizer.zero_grad()`)."""

import torch
import torch.nn.functional as F
from method_checks import batch, tiny_model
from torch import nn

from backsmooth import methods

EPS, ALPHA, STEPS = 8 / 255, 0.007, 10


def authors_mart_loss(model: nn.Module, x_natural: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
                      step_size: float, epsilon: float, perturb_steps: int, beta: float) -> torch.Tensor:
    """YisenWang/MART, mart.py, `mart_loss` (distance 'l_inf'); `noise` is their torch.randn(x_natural.shape)."""
    kl = nn.KLDivLoss(reduction="none")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def _compare(ours: nn.Module, theirs: nn.Module, our_loss: torch.Tensor, their_loss: torch.Tensor) -> None:
    """Loss, every parameter gradient and every BatchNorm buffer equal to float tolerance."""
    torch.testing.assert_close(our_loss, their_loss)
    our_loss.backward()
    their_loss.backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_mart_is_the_authors_mart_loss():
    x, y = batch(interior=True)  # 0.001 N(0, I) never leaves the box, so our projected start is theirs
    for beta in (6.0, 5.0):
        ours, theirs = tiny_model().train(), tiny_model().train()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        method = methods.build("mart", eps=EPS, alpha=ALPHA, steps=STEPS, beta=beta)
        our_loss = method(ours, x, y, generator=torch.Generator().manual_seed(3))
        their_loss = authors_mart_loss(theirs, x, y, noise, ALPHA, EPS, STEPS, beta)
        _compare(ours, theirs, our_loss, their_loss)
    assert ours.training  # our step leaves the model in train mode, as theirs
