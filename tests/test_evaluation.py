"""The evaluation suite: attack names, agreement with an independent PGD, worst case, gradient-masking
flags, AutoAttack through its package, resuming after a real kill, and `backsmooth eval` end to end."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backsmooth import checkpoint, cli, models
from backsmooth.attacks import autoattack
from backsmooth.errors import BacksmoothError, ConfigError
from backsmooth.evaluation import (
    AttackSpec,
    binomial_tail,
    evaluate,
    model_info,
    paired_excess,
    parse_attack,
    parse_attacks,
    result_checks,
    worst_case,
)
from backsmooth.evaluation import state as evaluation_state

SRC = Path(__file__).resolve().parents[1] / "src"
EPS = 0.1  # digits pixels are coarse (17 grey levels); at 0.1 a naturally trained CNN is half broken


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    return torch.tensor(data.images, dtype=torch.float32)[:, None] / 16, torch.tensor(data.target)


@pytest.fixture(scope="module")
def model(digits) -> nn.Module:
    """A small CNN trained naturally on 1000 digits: about 98% clean, about 50% under PGD-20 at eps 0.1."""
    x, y = digits
    torch.manual_seed(0)
    net = models.build("small_cnn", 10, in_channels=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        i = torch.randint(0, 1000, (64,))
        loss = F.cross_entropy(net(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def held_out(digits, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits
    return x[1000:1000 + n], y[1000:1000 + n]


# --------------------------------------------------------------------------- names


def test_attack_names_parse_to_documented_settings():
    def fields(spec: AttackSpec) -> tuple:
        return spec.name, spec.kind, spec.steps, spec.random_start, spec.restarts

    assert fields(parse_attack("pgd20")) == ("pgd20", "pgd", 20, True, 1)
    assert fields(parse_attack("PGD100-norand")) == ("pgd100-norand", "pgd", 100, False, 1)
    assert fields(parse_attack("cw30x4")) == ("cw30x4", "cw", 30, True, 4)
    assert parse_attack("pgd20").settings(0.1, 0.025) == dict(kind="pgd", eps=0.1, norm="Linf", loss="CE", steps=20,
                                                               step_size=0.025, random_start=True, restarts=1)
    assert parse_attack("cw20").settings(0.5, 0.125, "l2")["norm"] == "L2"
    assert parse_attack("fgsm").kind == "fgsm"
    assert parse_attack("autoattack").components == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert parse_attack("autoattack-apgd").components == ("apgd-ce", "apgd-t")
    assert [s.name for s in parse_attacks("pgd20, cw20,,fgsm")] == ["pgd20", "cw20", "fgsm"]
    for bad, message in (("pgd", "valid forms"), ("pgd0", "valid forms"), ("bim10", "pgdK"),
                         ("pgd20x3-norand", "restarts"), ("pgd20,pgd20", "twice")):
        with pytest.raises(ConfigError, match=message):
            parse_attacks(bad)


# --------------------------------------------------------------------------- correctness


@pytest.mark.slow
def test_pgd_without_random_start_matches_torchattacks(model, digits):
    """Same model, data, eps, step and steps, deterministic: the same points survive (797 examples)."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = held_out(digits, 797)
    ours = evaluate(model, x, y, EPS, ["pgd20-norand"], batch_size=400, step_size=EPS / 4, progress=False)
    x_adv = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=20, random_start=False)(x, y)
    with torch.no_grad():
        theirs = (model(x_adv).argmax(1) == y) & ours.per_example["clean"]
    assert 0.2 < ours.per_attack["pgd20-norand"] < 0.9  # neither trivially robust nor trivially broken
    assert (theirs == ours.per_example["pgd20-norand"]).float().mean() >= 0.99
    assert abs(ours.per_attack["pgd20-norand"] - theirs.float().mean().item()) <= 0.01


@pytest.mark.slow
def test_pgd_with_random_start_agrees_with_torchattacks(model, digits):
    """The two draw different noise, so agreement is statistical: within 1 point on all 1797 digits."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits
    ours = evaluate(model, x, y, EPS, ["pgd20"], batch_size=600, step_size=EPS / 4, progress=False)
    torch.manual_seed(0)
    x_adv = torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=20, random_start=True)(x, y)
    with torch.no_grad():
        theirs = ((model(x_adv).argmax(1) == y) & ours.per_example["clean"]).float().mean().item()
    assert 0.2 < ours.per_attack["pgd20"] < 0.9
    assert abs(ours.per_attack["pgd20"] - theirs) <= 0.01
    assert ours.n_examples == 1797 and ours.attacks["pgd20"]["settings"]["steps"] == 20


def test_worst_case_is_pointwise():
    clean = torch.tensor([True, True, True, True, False])
    a = torch.tensor([True, False, True, True, True])
    b = torch.tensor([True, True, False, True, True])
    assert worst_case(clean, [a, b]).tolist() == [True, False, False, True, False]
    assert worst_case(clean, []).tolist() == clean.tolist()  # no attack: clean accuracy


def test_result_is_the_worst_case_of_its_attacks(model, digits):
    x, y = held_out(digits, 200)
    result = evaluate(model, x, y, EPS, "pgd20,cw20,fgsm", batch_size=64, progress=False)
    flags = result.per_example
    both = flags["clean"] & flags["pgd20"] & flags["cw20"] & flags["fgsm"]
    assert result.robust_acc == both.sum().item() / 200
    assert result.robust_acc <= min(result.per_attack.values()) <= result.clean_acc
    assert result.clean_acc == flags["clean"].sum().item() / 200
    assert result.settings["step_size"] == EPS / 4 and result.settings["attacks"] == ["pgd20", "cw20", "fgsm"]
    assert result.flags == []
    info = model_info(result, "m", "small_cnn", "digits")
    assert info["clean_acc"] == f"{100 * result.clean_acc:.2f}" and "autoattack_acc" not in info
    json.dumps(info)  # every field is JSON
    written = result.to_json()
    assert list(written) == ["n_examples", "eps", "clean_acc", "robust_acc", "per_attack", "attacks", "settings",
                             "self_checks", "flags", "autoattack_warnings", "batches", "seconds",
                             "norm"]  # no per_example
    assert written["robust_acc"] == result.robust_acc and written["attacks"]["fgsm"]["settings"]["step_size"] == EPS
    assert model_info(written, "m", "small_cnn", "digits") == info  # a plain dict of the same keys works too


def test_eps_zero_reproduces_clean_accuracy(model, digits):
    x, y = held_out(digits, 100)
    result = evaluate(model, x, y, 0.0, "pgd20,cw20", progress=False)
    assert result.per_attack == {"pgd20": result.clean_acc, "cw20": result.clean_acc}
    assert "eps0_not_clean" not in result.flags


# --------------------------------------------------------------------------- self-checks


class Quantised(nn.Module):
    """Rounds its input to 8 grey levels: a non-differentiable step whose input gradient is zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 7) / 7)


class Softmaxed(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


class Noisy(nn.Module):
    """Dropout that stays on in eval mode: a randomised model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(F.dropout(x, 0.3, training=True))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_healthy_model_is_not_flagged(model, digits, seed):
    """Random-start noise moves a few of 150 examples between PGD-20 and PGD-40; that is not evidence."""
    x, y = held_out(digits, 150)
    result = evaluate(model, x, y, EPS, "pgd20,pgd40,fgsm", batch_size=75, seed=seed, progress=False)
    assert result.flags == [], [c["message"] for c in result.self_checks if c["flagged"]]
    checks = {c["name"] for c in result.self_checks}
    assert {"outputs_probabilities", "zero_input_gradients", "nondeterministic", "eps0_not_clean",
            "robust_above_clean", "more_steps_higher_accuracy", "attack_not_converged", "fgsm_beats_pgd"} == checks


class SlowSlope(nn.Module):
    """Two classes split by the mean pixel at 0.5: the margin of an image is |mean - 0.5|, and a signed
    step of size s moves the mean by exactly s. With steps of eps/50, 20 steps reach 0.4 eps and
    100 steps the whole ball: every margin between the two is broken by PGD-100 and not by PGD-20."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.stack([torch.zeros(16), torch.full((16,), 10 / 16)]))
            self.linear.bias.copy_(torch.tensor([0.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_attack_that_needs_more_steps_is_flagged():
    generator = torch.Generator().manual_seed(0)
    margins = torch.rand(200, generator=generator) * 0.15 + 0.002
    y = torch.arange(200) % 2
    x = (0.5 + torch.where(y == 1, margins, -margins)).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    result = evaluate(SlowSlope().eval(), x, y, EPS, "pgd20,pgd100", step_size=EPS / 50, progress=False)
    assert result.clean_acc == 1.0
    assert result.per_attack["pgd100"] < result.per_attack["pgd20"] - 0.2
    check = next(c for c in result.self_checks if c["name"] == "attack_not_converged")
    assert check.get("flagged") and result.flags == ["attack_not_converged"]
    assert "pgd100 minus pgd20" in check["message"] and "exact McNemar p = " in check["message"]
    assert check["value"] == pytest.approx(100 * (result.per_attack["pgd20"] - result.per_attack["pgd100"]))


def test_exact_tests_match_their_closed_forms():
    assert binomial_tail(0, 5, 0.5) == 1.0 and binomial_tail(6, 5, 0.5) == 0.0
    assert binomial_tail(4, 5, 0.5) == pytest.approx(6 / 32)  # the three-example gap of a healthy model: p = 0.19
    assert binomial_tail(10, 10, 0.5) == pytest.approx(2 ** -10)
    assert binomial_tail(3, 1000, 0.002) == pytest.approx(
        1 - sum(math.comb(1000, i) * 0.002 ** i * 0.998 ** (1000 - i) for i in range(3)))
    comparison = paired_excess(torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool),
                               torch.tensor([0, 1, 0, 1, 1], dtype=torch.bool))
    assert (comparison.only_first, comparison.only_second, comparison.excess) == (2, 1, 0.2)
    assert comparison.p_value == pytest.approx(0.5)


def test_gradient_masking_model_is_flagged(model, digits):
    x, y = held_out(digits, 150)
    masked = evaluate(Quantised(model).eval(), x, y, EPS, "pgd20", progress=False)
    assert "zero_input_gradients" in masked.flags
    check = next(c for c in masked.self_checks if c["name"] == "zero_input_gradients")
    assert check["value"] == 1.0 and "non-differentiable" in check["message"]
    # PGD cannot move it, so its number looks far better than the healthy model's: the flag is the warning
    healthy = evaluate(model, x, y, EPS, "pgd20", progress=False)
    assert masked.per_attack["pgd20"] > healthy.per_attack["pgd20"] + 0.2


def test_probability_outputs_and_randomness_are_flagged(model, digits):
    x, y = held_out(digits, 100)
    assert "outputs_probabilities" in evaluate(Softmaxed(model).eval(), x, y, EPS, "fgsm", progress=False).flags
    noisy = evaluate(Noisy(model).eval(), x, y, EPS, "fgsm", progress=False).flags
    assert "nondeterministic" in noisy and "eps0_not_clean" in noisy


def _flags(n_true: int, n: int = 400, offset: int = 0) -> torch.Tensor:
    """n flags, `n_true` of them set, starting at `offset`."""
    flags = torch.zeros(n, dtype=torch.bool)
    flags[offset:offset + n_true] = True
    return flags


def test_registered_families_say_which_comparisons_they_join():
    def roles(name: str) -> tuple[bool, bool, bool, bool]:
        spec = parse_attack(name)
        return spec.iterative, spec.single_step, spec.single_step_reference, spec.runs_in_package

    assert roles("pgd20") == roles("pgd20x3") == roles("pgd20-norand") == (True, False, True, False)
    assert roles("cw20") == (True, False, False, False)
    assert roles("fgsm") == (False, True, False, False)
    assert roles("autoattack") == roles("autoattack-apgd") == (False, False, False, True)


def test_an_attack_joins_the_comparisons_its_spec_names():
    """A user's family joins the more-steps pairs with `iterative=True`, and FGSM's check with
    `single_step_reference=True`; without the flags it joins neither, whatever its kind is called."""
    def spec(name: str, steps: int, **roles: bool) -> AttackSpec:
        return AttackSpec(name, "mine", steps, make=lambda s, eps, step: None, **roles)

    clean, few, many = _flags(320), _flags(200), _flags(220)
    per_example = {"mine20": few, "mine100": many, "fgsm": _flags(180)}
    joined = {c.name for c in result_checks((spec("mine20", 20, iterative=True, single_step_reference=True),
                                             spec("mine100", 100, iterative=True), parse_attack("fgsm")),
                                            clean, per_example, {}, {})}
    assert {"more_steps_higher_accuracy", "attack_not_converged", "fgsm_beats_pgd"} <= joined
    alone = {c.name for c in result_checks((spec("mine20", 20), spec("mine100", 100), parse_attack("fgsm")),
                                           clean, per_example, {}, {})}
    assert alone == set()


def test_accuracy_comparisons_need_size_and_evidence():
    specs = parse_attacks("pgd20,pgd100,fgsm,autoattack-apgd")
    clean = _flags(320)
    # pgd100 keeps 20 examples (5 points) that pgd20 broke and breaks none pgd20 kept: p = 2**-20
    pgd20, pgd100 = _flags(200), _flags(220)
    fgsm = _flags(180)  # 20 more broken by one step than by pgd20
    aa = _flags(160)
    per_example = {"clean": clean, "pgd20": pgd20, "pgd100": pgd100, "fgsm": fgsm, "autoattack-apgd": aa}
    raw = {"pgd20": pgd20, "pgd100": pgd100, "fgsm": fgsm}
    checks = {c.name: c for c in result_checks(specs, clean, per_example, raw, {"apgd-ce": aa, "apgd-t": aa})}
    assert checks["more_steps_higher_accuracy"].flagged
    assert checks["more_steps_higher_accuracy"].value == pytest.approx(5)
    assert "20 vs 0 discordant of 400" in checks["more_steps_higher_accuracy"].message
    assert not checks["attack_not_converged"].flagged
    assert checks["fgsm_beats_pgd"].flagged
    # 10 points below pgd20 alone, but only 5 below the pointwise worst case of the engine attacks (fgsm)
    assert not checks["autoattack-apgd_far_below_pgd"].flagged
    assert checks["autoattack-apgd_far_below_pgd"].value == pytest.approx(5)
    assert not checks["robust_above_clean"].flagged

    # the same 5-point rise made of 30 gains and 10 losses: still significant (p = 0.001)
    pgd100 = _flags(190, offset=10) | _flags(30, offset=200)
    checks = {c.name: c for c in result_checks(parse_attacks("pgd20,pgd100"), clean,
                                               {"pgd20": pgd20, "pgd100": pgd100}, {}, {})}
    assert checks["more_steps_higher_accuracy"].flagged
    # a 1.5-point rise from 9 gains and 3 losses exceeds the 1-point tolerance but is noise (p = 0.07)
    pgd100 = _flags(197, offset=3) | _flags(9, offset=200)
    checks = {c.name: c for c in result_checks(parse_attacks("pgd20,pgd100"), clean,
                                               {"pgd20": pgd20, "pgd100": pgd100}, {}, {})}
    assert not checks["more_steps_higher_accuracy"].flagged and checks["more_steps_higher_accuracy"].value > 1

    # accuracy under attack above clean on 30 examples, none the other way; AutoAttack 20 points below
    raw = {"pgd20": clean | _flags(30, offset=320)}
    aa = _flags(120)
    checks = {c.name: c for c in result_checks(parse_attacks("pgd20,autoattack-apgd"), clean,
                                               {"pgd20": _flags(200), "autoattack-apgd": aa}, raw,
                                               {"apgd-ce": aa, "apgd-t": aa})}
    assert checks["robust_above_clean"].flagged
    assert checks["autoattack-apgd_far_below_pgd"].flagged
    assert "20.00 points" in checks["autoattack-apgd_far_below_pgd"].message


def test_square_check_tests_its_count_against_autoattack_rate():
    specs = parse_attacks("autoattack")
    clean = _flags(800, 1000)
    white_box = _flags(500, 1000)
    for broken, flagged in ((3, False), (12, True)):  # 0.3% is within noise of 0.2%; 1.2% is not
        square = _flags(500 - broken, 1000)
        components = {"apgd-ce": white_box, "apgd-t": white_box, "fab-t": white_box, "square": square}
        checks = {c.name: c for c in result_checks(specs, clean, {"clean": clean, "autoattack": square}, {},
                                                   components)}
        assert checks["square_beats_white_box"].flagged is flagged
        assert f"broke {broken} of 1000" in checks["square_beats_white_box"].message


# --------------------------------------------------------------------------- AutoAttack


@pytest.mark.slow
def test_autoattack_subset_runs_through_the_package(model, digits):
    pytest.importorskip("pyautoattack")
    x, y = held_out(digits, 24)
    result = evaluate(model, x, y, EPS, "pgd20,autoattack-apgd", batch_size=12, progress=False)
    report = result.attacks["autoattack-apgd"]
    assert report["settings"]["package"].startswith("pyautoattack")
    assert list(report["after_component"]) == ["apgd-ce", "apgd-t"]
    assert report["after_component"]["apgd-t"] <= report["after_component"]["apgd-ce"] <= result.clean_acc
    assert result.per_attack["autoattack-apgd"] == report["after_component"]["apgd-t"]
    assert result.per_attack["autoattack-apgd"] <= result.per_attack["pgd20"] + 0.1
    assert "autoattack-apgd_far_below_pgd" in {c["name"] for c in result.self_checks}
    assert torch.equal(result.per_example["autoattack-apgd"] & ~result.per_example["clean"],
                       torch.zeros(24, dtype=torch.bool))


@pytest.mark.slow
def test_standard_autoattack_reports_every_component(model, digits):
    pytest.importorskip("pyautoattack")
    x, y = held_out(digits, 8)
    result = evaluate(model, x, y, EPS, "autoattack-apgd,autoattack", progress=False)
    after = result.attacks["autoattack"]["after_component"]
    assert list(after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.per_attack["autoattack-apgd"] == after["apgd-t"]  # shared components run once
    assert result.batches == {"total": 5, "resumed": 0}
    assert list(after.values()) == sorted(after.values(), reverse=True)  # cumulative, as in the package
    assert "square_beats_white_box" in {c["name"] for c in result.self_checks}
    info = model_info(result, "m", "small_cnn", "digits")
    assert info["autoattack_acc"] == f"{100 * after['square']:.2f}" and info["eps"] == "0.1"


def test_missing_autoattack_package_gives_an_install_hint(model, digits, monkeypatch):
    def no_package(name: str, *args, **kwargs):
        if name in autoattack.PACKAGES:
            raise ImportError(f"No module named {name!r}")
        return importlib.import_module(name, *args, **kwargs)

    monkeypatch.setattr(autoattack.importlib, "import_module", no_package)
    x, y = held_out(digits, 4)
    with pytest.raises(BacksmoothError) as error:
        evaluate(model, x, y, EPS, "pgd20,autoattack", progress=False)
    assert "pip install pyautoattack" in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- resuming


RUNNER = textwrap.dedent("""
    import sys, torch
    from backsmooth import models
    from backsmooth.evaluation import evaluate
    torch.set_num_threads(1)
    model = models.build("small_cnn", 10, in_channels=1)
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    data = torch.load(sys.argv[2], weights_only=True)
    evaluate(model.eval(), data["x"], data["y"], 0.1, ("pgd100", "cw20"), 20, seed=3, state_path=sys.argv[3],
             progress=False)
""")


@pytest.mark.slow
def test_killed_evaluation_resumes_to_the_same_result(model, digits, tmp_path):
    x, y = held_out(digits, 240)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    (tmp_path / "runner.py").write_text(RUNNER)
    state = tmp_path / "eval.state.pt"
    process = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "model.pt"),
                                str(tmp_path / "data.pt"), str(state)],
                               env=dict(os.environ, PYTHONPATH=str(SRC)), stderr=subprocess.PIPE)
    done = 0
    deadline = time.monotonic() + 120
    while done < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        if state.exists():
            done = checkpoint.load(state)["units"].get("pgd100", {}).get("done", 0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    saved = checkpoint.load(state)["units"]
    assert 3 <= saved["pgd100"]["done"] < 12 and "cw20" not in saved  # killed part-way through pgd100

    resumed = evaluate(model, x, y, EPS, ("pgd100", "cw20"), 20, seed=3, state_path=state, progress=False)
    fresh = evaluate(model, x, y, EPS, ("pgd100", "cw20"), 20, seed=3, progress=False)
    assert resumed.batches["resumed"] == 12 + saved["pgd100"]["done"]  # clean and the finished pgd100 batches
    for name, flags in fresh.per_example.items():
        assert torch.equal(resumed.per_example[name], flags), name
    assert (resumed.clean_acc, resumed.robust_acc, resumed.per_attack) == \
        (fresh.clean_acc, fresh.robust_acc, fresh.per_attack)

    with pytest.raises(ConfigError, match="different eps.*restart"):
        evaluate(model, x, y, 0.05, ("pgd100",), 20, seed=3, state_path=state, progress=False)
    assert evaluate(model, x, y, 0.05, ("fgsm",), 20, seed=3, state_path=state, restart=True,
                    progress=False).batches["resumed"] == 0


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run of `backsmooth train` on the real handwritten digits (sklearn's, embedded): 2 epochs."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("eval-cli") / "run"
    assert cli.main(["train", "--preset", "demo", "--epochs", "2", "--out", str(out), "--no-progress",
                     "--cache-dir", str(out.parent / "cache")]) == 0
    return out


def test_cli_evaluates_a_trained_run(trained_run, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(trained_run), "--n-examples", "200", "--attacks", "pgd20,cw20", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for text in ("200 of 359 digits test examples", "clean", "pgd20", "cw20", "worst case", "self-checks",
                 "eval-run.json"):
        assert text in printed
    report = json.loads((trained_run / "eval-run.json").read_text())
    assert {"name", "architecture", "dataset", "eps", "clean_acc", "evaluation"} <= set(report)
    assert report["name"] == "run" and report["architecture"] == "small_cnn" and report["dataset"] == "digits"
    assert report["checkpoint"]["method"] == "backward_smoothing" and report["subset"]["stratified"]
    evaluation = report["evaluation"]
    assert evaluation["n_examples"] == 200 and set(evaluation["per_attack"]) == {"pgd20", "cw20"}
    assert report["clean_acc"] == f"{100 * evaluation['clean_acc']:.2f}"
    assert 0 < evaluation["robust_acc"] <= min(evaluation["per_attack"].values()) <= evaluation["clean_acc"]
    assert not (trained_run / "eval-run.state.pt").exists()  # removed once the JSON is written


@pytest.mark.parametrize("argv,message", [
    (["--attacks", "pgd20,bogus"], "unknown attack 'bogus'"),
    (["--n-examples", "0"], "--n-examples must be positive"),
    (["--batch-size", "0"], "batch size must be positive"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
])
def test_cli_bad_input_is_one_line_exit_2(trained_run, argv, message, capsys):
    assert cli.main(["eval", str(trained_run), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("batches_saved", [1, 0])
def test_ctrl_c_names_the_state_file_it_left(trained_run, batches_saved, tmp_path, monkeypatch, capsys):
    saves = []

    def save_then_ctrl_c(path, state):
        if len(saves) < batches_saved:
            checkpoint.save(path, state)
        saves.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation_state, "save", save_then_ctrl_c)
    out = tmp_path / "evals"
    assert cli.main(["eval", str(trained_run), "--n-examples", "40", "--attacks", "fgsm", "--name", "mine",
                     "--out", str(out), "--no-progress"]) == 75
    err = capsys.readouterr().err
    state = out / "eval-mine.state.pt"
    assert saves == [state] and state.is_file() == bool(batches_saved)
    expected = f"finished batches are saved in {state};" if batches_saved else "no batch had finished"
    assert err.count("\n") == 1 and expected in err and "eval-NAME" not in err, err
    assert not (out / "eval-mine.json").exists()
