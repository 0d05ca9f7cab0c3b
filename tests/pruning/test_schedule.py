"""fls_hf.pruning.schedule: cubic / linear targets, pruning steps, one-shot, recomputation splits."""

import math

import pytest

from fls_hf.errors import RecipeError
from fls_hf.pruning.schedule import SparsitySchedule, recomputation_targets


def test_cubic_targets():
    s = SparsitySchedule(0.5, 0.9, start_step=10, end_step=20, update_frequency=2)
    # s_t = 0.9 + (0.5 − 0.9)(1 − (t − 10)/10)³
    expected = {0: 0.0, 9: 0.0, 10: 0.5, 12: 0.9 - 0.4 * 0.8**3, 15: 0.85, 18: 0.9 - 0.4 * 0.2**3, 20: 0.9, 100: 0.9}
    for step, value in expected.items():
        assert s.target(step) == pytest.approx(value, abs=1e-12), step


def test_linear_targets():
    s = SparsitySchedule(0.2, 0.6, start_step=0, end_step=8, update_frequency=4, inter_func="linear")
    assert [s.target(t) for t in (0, 2, 4, 8, 9)] == pytest.approx([0.2, 0.3, 0.4, 0.6, 0.6])


@pytest.mark.parametrize("frequency, steps", [(2, [10, 12, 14, 16, 18, 20]), (3, [10, 13, 16, 19, 20]), (50, [10, 20])])
def test_pruning_steps_always_end_at_end_step(frequency, steps):
    s = SparsitySchedule(0.1, 0.8, start_step=10, end_step=20, update_frequency=frequency)
    assert s.pruning_steps() == steps
    assert [t for t in range(30) if s.is_pruning_step(t)] == steps
    assert s.target(steps[-1]) == 0.8


def test_targets_rise_monotonically():
    s = SparsitySchedule(0.0, 0.9, start_step=0, end_step=100, update_frequency=7)
    values = [s.target(t) for t in s.pruning_steps()]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 0.9


@pytest.mark.parametrize("init", [0.7, 0.0])
def test_one_shot(init):
    s = SparsitySchedule(init, 0.7, start_step=5, end_step=5)
    assert s.pruning_steps() == [5]
    assert (s.target(4), s.target(5), s.target(6)) == (0.0, 0.7, 0.7)
    assert not s.is_pruning_step(4) and s.is_pruning_step(5) and not s.is_pruning_step(6)


def test_recomputation_targets_equal_log_density_steps():
    assert recomputation_targets(0.5, 0.9, 1) == [0.9]
    got = recomputation_targets(0.5, 0.9, 3)
    densities = [0.5 * 0.2 ** (i / 3) for i in (1, 2, 3)]
    assert got == pytest.approx([1 - d for d in densities], abs=1e-12)
    assert got[-1] == 0.9
    ratios = [(1 - b) / (1 - a) for a, b in zip([0.5] + got[:-1], got)]
    assert ratios == pytest.approx([0.2 ** (1 / 3)] * 3)
    assert recomputation_targets(0.0, 0.0, 2) == [0.0, 0.0]
    assert math.isclose(recomputation_targets(0.0, 0.75, 2)[0], 0.5)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.5, 1.0, 2), r"target sparsity = 1.0 must be in \[0, 1\)"),
        ((0.6, 0.5, 2), "0.5 is below the current sparsity 0.6"),
    ],
)
def test_recomputation_validation(args, match):
    with pytest.raises(RecipeError, match=match):
        recomputation_targets(*args)
