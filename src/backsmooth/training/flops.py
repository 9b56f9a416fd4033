"""Model FLOPs utilisation (MFU) of a training step: the FLOPs of one forward pass of the architecture at the input
size (counted by torch.utils.flop_counter: matrix products and convolutions, 2 per multiply-add), times the forward
units F the step makes (a backward counts 2, as in docs/algorithms.md#cost-in-forward-passes), per second, over
the device's peak.

The peaks are the dense bf16/fp16 tensor-core rates with fp32 accumulation of NVIDIA's data sheets: the ceiling a
mixed-precision step can reach. An fp32 step is measured against the same number (it says how far from the chip's
best the step is, not from its fp32 rate). Another device needs `--peak-tflops`.
"""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PEAK_TFLOPS = {  # device name substring (most specific first) -> dense bf16 TFLOP/s
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16
    "RTX 4090": 165.0,
}


def forward_flops(net: nn.Module, image_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """FLOPs of one forward pass of `net` on one image of `image_shape` (eval mode, no gradients)."""
    was_training = net.training
    net.eval()
    x = torch.zeros(1, *image_shape, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    net.train(was_training)
    return int(counter.get_total_flops())


def device_peak_tflops(name: str, given: float | None = None) -> float | None:
    """The device's peak: `given` (--peak-tflops), else the table's entry whose key is in `name`, else None."""
    if given:
        return given
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def achieved_tflops(flops_per_forward: int, f_units: float, images_per_second: float) -> float:
    """TFLOP/s a step does: forward FLOPs x forward units per image x images per second."""
    return flops_per_forward * f_units * images_per_second / 1e12
