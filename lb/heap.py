"""The cyclic garbage collector and a growing session table: freeze as it grows, and time it.

A full collection rescans every tracked object with the GIL held: ~24 ms for a table of
10⁵ sessions on the lab box, ~0.25 s at 10⁶. The VRRP thread needs the GIL for the
microseconds of each advert, so such a pause delays the master's adverts by as much (seen
in the 60 s saturation bench: one timer run 43 ms late at 30 ms adverts, with ~10⁵ TIME_WAIT
sessions from wrk in the table), and at 10⁶ sessions past the backup's Master_Down_Interval:
a false failover. CPython runs a full collection whenever the objects that survived into
the oldest generation grew by a quarter, so a table that grows by live traffic pays it again
and again.

The sessions, bindings and per-source entries are acyclic: reference counting frees them,
the cyclic collector never has anything to find among them. So, as the snapshot load and the
peer's snapshot already do after a bulk install, the heap goes to the permanent generation
(``gc.freeze()``: a list splice, O(1)) once the node has started and then each time another
:data:`FREEZE_STEP` entries were created since the last freeze. Collections then scan only
what was allocated since, whatever the size of the table. The price: a reference cycle that
is alive at a freeze and becomes garbage later is never collected (lbd's long-lived cycles
are few: its tasks, connections and their buffers, which break their cycles when they
close).

:class:`HeapWatch` also times every collection through ``gc.callbacks`` (plain counters,
exported at scrape time) so that a pause shows as ``lbd_gc_pause_seconds``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from lb.histogram import Histogram

FREEZE_STEP: Final = 5_000
"""Entries created (sessions, bindings: by this node or installed from the peer) between
two freezes: a collection rescans at most about this many of them."""

PAUSE_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class HeapWatch:
    """Freezes the heap as the tables grow (:meth:`grown`), times the collector's pauses.

    ``created()`` is the running total of entries created; the node calls :meth:`grown`
    from its periodic expiry tick, never from the packet path.
    """

    def __init__(self, created: Callable[[], int], step: int = FREEZE_STEP) -> None:
        self._created = created
        self.step = step
        self._frozen_at = created()
        self.freezes = 0
        self.pauses = [Histogram(PAUSE_BUCKETS) for _ in range(3)]  # per generation
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def grown(self) -> bool:
        """Freeze the heap if :attr:`step` entries were created since the last freeze."""
        if self._created() - self._frozen_at < self.step:
            return False
        self.freeze()
        return True

    def freeze(self) -> None:
        """Freeze the heap now (the node does at the end of its start: the modules, config
        and whatever the start built, ~40,000 objects and 10-20 ms per full collection)."""
        gc.freeze()
        self._frozen_at = self._created()
        self.freezes += 1

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        gen = min(max(info.get("generation", 0), 0), 2)
        self.pauses[gen].observe(took)

    def metrics(self) -> Iterator[Metric]:
        hist = HistogramMetricFamily("lbd_gc_pause_seconds",
                                     "Cyclic garbage collections by generation, timed (the GIL "
                                     "is held throughout)", labels=["generation"])
        for gen, pauses in enumerate(self.pauses):
            hist.add_metric([str(gen)], pauses.exposition(), pauses.sum)
        yield hist
        yield CounterMetricFamily("lbd_gc_freezes", "Heap freezes as the tables grew "
                                  "(gc.freeze: no longer rescanned by collections)",
                                  value=self.freezes)
