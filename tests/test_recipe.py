"""The modern recipe: weight averaging (closed form, BatchNorm statistics, exact resume), label smoothing,
the one-cycle schedule, and the collapse guard (fires on a collapsing run, silent on a healthy one)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from processes import kill_after_two_checkpoints
from torch import nn

from backsmooth import methods
from backsmooth.config import from_mapping
from backsmooth.schedules import learning_rate
from backsmooth.training import train
from backsmooth.training import trainer as trainer_module
from backsmooth.training.averaging import WeightAverage, decay_at
from backsmooth.training.guard import CollapseGuard, GuardState, evidence, exact_tests

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --------------------------------------------------------------------------- weight averaging


def test_average_equals_the_closed_form():
    """avg_n = prod(d) avg_0 + sum_i (1 - d_i) prod_{j > i} d_j w_i, with the warm-up decays d_i."""
    model = nn.Linear(3, 2)
    average = WeightAverage(model, tau=0.9)
    start = average.module.weight.clone()
    history = []
    for step in range(30):
        with torch.no_grad():
            model.weight.copy_(torch.full_like(model.weight, float(step + 1)))
        history.append(model.weight.clone())
        average.update(model)
    decays = [decay_at(0.9, i) for i in range(30)]
    expected = math.prod(decays) * start
    for i, weights in enumerate(history):
        expected = expected + (1 - decays[i]) * math.prod(decays[i + 1:]) * weights
    torch.testing.assert_close(average.module.weight, expected)
    assert decays[0] == pytest.approx(0.1) and decays[-1] == pytest.approx(30 / 39)  # warm-up: early steps weigh more
    assert decay_at(0.9, 1000) == 0.9
    assert all(not p.requires_grad for p in average.module.parameters())


def test_batchnorm_statistics_are_averaged_like_the_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    average = WeightAverage(model, tau=0.5)
    before = average.module[1].running_mean.clone()
    model.train()
    model(torch.randn(8, 1, 4, 4) + 3)  # moves the raw running statistics
    average.update(model)
    decay = decay_at(0.5, 0)
    torch.testing.assert_close(average.module[1].running_mean, decay * before + (1 - decay) * model[1].running_mean)
    assert int(average.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 1  # copied


def _train_command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "backsmooth", "train", "--dataset", "synthetic", "--method", "fgsm_rs",
            "--epochs", "2", "--batch-size", "32", "--val-pgd-steps", "1", "--final-eval-examples", "50",
            "--weight-averaging", "0.99", "--label-smoothing", "0.2", "--schedule", "onecycle",
            "--checkpoint-every", "3", "--cache-dir", str(cache), "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_resume_with_averaging_is_bitwise(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cache = tmp_path / "cache"
    reference = subprocess.run(_train_command(tmp_path / "reference", cache), env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    kill_after_two_checkpoints(_train_command(out, cache), out, env)
    resumed = subprocess.run(_train_command(out, cache, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.pt", "checkpoint.pt"):  # the average (last.pt) and the raw weights (checkpoint.pt)
        a = torch.load(tmp_path / "reference" / name, weights_only=True)["model"]
        b = torch.load(out / name, weights_only=True)["model"]
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    raw = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    averaged = torch.load(out / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)  # last.pt holds the average, not the raw weights


# --------------------------------------------------------------------------- label smoothing and one-cycle


def test_label_smoothing_changes_the_ce_term_by_its_formula():
    """(1 - s) CE + s * mean over classes of -log p, on the CE term only (TRADES' KL is untouched)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.rand(6, 3, 2, 2), torch.randint(0, 4, (6,))
    plain = methods.build("natural")(model, x, y)
    smoothed = methods.build("natural", label_smoothing=0.3)(model, x, y)
    log_probs = F.log_softmax(model(x), dim=1)
    expected = 0.7 * F.nll_loss(log_probs, y) + 0.3 * (-log_probs.mean(1)).mean()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6) and smoothed.item() != plain.item()
    stats_plain, stats_smooth = {}, {}
    methods.build("trades", steps=1)(model, x, y, torch.Generator().manual_seed(1), stats_plain)
    methods.build("trades", steps=1, label_smoothing=0.3)(model, x, y, torch.Generator().manual_seed(1), stats_smooth)
    assert stats_smooth["kl"].item() == pytest.approx(stats_plain["kl"].item(), rel=1e-6)
    assert stats_smooth["ce"].item() != pytest.approx(stats_plain["ce"].item(), rel=1e-3)


def test_onecycle_values():
    """Cosine rise from lr/25 to lr until step 0.3 T - 1, then cosine to lr/25/1e4 at step T - 1 (PyTorch's)."""
    total, lr = 1000, 0.1
    assert learning_rate("onecycle", lr, 0, total) == pytest.approx(lr / 25)
    assert learning_rate("onecycle", lr, 299, total) == pytest.approx(lr)
    assert learning_rate("onecycle", lr, 999, total) == pytest.approx(lr / 25 / 1e4)
    middle = 299 + (999 - 299) / 2
    assert learning_rate("onecycle", lr, int(middle), total) == pytest.approx(
        lr / 25 / 1e4 + (lr - lr / 25 / 1e4) * 0.5 * (1 + math.cos(math.pi * (int(middle) - 299) / 700)))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, cycle_momentum=False)
    for step in range(total):
        assert learning_rate("onecycle", lr, step, total) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        if step < total - 1:
            scheduler.step()


# --------------------------------------------------------------------------- the collapse guard


def _first(n: int, ones: int) -> torch.Tensor:
    """n flags, the first `ones` of them True."""
    flags = torch.zeros(n, dtype=torch.bool)
    flags[:ones] = True
    return flags


def test_guard_evidence_is_counts_and_three_exact_tests_checkable_by_hand():
    n = 100
    clean, single = _first(n, 80), _first(n, 60)  # 60 of the 80 clean-correct images correct under FGSM too
    reference = _first(n, 0) | (torch.arange(n) >= 95)  # 5 gap images at the reference, outside S now
    found = evidence(clean, single, _first(n, 3), reference, keep=0.25)  # PGD keeps 3 of the 60
    assert (found.clean, found.single, found.kept, found.multi, found.up, found.down) == (80, 60, 3, 3, 57, 5)
    assert found.p_hold == pytest.approx(sum(math.comb(80, k) for k in range(60, 81)) / 2 ** 80)
    assert found.p_keep == pytest.approx(sum(math.comb(60, k) * 0.25 ** k * 0.75 ** (60 - k) for k in range(4)))
    assert found.p_grow == pytest.approx(sum(math.comb(62, k) for k in range(57, 63)) / 2 ** 62)
    assert found.signature and exact_tests(80, 60, 3, 57, 5, 0.25) == (found.p_hold, found.p_keep, found.p_grow)
    borderline = evidence(clean, single, _first(n, 6), reference, keep=0.25)  # 6 of 60: p_keep 0.0031, not enough
    assert 0.001 < borderline.p_keep < 0.01 and not borderline.signature
    healthy = evidence(clean, single, _first(n, 45), reference, keep=0.25)  # PGD keeps 45 of 60: no signature
    assert healthy.kept == 45 and healthy.p_keep > 0.5 and not healthy.signature
    weak = evidence(clean, _first(n, 8), _first(n, 0), None, keep=0.25)  # too few FGSM-correct images to judge
    assert weak.p_keep == pytest.approx(0.75 ** 8) and not weak.signature
    # FGSM breaks most clean-correct images (35 of 80 survive): not yet robust, not overfitted to FGSM, though PGD
    # keeps none of them and the gap grew
    early = evidence(clean, _first(n, 35), _first(n, 0), None, keep=0.25)
    assert early.p_keep < 1e-3 and early.p_grow < 1e-3 and early.p_hold > 0.5 and not early.signature


def scripted_measure(trace: list[tuple[int, int, int]], n: int = 200):
    """A guard measurement read from `trace`: (clean, FGSM, PGD) correct counts per check, nested first-k flags."""
    calls = iter(trace)

    def measure(self, model):
        clean, single, multi = next(calls)
        return _first(n, clean), _first(n, single), _first(n, multi)
    return measure


def guard_decisions(monkeypatch, trace: list[tuple[int, int, int]], decides: bool = True) -> list[dict | None]:
    """The guard's answers to a scripted trace; its first entry is the reference check before training."""
    monkeypatch.setattr(CollapseGuard, "measure", scripted_measure(trace))
    guard = CollapseGuard(torch.rand(200, 1, 2, 2), torch.zeros(200, dtype=torch.long), 0.1, every=1, keep=0.25,
                          state=GuardState(), start_step=0, decides=decides)
    guard.reference_check(nn.Linear(1, 1))
    return [guard.check(nn.Linear(1, 1), step, 0) for step in range(1, len(trace))]


def test_guard_flags_a_run_that_is_never_robust_while_fgsm_accuracy_rises(monkeypatch):
    # PGD accuracy stays at zero; FGSM accuracy rises from 5 to 170 of 200: the gap grows from the reference
    trace = [(20, 2, 0), (60, 5, 0), (120, 40, 0), (160, 120, 0), (180, 150, 0), (190, 170, 0)]
    decisions = guard_decisions(monkeypatch, trace)
    # 5 FGSM-correct images: too few; 40 of 120: FGSM breaks most, not yet robust; 120 of 160: the first signature
    assert decisions[:3] == [None, None, None]
    assert decisions[3]["step"] == 4 and decisions[3]["guard_pgd_acc"] == 0 and decisions[3]["guard_fgsm_acc"] == 0.75
    assert decisions[4] is None  # it fires once


def test_guard_logs_but_records_nothing_for_methods_whose_attack_is_not_one_ce_step(monkeypatch):
    trace = [(20, 2, 0), (60, 5, 0), (120, 40, 0), (160, 120, 0), (180, 150, 0), (190, 170, 0)]
    assert guard_decisions(monkeypatch, trace, decides=False) == [None] * 5
    assert not methods.method_class("backward_smoothing").single_step_attack
    assert methods.method_class("fgsm_rs").single_step_attack


def test_guard_ignores_a_dip_of_both_attacks_and_a_single_bad_check(monkeypatch):
    # healthy: PGD keeps most of what FGSM leaves; a dip where both fall; one check with the signature, then back
    trace = [(20, 2, 0), (150, 80, 60), (150, 30, 20), (160, 90, 10), (170, 100, 70), (170, 110, 80)]
    assert guard_decisions(monkeypatch, trace) == [None] * 5


@pytest.mark.slow
def test_guard_on_a_real_run_records_nothing_when_healthy(tmp_path):
    """Backward Smoothing on the digits with the guard every 5 steps: no event, and the guard's checks do
    not change training (the same weights as a run without the guard)."""
    pytest.importorskip("sklearn")
    base = dict(dataset="digits", arch="small_cnn", method="backward_smoothing", eps=0.1, batch_size=64, lr=0.05,
                schedule="cosine", epochs=3, val_size=180, val_pgd_steps=0, final_eval_examples=0)
    guarded = train(from_mapping(dict(base, collapse_every=5, out=str(tmp_path / "guarded"))), progress=False)
    plain = train(from_mapping(dict(base, collapse_every=0, out=str(tmp_path / "plain"))), progress=False)
    assert guarded["collapse"] is None and plain["collapse"] is None
    rows = [json.loads(line) for line in (tmp_path / "guarded" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "event" not in r]) == 3
    checks = [r for r in rows if r.get("event") == "guard"]  # every check is logged, with its position
    assert {r.get("event") for r in rows} == {None, "guard"} and [c["step"] for c in checks] == list(range(5, 58, 5))
    assert all(0 <= c["guard_pgd_acc"] <= 1 and c["epochs_done"] == pytest.approx(c["step"] / 19) for c in checks)
    a = torch.load(tmp_path / "guarded" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


ROLLBACK_RUN = dict(dataset="digits", arch="small_cnn", method="fgsm_rs", eps=0.1, batch_size=64, lr=0.05,
                    schedule="cosine", epochs=2, val_size=180, val_pgd_steps=0, final_eval_examples=0,
                    collapse_every=2, on_collapse="rollback")


def scripted_check(best_step: int, collapse_steps: tuple[int, ...], interrupt_step: int | None = None,
                   seen: dict | None = None):
    """A guard check decided by the step alone: a new best at `best_step` (its weights go to seen["best"]),
    a collapse at each of `collapse_steps`, and a SIGINT to this process at `interrupt_step`."""
    def check(self, model, step, epoch):
        self.flush()
        self.improved = step == best_step
        if self.improved:
            self.state.best = 0.5
            if seen is not None:
                seen["best"] = {k: v.clone() for k, v in model.state_dict().items()}
        if step == interrupt_step:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler turns it into a checkpoint and a stop
        if step in collapse_steps:
            self.state.collapse = {"event": "collapse", "epoch": epoch + 1, "step": step, "guard_pgd_acc": 0.1,
                                   "guard_best": 0.5, "train_adv_acc": 0.9}
            return self.state.collapse
        return None
    return check


def test_rollback_restores_the_best_check_and_lowers_alpha(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    seen: dict = {}
    monkeypatch.setattr(CollapseGuard, "check", scripted_check(8, (14,), seen=seen))
    original_roll_back = trainer_module.roll_back

    def recording_roll_back(good, parts):
        original_roll_back(good, parts)
        seen["restored"] = {k: v.clone() for k, v in parts.net.state_dict().items()}

    monkeypatch.setattr(trainer_module, "roll_back", recording_roll_back)
    summary = train(from_mapping(dict(ROLLBACK_RUN, out=str(tmp_path / "run"))), progress=False)
    assert all(torch.equal(seen["best"][k], seen["restored"][k]) for k in seen["best"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "collapse"]
    alpha = methods.build("fgsm_rs", eps=0.1).alpha
    assert len(events) == 1 and events[0]["action"] == "rollback"
    assert events[0]["alpha"] == pytest.approx(alpha * 0.5)
    assert [r["epoch"] for r in rows if "event" not in r] == [1, 2]  # training went on to the end
    # every 2 steps after a quarter of the first epoch (19 steps of 64 digits an epoch), 2 epochs
    assert [r["step"] for r in rows if r.get("event") == "guard"] == [s for s in range(1, 39) if s % 2 == 0 and s > 4]
    assert summary["rollbacks"] == 1 and summary["collapse"]["step"] == 14
    guard = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["train_state"]["guard"]
    assert guard["alpha"] == pytest.approx(alpha * 0.5) and guard["collapse"] is None


def test_rollback_stops_after_its_limit(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from backsmooth.training.guard import MAX_ROLLBACKS
    collapses = tuple(range(14, 14 + 4 * (MAX_ROLLBACKS + 1), 4))
    monkeypatch.setattr(CollapseGuard, "check", scripted_check(8, collapses))
    summary = train(from_mapping(dict(ROLLBACK_RUN, out=str(tmp_path / "run"))), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    actions = [r["action"] for r in rows if r.get("event") == "collapse"]
    assert actions == ["rollback"] * MAX_ROLLBACKS + ["stop"]
    assert summary["rollbacks"] == MAX_ROLLBACKS
    alphas = [r["alpha"] for r in rows if r.get("action") == "rollback"]
    assert alphas == pytest.approx([methods.build("fgsm_rs", eps=0.1).alpha * 0.5 ** k
                                    for k in range(1, MAX_ROLLBACKS + 1)])


@pytest.mark.slow
def test_resume_between_the_best_check_and_the_rollback_is_bitwise(tmp_path, monkeypatch):
    """Killed after the best check and resumed, the run rolls back to the checkpointed copy: the same weights."""
    pytest.importorskip("sklearn")
    from backsmooth.errors import Interrupted
    monkeypatch.setattr(CollapseGuard, "check", scripted_check(8, (14,)))
    train(from_mapping(dict(ROLLBACK_RUN, out=str(tmp_path / "reference"))), progress=False)
    monkeypatch.setattr(CollapseGuard, "check", scripted_check(8, (14,), interrupt_step=10))
    with pytest.raises(Interrupted):
        train(from_mapping(dict(ROLLBACK_RUN, out=str(tmp_path / "resumed"))), progress=False)
    monkeypatch.setattr(CollapseGuard, "check", scripted_check(8, (14,)))
    summary = train(from_mapping(dict(ROLLBACK_RUN, out=str(tmp_path / "resumed"))), resume=True, progress=False)
    assert summary["rollbacks"] == 1
    a = torch.load(tmp_path / "reference" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rollback_needs_a_method_with_a_step_size():
    from backsmooth.config import validate
    from backsmooth.errors import ConfigError
    with pytest.raises(ConfigError, match="does not take"):
        validate(from_mapping(dict(ROLLBACK_RUN, method="natural")))
