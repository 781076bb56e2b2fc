"""lb.heap: the heap is frozen each time the tables grew by a step, collections are timed."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from lb.heap import PAUSE_BUCKETS, HeapWatch


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the permanent generation back to the collector: later tests as before


def test_freezes_once_per_step_of_created_entries() -> None:
    created = [100]
    watch = HeapWatch(lambda: created[0], step=10)
    assert not watch.grown()  # nothing created since the watch began
    created[0] = 109
    assert not watch.grown()
    before = gc.get_freeze_count()
    kept = [object() for _ in range(50)]  # tracked objects alive now: frozen by the freeze
    kept.append([])
    created[0] = 110
    assert watch.grown()
    assert gc.get_freeze_count() > before
    assert watch.freezes == 1
    created[0] = 119
    assert not watch.grown()  # counted from the last freeze, not from the start
    created[0] = 125
    assert watch.grown() and watch.freezes == 2


def test_frozen_acyclic_objects_are_still_freed_by_reference_counting() -> None:
    import weakref

    class Entry:
        pass

    created = [0]
    watch = HeapWatch(lambda: created[0], step=1)
    entry = Entry()
    ref = weakref.ref(entry)
    created[0] = 1
    assert watch.grown()
    del entry  # a session leaving the table: its last reference goes
    assert ref() is None


def test_collections_are_timed_by_generation_and_exported() -> None:
    watch = HeapWatch(lambda: 0)
    watch.install()
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        watch.uninstall()
    gc.collect(2)  # after uninstall: not counted
    assert watch.pauses[1].count == 1 and watch.pauses[2].count == 1
    assert watch.pauses[2].sum > 0
    (hist, freezes) = list(watch.metrics())
    by_gen = {}
    for sample in hist.samples:
        if sample.name == "lbd_gc_pause_seconds_count":
            by_gen[sample.labels["generation"]] = sample.value
    assert by_gen["1"] == 1 and by_gen["2"] == 1
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")
               and s.labels["generation"] == "2"]
    assert len(buckets) == len(PAUSE_BUCKETS) + 1 and buckets[-1].value == 1
    assert freezes.samples[0].value == 0
