"""End-to-end training runs: the run directory, metrics, checkpoints and the final table."""

import json

import pytest
import torch

from backsmooth import cli
from backsmooth.config import from_mapping
from backsmooth.training import train

FAST = dict(dataset="synthetic", arch="small_cnn", epochs=2, batch_size=32, val_pgd_steps=2, eval_batch_size=128,
            final_eval_examples=100)


def run_config(tmp_path, **overrides):
    return from_mapping(dict(FAST, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **overrides))


def test_training_writes_the_run_directory(tmp_path):
    summary = train(run_config(tmp_path, method="backward_smoothing"), progress=False)
    run = tmp_path / "run"
    expected = {"config.json", "metrics.jsonl", "checkpoint.pt", "last.pt", "best.pt", "summary.json"}
    assert expected <= {p.name for p in run.iterdir()}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "event" not in r]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {r["event"] for r in lines if "event" in r} <= {"guard"}  # the collapse guard's checks, nothing else
    for row in rows:
        assert {"lr", "train_loss", "train_kl", "train_seconds", "val_clean_acc", "val_pgd2_acc",
                "images_per_second"} <= set(row)
        assert 0 <= row["val_pgd2_acc"] <= row["val_clean_acc"] <= 1
        assert row["train_seconds"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "backward_smoothing" and config["epochs"] == 2
    for name in ("last.pt", "best.pt"):
        saved = torch.load(run / name, weights_only=True)
        assert "normalize.mean" in saved["model"] and saved["meta"]["arch"] == "small_cnn"
    assert summary["last"]["epoch"] == 2 and 0 <= summary["last"]["pgd20_acc"] <= summary["last"]["clean_acc"]
    assert json.loads((run / "summary.json").read_text())["train_seconds"] == pytest.approx(summary["train_seconds"])


def test_training_learns_the_synthetic_task(tmp_path):
    summary = train(run_config(tmp_path, method="natural", epochs=3), progress=False)
    assert summary["best"]["clean_acc"] > 0.5  # 10 classes: chance is 0.1


def test_learning_rate_follows_the_schedule_per_iteration(tmp_path):
    train(run_config(tmp_path, method="natural", schedule="stage", epochs=4), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]  # the lr of each epoch's last step: steps 13, 27, 41, 55 of 56
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])


@pytest.mark.slow
def test_cli_demo_table_and_eval(tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = cli.main(["train", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "32", "--val-pgd-steps", "1",
                     "--final-eval-examples", "50", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                     "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "PGD-20" in printed and "last" in printed and "best" in printed and "training time" in printed
    assert cli.main(["eval", str(out), "--n-examples", "50"]) == 0
