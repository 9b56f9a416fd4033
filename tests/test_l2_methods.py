"""Training in the L2 threat model: the methods with an L2 form keep every input in the L2 ball (N-FGSM: its
radius) and the box, use the L2 step, and make the passes of their L-inf form; the others refuse --norm l2 in one
line; the run records its norm, and its validation and guard attack in it."""

import json

import pytest
import torch
from method_checks import ForwardLog, batch, gen, tiny_model

from backsmooth import cli, methods
from backsmooth.attacks import lp_norms
from backsmooth.config import from_mapping
from backsmooth.errors import ConfigError
from backsmooth.methods.backward_smoothing import backward_smoothing_start
from backsmooth.training import train
from backsmooth.training.bench import count_passes

EPS = 0.5
L2_METHODS = sorted(n for n in methods.names() if "l2" in methods.method_class(n).norms and n != "natural")


def test_the_methods_with_an_l2_form():
    assert L2_METHODS == ["backward_smoothing", "fast_trades", "fgsm_rs", "gradalign", "n_fgsm", "pgd_at", "trades"]


@pytest.mark.parametrize("name", L2_METHODS)
def test_every_input_lies_in_the_l2_ball_and_the_box(name):
    method = methods.build(name, eps=EPS, norm="l2")
    model = tiny_model().train()
    log = ForwardLog(model)
    x, y = batch(interior=True)
    method(model, x, y, generator=gen(0)).backward()
    radius = getattr(method, "radius", EPS)
    moved = 0
    for _, _, seen in log.calls:
        if seen.shape != x.shape:
            continue
        distance = lp_norms(seen - x, "l2")
        assert (distance <= radius * (1 + 1e-5)).all(), (name, distance.max().item(), radius)
        assert seen.min() >= 0 and seen.max() <= 1
        moved += bool((distance > 1e-3).any())
    assert moved  # some input was perturbed


@pytest.mark.parametrize("name", L2_METHODS)
def test_the_l2_form_makes_the_passes_of_the_linf_form(name):
    x, y = batch()
    linf = count_passes(tiny_model(), methods.build(name, eps=8 / 255), x, y)
    l2 = count_passes(tiny_model(), methods.build(name, eps=EPS, norm="l2"), x, y)
    assert l2 == linf


def test_the_backward_step_at_l2_is_a_full_step_along_the_normalised_gradient():
    """Away from the box, x0 - x = -alpha g / ||g||_2 exactly: L2 length alpha, not a sign step."""
    x, _ = batch(interior=True)
    x0, _ = backward_smoothing_start(tiny_model(), x, gamma=1.0, alpha=0.2, eps=EPS, generator=gen(0), norm="l2")
    assert torch.allclose(lp_norms(x0 - x, "l2"), torch.full((len(x),), 0.2), atol=1e-5)
    assert len((x0 - x).abs().unique()) > 3  # not the three values of a sign step


def test_l2_step_sizes_follow_the_authors():
    assert methods.build("pgd_at", eps=EPS, norm="l2").alpha == pytest.approx(EPS / 4)  # the L2 references
    assert methods.build("trades", eps=EPS, norm="l2").alpha == pytest.approx(2 * EPS / 10)  # the authors' L2 lr
    assert methods.build("backward_smoothing", eps=EPS, norm="l2").alpha == EPS
    assert methods.build("pgd_at").alpha == 2 / 255 and methods.build("trades").alpha == 0.007  # L-inf unchanged


@pytest.mark.parametrize("name", sorted(set(methods.names()) - set(L2_METHODS) - {"natural"}))
def test_linf_only_methods_refuse_l2_in_one_line(name):
    with pytest.raises(ConfigError, match=f"{name} is defined for linf only, not l2") as error:
        methods.build(name, eps=EPS, norm="l2")
    assert "\n" not in str(error.value)


def test_train_at_l2_records_the_norm_and_refuses_what_it_cannot(tmp_path, capsys):
    code = cli.main(["train", "--method", "gat", "--norm", "l2", "--eps", "0.5", "--out", str(tmp_path / "gat")])
    assert code == 2 and "gat is defined for linf only" in capsys.readouterr().err
    assert cli.main(["train", "--norm", "l5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown norm 'l5'" in capsys.readouterr().err
    assert not (tmp_path / "gat").exists() and not (tmp_path / "x").exists()
    settings = dict(dataset="synthetic", arch="small_cnn", method="fgsm_rs", norm="L2", eps=0.5, epochs=1,
                    batch_size=32, val_size=64, final_eval_examples=32, val_pgd_steps=2, collapse_every=2,
                    out=str(tmp_path / "run"))
    summary = train(from_mapping(settings), progress=False)
    assert summary["norm"] == "l2"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["norm"] == "l2"
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["meta"]["norm"] == "l2"


def test_l2_presets_exist_for_every_method_with_an_l2_form_and_only_those():
    from backsmooth import presets
    l2 = {name for name in presets.PRESETS if name.endswith("-l2")}
    allowed = set(L2_METHODS) | {"natural"}
    expected = {f"{prefix}-{m}-l2" for m in allowed for prefix in ("cifar10-resnet18", "cpu-digits", "cpu-cifar10")}
    assert l2 == expected
    for name in l2:
        values, linf = presets.preset(name), presets.preset(name.removesuffix("-l2"))
        assert (values["norm"], values["eps"]) == ("l2", 0.5)
        changed = {k for k in values if values[k] != linf.get(k)}
        assert changed <= {"norm", "eps", "epochs"}, (name, changed)  # the rest of the protocol is the L-inf one's
    config = from_mapping(presets.preset("cifar10-resnet18-pgd_at-l2"))
    assert (config.arch, config.epochs, config.norm) == ("resnet18", 100, "l2")
    assert methods.build("pgd_at", **config.method_hyperparameters()).alpha == pytest.approx(0.5 / 4)
