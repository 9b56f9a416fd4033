"""--tensorboard [DIR]: the events hold the numbers of metrics.jsonl at their steps, also after a resume; the
default folder, one's own, none without the flag; a missing tensorboard package is a one-line refusal."""

import json
import os
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from backsmooth import cli
from backsmooth.config import from_mapping
from backsmooth.training import train
from backsmooth.training.tensorboard import TensorBoardLog, event_folder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dataset="synthetic", arch="small_cnn", method="fgsm_rs", batch_size=32, val_size=32,
            final_eval_examples=16, val_pgd_steps=2)


def _argv(out: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return ["train", *flags, "--epochs", "2", "--collapse-every", "6", "--no-progress", "--out", str(out), *extra]


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def _points(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _expected(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows if key in row]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


def test_events_hold_metrics_jsonl_at_its_steps_and_a_resume_shows_no_point_twice(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_argv(run, "--tensorboard")) == 0
    assert json.loads((run / "config.json").read_text())["tensorboard"] == "RUN_DIR/tensorboard"
    rows = _rows(run)
    epochs, checks = [r for r in rows if "event" not in r], [r for r in rows if r.get("event") == "guard"]
    assert len(epochs) == 2 and checks
    events = _events(run / "tensorboard")
    for tag, key, kind in [("val/clean_acc", "val_clean_acc", epochs), ("val/pgd2_acc", "val_pgd2_acc", epochs),
                           ("train/loss", "train_loss", epochs), ("train/lr", "lr", epochs),
                           ("time/images_per_second", "images_per_second", epochs),
                           ("guard/pgd_acc", "guard_pgd_acc", checks), ("guard/p_keep", "p_keep", checks)]:
        assert _points(events, tag) == _expected(kind, key), tag
    # killed after epoch 1's checkpoint: epoch 2's points of the stopped process are hidden and logged again
    os.replace(run / "checkpoint.prev.pt", run / "checkpoint.pt")
    assert cli.main(_argv(run, "--tensorboard", "--resume")) == 0
    resumed = _rows(run)
    assert [r["val_clean_acc"] for r in resumed if "event" not in r] == [r["val_clean_acc"] for r in epochs]
    assert len(_event_files(run / "tensorboard")) == 2
    events = _events(run / "tensorboard")
    assert _points(events, "val/clean_acc") == _expected(resumed, "val_clean_acc")
    assert _points(events, "guard/pgd_acc") == _expected([r for r in resumed if r.get("event") == "guard"],
                                                         "guard_pgd_acc")
    assert _points(events, "time/train_seconds") == _expected(resumed, "train_seconds")  # the resumed run's


def test_a_folder_of_ones_own_and_no_events_without_the_flag(tmp_path):
    settings = dict(TINY, epochs=1, collapse_every=0, val_pgd_steps=0, final_eval_examples=0)
    train(from_mapping(dict(settings, out=str(tmp_path / "plain"))), progress=False)
    assert _event_files(tmp_path) == []
    train(from_mapping(dict(settings, out=str(tmp_path / "run"), tensorboard=str(tmp_path / "tb"))), progress=False)
    assert [p.parent for p in _event_files(tmp_path)] == [tmp_path / "tb"]
    (row,) = _rows(tmp_path / "run")
    assert _points(_events(tmp_path / "tb"), "val/clean_acc") == _expected([row], "val_clean_acc")


def test_the_folder_of_each_value(tmp_path):
    assert event_folder(None, tmp_path) is None
    assert event_folder("RUN_DIR/tensorboard", tmp_path / "run") == str(tmp_path / "run" / "tensorboard")
    assert event_folder("elsewhere/tb", tmp_path / "run") == "elsewhere/tb"


def test_tags_of_each_kind_of_row(tmp_path):
    rows = [{"event": "guard", "step": 5, "epoch": 1, "guard_pgd_acc": 0.5, "p_keep": 0.25, "signature": True},
            {"event": "collapse", "step": 5, "epoch": 1, "guard_pgd_acc": 0.5, "action": "stop"},
            {"epoch": 1, "step": 9, "lr": 0.1, "train_loss": 2.0, "val_clean_acc": 0.75, "val_pgd20_acc": 0.5,
             "val_examples": 64, "train_seconds": 3.0, "images_per_second": 100.0}]
    with TensorBoardLog(str(tmp_path)) as log:
        for row in rows:
            log.record(row)
    events = _events(tmp_path)
    expected = {"guard/epoch": 1, "guard/pgd_acc": 0.5, "guard/p_keep": 0.25, "guard/signature": 1,
                "collapse/epoch": 1, "collapse/guard_pgd_acc": 0.5, "train/epoch": 1, "train/lr": 0.1,
                "train/loss": 2.0, "val/clean_acc": 0.75, "val/pgd20_acc": 0.5, "val/examples": 64,
                "time/train_seconds": 3.0, "time/images_per_second": 100.0}
    assert set(events.Tags()["scalars"]) == set(expected)
    assert {tag: events.Scalars(tag)[0].value for tag in expected} == pytest.approx(expected)
    assert {events.Scalars(tag)[0].step for tag in expected if tag.startswith(("guard", "collapse"))} == {5}
    (text,) = events.Tensors("collapse/text_summary")
    assert '"action": "stop"' in text.tensor_proto.string_val[0].decode() and text.step == 5
    assert "guard/text_summary" not in events.Tags()["tensors"]  # the routine checks: numbers only


def test_without_the_package_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it fails
    assert cli.main(_argv(tmp_path / "run", "--tensorboard")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --tensorboard needs")
    assert "pip install tensorboard" in err
    (tmp_path / "file").write_text("")
    assert cli.main(_argv(tmp_path / "run", "--tensorboard", str(tmp_path / "file"))) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
