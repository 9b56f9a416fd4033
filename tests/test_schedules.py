import math

import pytest

from backsmooth.schedules import learning_rate


def lrs(schedule: str, total: int = 100) -> list[float]:
    return [learning_rate(schedule, 0.1, step, total) for step in range(total)]


def test_stage_drops_tenfold_at_half_and_three_quarters():
    values = lrs("stage")
    assert values[0] == values[49] == 0.1
    assert values[50] == values[74] == pytest.approx(0.01)
    assert values[75] == values[99] == pytest.approx(0.001)


def test_stage75_drops_at_75_and_90_percent():
    values = lrs("stage75")
    assert values[74] == 0.1 and values[75] == pytest.approx(0.01) and values[90] == pytest.approx(0.001)


def test_cyclic_ramps_to_twice_lr_then_decays_to_zero():
    values = lrs("cyclic")
    assert values[0] == 0.0
    assert max(values) == pytest.approx(0.2) and values.index(max(values)) == 40
    assert values[70] == pytest.approx(0.1) and values[-1] < 0.004


def test_cosine_and_constant():
    values = lrs("cosine")
    assert values[0] == 0.1 and values[50] == pytest.approx(0.05)
    assert values[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert set(lrs("constant")) == {0.1}
