"""Timing wheel: never early, at most a tick late, bounded sweeps, lazy re-filing, discards."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from lb.wheel import UNFILED, TimingWheel

HOLD = 1.5  # how far a held item's due time is pushed at each sweep (persistence's "in use")


class Item:
    """A wheel entry whose due time is ``when``, or ``now + HOLD`` while ``held``."""

    __slots__ = ("_slot", "held", "name", "when")

    def __init__(self, name: str, when: float) -> None:
        self.name = name
        self.when = when
        self.held = False
        self._slot = UNFILED

    def __repr__(self) -> str:
        return f"Item({self.name!r}, when={self.when}, held={self.held})"


def due(item: Item, now: float) -> float:
    return now + HOLD if item.held else item.when


def wheel(tick: float = 1.0) -> TimingWheel[Item]:
    return TimingWheel(tick, due)


def filed(w: TimingWheel[Item], when: float, name: str = "x") -> Item:
    item = Item(name, when)
    w.file(item, when)
    return item


# --- named properties ------------------------------------------------------------------------


def test_tick_must_be_positive() -> None:
    for tick in (0.0, -1.0):
        with pytest.raises(ValueError, match="tick must be positive"):
            wheel(tick)


def test_due_inside_a_slot_is_not_anticipated() -> None:
    w = wheel(0.1)
    item = filed(w, 300.05)
    for now in (299.99, 300.0, 300.02, 300.049):
        assert w.sweep(now) == []
        assert item in w
    assert w.sweep(300.05) == [item]
    assert item not in w  # handed back unfiled


def test_swept_every_tick_an_item_is_at_most_one_tick_late() -> None:
    w = wheel(0.25)
    items = [filed(w, 10.0 + k * 0.0371, str(k)) for k in range(100)]
    got: dict[str, float] = {}
    now = 0.0
    while len(got) < len(items):
        now += 0.25
        for item in w.sweep(now):
            got[item.name] = now
    for item in items:
        assert item.when <= got[item.name] < item.when + 0.25


def test_lazy_refile_when_the_due_time_moves_later() -> None:
    w = wheel()
    item = filed(w, 10.0)
    item.when = 25.0  # the table need not tell the wheel
    assert w.sweep(20.0) == []
    assert item in w
    assert w.sweep(24.9) == []
    assert w.sweep(25.0) == [item]


def test_file_earlier_moves_only_earlier_and_only_filed_items() -> None:
    w = wheel()
    item = filed(w, 50.0)
    item.when = 5.0
    w.file_earlier(item, 5.0)
    assert w.sweep(5.0) == [item]
    w.file_earlier(item, 1.0)  # not filed any more: nothing to do
    assert item not in w
    later = filed(w, 10.0, "later")
    w.file_earlier(later, 30.0)  # later: ignored, it stays filed at 10
    assert w.sweep(10.0) == [later]


def test_a_due_time_already_swept_is_handed_back_by_the_next_sweep() -> None:
    w = wheel()
    assert w.sweep(100.0) == []
    item = filed(w, 3.0)
    assert w.sweep(100.0) == [item]


def test_a_discarded_item_is_skipped() -> None:
    w = wheel()
    gone = filed(w, 10.0, "gone")
    kept = filed(w, 10.0, "kept")
    assert w.discard(gone) is True
    assert w.discard(gone) is False  # idempotent
    assert gone not in w
    assert w.sweep(10.0) == [kept]
    assert w.discard(kept) is False  # a sweep hands back unfiled items


def test_refiled_after_discard_in_the_same_slot_is_handed_back_once() -> None:
    w = wheel()
    item = filed(w, 10.2)
    w.discard(item)
    w.file(item, 10.7)  # the stale entry and the new one share slot 10
    assert w.sweep(11.0) == [item]
    assert w.sweep(12.0) == []


def test_budget_bounds_the_entries_touched_stale_ones_included() -> None:
    w = wheel()
    stale = [filed(w, 10.0, f"s{k}") for k in range(5)]
    for item in stale:
        w.discard(item)
    live = filed(w, 10.0, "live")
    assert w.sweep(10.0, budget=5) == []  # five stale entries used the budget
    assert w.sweep(10.0, budget=5) == [live]


def test_the_entry_a_move_leaves_behind_is_dropped_not_carried() -> None:
    w = wheel()
    moved = filed(w, 10.0, "moved")
    moved.when = 20.0
    w.file(moved, 20.0)  # its entry in slot 10 is now stale
    assert w.sweep(15.0) == []
    other = filed(w, 20.0, "other")
    assert w.sweep(20.0, budget=2) == [moved, other]  # no second entry for "moved"


def test_a_sweep_resumes_mid_slot_in_filing_order() -> None:
    w = wheel()
    items = [filed(w, 10.0 + k * 0.01, str(k)) for k in range(25)]
    batches = []
    while batch := w.sweep(50.0, budget=4):
        batches.append(batch)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 4, 1]
    assert [item for batch in batches for item in batch] == items


def test_not_yet_due_entries_wait_behind_the_unvisited_ones() -> None:
    # In the slot being swept, an item due later within it goes behind the entries the
    # budget did not reach, so that a small budget still reaches every due item.
    w = wheel()
    late = [filed(w, 10.9, f"late{k}") for k in range(3)]
    due_now = [filed(w, 10.1, f"now{k}") for k in range(3)]
    got = []
    for _ in range(3):
        got += w.sweep(10.5, budget=2)
    assert got == due_now
    assert all(item in w for item in late)


def test_a_long_gap_visits_only_occupied_slots() -> None:
    w = wheel(0.001)
    item = filed(w, 5.0)
    assert w.sweep(1e9) == [item]  # a trillion empty slots are not visited
    other = filed(w, 1e9 + 1.0)
    assert w.sweep(1e9 + 1.0) == [other]


def test_a_due_time_that_depends_on_now() -> None:
    w = wheel()
    item = filed(w, 10.0)
    item.held = True  # while held, due HOLD after each sweep that meets it
    assert w.sweep(10.0) == []
    assert w.sweep(100.0) == []
    item.held = False
    item.when = 100.0 + HOLD  # released at 100 (the table's rule: due no earlier than that)
    assert w.sweep(101.0) == []
    assert w.sweep(101.5) == [item]


def test_no_budget_sweeps_nothing() -> None:
    w = wheel()
    item = filed(w, 5.0)
    for budget in (0, -1):
        assert w.sweep(10.0, budget) == []
    assert w.sweep(10.0, 1) == [item]


def test_time_going_backwards_sweeps_nothing() -> None:
    w = wheel()
    item = filed(w, 5.0)
    assert w.sweep(3.0) == []
    assert w.sweep(2.0) == []
    assert w.sweep(5.0) == [item]


# --- a random model --------------------------------------------------------------------------


class WheelModel(RuleBasedStateMachine):
    """Random file / re-file / move earlier / postpone / hold / discard / sweep schedules.

    The model is a set of filed items and their due times. Checked at every sweep: what
    comes back was filed and is due (never early), once; it is no longer filed; at most
    ``budget`` items come back. After a sweep that drains (an unlimited budget, or repeated
    small ones), nothing filed is due; and an item handed back was not already due and
    known at the previous drained sweep (at most a tick late when sweeping every tick).
    """

    items = Bundle("items")

    def __init__(self) -> None:
        super().__init__()
        self.tick = 0.25
        self.wheel: TimingWheel[Item] = TimingWheel(self.tick, due)
        self.now = 0.0
        self.drained_at = float("-inf")  # time of the last sweep that left nothing due
        self.drains = 0  # how many such sweeps so far
        self.filed: set[Item] = set()
        self.known_in: dict[Item, int] = {}  # ``drains`` when the item's due time was set
        self.count = 0

    def _due_now(self, item: Item) -> bool:
        return not item.held and item.when <= self.now

    def _set_when(self, item: Item, when: float) -> None:
        item.when = when
        self.known_in[item] = self.drains

    @rule(target=items, offset=st.floats(-3.0, 20.0))
    def file_new(self, offset: float) -> Item:
        self.count += 1
        item = Item(str(self.count), 0.0)
        self._set_when(item, self.now + offset)
        self.wheel.file(item, item.when)
        self.filed.add(item)
        return item

    @rule(item=items, offset=st.floats(-3.0, 20.0))
    def file_again(self, item: Item, offset: float) -> None:
        """File at any time, filed or not (a discarded item may be filed again)."""
        if item.held:
            return
        self._set_when(item, self.now + offset)
        self.wheel.file(item, item.when)
        self.filed.add(item)

    @rule(item=items, dt=st.floats(0.0, 10.0))
    def postpone(self, item: Item, dt: float) -> None:
        """The due time moves later: the wheel is not told."""
        item.when += dt

    @rule(item=items, offset=st.floats(-3.0, 20.0))
    def move_earlier(self, item: Item, offset: float) -> None:
        when = self.now + offset
        if item.held or when >= item.when:
            return
        self._set_when(item, when)
        self.wheel.file_earlier(item, when)

    @rule(item=items)
    def hold(self, item: Item) -> None:
        item.held = True

    @rule(item=items)
    def release(self, item: Item) -> None:
        """As a persistence binding: due no earlier than HOLD after its release."""
        if item.held:
            item.held = False
            self._set_when(item, max(item.when, self.now + HOLD))

    @rule(item=consumes(items))
    def discard(self, item: Item) -> None:
        assert self.wheel.discard(item) is (item in self.filed)
        self.filed.discard(item)
        assert item not in self.wheel

    def _sweep(self, budget: int) -> list[Item]:
        out = self.wheel.sweep(self.now, budget)
        assert len(out) <= budget
        assert len(set(out)) == len(out)
        for item in out:
            assert item in self.filed
            assert self._due_now(item), "handed back early"
            assert item not in self.wheel
            # Due at the last drain, and known then: that sweep should have handed it back.
            assert not (item.when <= self.drained_at and self.known_in[item] < self.drains)
            self.filed.remove(item)
        return out

    @rule(
        dt=st.floats(0.0, 0.25) | st.sampled_from([0.013, 0.25, 0.37]),
        jump=st.sampled_from([0.0, 0.0, 0.0, 4.0, 1000.0]),
        budget=st.sampled_from([10**9, 10**9, 1, 2, 3, 7]),
    )
    def sweep(self, dt: float, jump: float, budget: int) -> None:
        self.now += dt + jump
        self._sweep(budget)
        for _ in range(10_000):  # drain: a small budget resumes where it stopped
            if not any(self._due_now(item) for item in self.filed):
                break
            self._sweep(budget)
        else:
            raise AssertionError("repeated sweeps do not reach every due item")
        self.drained_at = self.now
        self.drains += 1

    @precondition(lambda self: self.filed)
    @rule(budget=st.integers(0, 3))
    def partial_sweep(self, budget: int) -> None:
        """A sweep cut short, not drained: the next sweep must pick up from here."""
        self._sweep(budget)

    @invariant()
    def membership(self) -> None:
        for item in self.filed:
            assert item in self.wheel


WheelModel.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestWheelModel = WheelModel.TestCase
