"""lb.histogram: buckets as Prometheus counts them, quantiles as PromQL computes them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.histogram import Histogram, quantile

BOUNDS = (0.01, 0.02, 0.05)


@pytest.mark.parametrize(("value", "bucket"), [
    (-1.0, 0),      # below every bound (a timer a clock resolution early): the first
    (0.0, 0),
    (0.01, 0),      # equal to a bound: in its bucket ("le")
    (0.010001, 1),
    (0.05, 2),
    (0.0501, 3),    # above every bound: the +Inf bucket
    (1e9, 3),
])
def test_a_value_lands_in_the_first_bucket_whose_bound_it_does_not_exceed(
        value: float, bucket: int) -> None:
    h = Histogram(BOUNDS)
    h.observe(value)
    assert h.counts == [1 if i == bucket else 0 for i in range(4)]
    assert (h.count, h.sum) == (1, value)


def test_weights_sums_the_largest_and_the_exposition() -> None:
    h = Histogram(BOUNDS)
    h.observe(0.015, 3)
    h.observe(0.5)
    assert (h.count, h.max) == (4, 0.5)
    assert h.sum == pytest.approx(0.545)
    assert h.cumulative() == [(0.01, 0), (0.02, 3), (0.05, 3), (math.inf, 4)]
    assert h.exposition() == [("0.01", 0), ("0.02", 3), ("0.05", 3), ("+Inf", 4)]


def test_bounds_must_ascend() -> None:
    with pytest.raises(ValueError, match="ascending"):
        Histogram((0.02, 0.01))
    with pytest.raises(ValueError, match="ascending"):
        Histogram((0.01, 0.01))


def test_quantiles_interpolate_within_a_bucket_as_promql_does() -> None:
    h = Histogram((0.01, 0.02))
    assert math.isnan(h.quantile(0.5))
    h.observe(0.005, 50)
    h.observe(0.015, 50)
    assert h.quantile(0.5) == pytest.approx(0.01)
    assert h.quantile(0.75) == pytest.approx(0.015)
    h.observe(5.0)  # beyond the last bound: +Inf, reported as the highest finite bound
    assert h.cumulative() == [(0.01, 50), (0.02, 100), (math.inf, 101)]
    assert h.quantile(1.0) == 0.02
    assert math.isnan(quantile([(0.01, 0), (math.inf, 0)], 0.5))


@given(st.lists(st.floats(min_value=-1.0, max_value=10.0, allow_nan=False), max_size=200))
def test_counts_agree_with_a_linear_scan(values: list[float]) -> None:
    h = Histogram(BOUNDS)
    for v in values:
        h.observe(v)
    expected = [0] * 4
    for v in values:
        expected[next((i for i, b in enumerate(BOUNDS) if v <= b), 3)] += 1
    assert h.counts == expected
    cum = [n for _, n in h.cumulative()]
    assert cum == sorted(cum) and cum[-1] == h.count == len(values)
