"""`backsmooth report` on fake run directories written with the project's own writers (no training)."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from backsmooth import cli
from backsmooth.atomic import atomic_write_json
from backsmooth.checkpoint import write_jsonl
from backsmooth.config import RunConfig
from backsmooth.errors import BacksmoothError, DataError
from backsmooth.evaluation import evaluate, model_info
from backsmooth.report import PLOTS, build_report, build_rows, read_run, run_labels
from backsmooth.report.plots import collapse_points, guard_checks, robust_measure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEGACY_METHOD_KEYS = ("alpha", "beta", "gamma", "steps", "grad_align_lambda")  # top-level in older config.json
JPEG_NOTE = "a JPEG-75 copy of CIFAR-10; absolute numbers may differ from published ones by a few points."


@pytest.fixture(scope="module")
def real_result() -> dict[str, Any]:
    """A genuine `evaluate` result (tiny linear model, 12 examples) whose numbers the tests then set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    return evaluate(model, torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,)), 8 / 255, "pgd20,cw20",
                    progress=False).to_json()


def write_run(root: Path, name: str, *, method: str, seed: int = 0, arch: str = "resnet18", dataset: str = "cifar10",
              epoch_seconds: tuple[float, ...] = (10.0, 10.0, 10.0), val_robust: tuple[float, ...] = (0.3, 0.4, 0.5),
              val_clean: tuple[float, ...] = (0.6, 0.7, 0.8), summary: tuple[float, float] | None = (0.8, 0.45),
              data_note: str | None = None, legacy: bool = False, **config: Any) -> Path:
    """config.json, metrics.jsonl and (optionally) summary.json as `backsmooth train` writes them; `legacy`: the
    config.json of older runs (method hyperparameters as top-level keys, null when unset, no method_options);
    `data_note`: summary.json's data note (None: an older summary.json without one)."""
    run = root / name
    cfg = RunConfig(dataset=dataset, arch=arch, method=method, seed=seed, epochs=3, batch_size=128, out=str(run),
                    **config)
    config_json = cfg.to_dict()
    if legacy:
        options = config_json.pop("method_options")
        config_json |= {key: options.get(key) for key in LEGACY_METHOD_KEYS}
    atomic_write_json(run / "config.json", config_json)
    rows, total = [], 0.0
    for epoch, (seconds, robust, clean) in enumerate(zip(epoch_seconds, val_robust, val_clean), 1):
        total += seconds
        rows.append(dict(epoch=epoch, lr=0.1, train_seconds=seconds, total_train_seconds=total,
                         images_per_second=1000 / seconds, val_clean_acc=clean, val_pgd20_acc=robust,
                         val_examples=200, eval_seconds=1.0, skipped_steps=0, train_loss=1.0))
    write_jsonl(run / "metrics.jsonl", rows)
    if summary is not None:
        best = dict(epoch=len(rows), clean_acc=summary[0], pgd20_acc=summary[1])
        data = dict(run_dir=str(run), method=method, arch=arch, dataset=dataset, eps=cfg.eps, epochs=3,
                    train_seconds=total, best_epoch=len(rows), test_examples=1000, processes=1, best=best, last=best)
        atomic_write_json(run / "summary.json", data if data_note is None else data | dict(data_note=data_note))
    return run


def add_collapse(run: Path, *, epoch: int, step: int, action: str = "stop", summary: bool = True,
                 legacy: bool = False) -> None:
    """A collapse event appended to metrics.jsonl as the trainer's guard writes it (`legacy`: as the rule before the
    FGSM/PGD one wrote it) and, with `summary`, kept in summary.json (without `action`, as the trainer's summary
    has it)."""
    event = dict(event="collapse", epoch=epoch, step=step, guard_pgd_acc=0.04, guard_best=0.31, train_adv_acc=0.82,
                 guard_examples=256) | (dict(train_adv_acc_at_best=0.55) if legacy else
                                        dict(guard_fgsm_acc=0.85, p_keep=1e-30, p_grow=1e-20))
    with (run / "metrics.jsonl").open("a") as file:
        file.write(json.dumps(event | dict(action=action)) + "\n")
    if summary:
        atomic_write_json(run / "summary.json", json.loads((run / "summary.json").read_text()) | dict(collapse=event))


def write_eval(run: Path, name: str, result: dict[str, Any], which: str, clean: float,
               per_attack: dict[str, float], robust: float | None = None, *, n_examples: int = 1000,
               subset_seed: int = 0, epoch: int = 3) -> None:
    """eval-NAME.json as `backsmooth eval` writes it, with the given accuracies (robust: the pointwise worst case)
    on the stratified test subset of `n_examples` chosen with `subset_seed`."""
    result = copy.deepcopy(result)
    result.update(clean_acc=clean, per_attack=per_attack, n_examples=n_examples,
                  robust_acc=min(per_attack.values()) if robust is None else robust)
    if "autoattack-apgd" in per_attack:
        result["attacks"] = {"autoattack-apgd": dict(robust_acc=per_attack["autoattack-apgd"], settings=dict(
            kind="autoattack", eps=8 / 255, norm="Linf", version="standard", components=["apgd-ce", "apgd-t"]))}
    extra = dict(checkpoint=dict(path=str(run / f"{which}.pt"), method="backward_smoothing", epoch=epoch),
                 subset=dict(n_examples=n_examples, test_size=10000, seed=subset_seed, stratified=True))
    atomic_write_json(run / f"eval-{name}.json", model_info(result, name, "resnet18", "cifar10", extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_result) -> list[Path]:
    """TRADES (default 10 steps), two seeds of Backward Smoothing (both evaluated on the same subset, seed 1 with
    PGD-20 only), an unfinished PGD-AT; two runs carry the same data note, one an older summary.json without it."""
    root = tmp_path_factory.mktemp("runs")
    trades = write_run(root, "trades", method="trades", epoch_seconds=(30.0, 20.0, 20.0), data_note=JPEG_NOTE)
    bs0 = write_run(root, "bs0", method="backward_smoothing", seed=0, epoch_seconds=(12.0, 5.0, 5.0),
                    data_note=JPEG_NOTE)
    write_eval(bs0, "best", real_result, "best", 0.82, {"pgd20": 0.50, "cw20": 0.48})
    write_eval(bs0, "best-aa", real_result, "best", 0.82, {"autoattack-apgd": 0.46})
    write_eval(bs0, "last", real_result, "last", 0.81, {"pgd20": 0.49, "cw20": 0.47})
    write_eval(bs0, "last-all", real_result, "last", 0.81, {"pgd20": 0.49, "cw20": 0.47, "autoattack-apgd": 0.46},
               robust=0.45)
    bs1 = write_run(root, "bs1", method="backward_smoothing", seed=1, epoch_seconds=(7.0, 7.0, 8.0),
                    summary=(0.84, 0.52))
    write_eval(bs1, "best", real_result, "best", 0.84, {"pgd20": 0.52})
    pgd = write_run(root, "pgd", method="pgd_at", arch="wrn34_10", epoch_seconds=(100.0, 200.0),
                    val_robust=(0.3, 0.4), val_clean=(0.6, 0.7), summary=None)
    return [trades, bs0, bs1, pgd]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return build_report(runs, tmp_path_factory.mktemp("report") / "out")


def markdown_table(text: str, first_column: str) -> dict[tuple[str, str], dict[str, str]]:
    """The Markdown table whose header starts with `first_column`, keyed by its first two cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[(cells[header[0]], cells[header[1]])] = cells
    return rows


def test_main_table_values(report):
    text = report.read_text()
    rows = markdown_table(text, "run")
    header = text.splitlines()[2].split(" | ")  # one column per attack evaluated, in order, then the worst case
    assert header[7:12] == ["clean", "PGD-20", "CW-20", "AutoAttack-APGD", "worst case"]
    assert list(rows) == [("trades", "best (epoch 3)"), ("backward_smoothing seed=0", "best (epoch 3)"),
                          ("backward_smoothing seed=0", "last (epoch 3)"),
                          ("backward_smoothing seed=1", "best (epoch 3)"), ("pgd_at", "best (epoch 2)")]
    trades = rows["trades", "best (epoch 3)"]
    assert (trades["method"], trades["arch"], trades["dataset"], trades["threat model"], trades["epochs"]) == (
        "trades", "resnet18", "cifar10", "Linf, eps 8/255", "3")
    assert (trades["clean"], trades["PGD-20"], trades["CW-20"], trades["AutoAttack-APGD"]) == (
        "80.00", "45.00", "n/a", "n/a")
    assert (trades["examples"], trades["train time"], trades["time/epoch"], trades["vs TRADES-10"]) == (
        "1000", "1m 10s", "20.0 s", "1.00x")
    assert trades["source"] == "summary.json" and trades["worst case"] == "45.00"  # PGD-20 is its only attack
    best = rows["backward_smoothing seed=0", "best (epoch 3)"]  # two eval files of best.pt merged
    assert (best["clean"], best["PGD-20"], best["CW-20"], best["AutoAttack-APGD"]) == (
        "82.00", "50.00", "48.00", "46.00")
    assert best["source"] == "eval-best-aa.json, eval-best.json"
    assert best["worst case"] == "<= 46.00"  # no file ran all three attacks: the lowest file result bounds it
    assert (best["train time"], best["time/epoch"], best["vs TRADES-10"]) == ("22.0 s", "5.0 s", "0.25x")
    last = rows["backward_smoothing seed=0", "last (epoch 3)"]
    assert (last["clean"], last["PGD-20"], last["CW-20"], last["AutoAttack-APGD"]) == (
        "81.00", "49.00", "47.00", "46.00")
    assert last["worst case"] == "45.00"  # eval-last-all.json ran every attack of the row: its pointwise result
    seed1 = rows["backward_smoothing seed=1", "best (epoch 3)"]
    assert (seed1["PGD-20"], seed1["CW-20"], seed1["source"], seed1["vs TRADES-10"]) == (
        "52.00", "n/a", "eval-best.json", "0.35x")
    pgd = rows["pgd_at", "best (epoch 2)"]  # unfinished, no TRADES-10 with wrn34_10: validation numbers, n/a
    assert (pgd["epochs"], pgd["clean"], pgd["PGD-20"], pgd["examples"]) == ("2/3", "70.00", "40.00", "200 val")
    assert (pgd["train time"], pgd["time/epoch"], pgd["vs TRADES-10"]) == ("5m 00s", "2m 30s", "n/a")
    assert "cifar10 with resnet18, wrn34_10: 1000 test examples" in text and "200 validation examples" in text
    assert text.count(JPEG_NOTE) == 1 and f"cifar10: {JPEG_NOTE}" in text  # once, though two runs carry it


def test_seeds_are_aggregated(report):
    groups = markdown_table(report.read_text(), "runs")
    assert list(groups) == [("backward_smoothing", "best")]  # last.pt was evaluated for one seed only
    group = groups["backward_smoothing", "best"]
    assert (group["n"], group["seeds"], group["examples"]) == ("2", "0, 1", "1000")
    assert (group["clean"], group["PGD-20"]) == ("83.00 ± 1.41", "51.00 ± 1.41")
    assert (group["CW-20"], group["AutoAttack-APGD"]) == ("n/a", "n/a")  # seed 1 ran PGD-20 only
    assert group["worst case"] == "n/a"  # seed 0's is an upper bound only
    assert (group["time/epoch"], group["vs TRADES-10"]) == ("6.0 s ± 1.4 s", "0.30 ± 0.07")
    assert group["source"] == "eval"


def test_plots_are_pngs_linked_from_the_report(report):
    text = report.read_text()
    for name in PLOTS:
        assert (report.parent / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_report_json_holds_the_rows(report, runs):
    data = json.loads((report.parent / "report.json").read_text())
    assert data["runs"] == [str(r) for r in runs] and data["plots"] == list(PLOTS)
    assert data["clean_vs_robust"] == "pgd20"
    assert len(data["rows"]) == 5
    best = data["rows"][1]
    assert (best["run_dir"], best["checkpoint"], best["source_kind"]) == (str(runs[1]), "best", "eval")
    assert best["per_attack"] == {"pgd20": 0.50, "cw20": 0.48, "autoattack-apgd": 0.46}
    assert (best["autoattack_variant"], best["cw_attack"], best["n_examples"]) == ("APGD-CE + APGD-T", "cw20", 1000)
    assert best["subset_seed"] == 0 and data["rows"][0]["subset_seed"] == 0  # summary.json: the run's seed
    assert best["relative_to_trades10"] == pytest.approx(0.25) and best["seconds_per_epoch"] == 5.0
    assert data["rows"][4]["relative_to_trades10"] is None and data["rows"][0]["cw_acc"] is None
    (group,) = data["seed_groups"]
    assert group["clean_acc"] == pytest.approx(dict(mean=0.83, std=2 ** 0.5 / 100))
    assert group["cw_acc"] is None and group["seeds"] == [0, 1]
    assert (group["n_examples"], group["subset_seed"]) == (1000, 0)
    assert group["per_attack"]["pgd20"] == pytest.approx(dict(mean=0.51, std=2 ** 0.5 / 100))
    assert group["per_attack"]["cw20"] is None and group["per_attack"]["autoattack-apgd"] is None
    assert data["notes"][-1] == f"cifar10: {JPEG_NOTE}"


def test_report_json_keeps_the_keys_of_earlier_reports(report):
    """Rows and seed groups serialise with the keys of the committed reports, so they stay comparable."""
    data = json.loads((report.parent / "report.json").read_text())
    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    earlier = json.loads((docs / "study-seeds" / "report.json").read_text())
    new_row_keys = {"collapse", "subset_seed", "norm"}
    assert {frozenset(row) for row in data["rows"]} == {frozenset(earlier["rows"][0]) | new_row_keys}
    new_group_keys = {"collapsed", "n_examples", "subset_seed", "per_attack", "norm"}
    assert set(data["seed_groups"][0]) == set(earlier["seed_groups"][0]) | new_group_keys


def test_a_collapsed_run_is_marked(tmp_path, real_result):
    """A run the collapse guard stopped in epoch 3: its event is apart from the epochs, its row says where it
    collapsed, report.md marks it once with one note; its seed group counts it; other runs carry no collapse."""
    stopped = write_run(tmp_path, "fgsm0", method="fgsm_rs", seed=0, epoch_seconds=(10.0, 10.0),
                        val_robust=(0.3, 0.4), val_clean=(0.6, 0.7))
    add_collapse(stopped, epoch=3, step=20)
    write_eval(stopped, "best", real_result, "best", 0.7, {"pgd20": 0.1}, epoch=2)
    fine = write_run(tmp_path, "fgsm1", method="fgsm_rs", seed=1)  # an older summary.json without "collapse"
    write_eval(fine, "best", real_result, "best", 0.8, {"pgd20": 0.4})
    trades = write_run(tmp_path, "trades", method="trades")
    atomic_write_json(trades / "summary.json", json.loads((trades / "summary.json").read_text()) | dict(collapse=None))
    run = read_run(stopped)
    assert [r["epoch"] for r in run.metrics] == [1, 2] and [e["event"] for e in run.events] == ["collapse"]
    assert run.collapse["action"] == "stop" and read_run(fine).collapse is None and read_run(trades).collapse is None
    assert collapse_points(run) == [(2.5, 25.0, 4.0)]  # 8 steps an epoch: step 20 is half-way through epoch 3
    report = build_report([stopped, fine, trades], tmp_path / "out")
    text = report.read_text()
    rows = markdown_table(text, "run")
    assert list(rows) == [("fgsm_rs seed=0 (collapsed)", "best (epoch 2)"), ("fgsm_rs seed=1", "best (epoch 3)"),
                          ("trades", "best (epoch 3)")]
    assert rows["fgsm_rs seed=0 (collapsed)", "best (epoch 2)"]["epochs"] == "2/3"
    data = json.loads((report.parent / "report.json").read_text())
    where = "epoch 3 (step 20): guard FGSM 85.0% vs PGD 4.0%, stopped"
    assert [row["collapse"] for row in data["rows"]] == [where, None, None]
    (note,) = [n for n in data["notes"] if "collapse guard" in n]
    assert "best.pt is from before the collapse" in note and note.endswith(f"fgsm_rs seed=0 at {where}.")
    assert text.count("'(collapsed)' after a run label") == 1 and f"{note}\n" in text
    (group,) = data["seed_groups"]
    assert group["collapsed"] == 1 and markdown_table(text, "runs")["fgsm_rs", "best"]["n"] == "2 (1 collapsed)"


def test_a_collapse_in_metrics_only_and_runs_without_one(tmp_path):
    """Without summary.json (the guard warned, training goes on) the first collapse event of metrics.jsonl counts;
    a report without collapses has `collapse` null, no mark and no note."""
    warned = write_run(tmp_path, "warned", method="fgsm_rs", summary=None)
    add_collapse(warned, epoch=2, step=12, action="warn", summary=False, legacy=True)  # a run of the earlier rule
    add_collapse(warned, epoch=2, step=14, action="warn", summary=False, legacy=True)
    run = read_run(warned)
    assert len(run.metrics) == 3 and [e["step"] for e in run.events] == [12, 14]
    assert [point[0] for point in collapse_points(run)] == [1.5, 1.75]
    report = build_report([warned], tmp_path / "out")
    assert json.loads((report.parent / "report.json").read_text())["rows"][0]["collapse"] == (
        "epoch 2 (step 12): guard PGD-5 4.0% vs best 31.0%, went on")
    assert "fgsm_rs (collapsed)" in report.read_text()
    plain = build_report([write_run(tmp_path, "plain", method="fgsm_rs")], tmp_path / "out2")
    data = json.loads((plain.parent / "report.json").read_text())
    assert data["rows"][0]["collapse"] is None and not any("collapse" in note for note in data["notes"])
    assert "collapsed" not in plain.read_text()


def test_one_run_evaluated_on_several_subsets_is_no_seed_group(tmp_path, real_result):
    """One run evaluated on 359 examples (two files, merged), on 359 chosen with another seed, and with AutoAttack on
    60: three rows, told apart by their subsets, and no seed table (one run is not two seeds)."""
    run = write_run(tmp_path, "bs", method="backward_smoothing")
    write_eval(run, "best", real_result, "best", 0.82, {"pgd20": 0.50}, n_examples=359)
    write_eval(run, "best-cw", real_result, "best", 0.82, {"cw20": 0.48}, n_examples=359)
    write_eval(run, "best-s1", real_result, "best", 0.81, {"pgd20": 0.49}, n_examples=359, subset_seed=1)
    write_eval(run, "best-aa", real_result, "best", 0.80, {"autoattack-apgd": 0.40}, n_examples=60)
    report = build_report([run], tmp_path / "out")
    text = report.read_text()
    rows = markdown_table(text, "run")
    assert list(rows) == [("backward_smoothing", "best (epoch 3), n=60"),
                          ("backward_smoothing", "best (epoch 3), n=359, subset seed 0"),
                          ("backward_smoothing", "best (epoch 3), n=359, subset seed 1")]
    small, first, second = rows.values()
    assert (first["PGD-20"], first["CW-20"], first["AutoAttack-APGD"], first["examples"]) == (
        "50.00", "48.00", "n/a", "359")
    assert (second["PGD-20"], second["CW-20"], second["source"]) == ("49.00", "n/a", "eval-best-s1.json")
    assert (small["clean"], small["PGD-20"], small["AutoAttack-APGD"], small["examples"]) == (
        "80.00", "n/a", "40.00", "60")
    assert "Mean ± std over seeds" not in text and "| runs |" not in text
    data = json.loads((report.parent / "report.json").read_text())
    assert data["seed_groups"] == []
    assert [(r["n_examples"], r["subset_seed"]) for r in data["rows"]] == [(60, 0), (359, 0), (359, 1)]
    assert any(note.startswith("A run evaluated on several test subsets") for note in data["notes"])


def test_seeds_are_grouped_on_the_same_examples_only(tmp_path, real_result):
    """Two runs that differ only by seed: one group (n 2) when evaluated on the same subset; none when the example
    counts or the subset seeds differ, nor from summary.json alone (each run's subset is drawn with its seed)."""

    def report(name: str, second: dict[str, int] | None) -> dict[str, Any]:
        runs = [write_run(tmp_path / name, f"s{seed}", method="trades", seed=seed, summary=(0.8, 0.4 + seed / 100))
                for seed in (0, 1)]
        if second is not None:
            write_eval(runs[0], "best", real_result, "best", 0.80, {"pgd10": 0.40, "cw20": 0.38})
            write_eval(runs[1], "best", real_result, "best", 0.82, {"pgd10": 0.42, "cw20": 0.36}, **second)
        out = build_report(runs, tmp_path / name / "out")
        return dict(json.loads((out.parent / "report.json").read_text()), text=out.read_text())

    same = report("same", {})
    (group,) = same["seed_groups"]
    assert (group["label"], group["n"], group["seeds"], group["n_examples"], group["subset_seed"]) == (
        "trades", 2, [0, 1], 1000, 0)
    assert group["per_attack"]["pgd10"] == pytest.approx(dict(mean=0.41, std=2 ** 0.5 / 100))
    assert group["per_attack"]["cw20"] == pytest.approx(dict(mean=0.37, std=2 ** 0.5 / 100))
    cells = markdown_table(same["text"], "runs")["trades", "best"]
    assert (cells["n"], cells["seeds"], cells["examples"], cells["PGD-10"], cells["CW-20"]) == (
        "2", "0, 1", "1000", "41.00 ± 1.41", "37.00 ± 1.41")
    for name, second in (("fewer", {"n_examples": 500}), ("other-subset", {"subset_seed": 1}), ("summary", None)):
        found = report(name, second)
        assert found["seed_groups"] == [] and "Mean ± std over seeds" not in found["text"], name


def test_a_run_evaluated_with_pgd10_only(tmp_path, real_result):
    """The columns follow the evaluations: PGD-10 (of an eval file, and of an unfinished run's validation split
    with val_pgd_steps 10) and no PGD-20, CW or AutoAttack; the clean-vs-robust plot shows PGD-10."""
    run = write_run(tmp_path, "fgsm", method="fgsm_rs", summary=None)
    write_eval(run, "last", real_result, "last", 0.70, {"pgd10": 0.37}, n_examples=100)
    unfinished = write_run(tmp_path, "trades", method="trades", summary=None, val_pgd_steps=10)
    metrics = [json.loads(line) for line in (unfinished / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(unfinished / "metrics.jsonl", [{("val_pgd10_acc" if k == "val_pgd20_acc" else k): v
                                                for k, v in row.items()} for row in metrics])
    report = build_report([run, unfinished], tmp_path / "out")
    text = report.read_text()
    header = text.splitlines()[2].split(" | ")
    assert header[7:10] == ["clean", "PGD-10", "worst case"]
    assert not any(title.startswith(("PGD-20", "CW", "AutoAttack")) for title in header)
    rows = markdown_table(text, "run")
    fgsm, trades = rows["fgsm_rs", "last (epoch 3)"], rows["trades", "best (epoch 3)"]
    assert (fgsm["clean"], fgsm["PGD-10"], fgsm["worst case"], fgsm["examples"]) == ("70.00", "37.00", "37.00", "100")
    assert (trades["clean"], trades["PGD-10"], trades["examples"]) == ("80.00", "50.00", "200 val")
    data = json.loads((report.parent / "report.json").read_text())
    assert data["clean_vs_robust"] == "pgd10" and data["plots"] == list(PLOTS)
    assert (report.parent / "clean_vs_robust.png").read_bytes()[:8] == PNG_MAGIC
    assert "](clean_vs_robust.png)" in text
    assert [robust_measure(build_rows([read_run(r)])) for r in (run, unfinished)] == ["pgd10", "pgd10"]


def test_the_clean_vs_robust_measure():
    """pgd20 when a row has it, else the single attack evaluated, else the pointwise worst case, else none."""

    def row(per_attack: dict[str, float | None], worst: float | None = None, clean: float | None = 0.8) -> Any:
        return SimpleNamespace(per_attack=per_attack, worst_case_acc=worst, clean_acc=clean)

    assert robust_measure([row({"pgd10": 0.4}), row({"pgd20": 0.3, "cw20": 0.2})]) == "pgd20"
    assert robust_measure([row({"pgd10": 0.4}), row({"pgd10": 0.3})]) == "pgd10"
    assert robust_measure([row({"pgd10": 0.4, "cw20": 0.3}, worst=0.3)]) == "worst_case"
    assert robust_measure([row({"pgd20": None}), row({"pgd20": 0.4}, clean=None)]) is None


def test_no_robust_accuracy_draws_no_clean_vs_robust_plot(tmp_path, capsys):
    """A run whose only robust number is missing: no empty chart; an earlier report's chart is removed, and
    report.md, report.json and the command's message list only the plots written."""
    run = write_run(tmp_path, "trades", method="trades")
    summary = json.loads((run / "summary.json").read_text())
    atomic_write_json(run / "summary.json", summary | dict(best=summary["best"] | dict(pgd20_acc=None)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "clean_vs_robust.png").write_bytes(PNG_MAGIC)  # left by an earlier report of these runs
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    assert "and 2 plots (val_robust_by_epoch.png, val_robust_by_time.png)" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["plots"] == ["val_robust_by_epoch.png", "val_robust_by_time.png"] and data["clean_vs_robust"] is None
    assert not (out / "clean_vs_robust.png").exists()
    text = (out / "report.md").read_text()
    assert "clean_vs_robust" not in text and "](val_robust_by_time.png)" in text
    assert markdown_table(text, "run")["trades", "best (epoch 3)"]["PGD-20"] == "n/a"


def test_only_trades_with_ten_steps_is_the_reference(tmp_path):
    trades5 = write_run(tmp_path, "trades5", method="trades", method_options={"steps": 5})
    trades5_old = write_run(tmp_path, "trades5-old", method="trades", method_options={"steps": 5}, legacy=True)
    bs = write_run(tmp_path, "bs", method="backward_smoothing")
    rows = markdown_table(build_report([trades5, trades5_old, bs], tmp_path / "out").read_text(), "run")
    assert {row["vs TRADES-10"] for row in rows.values()} == {"n/a"}


def test_labels_name_the_settings_that_differ():
    base = RunConfig(method="backward_smoothing").to_dict()
    configs = [dict(base, gamma=1.0, seed=0), dict(base, gamma=2.0, seed=0), dict(base, gamma=2.0, seed=1),
               dict(base, method="trades", seed=5)]
    assert run_labels(configs) == ["backward_smoothing gamma=1 seed=0", "backward_smoothing gamma=2 seed=0",
                                   "backward_smoothing gamma=2 seed=1", "trades"]
    assert run_labels(configs, with_seed=False)[1:3] == ["backward_smoothing gamma=2"] * 2


def test_old_and_new_configs_label_alike():
    """Method options nested in method_options (new) or top-level with nulls (old) give the same labels."""
    old = RunConfig(method="trades").to_dict()
    old = {k: v for k, v in old.items() if k != "method_options"} | dict.fromkeys(LEGACY_METHOD_KEYS)
    new = RunConfig(method="trades").to_dict()
    configs = [old | dict(beta=6.0, seed=0), new | dict(method_options={"beta": 6.0}, seed=1),
               new | dict(method_options={"beta": 1.0}, seed=0), old | dict(beta=1.0, seed=1)]
    assert run_labels(configs) == ["trades beta=6 seed=0", "trades beta=6 seed=1", "trades beta=1 seed=0",
                                   "trades beta=1 seed=1"]
    assert run_labels(configs, with_seed=False) == ["trades beta=6"] * 2 + ["trades beta=1"] * 2
    # method options, whatever their names, come right after eps, sorted
    configs = [new | dict(epochs=3, eps=8 / 255, method_options={"zeta": 1.0, "alpha": 0.1}),
               new | dict(epochs=5, eps=4 / 255, method_options={"zeta": 2.0, "alpha": 0.2})]
    assert run_labels(configs) == ["trades eps=8/255 alpha=0.1 zeta=1 epochs=3",
                                   "trades eps=4/255 alpha=0.2 zeta=2 epochs=5"]


def test_old_and_new_run_directories_group_alike(tmp_path, real_result):
    old = write_run(tmp_path, "old", method="trades", seed=0, method_options={"beta": 6.0}, legacy=True)
    new = write_run(tmp_path, "new", method="trades", seed=1, method_options={"beta": 6.0}, summary=(0.82, 0.47))
    other = write_run(tmp_path, "other", method="trades", seed=0, method_options={"beta": 1.0})
    for run in (old, new, other):  # on a common subset: seeds are grouped on the same examples only
        write_eval(run, "best", real_result, "best", 0.8, {"pgd20": 0.45})
    text = build_report([old, new, other], tmp_path / "out").read_text()
    rows = markdown_table(text, "run")
    assert list(rows) == [("trades beta=6 seed=0", "best (epoch 3)"), ("trades beta=6 seed=1", "best (epoch 3)"),
                          ("trades beta=1 seed=0", "best (epoch 3)")]
    assert {row["vs TRADES-10"] for row in rows.values()} == {"1.00x"}  # steps unset in both forms: TRADES-10
    groups = markdown_table(text, "runs")
    assert list(groups) == [("trades beta=6", "best")] and groups["trades beta=6", "best"]["seeds"] == "0, 1"


def test_a_data_note_in_summary_json_is_printed(tmp_path):
    run = write_run(tmp_path, "noted", method="trades", data_note=JPEG_NOTE)
    report = build_report([run], tmp_path / "out")
    assert f"cifar10: {JPEG_NOTE}" in report.read_text()
    assert json.loads((report.parent / "report.json").read_text())["notes"][-1] == f"cifar10: {JPEG_NOTE}"


@pytest.mark.parametrize(("dataset", "data_note"), [("synthetic", None), ("digits", ""), ("cifar10", None)])
def test_runs_without_a_data_note_get_none(tmp_path, dataset, data_note):
    """No note from the dataset's name: older runs (no data_note, even for cifar10) and empty notes add none."""
    run = write_run(tmp_path, "run", method="trades", dataset=dataset, data_note=data_note)
    report = build_report([run], tmp_path / "out")
    text = report.read_text()
    assert "JPEG" not in text and "CIFAR" not in text and "shared/data" not in text
    notes = json.loads((report.parent / "report.json").read_text())["notes"]
    assert len(notes) == 2 and notes[0].startswith("Data and models:") and notes[1].startswith("Accuracies in %")


def test_import_backsmooth_report_does_not_import_torch():
    """Formatting a report needs neither torch nor the evaluation suite (and its AutoAttack adapter)."""
    code = ("import sys, backsmooth.report; "
            "assert 'torch' not in sys.modules and 'backsmooth.evaluation' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_stopped_in_its_first_epoch_with_guard_checks(tmp_path):
    """The guard stopped the run before its first epoch ended: no epoch rows, but summary.json and the logged
    checks; the report shows the run (0/3 epochs, no time per epoch) and draws the checks and the collapse."""
    stopped = write_run(tmp_path, "stopped", method="fgsm_rs", epoch_seconds=(), val_robust=(), val_clean=())
    checks = [dict(event="guard", epoch=1, step=step, epochs_done=step / 40, total_train_seconds=step / 4,
                   guard_pgd_acc=acc, train_adv_acc=0.5 + step / 100)
              for step, acc in ((10, 0.2), (20, 0.3), (30, 0.1))]
    event = dict(event="collapse", epoch=1, step=30, guard_pgd_acc=0.04, guard_best=0.3, train_adv_acc=0.8,
                 train_adv_acc_at_best=0.7, epochs_done=0.75, total_train_seconds=7.5)
    write_jsonl(stopped / "metrics.jsonl", [*checks, event | dict(action="stop")])
    atomic_write_json(stopped / "summary.json", json.loads((stopped / "summary.json").read_text())
                      | dict(collapse=event, train_seconds=7.5))
    run = read_run(stopped)
    assert run.metrics == [] and run.epochs_done == 0 and run.train_seconds == 7.5
    assert guard_checks(run) == [(0.25, 2.5, 20.0), (0.5, 5.0, 30.0), (0.75, 7.5, 10.0)]
    assert collapse_points(run) == [(0.75, 7.5, 4.0)]
    report = build_report([stopped, write_run(tmp_path, "other", method="trades")], tmp_path / "out")
    rows = markdown_table(report.read_text(), "run")
    (row,) = [r for key, r in rows.items() if key[0].startswith("fgsm_rs")]
    assert row["epochs"] == "0/3" and row["time/epoch"] == "n/a" and row["vs TRADES-10"] == "n/a"
    assert (report.parent / "val_robust_by_epoch.png").read_bytes().startswith(b"\x89PNG")


def test_bad_run_directories_are_one_line_errors(tmp_path, runs):
    with pytest.raises(DataError, match="run directory .*missing not found"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    atomic_write_json(tmp_path / "empty" / "config.json", RunConfig().to_dict())
    with pytest.raises(DataError, match="has no metrics.jsonl"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"epoch": 1, "train_seconds": 1.0, "total_tr\n')
    with pytest.raises(DataError, match="metrics.jsonl line 1 is not valid JSON"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"event": "collapse", "epoch": 1, "step": 5}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl has no epochs yet; report a run after its first epoch$"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"event": "collapse", "epoch": "one"}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 1 \(an event\) lacks a valid 'epoch'"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    bad = write_run(tmp_path, "bad", method="trades", data_note=JPEG_NOTE)
    summary = json.loads((bad / "summary.json").read_text())
    atomic_write_json(bad / "summary.json", summary | dict(data_note=["not", "text"]))
    with pytest.raises(DataError, match="summary.json has an invalid 'data_note'"):
        build_report([bad], tmp_path / "out")
    atomic_write_json(bad / "config.json", RunConfig().to_dict() | dict(method_options=5))
    with pytest.raises(DataError, match="config.json has an invalid 'method_options'"):
        build_report([bad], tmp_path / "out")
    with pytest.raises(BacksmoothError, match="given twice"):
        build_report([runs[0], runs[0]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib_is_a_one_line_hint(tmp_path, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(BacksmoothError, match=r"plots need matplotlib: pip install 'backsmooth\[report\]'"):
        build_report(runs[:1], tmp_path / "out")
    assert not (tmp_path / "out" / "report.md").exists()


def test_cli(tmp_path, runs, capsys):
    assert cli.main(["report", str(runs[0]), str(runs[2]), "--out", str(tmp_path / "out")]) == 0
    assert f"wrote {tmp_path / 'out' / 'report.md'}" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.json").exists()
    assert cli.main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: run directory") and "nope not found" in err
