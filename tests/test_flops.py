"""Model FLOPs utilisation in `bench` (training/flops.py): FLOPs counted for layers whose count is known by hand,
the peak table's lookup by device name, and a bench row's TFLOP/s and MFU from its own counts and time."""

import pytest
from torch import nn

from backsmooth import models
from backsmooth.training.bench import BenchSetup, run_benchmark
from backsmooth.training.flops import device_peak_tflops, forward_flops


def test_forward_flops_count_two_per_multiply_add():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(10, 5))
    assert forward_flops(linear, (1, 2, 5)) == 2 * 10 * 5
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert forward_flops(conv, (3, 8, 8)) == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    net = models.build("small_cnn", 10).train()
    assert forward_flops(net, (3, 32, 32)) > forward_flops(net, (3, 16, 16)) > 0 and net.training  # mode restored


def test_the_peak_comes_from_the_flag_else_the_most_specific_table_entry():
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H200") == 989.0
    assert device_peak_tflops("AMD EPYC CPU (2 threads)") is None
    assert device_peak_tflops("AMD EPYC CPU (2 threads)", 1.5) == 1.5


def test_a_bench_row_reports_the_arithmetic_it_did_per_second_and_its_share_of_the_peak():
    setup = BenchSetup(batch_size=8, warmup=0, repeats=1, steps=1, epoch_images=0, peak_tflops=2.0)
    result = run_benchmark(setup, ("natural", "backward_smoothing"))
    flops = forward_flops(models.build("small_cnn", 10), (3, 32, 32))
    assert result["forward_flops"] == flops and result["peak_tflops"] == 2.0
    for row in result["rows"]:
        expected = flops * row["f_units"] * row["images_per_second"] / 1e12
        assert row["tflops"] == pytest.approx(expected) and row["mfu"] == pytest.approx(expected / 2.0)
    without = run_benchmark(BenchSetup(batch_size=8, warmup=0, repeats=1, steps=1, epoch_images=0), ("natural",))
    assert without["peak_tflops"] is None and without["rows"][0]["mfu"] is None
