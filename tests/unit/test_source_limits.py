"""Tests of lb.source_limits: per-source concurrent and rate limits, with a float clock.

Table-driven cases script one tracker (admit/release at given times, what each returns);
hypothesis drives random interleavings against the properties the module docstring states:
counts never negative and given back once, the memory bound, the token bucket's bound.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings, stateful
from hypothesis import strategies as st

from lb.source_limits import (
    CONN_LIMIT,
    RATE_LIMIT,
    SourceEntry,
    SourceLimits,
    SourceTracker,
    source_key,
)

A, B = source_key(1, 0xC6336464), source_key(1, 0xC6336465)
OTHER_VS = source_key(2, 0xC6336464)


@dataclass(frozen=True)
class Op:
    """``admit`` (key, at) expecting "ok" / a refusal / "untracked", or ``release`` of the
    n-th admitted entry."""

    kind: str
    at: float
    key: int = A
    expect: str = "ok"
    nth: int = 0


def admit(at: float, key: int = A, expect: str = "ok") -> Op:
    return Op("admit", at, key, expect)


def release(at: float, nth: int) -> Op:
    return Op("release", at, nth=nth)


CASES: list[tuple[str, SourceLimits, int, list[Op], int]] = [
    # (description, limits, capacity, ops, entries left)
    ("the concurrent limit refuses the next one and frees a slot on release",
     SourceLimits(max_conns=2), 8,
     [admit(0), admit(0), admit(0, expect=CONN_LIMIT), release(1, 0), admit(1),
      admit(1, expect=CONN_LIMIT)], 1),
    ("limits are per source and per virtual server",
     SourceLimits(max_conns=1), 8,
     [admit(0), admit(0, B), admit(0, OTHER_VS), admit(0, expect=CONN_LIMIT)], 3),
    ("a burst of the limit passes, then the bucket refills at limit/period",
     SourceLimits(max_rate=3, period=1.5), 8,
     [admit(0), admit(0), admit(0), admit(0.1, expect=RATE_LIMIT),
      admit(0.5, expect="ok"), admit(0.6, expect=RATE_LIMIT), admit(1.0)], 1),
    ("a steady rate of limit/period is never refused",
     SourceLimits(max_rate=2, period=1.0), 8,
     [admit(t * 0.5) for t in range(10)], 1),
    ("a refused SYN takes no token",
     SourceLimits(max_rate=1, period=1.0), 8,
     [admit(0), admit(0.5, expect=RATE_LIMIT), admit(0.9, expect=RATE_LIMIT), admit(1.0)], 1),
    ("both limits: concurrency is judged first",
     SourceLimits(max_conns=1, max_rate=1), 8,
     [admit(0), admit(0, expect=CONN_LIMIT), release(0, 0), admit(0, expect=RATE_LIMIT)], 1),
    ("no limit: nothing tracked",
     SourceLimits(), 8, [admit(0, expect="untracked"), admit(0, B, expect="untracked")], 0),
    ("an entry without sessions and a full bucket is forgotten at its release",
     SourceLimits(max_conns=5, max_rate=10, period=1.0), 8,
     [admit(0), release(5, 0)], 0),
    ("concurrency only: forgotten as soon as its last session goes",
     SourceLimits(max_conns=5), 8, [admit(0), admit(0), release(0, 0), release(0, 1)], 0),
    ("full of sources with sessions: a new source is admitted untracked",
     SourceLimits(max_conns=1), 1, [admit(0), admit(0, B, expect="untracked")], 1),
    ("full, with an idle source still refilling: it is evicted for the new one",
     SourceLimits(max_rate=10, period=10.0), 1,
     [admit(0), release(0.1, 0), admit(0.2, B)], 1),
    ("full, with an idle source whose bucket is full: recycled, not evicted",
     SourceLimits(max_rate=10, period=1.0), 1,
     [admit(0), release(0.01, 0), admit(5, B)], 1),
]


@pytest.mark.parametrize(("limits", "capacity", "ops", "left"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tracker_table(limits: SourceLimits, capacity: int, ops: list[Op], left: int) -> None:
    tracker = SourceTracker(capacity)
    admitted: list[SourceEntry] = []
    for op in ops:
        if op.kind == "release":
            tracker.release(admitted[op.nth], op.at)
            continue
        got = tracker.admit(op.key, limits, op.at)
        if isinstance(got, SourceEntry):
            admitted.append(got)
            assert op.expect == "ok", (op, got)
        elif got is None:
            assert op.expect == "untracked", op
        else:
            assert got == op.expect, op
    assert len(tracker) == left


def test_eviction_and_untracked_are_counted() -> None:
    lim = SourceLimits(max_rate=10, period=10.0)
    t = SourceTracker(1)
    e = t.admit(A, lim, 0.0)
    assert isinstance(e, SourceEntry)
    assert t.admit(B, lim, 0.0) is None and t.untracked == 1  # A has a session
    t.release(e, 0.5)
    assert t.idle == 1
    assert isinstance(t.admit(B, lim, 0.8), SourceEntry)  # A's bucket is full at 1.0
    assert t.evicted == 1 and t.get(A) is None  # A's history went for B


def test_a_double_release_is_refused() -> None:
    t = SourceTracker(4)
    e = t.admit(A, SourceLimits(max_conns=3), 0.0)
    assert isinstance(e, SourceEntry)
    t.release(e, 0.0)
    with pytest.raises(ValueError, match="no session counted"):
        t.release(e, 0.0)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        SourceLimits(max_conns=-1)
    with pytest.raises(ValueError):
        SourceLimits(max_rate=1, period=0.0)
    with pytest.raises(ValueError):
        SourceTracker(0)


def test_a_lower_limit_after_a_reload_clamps_the_bucket() -> None:
    t = SourceTracker(4)
    assert isinstance(t.admit(A, SourceLimits(max_rate=100), 0.0), SourceEntry)
    lower = SourceLimits(max_rate=2)
    assert isinstance(t.admit(A, lower, 0.0), SourceEntry)
    assert isinstance(t.admit(A, lower, 0.0), SourceEntry)
    assert t.admit(A, lower, 0.0) == RATE_LIMIT  # 98 tokens left, clamped to 2, both taken


# --- properties ------------------------------------------------------------------------------

KEYS = st.sampled_from([source_key(1, 100 + i) for i in range(6)])


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 20), period=st.sampled_from([0.1, 1.0, 2.5]),
       gaps=st.lists(st.floats(0, 0.5, allow_nan=False), min_size=1, max_size=200))
def test_admitted_never_exceed_the_bucket_bound(rate: int, period: float,
                                                gaps: list[float]) -> None:
    """Over every interval [t_i, t_j] of admissions: at most rate + rate*(t_j-t_i)/period."""
    t = SourceTracker(4)
    lim = SourceLimits(max_rate=rate, period=period)
    now, times = 0.0, []
    for gap in gaps:
        now += gap
        got = t.admit(A, lim, now)
        if isinstance(got, SourceEntry):
            times.append(now)
            t.release(got, now)  # concurrency plays no part here
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= rate + rate * (times[j] - times[i]) / period + 1e-6


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 10), period=st.sampled_from([0.5, 1.0]),
       n=st.integers(1, 100))
def test_a_source_within_its_rate_is_never_refused(rate: int, period: float, n: int) -> None:
    t = SourceTracker(4)
    lim = SourceLimits(max_rate=rate, period=period)
    step = period / rate
    for i in range(n):
        assert isinstance(t.admit(A, lim, i * step), SourceEntry)


class TrackerMachine(stateful.RuleBasedStateMachine):
    """Random admits, releases and time against a model of the counts the caller holds."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 4
        self.tracker = SourceTracker(self.capacity)
        self.limits = SourceLimits(max_conns=3, max_rate=4, period=1.0)
        self.now = 0.0
        self.held: list[SourceEntry] = []  # one item per counted session (the caller's refs)

    @stateful.rule(dt=st.floats(0, 2, allow_nan=False))
    def tick(self, dt: float) -> None:
        self.now += dt

    @stateful.rule(key=KEYS)
    def admit(self, key: int) -> None:
        before = sum(1 for e in self.held if e.key == key)
        got = self.tracker.admit(key, self.limits, self.now)
        if isinstance(got, SourceEntry):
            assert got.key == key
            assert before < self.limits.max_conns
            self.held.append(got)
        elif got == CONN_LIMIT:
            assert before >= self.limits.max_conns

    @stateful.rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.held:
            e = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
            self.tracker.release(e, self.now)

    @stateful.invariant()
    def counts_match_the_sessions_held(self) -> None:
        per_entry: dict[int, int] = {}
        for e in self.held:
            per_entry[id(e)] = per_entry.get(id(e), 0) + 1
        for e in self.held:
            assert e.conns == per_entry[id(e)] > 0
            assert self.tracker.get(e.key) is e  # an entry with sessions is never dropped

    @stateful.invariant()
    def memory_is_bounded(self) -> None:
        assert len(self.tracker) <= self.capacity
        assert self.tracker.idle <= len(self.tracker)


TestTrackerMachine = TrackerMachine.TestCase
TestTrackerMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_spoofed_flood_keeps_the_bound_and_the_protecting_counts(seed: int) -> None:
    """Thousands of random sources, one SYN each, whose sessions end at random: the tracker
    never holds more than its capacity, and a source at its concurrent limit stays limited."""
    rnd = random.Random(seed)
    t = SourceTracker(64)
    lim = SourceLimits(max_conns=2, max_rate=5, period=1.0)
    abuser = source_key(1, 7)
    held = [t.admit(abuser, lim, 0.0), t.admit(abuser, lim, 0.0)]
    assert all(isinstance(e, SourceEntry) for e in held)
    live: list[SourceEntry] = []
    now = 0.0
    for _ in range(3000):
        now += 0.0005
        got = t.admit(source_key(1, rnd.getrandbits(32) | 1 << 31), lim, now)
        if isinstance(got, SourceEntry):
            live.append(got)
        if live and rnd.random() < 0.6:
            t.release(live.pop(rnd.randrange(len(live))), now)
        assert len(t) <= 64
    assert t.admit(abuser, lim, now) == CONN_LIMIT
