"""`backsmooth export`: a trained and evaluated digits run leaves its run directory as model.safetensors (exactly
the run's weights, readable by safetensors alone), config.json and a model card whose YAML metadata parses and
whose numbers are the eval files'; the folder evaluates and loads like the run; RobustBench's model_info; and
bad input (no evaluation, an unfinished run, a folder that is no run, an occupied --out, a Hub id or a push
without network or token) is one line, exit 2, with nothing overwritten."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import backsmooth
from backsmooth import cli
from backsmooth.errors import CheckpointError, ConfigError
from backsmooth.publish.card import _yaml, percent

QUICK = ["--epochs", "1", "--val-pgd-steps", "2", "--no-progress", "--collapse-every", "0"]


def front_matter(card: str) -> dict:
    """The YAML between the card's two '---' lines."""
    _, header, _ = card.split("---\n", 2)
    return yaml.safe_load(header)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A digits run, evaluated with PGD-10 and CW-10 on 120 test digits, then exported."""
    root = tmp_path_factory.mktemp("export")
    run, out = root / "run", root / "exported"
    assert cli.main(["train", "--out", str(run), "--final-eval-examples", "100", *QUICK]) == 0
    assert cli.main(["eval", str(run), "--attacks", "pgd10,cw10", "--n-examples", "120", "--no-progress"]) == 0
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    return run, out


def test_the_weights_are_the_runs_and_load_with_safetensors_alone(exported):
    run, out = exported
    weights = load_file(str(out / "model.safetensors"))
    saved = torch.load(run / "best.pt", weights_only=True)["model"]
    assert set(weights) == set(saved)
    assert all(torch.equal(weights[key], saved[key]) and weights[key].dtype == saved[key].dtype for key in saved)
    assert "normalize.mean" in weights  # the normalisation travels with the weights


def test_the_card_metadata_parses_and_its_numbers_are_the_eval_files(exported):
    run, out = exported
    header = front_matter((out / "README.md").read_text())
    assert header["library_name"] == "backsmooth" and "adversarial-robustness" in header["tags"]
    (index,) = header["model-index"]
    results = {m["args"]["source"]: {} for r in index["results"] for m in r["metrics"]}
    for result in index["results"]:
        for metric in result["metrics"]:
            results[metric["args"]["source"]][metric["name"]] = metric["value"]
    evaluation = json.loads((run / "eval-run.json").read_text())["evaluation"]
    card = results["eval-run.json"]
    assert card["clean accuracy"] == percent(evaluation["clean_acc"])
    for attack in ("pgd10", "cw10"):
        assert card[f"{attack} accuracy (Linf, eps 0.1)"] == percent(evaluation["per_attack"][attack])
    assert card["worst-case accuracy (Linf, eps 0.1)"] == percent(evaluation["robust_acc"])
    summary = json.loads((run / "summary.json").read_text())
    assert results["summary.json"]["pgd20 accuracy (Linf, eps 0.1)"] == percent(summary["best"]["pgd20_acc"])
    text = (out / "README.md").read_text()
    assert "## How to load" in text and "backsmooth.load(" in text and "Not evaluated" not in text


def test_config_says_what_the_model_is(exported):
    run, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "small_cnn" and config["num_classes"] == 10 and config["input_size"] == [1, 8, 8]
    assert config["threat_model"] == {"norm": "linf", "eps": 0.1, "text": "Linf, eps 0.1"}
    assert config["training"]["method"] == "backward_smoothing" and config["training"]["checkpoint"] == "best"
    assert config["classes"] == [str(digit) for digit in range(10)] and "CPU" in config["training"]["device"]
    assert len(config["normalization"]["mean"]) == 1 and config["normalization"]["inside_model"] is True
    assert [e["source"] for e in config["evaluations"]] == ["eval-run.json", "summary.json"]


def test_the_exported_folder_evaluates_and_loads_like_the_run(exported, tmp_path):
    run, out = exported
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    assert cli.main(["eval", str(folder), "--attacks", "pgd10,cw10", "--n-examples", "120", "--no-progress"]) == 0
    ours = json.loads((folder / "eval-copy.json").read_text())["evaluation"]
    theirs = json.loads((run / "eval-run.json").read_text())["evaluation"]
    assert (ours["clean_acc"], ours["per_attack"]) == (theirs["clean_acc"], theirs["per_attack"])
    model = backsmooth.load(folder)
    reference, _ = backsmooth.load_model(run)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not model.training and torch.equal(model(x), reference(x))


def test_robustbench_format_writes_model_info_and_names_what_is_missing(exported, tmp_path, capsys):
    run, _ = exported
    out = tmp_path / "rb"
    assert cli.main(["export", str(run), "--out", str(out), "--format", "robustbench", "--name", "Doe2026Digits"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "robustbench" / "model_info" / "digits" / "Linf" / "Doe2026Digits.json").read_text())
    assert {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
            "architecture", "eps", "clean_acc", "unreliable"} <= set(info)
    evaluation = json.loads((run / "eval-run.json").read_text())["evaluation"]
    assert info["clean_acc"] == f"{100 * evaluation['clean_acc']:.2f}" and "autoattack_acc" not in info
    assert "a RobustBench submission still needs" in printed and "digits is not one of cifar10" in printed


def test_a_run_without_evaluations_exports_and_says_not_evaluated(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--final-eval-examples", "0", *QUICK]) == 0
    assert cli.main(["export", str(run), "--out", str(tmp_path / "out"), "--checkpoint", "last"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Not evaluated.**" in card and "model-index" not in front_matter(card)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["training"]["checkpoint"] == "last"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(exported, tmp_path, capsys):
    run, out = exported
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "summary.json").unlink()
    before = _snapshot(out)
    cases = {
        (str(unfinished), str(tmp_path / "a")): "has not finished training (no summary.json)",
        (str(tmp_path), str(tmp_path / "b")): "is not a run directory of `backsmooth train`",
        (str(run), str(out)): "already exists and is not empty",
    }
    for (source, target), message in cases.items():
        assert cli.main(["export", source, "--out", target]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert _snapshot(out) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_hub_without_network_or_token_is_one_line(exported, tmp_path, monkeypatch, capsys):
    run, _ = exported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="could not download nobody/no-such-model from the Hugging Face Hub") as e:
        backsmooth.load("nobody/no-such-model")
    assert "\n" not in str(e.value)
    assert cli.main(["eval", "nobody/no-such-model", "--no-progress"]) == 2
    capsys.readouterr()
    out = tmp_path / "pushed"
    assert cli.main(["export", str(run), "--out", str(out), "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and err.count("\n") == 1
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()  # the export itself is complete


def test_a_damaged_export_is_refused_in_one_line(exported, tmp_path):
    _, out = exported
    folder = tmp_path / "damaged"
    shutil.copytree(out, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        backsmooth.load(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="was not written by `backsmooth export`"):
        backsmooth.load(folder)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text())
KEYS = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_the_card_yaml_reads_back_as_written(value):
    assert yaml.safe_load(_yaml(value)) == value


def test_init_from_an_export_or_a_run_starts_from_its_weights(exported, tmp_path, capsys):
    from backsmooth.config import from_mapping
    from backsmooth.training.setup import build_model, load_data, runtime_for
    run, out = exported
    saved = torch.load(run / "best.pt", weights_only=True)["model"]
    for source in (out, run):
        config = from_mapping(dict(dataset="digits", init_from=str(source), seed=5))
        runtime = runtime_for(config)
        net, _ = build_model(config, load_data(config, runtime), runtime)
        assert all(torch.equal(net.state_dict()[key], saved[key]) for key in saved)
    assert cli.main(["train", "--init-from", str(out), "--out", str(tmp_path / "ft"), *QUICK]) == 0
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["init_from"] == str(out)
    capsys.readouterr()
    for source, message in ((out, "does not fit"), (tmp_path / "none", "no such run directory")):
        assert cli.main(["train", "--init-from", str(source), "--dataset", "synthetic",
                         "--out", str(tmp_path / "bad"), *QUICK]) == 2
        err = capsys.readouterr().err
        assert f"--init-from {source}" in err and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()
