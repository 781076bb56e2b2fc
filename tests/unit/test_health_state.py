"""Rise/fall counting and the slow-start ramp (pure: no clock, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.health.state import HealthState, SlowStart, Transition


def feed(state: HealthState, results: str) -> list[tuple[int, bool]]:
    """Feed "+" (ok) / "-" (fail) results at now = 0, 1, 2 ...; return (index, up) changes."""
    changes = []
    for i, mark in enumerate(results):
        ok = mark == "+"
        transition = state.record(ok, "ok" if ok else "connection refused", float(i))
        if transition is not None:
            changes.append((i, transition.up))
    return changes


# (description, rise, fall, initial_up, results, expected transitions as (index, up))
TABLE: list[tuple[str, int, int, bool, str, list[tuple[int, bool]]]] = [
    ("up stays up on successes", 2, 3, True, "++++++", []),
    ("down stays down on failures", 2, 3, False, "------", []),
    ("falls after exactly fall failures", 2, 3, True, "---", [(2, False)]),
    ("one fewer failure than fall keeps it up", 2, 3, True, "--", []),
    ("a success resets the failure run", 2, 3, True, "--+--+--", []),
    ("falls once, further failures change nothing", 2, 3, True, "-------", [(2, False)]),
    ("rises after exactly rise successes", 2, 3, False, "++", [(1, True)]),
    ("a failure resets the success run", 3, 3, False, "++-++-++", []),
    (
        "rise 1 fall 1 flips on every change",
        1,
        1,
        True,
        "-+-+",
        [(0, False), (1, True), (2, False), (3, True)],
    ),
    ("full cycle", 2, 2, True, "+--++--", [(2, False), (4, True), (6, False)]),
    ("flapping below thresholds", 3, 3, True, "--+--+-+-", []),
    ("initial down needs a rise", 2, 2, False, "-+-++", [(4, True)]),
]


@pytest.mark.parametrize(
    ("rise", "fall", "initial_up", "results", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_rise_fall_table(
    rise: int, fall: int, initial_up: bool, results: str, expected: list[tuple[int, bool]]
) -> None:
    state = HealthState(rise, fall, initial_up=initial_up)
    assert feed(state, results) == expected
    final = expected[-1][1] if expected else initial_up
    assert state.up is final


@pytest.mark.parametrize("initial_up", [True, False])
def test_initial_state(initial_up: bool) -> None:
    state = HealthState(2, 2, initial_up=initial_up, now=5.0)
    assert state.up is initial_up
    assert state.since == 5.0
    assert state.run == 0


def test_transition_carries_reason_and_time() -> None:
    state = HealthState(1, 2, initial_up=True)
    assert state.record(False, "timeout after 500ms", 10.0) is None
    assert state.run == 1
    assert state.record(False, "status 503", 11.0) == Transition(False, "status 503", 11.0)
    assert state.since == 11.0
    assert state.record(True, "ok", 12.0) == Transition(True, "ok", 12.0)


def test_transition_is_frozen() -> None:
    transition = Transition(True, "ok", 1.0)
    with pytest.raises(AttributeError):
        transition.up = False  # type: ignore[misc]


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_rejects_thresholds_below_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="rise and fall"):
        HealthState(rise, fall, initial_up=True)


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    initial_up=st.booleans(),
    results=st.lists(st.booleans(), max_size=60),
)
def test_transitions_alternate_and_follow_runs(
    rise: int, fall: int, initial_up: bool, results: list[bool]
) -> None:
    """Properties: transitions alternate, each one ends a run of exactly rise/fall results."""
    state = HealthState(rise, fall, initial_up=initial_up)
    up = initial_up
    for i, ok in enumerate(results):
        transition = state.record(ok, "r", float(i))
        if transition is not None:
            assert transition.up is (not up)
            needed = rise if transition.up else fall
            run = results[i - needed + 1 : i + 1]
            assert len(run) == needed
            assert all(r is transition.up for r in run)
            up = transition.up
        assert state.up is up


# (base, up_since, now, duration, expected)
RAMP: list[tuple[int, float, float, float, int]] = [
    (10, 100.0, 100.0, 10.0, 1),  # at least 1 as soon as up
    (10, 100.0, 100.5, 10.0, 1),  # ceil(0.5)
    (10, 100.0, 101.0, 10.0, 1),
    (10, 100.0, 101.01, 10.0, 2),
    (10, 100.0, 105.0, 10.0, 5),
    (10, 100.0, 109.99, 10.0, 10),
    (10, 100.0, 110.0, 10.0, 10),  # full weight after duration
    (10, 100.0, 500.0, 10.0, 10),
    (100, 0.0, 1.0, 30.0, 4),  # ceil(3.33)
    (1, 0.0, 0.1, 30.0, 1),
    (0, 0.0, 1.0, 10.0, 0),  # base 0 stays 0
    (0, 0.0, 100.0, 10.0, 0),
    (7, 0.0, 0.0, 0.0, 7),  # no slow start
    (7, 5.0, 4.0, 10.0, 1),  # clock before up_since: still at least 1
]


@pytest.mark.parametrize(("base", "up_since", "now", "duration", "expected"), RAMP)
def test_slow_start_ramp(
    base: int, up_since: float, now: float, duration: float, expected: int
) -> None:
    assert SlowStart.weight_at(base, up_since, now, duration) == expected


@given(
    base=st.integers(0, 1000),
    duration=st.floats(0.1, 1000),
    a=st.floats(0, 2000),
    b=st.floats(0, 2000),
)
def test_slow_start_is_monotonic_and_bounded(
    base: int, duration: float, a: float, b: float
) -> None:
    lo, hi = sorted((a, b))
    w_lo = SlowStart.weight_at(base, 0.0, lo, duration)
    w_hi = SlowStart.weight_at(base, 0.0, hi, duration)
    assert w_lo <= w_hi <= base
    assert w_lo >= min(1, base)


def test_ramping() -> None:
    assert SlowStart.ramping(0.0, 5.0, 10.0)
    assert not SlowStart.ramping(0.0, 10.0, 10.0)
    assert not SlowStart.ramping(0.0, 0.0, 0.0)
