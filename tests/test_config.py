"""Configuration: precedence, types, fractions, presets and one-line validation errors."""

import pytest

from backsmooth import config as cfg
from backsmooth import presets
from backsmooth.errors import ConfigError


def test_fractions_and_numbers_are_accepted_for_floats():
    c = cfg.from_mapping({"eps": "8/255", "lr": 0.05, "alpha": 2})
    assert c.eps == pytest.approx(8 / 255) and c.lr == 0.05 and c.method_options == {"alpha": 2.0}


@pytest.mark.parametrize("values,message", [
    ({"epochz": 3}, "unknown config key 'epochz'"),
    ({"epochs": "three"}, "epochs must be an integer"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"channels_last": "yes"}, "channels_last must be true or false"),
    ({"eps": "eight"}, "eps .eight. is not a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"beta": 6, "method_options": {"gammma": 1}}, "unknown config key .gammma."),
])
def test_type_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        cfg.from_mapping(values)


@pytest.mark.parametrize("values,message", [
    ({"eps": 0.0}, "eps must be in \\(0, 1\\]"),
    ({"eps": 2.0}, "eps must be in \\(0, 1\\]"),
    ({"method": "backward_smoothing", "gamma": 0.0}, "gamma must be > 0"),
    ({"method": "madry"}, "unknown method 'madry'"),
    ({"arch": "vgg"}, "unknown architecture 'vgg'"),
    ({"dataset": "imagenet1k"}, "unknown dataset 'imagenet1k'"),
    ({"dataset": "cifar10"}, "needs --data-dir"),
    ({"schedule": "linear"}, "unknown schedule"),
    ({"method": "trades", "gamma": 1.0}, "--gamma does not apply to method trades"),
    ({"method": "natural", "alpha": 0.01}, "--alpha does not apply to method natural"),
    ({"method": "pgd_at", "steps": 0}, "steps must be an integer >= 1"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"lr": -0.1}, "lr must be > 0"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of stop, skip"),
    ({"loader": "disk"}, "loader must be one of auto, device, stream"),
    ({"loader": "stream"}, "--loader stream and --image-size apply to the datasets that stream"),
    ({"dataset": "imagenet", "data_dir": ".", "resize_schedule": "0=128,x"}, "must be EPOCH=SIZE pairs"),
    ({"dataset": "imagenet", "data_dir": ".", "resize_schedule": "3=128,1=160"}, "needs increasing epochs"),
    ({"dataset": "imagenet", "data_dir": ".", "resize_schedule": "0=128", "method": "fgsm_pgi"},
     "fgsm_pgi keeps perturbations of the image's shape"),
    ({"resize_schedule": "0=16"}, "--resize-schedule resizes streamed images"),
    ({"pretrained": True}, "--pretrained and --weights apply to timm:NAME"),
    ({"epochs": 2, "freeze_epochs": 2}, "freeze_epochs must be in 0..epochs-1"),
    ({"warmup_epochs": -1.0}, "warmup_epochs must be in"),
])
def test_range_errors_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate(cfg.from_mapping(values))
    assert "\n" not in str(info.value)


def test_method_hyperparameters_pass_eps_only_to_methods_that_take_it():
    assert cfg.from_mapping({"method": "natural"}).method_hyperparameters() == {}
    c = cfg.from_mapping({"method": "backward_smoothing", "eps": "4/255", "gamma": 2})
    assert c.method_hyperparameters() == {"eps": pytest.approx(4 / 255), "gamma": 2.0}


def test_presets_cover_the_paper_grid_and_validate():
    for dataset in ("cifar10", "cifar100", "tiny_imagenet"):
        for arch in ("resnet18", "wrn34_10"):
            for method in ("backward_smoothing", "trades", "fast_trades", "pgd_at", "fgsm_rs", "gradalign", "natural"):
                values = presets.preset(f"{dataset}-{arch}-{method}")
                assert values["epochs"] == 100 and values["batch_size"] == 128 and values["weight_decay"] == 5e-4
        for method in ("fgsm_rs", "gradalign"):
            assert presets.preset(f"{dataset}-preact_resnet18-{method}")["arch"] == "preact_resnet18"
    assert presets.preset("cifar10-resnet18-trades")["schedule"] == "stage"
    for _name, values in presets.PRESETS.items():
        cfg.validate(cfg.from_mapping(dict(values, data_dir="/data")))
    assert presets.preset("demo")["method"] == "backward_smoothing"
    with pytest.raises(ConfigError, match="backsmooth presets"):
        presets.preset("nope")


def test_config_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "trades"\neps = "8/255"\nepochs = 2\n')
    assert cfg.read_file(toml) == {"method": "trades", "eps": "8/255", "epochs": 2}
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("method: trades\nbeta: 6\n")
    assert cfg.read_file(yaml_file) == {"method": "trades", "beta": 6}
    broken = tmp_path / "broken.toml"
    broken.write_text("method = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        cfg.read_file(broken)
    with pytest.raises(ConfigError, match="not found"):
        cfg.read_file(tmp_path / "missing.toml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a table"):
        cfg.read_file(listing)


def test_settings_that_look_like_mistakes_warn_in_one_line():
    def warnings(**values):
        return cfg.setting_warnings(cfg.from_mapping(dict(dataset="mnist", data_dir="x", **values)))

    # TRADES' absolute 0.007 kept at MNIST's eps 0.3: ten steps travel 0.07, a quarter of the radius
    (line,) = warnings(method="trades", eps=0.3)
    assert "10 steps of alpha 0.007 travel at most 0.07, less than eps 0.3" in line and "0.075" in line
    assert "\n" not in line
    assert warnings(method="trades", eps=0.3, alpha=0.075) == []  # 0.75: the attack can reach the edge
    assert warnings(method="trades", eps=8 / 255) == []  # the authors' setting: 0.07 >= 0.031
    assert warnings(method="fgsm_rs", eps=0.3) == []  # single-step methods default to a multiple of eps
    assert warnings(method="pgd_at", eps=0.5, norm="l2") == []  # at L2 the step follows eps
    (mixed,) = warnings(method="trades", eps=8 / 255, norm="l2")  # an L-inf radius at L2
    assert "unusual for l2" in mixed and "--norm linf" in mixed
