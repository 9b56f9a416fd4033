"""`backsmooth study`: the smoke spec end to end, a SIGKILL mid-study then the same command (equal to an
uninterrupted study), a rerun that does nothing, and specs refused whole (exit 2, one line, nothing written)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backsmooth.cli import main
from backsmooth.study import load_study
from backsmooth.study.report import EntryRow, render
from backsmooth.units import threat_model_text

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "benchmarks" / "studies" / "smoke.toml"
SRC = str(ROOT / "src")


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backsmooth", "study", *args], env=env(), capture_output=True,
                          text=True, timeout=900)


def accuracies(out: Path) -> dict[str, dict[str, float]]:
    """Every eval file's clean and per-attack accuracies, by run and checkpoint."""
    found = {}
    for path in sorted(out.glob("runs/*/eval-*.json")):
        evaluation = json.loads(path.read_text())["evaluation"]
        found[f"{path.parent.name}/{path.name}"] = {"clean": evaluation["clean_acc"], **evaluation["per_attack"]}
    return found


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke study, run once uninterrupted."""
    out = tmp_path_factory.mktemp("smoke") / "study"
    result = study(str(SMOKE), "--out", str(out))
    return out, result


@pytest.mark.slow
def test_smoke_study_runs_end_to_end(smoke):
    out, result = smoke
    assert result.returncode == 0, result.stderr
    plan = load_study(SMOKE, out)
    assert [r.name for r in plan.runs] == ["backward_smoothing-seed0", "backward_smoothing-seed1",
                                           "fgsm_rs-seed0", "fgsm_rs-seed1"]
    for run in plan.runs:
        folder = out / "runs" / run.name
        assert (folder / "summary.json").is_file()
        config = json.loads((folder / "config.json").read_text())
        assert (config["method"], config["seed"], config["epochs"]) == (run.config.method, run.seed, 1)
        for checkpoint in ("last", "best"):
            evaluation = json.loads((folder / f"eval-{checkpoint}.json").read_text())
            assert evaluation["subset"]["n_examples"] == 100
            assert evaluation["evaluation"]["settings"]["attacks"] == ["pgd10"]
        # one epoch: best.pt is a copy of last.pt, so its evaluation is last's under its own name, not rerun
        assert (folder / "best.pt").read_bytes() == (folder / "last.pt").read_bytes()
        best = json.loads((folder / "eval-best.json").read_text())
        assert best["name"] == "best" and best["checkpoint"]["same_weights_as"] == str(folder / "last.pt")
        assert best["evaluation"] == json.loads((folder / "eval-last.json").read_text())["evaluation"]
    assert "[study smoke] 4/4 runs trained, 8/8 evaluations done" in result.stdout
    report = out / "report"
    for name in ("study.md", "study.json", "tradeoff.png", "report.md", "report.json"):
        assert (report / name).is_file(), name
    table = json.loads((report / "study.json").read_text())["entries"]
    found = accuracies(out)
    for row in table:  # the study table is the mean over the seeds' eval files
        files = [found[f"{row['entry']}-seed{seed}/eval-{row['checkpoint']}.json"] for seed in (0, 1)]
        assert row["seeds"] == [0, 1]
        assert row["attacks"]["pgd10"][0] == pytest.approx(sum(f["pgd10"] for f in files) / 2)
        assert row["clean"][0] == pytest.approx(sum(f["clean"] for f in files) / 2)
    fgsm = next(r for r in table if r["entry"] == "fgsm_rs")
    assert fgsm["ratios"]["FGSM-RS"] == pytest.approx(1.0) and fgsm["ratios"]["TRADES-10"] is None
    assert (out / "spec.toml").read_text() == SMOKE.read_text()


@pytest.mark.slow
def test_rerun_of_a_finished_study_trains_and_evaluates_nothing(smoke):
    out, first = smoke
    assert first.returncode == 0, first.stderr
    runs_before = snapshot(out / "runs")
    again = study(str(SMOKE), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "training" not in again.stdout and "evaluating" not in again.stdout
    assert snapshot(out / "runs") == runs_before


@pytest.mark.slow
def test_sigkill_mid_study_then_rerun_equals_uninterrupted(smoke, tmp_path):
    reference, first = smoke
    assert first.returncode == 0, first.stderr
    out = tmp_path / "study"
    process = subprocess.Popen([sys.executable, "-m", "backsmooth", "study", str(SMOKE), "--out", str(out)],
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mid_run = out / "runs" / "backward_smoothing-seed1" / "checkpoint.pt"  # the second run, 5 steps in
    deadline = time.time() + 600
    while not mid_run.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    assert not (mid_run.parent / "summary.json").exists()
    assert (out / "runs" / "backward_smoothing-seed0" / "eval-best.json").exists()
    resumed = study(str(SMOKE), "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "now training backward_smoothing-seed0" not in resumed.stdout  # finished work is not redone
    assert "now training backward_smoothing-seed1" in resumed.stdout
    assert accuracies(out) == accuracies(reference)
    assert len(accuracies(out)) == 8


def test_report_only_reports_the_finished_runs_and_trains_nothing(smoke, tmp_path):
    out, first = smoke
    assert first.returncode == 0, first.stderr
    partial = tmp_path / "partial"
    shutil.copytree(out / "runs" / "fgsm_rs-seed0", partial / "runs" / "fgsm_rs-seed0")  # one finished run
    result = study(str(SMOKE), "--out", str(partial), "--report-only")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (partial / "runs").iterdir()) == ["fgsm_rs-seed0"]
    (row, *_) = json.loads((partial / "report" / "study.json").read_text())["entries"]
    assert row["entry"] == "fgsm_rs" and row["seeds"] == [0]


@pytest.mark.slow
def test_the_run_report_shows_the_attack_the_study_ran(smoke):
    """report.md of a study that ran PGD-10 only: a PGD-10 column with each eval file's number, no PGD-20, CW or
    AutoAttack column; seed groups per attack; the clean-vs-robust plot shows PGD-10."""
    out, first = smoke
    assert first.returncode == 0, first.stderr
    text = (out / "report" / "report.md").read_text()
    lines = text.splitlines()
    header = [cell.strip() for cell in next(line for line in lines if line.startswith("| run |")).strip("|").split("|")]
    assert "PGD-10" in header and not any(title.startswith(("PGD-20", "CW", "AutoAttack")) for title in header)
    data = json.loads((out / "report" / "report.json").read_text())
    found = accuracies(out)
    assert len(data["rows"]) == 8
    for row in data["rows"]:
        pgd10 = found[f"{Path(row['run_dir']).name}/eval-{row['checkpoint']}.json"]["pgd10"]
        assert row["per_attack"] == {"pgd10": pytest.approx(pgd10)}
        (line,) = [line for line in lines if line.startswith(f"| {row['label']} | {row['checkpoint']} (")]
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        assert cells["PGD-10"] == f"{100 * pgd10:.2f}"
    assert data["clean_vs_robust"] == "pgd10" and "clean_vs_robust.png" in data["plots"]
    assert (out / "report" / "clean_vs_robust.png").is_file()
    groups = data["seed_groups"]  # every entry's two seeds, on the study's common subset, per checkpoint
    assert len(groups) == 4 and all(g["n"] == 2 and g["per_attack"]["pgd10"] is not None for g in groups)


def test_changed_spec_is_refused_and_changes_nothing(smoke, tmp_path, capsys):
    out, first = smoke
    assert first.returncode == 0, first.stderr
    changed = tmp_path / "smoke.toml"
    changed.write_text(SMOKE.read_text().replace("epochs = 1", "epochs = 2"))
    before = snapshot(out)
    assert main(["study", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another version of the study" in err and "epochs" in err
    assert "--resume" not in err and "--out DIR" in err
    assert snapshot(out) == before


def test_an_added_attack_evaluates_again_and_changes_nothing_else(smoke, tmp_path, capsys):
    reference, first = smoke
    assert first.returncode == 0, first.stderr
    out = tmp_path / "study"
    shutil.copytree(reference, out)
    before, old = snapshot(out / "runs"), accuracies(out)
    added = tmp_path / "smoke.toml"
    added.write_text(SMOKE.read_text().replace('attacks = ["pgd10"]', 'attacks = ["pgd10", "fgsm"]'))
    assert main(["study", str(added), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training" not in printed and printed.count("evaluating") == 4  # last.pt of each run; best.pt reuses it
    after = snapshot(out / "runs")

    def trained(files: dict[str, bytes]) -> dict[str, bytes]:
        return {name: data for name, data in files.items() if "/eval-" not in name}

    assert trained(after) == trained(before)
    new = accuracies(out)
    assert new.keys() == old.keys()
    for key, found in new.items():
        assert {k: found[k] for k in ("clean", "pgd10")} == old[key]  # seeded: the same numbers again
        assert 0 <= found["fgsm"] <= found["clean"]
    table = json.loads((out / "report" / "study.json").read_text())["entries"]
    assert all(set(row["attacks"]) == {"pgd10", "fgsm"} for row in table)
    dropped = tmp_path / "dropped.toml"
    dropped.write_text(SMOKE.read_text().replace('attacks = ["pgd10"]', 'attacks = ["fgsm"]'))
    assert main(["study", str(dropped), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "may add attacks, not drop" in err
    assert snapshot(out / "runs") == after


def test_report_only_before_any_run_finished_is_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", str(SMOKE), "--out", str(out), "--report-only"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "no run of the study" in captured.err, captured.err
    assert f"run the study first: backsmooth study {SMOKE} --out {out}" in captured.err
    assert "writing the report" not in captured.out and not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", str(SMOKE), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for name in ("backward_smoothing-seed0", "backward_smoothing-seed1", "fgsm_rs-seed0", "fgsm_rs-seed1"):
        assert name in printed
    assert "left to do: about" in printed and not out.exists()


SPEC = """
[protocol]
preset = "cpu-digits-{method}"
epochs = 1
[evaluation]
attacks = ["pgd10"]
n_examples = 100
[[entries]]
method = "fgsm_rs"
"""

MALFORMED = {
    "unknown top-level key": "colour = 'red'\n" + SPEC,
    "unknown protocol key": SPEC.replace("epochs = 1", "epochs = 1\nlearning_rate = 0.1"),
    "unknown method": SPEC.replace('method = "fgsm_rs"', 'method = "fgsm_rss"'),
    "unknown attack": SPEC.replace('["pgd10"]', '["pgd10", "pgd0"]'),
    "bad value": SPEC.replace("epochs = 1", "epochs = 0"),
    "wrong type": SPEC.replace("epochs = 1", 'epochs = "one"'),
    "option of another method": SPEC + "beta = 6\n",
    "seed in the protocol": SPEC.replace("epochs = 1", "epochs = 1\nseed = 3"),
    "duplicate entries": SPEC + '[[entries]]\nmethod = "fgsm_rs"\n',
    "bad seeds": SPEC + "seeds = [0, 0]\n",
    "no entries": SPEC.split("[[entries]]")[0],
    "no evaluation": SPEC.replace("[evaluation]", "[other]"),
    "unknown checkpoint": SPEC.replace("n_examples = 100", "n_examples = 100\ncheckpoints = ['final']"),
    "not TOML": SPEC + "[[entries\n",
    "unknown preset": SPEC.replace("cpu-digits-{method}", "cpu-nowhere-{method}"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(MALFORMED[case])
    out = tmp_path / "study"
    assert main(["study", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()


PLACED = {
    "protocol key": (SPEC.replace("epochs = 1", "epoch = 1"),
                     "[protocol]: unknown key 'epoch' (did you mean 'epochs'?)"),
    "protocol value": (SPEC.replace("epochs = 1", "epochs = 0"), "[protocol]: epochs must be >= 1, got 0"),
    "protocol preset": (SPEC.replace("cpu-digits-", "cpu-digit-"),
                        "[protocol]: preset 'cpu-digit-{method}' gives 'cpu-digit-fgsm_rs' for entry 1 (fgsm_rs), "
                        "which is not a preset (did you mean 'cpu-digits-{method}'?)"),
    "entry method": (SPEC + '[[entries]]\nmethod = "fgsm-rs"\n',
                     "entry 2 (fgsm-rs): unknown method 'fgsm-rs' (did you mean 'fgsm_rs'?)"),
    "entry key": (SPEC + "alpah = 0.1\n", "entry 1 (fgsm_rs): unknown key 'alpah' (did you mean 'alpha'?)"),
    "entry value": (SPEC + "epochs = 0\n", "entry 1 (fgsm_rs): epochs must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(PLACED))
def test_spec_errors_name_their_place_and_the_nearest_name(case, tmp_path, capsys):
    text, message = PLACED[case]
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    assert main(["study", str(spec), "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {spec}: {message}" + ("; run `backsmooth presets` to list them" if "preset" in case
                                                 else "") + "\n"
    assert not (tmp_path / "study").exists()


def test_runs_of_another_spec_are_refused_with_the_study_options(tmp_path, capsys):
    spec, changed, out = tmp_path / "spec.toml", tmp_path / "changed.toml", tmp_path / "study"
    spec.write_text(SPEC)
    changed.write_text(SPEC.replace("epochs = 1", "epochs = 2"))
    (run,) = load_study(spec, out).runs
    Path(run.config.out).mkdir(parents=True)
    (Path(run.config.out) / "config.json").write_text(json.dumps(run.config.to_dict()))
    (out / "spec.toml").write_text(SPEC)
    before = snapshot(out)
    assert main(["study", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" not in err, err
    assert f"trained with epochs = 1 ({run.config.out}/config.json), this spec gives 2" in err
    assert f"run `backsmooth study {out / 'spec.toml'} --out {out}`, or give this spec a new folder with --out" in err
    assert snapshot(out) == before


def test_spec_layers_preset_protocol_and_entry(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace('method = "fgsm_rs"', 'method = "fgsm_rs"\nalpha = "0.2"\nseeds = [3]')
                    + '[[entries]]\nmethod = "free_at"\n[[entries]]\nmethod = "natural"\nname = "nat"\nepochs = 3\n'
                    + 'checkpoints = ["last"]\nattacks = ["pgd20", "cw20"]\n')
    plan = load_study(spec, tmp_path / "out")
    fgsm, free, natural = plan.runs
    assert fgsm.name == "fgsm_rs-seed3" and fgsm.config.method_options["alpha"] == pytest.approx(0.2)
    assert fgsm.config.eps == pytest.approx(0.1) and fgsm.config.batch_size == 64  # from the cpu-digits preset
    assert free.config.epochs == 1  # ceil(1 / m)
    assert natural.name == "nat-seed0" and natural.config.epochs == 3  # the entry's own epochs are kept
    assert Path(natural.config.out) == tmp_path / "out" / "runs" / "nat-seed0"
    assert (natural.checkpoints, natural.attacks) == (("last",), ("pgd20", "cw20"))
    assert (fgsm.checkpoints, fgsm.attacks) == (("last", "best"), ("pgd10",))  # the [evaluation] defaults


@pytest.mark.parametrize("spec", sorted(p.name for p in SMOKE.parent.glob("*.toml")))
def test_every_shipped_spec_is_valid(spec):
    plan = load_study(SMOKE.parent / spec)
    assert plan.runs and len({r.name for r in plan.runs}) == len(plan.runs)


def test_free_at_epochs_count_passes_over_the_data(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace("epochs = 1", "epochs = 10").replace('"fgsm_rs"', '"free_at"\nreplay = 4'))
    (run,) = load_study(spec, tmp_path / "out").runs
    assert run.config.epochs == 3  # ceil(10 / 4)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_study_under_torchrun_trains_each_run_on_every_process(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace('"fgsm_rs"', '"fgsm_rs"\ndevice = "cpu"'))
    out = tmp_path / "study"
    result = subprocess.run([shutil.which("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "backsmooth",
                             "study", str(spec), "--out", str(out)], env=env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "runs" / "fgsm_rs-seed0" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert (out / "runs" / "fgsm_rs-seed0" / "eval-last.json").is_file()
    assert (out / "report" / "study.md").is_file()
    assert result.stdout.count("writing the report") == 1  # rank 0 alone evaluates and reports


def _row(run, clean: float) -> EntryRow:
    return EntryRow(entry=run.entry, method=run.config.method, checkpoint="last",
                    threat_model=threat_model_text(run.config.norm, run.config.eps), seeds=(0,), f_per_step=5,
                    clean=(clean, 0.0), attacks={"pgd10": (0.5, 0.0)}, worst_case=(0.5, 0.0),
                    seconds_per_epoch=(10.0, 0.0), ratios={"TRADES-10": None, "FGSM-RS": None}, collapsed=0)


def test_study_table_states_the_threat_model_and_a_column_when_entries_differ(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.replace("epochs = 1", 'epochs = 1\nnorm = "l2"\neps = 0.5'))
    plan = load_study(spec, tmp_path / "out")
    text = render(plan, [_row(plan.runs[0], 0.9)], "backsmooth study spec.toml")
    assert "Protocol: digits, small_cnn, L2, eps 0.5, 1 epoch" in text and "threat model" not in text
    spec.write_text(SPEC + '[[entries]]\nmethod = "pgd_at"\nnorm = "l2"\neps = 0.5\n')
    plan = load_study(spec, tmp_path / "out2")
    text = render(plan, [_row(run, 0.9) for run in plan.runs], "backsmooth study spec.toml")
    assert "Protocol: digits, small_cnn, Linf, eps 0.1," in text
    last = text.split("## last.pt")[1].split("##")[0]
    header, _, fgsm, pgd = [line for line in last.splitlines() if line.startswith("|")]
    assert header.split(" | ")[2] == "threat model"
    assert fgsm.split(" | ")[2] == "Linf, eps 0.1" and pgd.split(" | ")[2] == "L2, eps 0.5"
