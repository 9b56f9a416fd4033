"""FGSM-RS-CS against a transcription of the code that runs it (the 2026 FastAT benchmark, fzjcdt/FastAT_Benchmark;
no other release of the method was found), as tests/test_authors_baselines.py does for the other methods: the same
small BatchNorm model, batch and random draw on both sides; every train-mode input, the loss, every parameter
gradient and the BatchNorm buffers compared to float tolerance, in the epochs without the loss control and in both
of its branches; and the end-of-epoch bookkeeping.

docs/algorithms.md#fgsm_rs_cs documents the one difference: their FGSM forward runs in train mode (undone here by
`train_mode_attacks`), ours in eval mode (asserted at the end)."""

import pytest
import torch
import torch.nn.functional as F
from method_checks import ForwardLog, batch, gen, tiny_model
from test_authors_baselines import (
    N,
    assert_inputs_equal,
    assert_stats_are_replay,
    compare,
    eval_inputs,
    paper_method,
    train_inputs,
    train_mode_attacks,
    uniform,
)
from torch import Tensor, nn

from backsmooth.methods import StepContext

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["train_mode_attacks"]  # a fixture the tests below use by name


def authors_soft_labels(label: Tensor, factor: float, num_classes: int = 10) -> Tensor:
    """fzjcdt/FastAT_Benchmark @ 1d7105e, fast_at/fgsm_rs_cs.py, `FGSM_RS_CS._label_smoothing`, lines 29-32."""
    one_hot = torch.eye(num_classes, device=label.device)[label]
    return one_hot * factor + (one_hot - 1.) * ((factor - 1.) / float(num_classes - 1))


def authors_rs_cs_step(model: nn.Module, images: Tensor, labels: Tensor, rand_perturb: Tensor, eps: float,
                       epoch: int, pre_loss: float, beta_loss: float) -> tuple[Tensor, Tensor, Tensor]:
    """fzjcdt/FastAT_Benchmark @ 1d7105e, fast_at/fgsm_rs_cs.py, `FGSM_RS_CS.train`, the batch loop, lines 92-141,
    with configs/cifar10/fgsm_rs_cs.yaml (factor 0.6, gamma 0.03, ratio 1, stride 1, w2 1.0, initialize, reg_single
    and reg_multi false, decay_arr [0, 100, 105, 110]) and label smoothing 0.4 (line 39); `rand_perturb` is their
    uniform_(-eps, eps) draw (line 92). The model is in train mode throughout (line 84). Returns (loss, loss_normal,
    data_adv)."""
    factor, gamma, ratio, stride, w2, decay_arr = 0.6, 0.03, 1, 1, 1.0, [0, 100, 105, 110]
    criterion = nn.CrossEntropyLoss(label_smoothing=0.4)
    images = images + rand_perturb
    images = torch.clamp(images, 0, 1)
    label_smooth = authors_soft_labels(labels, factor, 10)
    images = images.detach().requires_grad_(True)
    ori_output = model(images)
    ori_loss = criterion(ori_output, labels)
    grad = torch.autograd.grad(ori_loss, [images])[0]
    perturbation = eps * torch.sign(grad)
    data_adv = images + perturbation
    data_adv = torch.clamp(data_adv, 0, 1)
    output = model(data_adv)
    benign_output = model(images)
    loss_normal = criterion(benign_output, label_smooth)
    loss = criterion(output, label_smooth)
    gamma_flag = False
    for j, _ in enumerate(decay_arr):
        if j < len(decay_arr) - 1:
            start_decay = decay_arr[j]
            end_decay = decay_arr[j + 1]
            if epoch > start_decay + stride and epoch < end_decay - stride:
                gamma_flag = True
                break
    if gamma_flag:
        gamma_max = torch.tensor(gamma)
        gamma_min = gamma_max / ratio
        if torch.abs(loss_normal - pre_loss) > min(max(gamma_min, torch.tensor(beta_loss)), gamma_max):
            if loss_normal - pre_loss > 0:
                loss = loss + w2 * loss_normal
            else:
                loss = loss - w2 * loss_normal
    return loss, loss_normal, data_adv


def test_the_preset_is_the_benchmarks():
    method = paper_method("fgsm_rs_cs")
    assert (method.eps, method.soft_factor, method.control_band, method.band_ratio, method.control_weight) == (
        8 / 255, 0.6, 0.03, 1.0, 1.0)
    assert method.label_smoothing == 0.4  # configs/cifar10/fgsm_rs_cs.yaml: label_smoothing 0.4


def with_state(previous: float, change: float, epoch: int):
    """Our method (the preset's) as it stands at `epoch` after epochs whose benign means give these values."""
    method = paper_method("fgsm_rs_cs")
    method.setup(0, (), torch.device("cpu"))
    method.state.update(epoch=epoch, previous=torch.tensor(previous, dtype=torch.float64),
                        change=torch.tensor(change, dtype=torch.float64))
    return method


@pytest.mark.parametrize("epoch,shift", [(0, 0.0), (1, 0.5), (5, -0.5), (5, 0.5), (5, 0.0), (99, 0.5)])
def test_a_step_with_train_mode_attacks_is_the_benchmarks(epoch, shift, train_mode_attacks):
    """Epochs 0, 1 and 99: no control; epoch 5 with last epoch's benign loss far below (the benign loss is added),
    far above (subtracted) and at it (left alone). The full box, so the clamps act."""
    x, y = batch(N)
    x[:, 0, :2] = 0.0
    x[:, 1, :2] = 1.0
    draw_seed = 3
    theirs_model = tiny_model().train()
    # the benign loss of this batch (a fresh copy: train-mode BatchNorm uses the batch's statistics), to put last
    # epoch's mean on either side of it
    _, benign, _ = authors_rs_cs_step(tiny_model().train(), x, y, uniform(x.shape, 8 / 255, draw_seed), 8 / 255,
                                      epoch, 0.0, 0.0)
    previous = float(benign.detach()) - shift
    method = with_state(previous, -1.0, epoch)
    ours = tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs_model)
    our_loss = method(ours, x, y, generator=gen(draw_seed), context=StepContext(epoch=epoch, epochs=100))
    their_loss, their_normal, their_x_adv = authors_rs_cs_step(theirs_model, x, y, uniform(x.shape, 8 / 255, draw_seed),
                                                               8 / 255, epoch, previous, -1.0)
    assert_inputs_equal(train_inputs(our_log), train_inputs(their_log), "start, point, benign point")
    torch.testing.assert_close(train_inputs(our_log)[1], their_x_adv)
    with torch.no_grad():  # their loss without the control, from a fresh copy (theirs keeps its statistics)
        plain = F.cross_entropy(tiny_model().train()(their_x_adv), authors_soft_labels(y, 0.6), label_smoothing=0.4)
    controlled = 1 < epoch < 99 and shift != 0.0
    assert (abs(float(their_loss) - float(plain)) > 0.1) == controlled  # the control acted where it should
    compare(ours, theirs_model, our_loss, their_loss)


def test_the_epochs_benign_mean_and_its_change_are_the_benchmarks():
    """Lines 154 and 160-162: L_prev is the mean benign loss of the epoch before, its change the difference from
    the one before that, over batches of unequal size."""
    method = paper_method("fgsm_rs_cs")
    model = tiny_model().train()
    means = []
    for epoch in range(3):
        total, count = 0.0, 0
        for step, size in enumerate((8, 5)):
            x, y = batch(size, seed=10 * epoch + step)
            stats: dict = {}
            method(model, x, y, generator=gen(step), stats=stats, context=StepContext(epoch=epoch, epochs=100))
            total += float(stats["benign_ce"]) * size
            count += size
        means.append(total / count)
    method(model, *batch(4, seed=99), generator=gen(0), context=StepContext(epoch=3, epochs=100))
    assert float(method.state["previous"]) == pytest.approx(means[2], rel=1e-6)
    assert float(method.state["change"]) == pytest.approx(means[2] - means[1], rel=1e-6)


def test_it_differs_from_the_benchmark_by_the_attack_mode_alone():
    """docs/algorithms.md#fgsm_rs_cs: our FGSM forward runs in eval mode, theirs in train mode; from the same start
    the points differ, and our running statistics saw the two training forwards only, theirs the start too."""
    x, y = batch(N)
    method = paper_method("fgsm_rs_cs")
    ours, theirs = tiny_model().train(), tiny_model().train()
    our_log, their_log = ForwardLog(ours), ForwardLog(theirs)
    method(ours, x, y, generator=gen(1), context=StepContext(epoch=0, epochs=100))
    _, _, their_x_adv = authors_rs_cs_step(theirs, x, y, uniform(x.shape, 8 / 255, 1), 8 / 255, 0, 0.0, 0.0)
    (our_start,) = eval_inputs(our_log)
    their_start = train_inputs(their_log)[0]
    torch.testing.assert_close(our_start, their_start)
    our_x_adv, our_benign = train_inputs(our_log)
    torch.testing.assert_close(our_benign, their_start)
    assert (our_x_adv - their_x_adv).abs().max() > 0.99 * 8 / 255  # some signs differ: a whole step apart
    assert (ours[1].num_batches_tracked, theirs[1].num_batches_tracked) == (2, 3)
    assert_stats_are_replay(ours, [our_x_adv, our_start])
