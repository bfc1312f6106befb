import pytest
import torch

from tsm import TsmError
from tsm.intervals import (
    check_scales,
    expert_index,
    integer_timesteps,
    interval_bounds,
    num_intervals,
    sample_timesteps,
)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 1000])
def test_uniform_index_at_every_boundary(n):
    T = 1000
    t = torch.arange(T)
    idx = expert_index(t, n, T)
    # reference: the formula in plain Python integers
    assert idx.tolist() == [min(ti * n // T, n - 1) for ti in range(T)]
    for i in range(n):
        owned = integer_timesteps(i, n, T)
        assert (idx[owned.start : owned.stop] == i).all()
        if owned.start > 0:  # the step just below the interval belongs to the previous expert
            assert int(expert_index(owned.start - 1, n, T)) == i - 1
    assert sum(len(integer_timesteps(i, n, T)) for i in range(n)) == T


def test_uniform_boundaries_8():
    assert [int(expert_index(t, 8)) for t in (0, 124, 125, 249, 250, 874, 875, 999)] == [
        0,
        0,
        1,
        1,
        2,
        6,
        7,
        7,
    ]
    assert interval_bounds(3, 8) == (375.0, 500.0)
    assert integer_timesteps(7, 8) == range(875, 1000)


def test_float_flow_matching_timesteps():
    # t = sigma * 1000; sigma = 1 (pure noise) belongs to the last interval
    t = torch.tensor([0.0, 124.999, 125.0, 500.0, 999.5, 1000.0])
    assert expert_index(t, 8).tolist() == [0, 0, 1, 4, 7, 7]
    assert expert_index(torch.tensor(0.5) * 1000, 2).item() == 1


def test_custom_cut_points():
    assert check_scales([[875], 1]) == ((875.0,), 1)
    assert num_intervals((875.0,)) == 2
    t = torch.tensor([0, 874, 875, 999])
    assert expert_index(t, (875.0,)).tolist() == [0, 0, 1, 1]
    assert expert_index(torch.tensor([874.9, 875.0, 1000.0]), (875.0,)).tolist() == [0, 1, 1]
    assert interval_bounds(1, (875.0,)) == (875.0, 1000.0)
    assert integer_timesteps(0, (500.5,)) == range(0, 501)


@pytest.mark.parametrize(
    "scales,msg",
    [
        ((1, 8), "finest to coarsest"),
        ((8, 8), "finest to coarsest"),
        ((0,), "between 1 and"),
        ((1001,), "between 1 and"),
        ((), "non-empty"),
        (([0.0],), "inside"),
        (([600, 500],), "strictly increasing"),
        ((["a"],), "not an int"),
    ],
)
def test_bad_scales_raise_one_line(scales, msg):
    with pytest.raises(TsmError, match=msg) as e:
        check_scales(scales, 1000)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("t", [-1, 1001, float("nan"), -0.5])
def test_timestep_out_of_range(t):
    with pytest.raises(TsmError, match="out of range"):
        expert_index(torch.tensor([t]), 8)


@pytest.mark.parametrize("scale", [8, 3, (875.0,)])
def test_sample_inside_interval(scale):
    g = torch.Generator().manual_seed(0)
    for i in range(num_intervals(scale)):
        t = sample_timesteps(i, scale, 512, generator=g)
        assert t.dtype == torch.long
        assert (expert_index(t, scale) == i).all()
        lo, hi = interval_bounds(i, scale)
        tf = sample_timesteps(i, scale, 512, continuous=True, generator=g)
        assert tf.dtype == torch.float32 and (tf >= lo).all() and (tf < hi).all()
        assert (expert_index(tf, scale) == i).all()
    # every integer timestep of a small interval is reachable
    t = sample_timesteps(1, 8, 5000, generator=g)
    assert set(t.tolist()) == set(range(125, 250))
