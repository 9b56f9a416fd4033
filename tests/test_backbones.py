"""timm and torchvision backbones (models/backbones.py) and the fine-tuning knobs: a small timm model and a
torchvision model train with Backward Smoothing through the CLI on a streamed folder and are evaluated by
`backsmooth eval`, which rebuilds them from config.json; their normalisation is their pretrained configuration's;
local weights start a run with a new head; fine-tuning from a run starts at that run's accuracy; --freeze-epochs
holds the body; names, weights and shapes that do not fit are one line, exit 2, nothing written.

They need the `timm` extra (torch 2.14.1 with torchvision 0.29.1, see the README); CI runs them in a second
environment, and they skip where the libraries are absent."""

import json
from pathlib import Path

import pytest
import torch

from backsmooth import cli
from backsmooth.checkpoint import load_model
from backsmooth.config import from_mapping
from backsmooth.evaluation.accuracy import stratified_subset
from backsmooth.models import backbones
from backsmooth.training.setup import build_model, load_data, runtime_for

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from test_stream import write_imagenet  # noqa: E402  (after the skips: it needs nothing more)

QUICK = ["--method", "backward_smoothing", "--eps", "4/255", "--epochs", "1", "--batch-size", "6", "--val-size", "6",
         "--val-pgd-steps", "1", "--final-eval-examples", "9", "--collapse-every", "0", "--workers", "0",
         "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backbones") / "data"
    write_imagenet(root)
    return root


def train(folder: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--dataset", "imagenet", "--data-dir", str(folder), "--image-size", "32",
                     "--cache-dir", str(folder.parent / "cache"), "--out", str(out), *QUICK, *extra])


@pytest.mark.parametrize("arch", ["timm:resnet18", "torchvision:resnet18"])
def test_a_backbone_trains_with_backward_smoothing_and_eval_rebuilds_it(folder, tmp_path, arch, capsys):
    assert train(folder, tmp_path / "run", "--arch", arch) == 0
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["meta"]["arch"] == arch and saved["meta"]["image_shape"] == [3, 32, 32]
    mean = saved["model"]["normalize.mean"].flatten().tolist()
    assert mean == pytest.approx([0.485, 0.456, 0.406])  # the backbone's pretrained configuration's
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--attacks", "pgd2", "--n-examples", "9", "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "eval-run.json").read_text())
    assert report["architecture"] == arch and report["subset"]["n_examples"] == 9


def test_fine_tuning_from_a_run_starts_at_its_accuracy(folder, tmp_path):
    assert train(folder, tmp_path / "first", "--arch", "timm:resnet18") == 0
    config = from_mapping(dict(dataset="imagenet", data_dir=str(folder), image_size=32, val_size=6, workers=0,
                               cache_dir=str(folder.parent / "cache"), arch="timm:resnet18",
                               init_from=str(tmp_path / "first" / "last.pt"), seed=9))
    runtime = runtime_for(config)
    data = load_data(config, runtime)
    started, _ = build_model(config, data, runtime)
    trained, _ = load_model(str(tmp_path / "first" / "last.pt"))
    test = data.test.subset(stratified_subset(data.test.labels, 9, 0))
    started.eval()
    with torch.no_grad():
        assert torch.equal(started(test.images.float() / 255), trained(test.images.float() / 255))


def test_local_weights_start_the_body_and_a_new_head_and_freezing_holds_the_body(folder, tmp_path, capsys):
    source = torchvision.models.get_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    assert train(folder, tmp_path / "run", "--arch", "torchvision:resnet18", "--weights", str(tmp_path / "resnet18.pt"),
                 "--epochs", "2", "--freeze-epochs", "1", "--lr", "0.05") == 0
    assert "a new head (fc.bias, fc.weight)" in capsys.readouterr().out
    after_first = torch.load(tmp_path / "run" / "checkpoint.prev.pt", weights_only=False)["model"]
    after_both = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for key, value in source.state_dict().items():
        if key.startswith("fc.") or "running" in key or "num_batches" in key:
            continue
        assert torch.equal(after_first[f"net.{key}"], value), key  # frozen for the first epoch
    assert not torch.equal(after_both["net.conv1.weight"], source.state_dict()["conv1.weight"])  # then trained
    assert after_first["net.fc.weight"].shape == (3, 512)


@pytest.mark.parametrize("case", ["unknown timm model", "unknown torchvision model", "weights of another model",
                                  "pretrained on our own architecture"])
def test_bad_backbones_are_one_line_exit_2_and_nothing_written(folder, tmp_path, case, capsys):
    extra = {"unknown timm model": ["--arch", "timm:resnet_of_nobody"],
             "unknown torchvision model": ["--arch", "torchvision:resnet_of_nobody"],
             "weights of another model": ["--arch", "torchvision:resnet18", "--weights", str(tmp_path / "w.pt")],
             "pretrained on our own architecture": ["--arch", "small_cnn", "--pretrained"]}[case]
    torch.save(torchvision.models.get_model("resnet50", num_classes=3).state_dict(), tmp_path / "w.pt")
    expected = {"unknown timm model": "timm does not know the model 'resnet_of_nobody'",
                "unknown torchvision model": "torchvision does not know the model 'resnet_of_nobody'",
                "weights of another model": "has shape",
                "pretrained on our own architecture": "--pretrained and --weights apply to timm:NAME"}[case]
    capsys.readouterr()
    assert train(folder, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_the_head_is_the_classifier_of_either_library():
    assert backbones.head_names(timm.create_model("resnet18", num_classes=4)) == {"fc.weight", "fc.bias"}
    assert backbones.head_names(torchvision.models.get_model("mobilenet_v3_small", num_classes=4)) == {
        "classifier.3.weight", "classifier.3.bias"}
