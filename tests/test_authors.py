"""Our training steps against transcriptions of the authors' released code: the same small BatchNorm model, inputs
and random draws on both sides, then the loss, every parameter gradient and the BatchNorm buffers compared to
float tolerance. Each transcription names its repository, file and function; it keeps the authors' arithmetic
and drops only what ties it to CUDA or to their loop (`.cuda()`, `Variable`, `optimizer.zero_grad()`)."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


# --------------------------------------------------------------------------- AWP (csdongxian/AWP)


def authors_diff_in_weights(model: nn.Module, proxy: nn.Module) -> dict[str, torch.Tensor]:
    """csdongxian/AWP, AT_AWP/utils_awp.py (and trades_AWP/utils_awp.py), `diff_in_weights`."""
    diff_dict = {}
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + 1e-20) * diff_w
    return diff_dict


def authors_add_into_weights(model: nn.Module, diff: dict[str, torch.Tensor], coeff: float) -> None:
    """csdongxian/AWP, utils_awp.py, `add_into_weights`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name])


def authors_awp_step(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, gamma: float,
                     trades_beta: float | None, proxy_lr: float, opt: torch.optim.Optimizer) -> None:
    """One training step with AWP as the authors' loops run it: AT-AWP (AT_AWP/train_cifar10.py, the batch loop:
    `calc_awp`, `perturb`, CE on X_adv, backward, step, `restore`) or, with `trades_beta`, TRADES-AWP
    (trades_AWP/train_trades_cifar.py, `train`, with `TradesAWP.calc_awp`)."""
    proxy = copy.deepcopy(model)
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    if trades_beta is None:  # AdvWeightPerturb.calc_awp
        loss = -F.cross_entropy(proxy(x_adv), y)
    else:  # TradesAWP.calc_awp
        loss_natural = F.cross_entropy(proxy(x), y)
        loss_robust = F.kl_div(F.log_softmax(proxy(x_adv), dim=1), F.softmax(proxy(x), dim=1), reduction="batchmean")
        loss = -1.0 * (loss_natural + trades_beta * loss_robust)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    diff = authors_diff_in_weights(model, proxy)
    authors_add_into_weights(model, diff, 1.0 * gamma)
    if trades_beta is None:
        robust_loss = F.cross_entropy(model(x_adv), y)
    else:
        logits_adv = model(x_adv)
        loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(x), dim=1), reduction="batchmean")
        robust_loss = F.cross_entropy(model(x), y) + trades_beta * loss_robust
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    authors_add_into_weights(model, diff, -1.0 * gamma)


def _our_awp_step(model: nn.Module, method: methods.TrainingMethod, x: torch.Tensor, y: torch.Tensor,
                  gamma: float, seed: int) -> torch.optim.Optimizer:
    """backsmooth's training step with --awp gamma on `model` (the trainer's own function)."""
    from backsmooth.distributed import runtime
    from backsmooth.training.awp import WeightPerturbation
    from backsmooth.training.setup import Parts
    from backsmooth.training.step import training_step
    here = runtime("cpu", "fp32", False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    parts = Parts(model, model, method, opt, torch.amp.GradScaler("cpu", enabled=False),
                  torch.Generator().manual_seed(seed), awp=WeightPerturbation(model, gamma, 0, here.proc))
    training_step(parts, x, y, here)
    return opt


def test_awp_is_the_authors_at_awp_and_trades_awp():
    x, y = batch(interior=True)
    cases = (("pgd_at", None, 0.01, 0.01), ("trades", 6.0, 0.005, 0.1))  # method, TRADES beta, gamma, proxy lr
    for name, beta, gamma, proxy_lr in cases:
        method = methods.build(name, eps=EPS)
        ours, theirs = tiny_model().train(), tiny_model().train()
        x_adv = method.perturb(copy.deepcopy(theirs), x, y, torch.Generator().manual_seed(5))  # the step's own
        _our_awp_step(ours, method, x, y, gamma, seed=5)
        opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        authors_awp_step(theirs, x, x_adv, y, gamma, beta, proxy_lr, opt)
        for (key, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a, b, msg=f"{name}: {key}")
        if beta is None:  # TRADES-AWP's loop runs a third clean train-mode forward: BatchNorm statistics differ
            for (key, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
                torch.testing.assert_close(a, b, msg=f"{name}: {key}")


def test_awp_moves_the_step_and_leaves_no_perturbation_behind():
    """gamma 0 is the plain step bitwise; a positive gamma changes the step; the weights end where the optimiser
    put them, not at w + gamma v."""
    x, y = batch(interior=True)
    method = methods.build("pgd_at", eps=EPS)
    plain, zero, moved = tiny_model().train(), tiny_model().train(), tiny_model().train()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = method(plain, x, y, generator=torch.Generator().manual_seed(5))
    opt.zero_grad()
    loss.backward()
    opt.step()
    _our_awp_step(zero, method, x, y, 0.0, seed=5)
    _our_awp_step(moved, method, x, y, 0.01, seed=5)
    for (key, a), (_, b) in zip(plain.named_parameters(), zero.named_parameters()):
        assert torch.equal(a, b), key
    assert any(not torch.allclose(a, c) for a, c in zip(plain.parameters(), moved.parameters()))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_awp_under_two_processes_perturbs_as_one_process(tmp_path):
    worker = str(Path(__file__).with_name("ddp_awp_worker.py"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", worker,
                          str(tmp_path / "two.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    single, split = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name, directions in single.items():
        assert directions and set(directions) == set(split[name])
        for key, value in directions.items():
            # the all-reduce sums in another order, and w - 0.01 g - w loses digits before the rescaling to ||w||:
            # seen here, at most 1e-5 on entries up to 0.4
            torch.testing.assert_close(split[name][key], value, rtol=1e-4, atol=5e-5, msg=f"{name} {key}")


def test_awp_presets_are_the_authors_runs():
    from backsmooth.presets import preset
    from backsmooth.schedules import learning_rate
    trades, at = preset("cifar10-wrn34_10-trades-awp"), preset("cifar10-resnet18-pgd_at-awp")
    assert (trades["awp"], trades["awp_warmup"], trades["epochs"], trades["alpha"]) == (0.005, 9, 200, 2 / 255)
    assert (at["awp"], at["awp_warmup"], at["epochs"]) == (0.01, 0, 200)
    steps = 10  # per epoch
    lr = {epoch: learning_rate(trades["schedule"], 0.1, (epoch - 1) * steps, 200 * steps) for epoch in (99, 100, 150)}
    assert lr == pytest.approx({99: 0.1, 100: 0.01, 150: 0.001})  # `if epoch >= 100` / `>= 150`, epochs from 1


# --------------------------------------------------------------------------- LIET (fzjcdt/FastAT_Benchmark)


def authors_liet_criterion(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """fzjcdt/FastAT_Benchmark, fast_at/liet.py, `_get_custom_loss`'s CustomCrossEntropyLoss.forward (mean)."""
    smooth_labels = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1.0)
    if label_smoothing > 0:
        smooth_labels = smooth_labels * (1 - label_smoothing)
        rand_labels = torch.rand_like(smooth_labels) * label_smoothing
        mask = smooth_labels.bool()
        rand_labels = rand_labels.masked_fill_(mask, 0)
        rand_labels_sum = rand_labels.sum(dim=1, keepdim=True)
        rand_labels = rand_labels / rand_labels_sum * label_smoothing
        smooth_labels += rand_labels
    log_probs = F.log_softmax(logits, dim=-1)
    return (-smooth_labels * log_probs).sum(dim=-1).mean()


def authors_liet_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, cur_lambda: float,
                      class_num: int = 10, label_smoothing: float = 0.6, min_mask_ratio: float = 0.1,
                      max_mask_ratio: float = 0.5) -> torch.Tensor:
    """fzjcdt/FastAT_Benchmark, fast_at/liet.py, `LIET.train`: the body of the batch loop at idx % li_update == 0
    (LI recomputed), up to the loss; torch's global generator draws, as there."""
    model.eval()
    constant_input = torch.full((class_num, *images.shape[1:]), 0.5)
    constant_input.requires_grad_(True)
    sequential_labels = torch.arange(class_num)
    output = model(constant_input)
    loss = authors_liet_criterion(output, sequential_labels, label_smoothing)
    loss.backward()
    li = eps * torch.sign(constant_input.grad).detach()
    model.train()
    delta = li[labels].clone()
    bonulli_idx = torch.rand_like(images)
    if eps > 8 / 255:
        uniform_noise = torch.zeros_like(images).uniform_(-2 * eps, 2 * eps)
    else:
        uniform_noise = torch.zeros_like(images).uniform_(-eps, eps)
    mask_ratio = torch.rand(1).item() * (max_mask_ratio - min_mask_ratio) + min_mask_ratio
    delta[bonulli_idx < mask_ratio] = uniform_noise[bonulli_idx < mask_ratio]
    if torch.rand(1) < 0.5:
        adv_images = torch.clamp(images.clone() - delta, 0, 1).detach()
    else:
        adv_images = torch.clamp(images.clone() + delta, 0, 1).detach()
    adv_images = adv_images.detach().requires_grad_(True)
    ori_output = model(adv_images)
    ori_loss = authors_liet_criterion(ori_output, labels, label_smoothing)
    ori_loss.backward(retain_graph=True)
    delta = eps * adv_images.grad.sign().detach()
    adv_images = adv_images + delta
    if eps > 8 / 255:
        adv_images = torch.clamp(adv_images, min=0, max=1).detach()
    else:
        delta = torch.clamp(adv_images - images, min=-eps, max=eps)
        adv_images = torch.clamp(images + delta, min=0, max=1).detach()
    output = model(adv_images)
    loss1 = authors_liet_criterion(output, labels, label_smoothing)
    p = F.softmax(ori_output, dim=1)
    q = F.softmax(output, dim=1)
    m = torch.clamp((p + q) / 2.0, 0, 1).log()
    loss2 = cur_lambda * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean")) / 2
    return loss1 + loss2


def test_liet_is_the_benchmarks_liet_step():
    from backsmooth.methods import StepContext
    x, y = batch()
    for eps in (EPS, 16 / 255):  # both of its branches: projected onto the eps-ball, and box only
        for seed in (1, 2, 3):  # the coin: both signs of the start
            ours, theirs = tiny_model().train(), tiny_model().train()
            method = methods.build("liet", eps=eps)
            our_loss = method(ours, x, y, generator=torch.Generator().manual_seed(seed),
                              context=StepContext(epoch=0, epochs=10))
            torch.manual_seed(seed)
            their_loss = authors_liet_step(theirs, x, y, eps, cur_lambda=0 + 100 / 10)
            ours.zero_grad()
            theirs.zero_grad()  # their LI and x_0 backwards also filled parameter gradients; the loop zeroes them
            _compare(ours, theirs, our_loss, their_loss)


@pytest.mark.parametrize("name", [n for n in methods.names() if methods.method_class(n).splits()])
def test_awp_pass_counts_equal_the_floor_plus_the_proxy_step(name):
    from backsmooth import models
    from backsmooth.training.bench import count_passes
    model = models.build("small_cnn", 10)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    method = methods.build(name)
    assert count_passes(model, method, x, y, awp=True).f_units == method.floor_units() + method.awp_units()
