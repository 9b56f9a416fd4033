"""Evaluation in the L2 and L1 threat models: `backsmooth eval --norm`, its refusals, the threat model in the
report, and AutoAttack's L2 version through `backsmooth eval` equal to the package run directly."""

import json

import pytest
import torch
import torch.nn.functional as F

from backsmooth import checkpoint, cli, models
from backsmooth.attacks import AttackSpec, autoattack
from backsmooth.data import load_dataset
from backsmooth.errors import ConfigError
from backsmooth.evaluation import evaluate
from backsmooth.evaluation.accuracy import stratified_subset
from backsmooth.evaluation.state import derived_seed

pytest.importorskip("sklearn")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small CNN trained naturally on the digits' training split, saved as `backsmooth train` saves models."""
    train = load_dataset("digits", val_size=0).train
    x, y = train.images.float() / 255, train.labels
    torch.manual_seed(0)
    net = models.build("small_cnn", 10, in_channels=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(200):
        i = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(net(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("model") / "natural.pt"
    meta = dict(arch="small_cnn", num_classes=10, in_channels=1, image_shape=[1, 8, 8], dataset="digits",
                method="natural", eps=0.1, epoch=1)
    checkpoint.save(path, dict(model=net.eval().state_dict(), meta=meta))
    return path


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["eval", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_l2_evaluation_states_its_threat_model_everywhere(saved_model, tmp_path, capsys):
    code, out, err = _eval(capsys, str(saved_model), "--norm", "L2", "--eps", "0.5", "--attacks", "pgd10,cw10,fgsm",
                           "--n-examples", "60", "--out", str(tmp_path), "--name", "l2")
    assert code == 0, err
    assert "threat model: L2, eps 0.5" in out and "warning" not in out
    report = json.loads((tmp_path / "eval-l2.json").read_text())
    assert report["threat_model"] == "L2" and report["evaluation"]["norm"] == "l2"
    assert {a["settings"]["norm"] for a in report["evaluation"]["attacks"].values()} == {"L2"}
    per_attack = report["evaluation"]["per_attack"]
    assert per_attack["pgd10"] < report["evaluation"]["clean_acc"]  # the attack works at L2
    assert per_attack["fgsm"] >= per_attack["pgd10"] - 0.05


def test_a_wrong_norm_or_eps_is_one_line_and_exit_2(saved_model, tmp_path, capsys):
    cases = {("--norm", "l3"): "unknown norm 'l3'; choose one of: linf, l2, l1",
             ("--norm", "l2"): "give --eps for l2",
             ("--norm", "l2", "--eps", "-1"): "--eps must be a finite number >= 0",
             ("--norm", "l2", "--eps", "nan"): "is not a finite number",
             ("--norm", "l1", "--eps", "100"): "--eps must be at most 64 at l1 on digits",
             ("--norm", "l2", "--eps", "0.5", "--step-size", "9"): "--step-size must be at most 8 at l2"}
    for flags, message in cases.items():
        code, out, err = _eval(capsys, str(saved_model), *flags, "--n-examples", "20", "--out", str(tmp_path))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_an_eps_of_another_norm_gets_a_one_line_warning(saved_model, tmp_path, capsys):
    code, out, _ = _eval(capsys, str(saved_model), "--norm", "l2", "--eps", "8/255", "--attacks", "pgd5",
                         "--n-examples", "20", "--out", str(tmp_path))
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert code == 0 and warnings == ["warning: eps 0.0313725 is unusual for l2 (benchmarks use 0.5 on CIFAR-10, "
                                      "3.0 on ImageNet); did you mean --norm linf?"]
    with pytest.warns(UserWarning, match="unusual for linf"):
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), torch.rand(4, 1, 2, 2),
                 torch.zeros(4, dtype=torch.long), eps=0.5, attacks="pgd2", progress=False)


def test_an_attack_for_linf_only_refuses_another_norm():
    spec = AttackSpec("mine", "mine", make=lambda spec, eps, step: None)
    with pytest.raises(ConfigError, match="attack 'mine' is for linf only, not l2"):
        spec.build(0.5, 0.1, "l2")


@pytest.mark.slow
def test_autoattack_l2_through_eval_equals_the_package_run_directly(saved_model, tmp_path, capsys):
    package = pytest.importorskip("pyautoattack")
    code, _, err = _eval(capsys, str(saved_model), "--norm", "l2", "--eps", "0.5", "--attacks", "autoattack-apgd",
                         "--n-examples", "40", "--out", str(tmp_path), "--name", "aa")
    assert code == 0, err
    ours = json.loads((tmp_path / "eval-aa.json").read_text())["evaluation"]
    # the package itself, component after component on the points still robust, each with the seed eval gives it
    model, _ = checkpoint.load_model(saved_model)
    test = load_dataset("digits", val_size=0).test
    index = stratified_subset(test.labels, 40, 0)
    x, y = test.images[index].float() / 255, test.labels[index]
    robust = model(x).argmax(1) == y
    after = {}
    for component in autoattack.AUTOATTACK_VARIANTS["autoattack-apgd"]:
        adversary = package.AutoAttack(model, norm="L2", eps=0.5, version="standard",
                                       seed=derived_seed(0, component, 0), device="cpu")
        adversary.attacks_to_run = [component]
        adversary.verbose = False
        todo = robust.nonzero().squeeze(1)
        x_adv, _ = adversary.run_standard_evaluation(x[todo], y[todo], batch_size=len(todo))
        assert ((x_adv - x[todo]).flatten(1).norm(dim=1) <= 0.5 + 1e-4).all()
        robust[todo] = model(x_adv).argmax(1) == y[todo]
        after[component] = robust.sum().item() / len(robust)
    assert ours["attacks"]["autoattack-apgd"]["after_component"] == pytest.approx(after, abs=1e-12)
    assert after["apgd-t"] < ours["clean_acc"]  # the attack found something to break
