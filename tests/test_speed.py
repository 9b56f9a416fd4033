"""Speed paths: mixed precision agrees with fp32, fp16 trains with its scaler, and the benchmark's
pass counts equal the floor of docs/algorithms.md#cost-in-forward-passes for every method."""

import json
import math

import pytest
import torch

from backsmooth import cli, methods, models
from backsmooth.config import from_mapping
from backsmooth.runtime import autocast
from backsmooth.training import train
from backsmooth.training.bench import TRADESReference, count_passes, run_benchmark

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["natural", "trades", "backward_smoothing"])
def test_bf16_loss_matches_fp32(name):
    torch.manual_seed(0)
    model = models.build("small_cnn", 10).train()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    method = methods.build(name)
    losses = {}
    for precision in ("fp32", "bf16"):
        with autocast(CPU, precision):
            losses[precision] = method(model, x, y, generator=torch.Generator().manual_seed(1)).item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)


@pytest.mark.slow
def test_fp16_with_gradient_scaler_trains_without_nonfinite_losses(tmp_path):
    # fp16 kernels are slow on CPU: the 8x8 digits keep this short
    pytest.importorskip("sklearn")
    config = from_mapping(dict(dataset="digits", method="backward_smoothing", eps=0.1, epochs=1, batch_size=64,
                               precision="fp16", val_pgd_steps=1, final_eval_examples=0, out=str(tmp_path / "run")))
    train(config, progress=False)  # a non-finite loss would raise TrainingDiverged
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]  # the epochs (not the collapse guard's checks)
    assert all(math.isfinite(r["train_loss"]) and r["skipped_steps"] == 0 for r in rows)
    assert rows[-1]["val_clean_acc"] > 0.3  # learnt something in 20 steps (chance: 0.1)


def test_channels_last_gives_the_same_loss():
    torch.manual_seed(0)
    model = models.build("small_cnn", 10).train()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    method = methods.build("natural")
    plain = method(model, x, y).item()
    model = model.to(memory_format=torch.channels_last)
    assert method(model, x.contiguous(memory_format=torch.channels_last), y).item() == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("name", [*methods.names(), "trades_reference"])
def test_benchmark_pass_counts_equal_the_floor(name):
    model = models.build("small_cnn", 10)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    method = TRADESReference() if name == "trades_reference" else methods.build(name)
    if method.floor_units() is None:
        pytest.skip(f"{name} declares no floor: its step's cost varies (docs/algorithms.md)")
    passes = count_passes(model, method, x, y)
    # trades_reference is the reference code's structure: 10 x (2 forwards + input backward) + 3 forwards
    # + backward = 39F ("about 40F" in docs/algorithms.md#cost-in-forward-passes)
    assert passes.f_units == method.floor_units()


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--arch", "small_cnn", "--batch-size", "8", "--image-size", "16", "--warmup", "0",
                     "--repeats", "2", "--steps", "1", "--epoch-images", "256", "--json", str(out),
                     "--methods", "natural,trades,backward_smoothing"])
    assert code == 0
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"natural", "trades", "backward_smoothing"}
    assert rows["natural"]["ratio_to_natural"] == 1.0 and rows["trades"]["ratio_to_trades"] == 1.0
    assert rows["backward_smoothing"]["passes"] == {"clean_forward": 0, "input_gradient": 2, "training": 2,
                                                   "double_backprop": 0}
    assert rows["backward_smoothing"]["f_units"] == rows["backward_smoothing"]["floor_f_units"] == 10
    assert len(rows["trades"]["seconds_per_repeat"]) == 2
    assert 0 < result["data_pipeline"]["fraction_of_natural_epoch"]
    assert "backward_smoothing" in capsys.readouterr().out


def test_bench_rejects_unknown_methods():
    from backsmooth.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'tradez'"):
        run_benchmark(method_names=("tradez",))
