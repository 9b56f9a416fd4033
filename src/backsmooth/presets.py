"""Named settings: the papers' protocols for every dataset x architecture x method, and small CPU
presets that finish in minutes. `backsmooth presets` lists them; flags and files override them."""

import math
from typing import Any

from backsmooth import methods
from backsmooth.errors import ConfigError
from backsmooth.schedules import stage_drops

_PAPER = dict(epochs=100, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="stage",
              eps=8 / 255, val_size=1000)


def _paper_presets() -> dict[str, dict[str, Any]]:
    """The paper's settings for every dataset x architecture x method (docs/algorithms.md#training-protocol)."""
    presets: dict[str, dict[str, Any]] = {}
    for dataset in ("cifar10", "cifar100", "tiny_imagenet"):
        for arch in ("resnet18", "wrn34_10", "preact_resnet18"):
            for method in methods.names():
                cls = methods.method_class(method)
                if arch == "preact_resnet18" and cls.paper_arch != arch:
                    continue
                presets[f"{dataset}-{arch}-{method}"] = dict(_PAPER, dataset=dataset, arch=arch, method=method,
                                                             **{**cls.paper_settings,
                                                                **cls.paper_arch_settings.get(arch, {})})
    return presets


def _cpu_presets() -> dict[str, dict[str, Any]]:
    """Small settings that finish in minutes on a laptop CPU with `small_cnn`."""
    presets: dict[str, dict[str, Any]] = {}
    scale = {
        "digits": dict(dataset="digits", eps=0.1, epochs=30, batch_size=64, lr=0.05, val_size=180),
        "mnist": dict(dataset="mnist", eps=0.3, epochs=3, lr=0.05, val_size=1000),
        "cifar10": dict(dataset="cifar10", eps=8 / 255, epochs=5, lr=0.05, val_size=1000),
    }
    for name, values in scale.items():
        for method in methods.names():
            cls = methods.method_class(method)
            epochs = math.ceil(values["epochs"] / methods.build(method).replays)  # Free-AT: epochs / m
            presets[f"cpu-{name}-{method}"] = dict(values, arch="small_cnn", method=method, schedule="cosine",
                                                   epochs=epochs, **cls.small_scale_options)
    presets["demo"] = presets["cpu-digits-backward_smoothing"]
    return presets


def _l2_presets(base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The L2 threat model (docs/algorithms.md#threat-models) for every method that has an L2 form: the paper's
    CIFAR-10 ResNet-18 protocol and the CPU digits and CIFAR-10 ones at eps 0.5, RobustBench's L2 radius for
    CIFAR-10 (the digits' 8x8 images in [0, 1] take the same radius; docs/reproduction.md#training-at-l2)."""
    presets: dict[str, dict[str, Any]] = {}
    for method in methods.names():
        if "l2" not in methods.method_class(method).norms:
            continue
        for name in (f"cifar10-resnet18-{method}", f"cpu-digits-{method}", f"cpu-cifar10-{method}"):
            values = dict(base[name], norm="l2", eps=0.5)
            if name.startswith("cpu-digits"):
                values["epochs"] = 15  # what docs/reproduction.md measured: the L2 ball of 0.5 is learned sooner
            presets[f"{name}-l2"] = values
    return presets


def _controlled_presets() -> dict[str, dict[str, Any]]:
    """The 2026 FastAT benchmark's controlled protocol for every method (docs/recipe.md): ResNet-18, CIFAR-10,
    100 epochs (Free-AT: 100 / m), one-cycle lr 0.1, label smoothing 0.4, weight averaging 0.9995,
    best model by PGD-10 on 1,000 validation images."""
    presets: dict[str, dict[str, Any]] = {}
    for method in methods.names():
        values = dict(_PAPER, dataset="cifar10", arch="resnet18", method=method, schedule="onecycle",
                      label_smoothing=0.4, weight_averaging=0.9995, val_pgd_steps=10, val_size=1000,
                      epochs=math.ceil(100 / methods.build(method).replays))
        if not methods.method_class(method).label_smoothing_applies:  # it sets its own targets: refuses smoothing
            values["label_smoothing"] = 0.0
        if method == "fgsm_pgi":  # its authors' own soft labels take the place of label smoothing
            values["smoothing"] = 0.4
        presets[f"cifar10-resnet18-{method}-wa"] = values
    return presets


# adversarial weight perturbation as its authors ran it (csdongxian/AWP): TRADES-AWP (gamma 0.005 from epoch 10,
# i.e. after 9, 200 epochs, attack step 2/255, lr 0.1 x0.1 from epochs 100 and 150) and AT-AWP (gamma 0.01 from
# the start, 200 epochs, lr 0.1 x0.1 at 50% and 75%); Backward Smoothing takes TRADES-AWP's values (its loss is
# TRADES')
_TRADES_AWP_LR = stage_drops(200, {100: 0.1, 150: 0.01})  # train_trades_cifar.py: `if epoch >= 100` (1-based)
_AWP = {"trades": dict(awp=0.005, awp_warmup=9, epochs=200, alpha=2 / 255, schedule=_TRADES_AWP_LR),
        "backward_smoothing": dict(awp=0.005, awp_warmup=9, epochs=200, schedule=_TRADES_AWP_LR),
        "pgd_at": dict(awp=0.01, awp_warmup=0, epochs=200, schedule="stage")}  # AT-AWP: per iteration, at 50%, 75%


def _awp_presets(base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`DATASET-ARCH-METHOD-awp` for CIFAR-10/100 and `cpu-digits-METHOD-awp` (the CPU preset's epochs, AWP from
    the start) for the methods of `_AWP` (docs/algorithms.md#adversarial-weight-perturbation---awp)."""
    presets: dict[str, dict[str, Any]] = {}
    for method, values in _AWP.items():
        for dataset in ("cifar10", "cifar100"):
            for arch in ("resnet18", "wrn34_10"):
                name = f"{dataset}-{arch}-{method}"
                presets[f"{name}-awp"] = dict(base[name], **values)
        presets[f"cpu-digits-{method}-awp"] = dict(base[f"cpu-digits-{method}"], awp=values["awp"])
    return presets


def _speedrun_presets(base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The GPU speedrun (docs/reproduction.md#the-gpu-speedrun): Backward Smoothing on ResNet-18 for the paper's
    100 epochs under the controlled recipe, and a short schedule in the manner of fast_adversarial's CIFAR-10 run
    (PreAct ResNet-18, 30 one-cycle epochs peaking at lr 0.2) with the controlled recipe's label smoothing and a
    faster weight average; both in bf16 with channels-last. Neither has been run yet."""
    fast = dict(precision="bf16", channels_last=True)
    long = dict(base["cifar10-resnet18-backward_smoothing-wa"], **fast)
    short = dict(long, arch="preact_resnet18", epochs=30, lr=0.2, weight_averaging=0.999)
    return {"speedrun-cifar10-resnet18-backward_smoothing-100": long,
            "speedrun-cifar10-preact_resnet18-backward_smoothing-30": short}


_BASE = {**_cpu_presets(), **_paper_presets(), **_controlled_presets()}
PRESETS: dict[str, dict[str, Any]] = {**_BASE, **_l2_presets(_BASE), **_awp_presets(_BASE), **_speedrun_presets(_BASE)}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; run `backsmooth presets` to list them")
    return dict(PRESETS[name])
