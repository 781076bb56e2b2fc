"""A histogram of plain counters, read by the Prometheus collector at scrape time (pure).

Health check durations, garbage-collector pauses, the VRRP timer's lateness and the sync
acknowledgement delay are all counted this way: a list of per-bucket counts (not cumulative;
the last one holds what is above every bound), a count, a sum and the largest value seen.
Observing is a bisect and three additions; the cumulative form Prometheus wants is built only
when asked for. One writer per histogram (the VRRP thread writes its own): a reader copies
the counts first, so a scrape sees each bucket whole.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["Histogram", "quantile"]


class Histogram:
    """Counts per bucket of upper ``bounds`` (ascending; a value equal to a bound is in its
    bucket), plus one bucket for the rest."""

    __slots__ = ("bounds", "count", "counts", "max", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram bounds must be ascending and distinct: {bounds!r}")
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, value: float, weight: int = 1) -> None:
        """``weight`` observations of ``value`` each."""
        self.counts[bisect_left(self.bounds, value)] += weight
        self.count += weight
        self.sum += value * weight
        self.max = max(self.max, value)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), the last bound ``inf``."""
        out, acc = [], 0
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            acc += n
            out.append((bound, acc))
        return out

    def exposition(self) -> list[tuple[str, int]]:
        """:meth:`cumulative` with Prometheus's ``le`` labels, for HistogramMetricFamily."""
        return [("+Inf" if bound == float("inf") else repr(bound), acc)
                for bound, acc in self.cumulative()]

    def quantile(self, q: float) -> float:
        """The ``q`` quantile as PromQL's ``histogram_quantile`` computes it (:func:`quantile`)."""
        return quantile(self.cumulative(), q)


def quantile(cumulative: Sequence[tuple[float, int | float]], q: float) -> float:
    """``histogram_quantile`` over (upper bound, cumulative count) pairs ending with +Inf:
    interpolated within its bucket; NaN when empty; the highest finite bound when the rank
    falls in +Inf."""
    if not cumulative or cumulative[-1][1] <= 0:
        return float("nan")
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, acc in cumulative:
        if acc >= rank:
            if bound == float("inf"):
                return lower
            inside = acc - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, acc
    return lower
