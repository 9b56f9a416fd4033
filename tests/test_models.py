"""Architectures: parameter counts of the standard definitions and the [0, 1] input contract."""

import pytest
import torch

from backsmooth import models
from backsmooth.errors import ConfigError

# Standard definitions: CIFAR ResNet-18 (TRADES / Backward Smoothing code), PreAct-ResNet-18
# (Fast AT / GradAlign code), WRN-34-10 (TRADES code), all with 10 classes.
PARAMS = {"resnet18": 11_173_962, "preact_resnet18": 11_172_170, "wrn34_10": 46_160_474}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_the_standard_definitions(name):
    assert count(models.build(name, 10)) == PARAMS[name]


def test_class_count_changes_only_the_head():
    assert count(models.build("resnet18", 100)) - count(models.build("resnet18", 10)) == 90 * 513


def test_wide_resnet_depth_and_width_are_parameters():
    assert count(models.build("wrn34_10", 10, depth=16, width=1)) < 200_000
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.build("wrn34_10", 10, depth=30)


@pytest.mark.parametrize("name,shape", [("small_cnn", (1, 8, 8)), ("small_cnn", (1, 28, 28)),
                                        ("small_cnn", (3, 32, 32)), ("resnet18", (3, 32, 32)),
                                        ("preact_resnet18", (3, 64, 64))])
def test_models_take_unit_images_of_any_supported_size(name, shape):
    model = models.build(name, 7, in_channels=shape[0]).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_normalisation_is_inside_the_model():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    wrapped = models.build("small_cnn", 10, mean=mean, std=std).eval()
    x = torch.rand(3, 3, 32, 32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(x), wrapped.net(normalised))
    assert {"normalize.mean", "normalize.std"} <= set(wrapped.state_dict())


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet19'"):
        models.build("resnet19", 10)
