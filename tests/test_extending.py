"""Extending backsmooth from outside the package: a method, an attack, a dataset and an architecture,
each registered through the public API and run through `train`, `bench` and `eval`; a method and an
architecture named MODULE:CLASS / MODULE:FUNCTION on the command line; and the method example of
docs/extending.md, added from a module of its own, against the generic method checks, label smoothing
and an unknown floor cost (docs/extending.md)."""

import dataclasses
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from method_checks import CHECKS, batch, check_label_smoothing, gen, tiny_model
from torch import nn

from backsmooth import attacks, cli, data, evaluate, methods, models
from backsmooth.attacks import AttackSpec, Perturbation, ball_init, ce_loss, pgd, uniform_init
from backsmooth.config import RunConfig
from backsmooth.errors import ConfigError
from backsmooth.methods import registry as method_registry
from backsmooth.study.estimate import counted_units, step_units

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
QUICK = ["--epochs", "1", "--batch-size", "32", "--val-pgd-steps", "1", "--final-eval-examples", "40", "--no-progress"]


# --------------------------------------------------------------------------- the four extensions


@dataclasses.dataclass(frozen=True)
class NoisyCE(methods.TrainingMethod):
    """Cross-entropy on x plus uniform noise of radius `jitter` x eps: a one-forward toy method."""

    name = "noisy_ce"
    summary = "cross-entropy on uniformly perturbed inputs (test method)"
    eps: float = 8 / 255
    jitter: float = methods.hyperparameter(1.0, "jitter radius as a multiple of eps")

    def floor_units(self) -> int:
        return 3

    def __call__(self, model, x, y, generator=None, stats=None):
        x_noisy = uniform_init(model, x, y, self.jitter * self.eps, generator)
        return nn.functional.cross_entropy(model(x_noisy), y)


def _two_step_pgd(spec: AttackSpec, eps: float, step_size: float) -> Perturbation:
    return Perturbation(ce_loss, uniform_init, eps, 2 * step_size, spec.steps)


def _parse_big(match):
    return AttackSpec(match.group(0), "big", int(match.group(1)), random_start=True, make=_two_step_pgd)


def _parse_any_norm(match):
    """The docs' family for every norm: `make` takes `norm` because `norms` names more than L-inf."""
    return AttackSpec(match.group(0), "anynorm", int(match.group(1)), random_start=True, norms=("linf", "l2"),
                      make=lambda spec, eps, step, norm="linf": Perturbation(ce_loss, ball_init(norm), eps, step,
                                                                           spec.steps, norm=norm))


def _read_stripes(options: data.SourceOptions) -> data.Source:
    generator = torch.Generator().manual_seed(0)

    def make(n: int) -> data.ArrayDataset:
        labels = torch.arange(n) % 4
        images = torch.zeros(n, 1, 12, 12)
        for c in range(4):
            images[labels == c, :, 3 * c:3 * c + 3, :] = 1.0
        images = (images * 0.7 + 0.3 * torch.rand(n, 1, 12, 12, generator=generator)).mul(255).round()
        return data.ArrayDataset(images.to(torch.uint8), labels)

    return data.Source(make(256), make(80), ("a", "b", "c", "d"), "four stripe classes, generated for a test")


def _tiny_mlp(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 144, 32), nn.ReLU(), nn.Linear(32, num_classes))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register the four through the public API; afterwards remove them so other test modules see the
    built-in registries (the removal reaches into the registries: users have no need to unregister)."""
    from backsmooth.attacks import registry as attack_registry
    from backsmooth.data import load as data_registry
    from backsmooth.models import _REGISTRY as model_registry

    methods.register(NoisyCE)
    attacks.register(r"big([1-9]\d*)", ("bigK",), _parse_big)
    attacks.register(r"anynorm([1-9]\d*)", ("anynormK",), _parse_any_norm)
    data.register("stripes", data.DatasetKind(_read_stripes, "none", None, needs_files=False, default_val_size=32,
                                              summary="generated stripes (test dataset)"))
    models.register("tiny_mlp", _tiny_mlp)
    yield
    method_registry._REGISTRY.pop("noisy_ce")
    attack_registry._FAMILIES.pop()
    attack_registry._FAMILIES.pop()
    data_registry.DATASETS.pop("stripes")
    model_registry.pop("tiny_mlp")


def test_registered_extensions_train_bench_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert "noisy_ce" in methods.names() and "stripes" in data.dataset_names() and "tiny_mlp" in models.names()
    assert cli.main(["train", "--dataset", "stripes", "--arch", "tiny_mlp", "--method", "noisy_ce", "--jitter", "0.5",
                     "--out", str(out), *QUICK]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "noisy_ce" and config["method_options"] == {"jitter": 0.5}
    assert json.loads((out / "summary.json").read_text())["data_note"] == "four stripe classes, generated for a test"

    assert cli.main(["eval", str(out), "--attacks", "big3,pgd3", "--n-examples", "40", "--no-progress"]) == 0
    report = json.loads((out / "eval-run.json").read_text())["evaluation"]
    assert set(report["per_attack"]) == {"big3", "pgd3"}
    assert report["attacks"]["big3"]["settings"]["kind"] == "big"

    capsys.readouterr()
    assert cli.main(["bench", "--arch", "tiny_mlp", "--channels", "1", "--image-size", "12", "--batch-size", "8",
                     "--methods", "noisy_ce,natural", "--warmup", "0", "--repeats", "1", "--steps", "1",
                     "--epoch-images", "0"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("noisy_ce"))
    assert row.split()[-5:-3] == ["3", "3"]  # measured F units equal the declared floor (then MiB, TFLOP/s, MFU)


def test_a_registered_family_with_norms_attacks_at_l2_and_one_without_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()
    x, y = torch.rand(12, 3, 4, 4), torch.arange(12) % 3
    result = evaluate(model, x, y, eps=0.5, attacks="anynorm5,pgd5", norm="l2", progress=False)
    assert result.per_attack["anynorm5"] == result.per_attack["pgd5"]  # the same steps, start and projection
    assert result.attacks["anynorm5"]["settings"]["norm"] == "L2"
    with pytest.raises(ConfigError, match="attack 'big3' is for linf only, not l2"):
        evaluate(model, x, y, eps=0.5, attacks="big3", norm="l2", progress=False)


def test_registered_options_get_flags_and_checks(capsys):
    assert cli.main(["train", "--method", "natural", "--jitter", "0.5", "--dataset", "stripes"]) == 2
    assert "--jitter does not apply to method natural" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "jitter radius as a multiple of eps (noisy_ce)" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- MODULE:NAME from the command line

USER_MODULE = textwrap.dedent('''
    import dataclasses
    from torch import nn
    import torch.nn.functional as F
    from backsmooth.attacks import pgd
    from backsmooth.methods import TrainingMethod, hyperparameter


    @dataclasses.dataclass(frozen=True)
    class HalfPGD(TrainingMethod):
        """Cross-entropy on PGD points for half the batch, on clean points for the other half."""
        name = "half_pgd"
        summary = "half PGD, half clean (user method)"
        eps: float = 8 / 255
        steps: int = hyperparameter(2, "attack steps")

        def floor_units(self):
            return 2 * self.steps + 3

        def __call__(self, model, x, y, generator=None, stats=None):
            half = len(x) // 2
            x_adv = pgd(self.eps, self.eps / 2, self.steps)(model, x[:half], y[:half], generator).x_adv
            return F.cross_entropy(model(torch_cat(x_adv, x[half:])), y)


    def torch_cat(a, b):
        import torch
        return torch.cat([a, b])


    def narrow_cnn(num_classes, in_channels):
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                             nn.Flatten(), nn.Linear(128, num_classes))
''')


@pytest.mark.slow
def test_method_and_architecture_from_a_user_module(tmp_path):
    (tmp_path / "user_code").mkdir()
    (tmp_path / "user_code" / "my_extensions.py").write_text(USER_MODULE)
    env = {"PYTHONPATH": f"{tmp_path / 'user_code'}:{SRC}", "PATH": "/usr/bin:/bin"}
    run = tmp_path / "run"
    command = [sys.executable, "-m", "backsmooth", "train", "--dataset", "synthetic",
               "--method", "my_extensions:HalfPGD", "--steps", "1", "--arch", "my_extensions:narrow_cnn",
               "--out", str(run), "--cache-dir", str(tmp_path / "cache"), *QUICK]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["arch"], config["method_options"]) == (
        "my_extensions:HalfPGD", "my_extensions:narrow_cnn", {"steps": 1})
    done = subprocess.run([sys.executable, "-m", "backsmooth", "eval", str(run), "--attacks", "pgd5",
                           "--n-examples", "50", "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "my_extensions:narrow_cnn trained with my_extensions:HalfPGD" in done.stdout
    assert json.loads((run / "eval-run.json").read_text())["architecture"] == "my_extensions:narrow_cnn"

    for bad, message in ((["--method", "no_such_module:X"], "cannot import method module 'no_such_module'"),
                         (["--method", "my_extensions:Missing"], "has no 'Missing'"),
                         (["--method", "my_extensions:narrow_cnn"], "not a subclass of"),
                         (["--arch", "my_extensions:HalfPGD"], "must accept num_classes= and in_channels=")):
        done = subprocess.run([sys.executable, "-m", "backsmooth", "train", "--dataset", "synthetic", *bad,
                               "--out", str(tmp_path / "bad"), *QUICK], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert message in done.stderr and not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- the docs' method example, label smoothing


def _docs_method_example() -> str:
    """The training-method example of docs/extending.md, verbatim."""
    section = (ROOT / "docs" / "extending.md").read_text().split("## A training method", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


PLAIN_CE = textwrap.dedent('''
    import torch.nn.functional as F


    @dataclasses.dataclass(frozen=True)
    class PlainFGSM(TrainingMethod):
        """The docs' example written with F.cross_entropy and without floor_units()."""
        name = "plain_fgsm"
        summary = "FGSM from a random start, loss by F.cross_entropy (user method)"
        eps: float = 8 / 255

        def __call__(self, model, x, y, generator=None, stats=None):
            x_adv = pgd(self.eps, 1.25 * self.eps, 1)(model, x, y, generator).x_adv
            return F.cross_entropy(model(x_adv), y)
''')


@pytest.fixture
def user_methods(tmp_path, monkeypatch):
    """user_code/my_methods.py: the docs' MyFGSM (registered when imported) and PlainFGSM, importable here and in
    subprocesses; afterwards the method registry and sys.modules are as they were."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_methods.py").write_text(_docs_method_example() + PLAIN_CE)
    saved = dict(method_registry._REGISTRY)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("my_methods", None)
    method_registry._REGISTRY.clear()
    method_registry._REGISTRY.update(saved)


def _train(folder: Path, out: Path, method: str, *extra: str) -> subprocess.CompletedProcess:
    pytest.importorskip("sklearn")  # the digits
    env = {"PYTHONPATH": f"{folder}:{SRC}", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "backsmooth", "train", "--dataset", "digits", "--arch", "small_cnn", "--epochs",
               "1", "--method", method, "--final-eval-examples", "0", "--val-pgd-steps", "0", "--no-progress",
               "--cache-dir", str(out.parent / "cache"), "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_a_method_added_from_outside_passes_the_generic_checks(user_methods, check):
    """The two-places way from a module of one's own: import it (the @register), then build it by name."""
    assert "my_fgsm" not in methods.names()
    importlib.import_module("my_methods")
    assert "my_fgsm" in methods.names()
    assert methods.build("my_fgsm", step=1.0).step == 1.0
    check("my_fgsm")


@pytest.mark.slow
def test_the_docs_example_applies_label_smoothing(user_methods, tmp_path):
    done = _train(user_methods, tmp_path / "run", "my_methods:MyFGSM", "--label-smoothing", "0.4")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["label_smoothing"] == 0.4
    assert (tmp_path / "run" / "summary.json").is_file()

    importlib.import_module("my_methods")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))  # no BatchNorm: the loss is a function of x
    x, y = batch()
    loss = {s: methods.build("my_fgsm", label_smoothing=s)(model, x, y, generator=gen(3)) for s in (0.0, 0.4)}
    logits = model(pgd(8 / 255, 1.25 * 8 / 255, 1)(model, x, y, gen(3)).x_adv)
    torch.testing.assert_close(loss[0.4], F.cross_entropy(logits, y, label_smoothing=0.4))
    torch.testing.assert_close(loss[0.0], F.cross_entropy(logits, y))
    assert abs(loss[0.4].item() - loss[0.0].item()) > 0.01


def test_a_method_that_bypasses_cross_entropy_is_refused_under_label_smoothing(user_methods, tmp_path):
    done = _train(user_methods, tmp_path / "run", "my_methods:PlainFGSM", "--label-smoothing", "0.4")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert ("plain_fgsm computes its loss without TrainingMethod.cross_entropy, so --label-smoothing 0.4 would be "
            "ignored; use self.cross_entropy(logits, y)") in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()

    plain = methods.method_class("my_methods:PlainFGSM")
    x, y = batch()
    assert plain()(tiny_model(), x, y, generator=gen(0)).isfinite()  # without label smoothing it is a fine method
    with pytest.raises(ConfigError, match="without TrainingMethod.cross_entropy"):
        check_label_smoothing("plain_fgsm")  # the generic check catches it


def test_a_method_without_floor_units_benches_with_an_unknown_floor_and_is_estimated(user_methods, tmp_path, capsys):
    plain = methods.method_class("my_methods:PlainFGSM")  # registers although it declares no floor
    assert "plain_fgsm" in methods.names() and plain().floor_units() is None
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--methods", "my_methods:PlainFGSM,natural", "--arch", "small_cnn", "--batch-size", "8",
                     "--image-size", "16", "--warmup", "0", "--repeats", "1", "--steps", "1", "--epoch-images", "0",
                     "--json", str(out)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("my_methods:PlainFGSM"))
    assert row.split()[-5:-3] == ["5", "?"]  # counted F (one input-gradient step, a training pass); floor unknown
    saved = {r["method"]: r for r in json.loads(out.read_text())["rows"]}["my_methods:PlainFGSM"]
    assert (saved["f_units"], saved["floor_f_units"]) == (5, None)

    assert step_units(RunConfig(method="my_methods:PlainFGSM")) == 5  # the study estimate counts the passes
    for name in methods.names():  # the estimate's probe counts what the declared floors say
        floor = methods.build(name).floor_units()
        assert floor is None or counted_units(name, ()) == floor, name
