"""A hashed timing wheel with lazy re-filing, for tables whose entries expire when idle.

Slots are absolute: an item due at ``t`` belongs in slot ``floor(t / tick)``; the wheel is a
dict from slot to a list of items, so there is no rotation and no horizon. Each item carries
the slot it is filed in (its ``_slot`` attribute, :class:`Filed`), which is all the memory the
wheel adds per item besides one list entry.

Lazy re-filing. The table tells the wheel how to read an item's due time (``due(item, now)``)
and files an item when it enters the table. After that it need not say when the due time
moves *later* (a packet refreshing a session): a sweep that meets the item re-files it at its
new due time. It must say when the due time moves *earlier* (:meth:`TimingWheel.file_earlier`).
So an item is always filed in a slot no later than its due time's.

Sweeping. :meth:`TimingWheel.sweep` at ``now`` visits the slots up to ``floor(now / tick)``
and hands back, unfiled, the items whose ``due(item, now) <= now``; it re-files the others.
Guarantees, for items filed as above:

- never early: an item is handed back only when ``due(item, now) <= now``;
- at most one tick late: after a sweep at ``now`` that its budget did not cut short, no filed
  item has ``due(item, now) <= now``; with a sweep every ``tick``, an item is handed back
  within ``[due, due + tick)``;
- bounded work: a sweep touches at most ``budget`` list entries; the next sweep resumes in
  the slot where it stopped;
- removal is O(1): :meth:`TimingWheel.discard` only marks the item, and its list entry is
  skipped (and dropped) when its slot is swept, so memory follows the filing rate times the
  timeouts. Each item is touched O(1) times per period of its due time.

Pure: time is always the ``now`` argument; ``due`` must not file or discard items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

__all__ = ["UNFILED", "Filed", "TimingWheel"]

UNFILED: Final = -1  # the ``_slot`` of an item that is in no wheel


class Filed(Protocol):
    """What the wheel needs of an item: a ``_slot`` it owns.

    The item's class initialises ``_slot`` to :data:`UNFILED` and otherwise only reads it
    (``_slot != UNFILED``: the item is filed).
    """

    _slot: int


T = TypeVar("T", bound=Filed)


class TimingWheel(Generic[T]):
    """Items filed by due time, swept every ``tick``; see the module docstring.

    ``due(item, now)`` is the item's current due time; a value ``> now`` means "not yet, look
    again then". It is read only by :meth:`sweep`, once per item met.
    """

    def __init__(self, tick: float, due: Callable[[T, float], float]) -> None:
        if tick <= 0:
            raise ValueError("tick must be positive")
        self.tick = tick
        self._due = due
        self._inv_tick = 1.0 / tick
        self._slots: dict[int, list[T]] = {}
        self._cursor = 0  # first slot not yet fully swept
        self._last = UNFILED  # the slot file() computed last (its int, shared by the items)

    def __contains__(self, item: T) -> bool:
        """Is ``item`` filed (and not yet handed back by a sweep, nor discarded)?"""
        return item._slot != UNFILED

    def file(self, item: T, due: float) -> None:
        """File ``item``, or move it, at ``due`` (a slot already swept: the next sweep's)."""
        k = int(due * self._inv_tick)
        if k < self._cursor:
            k = self._cursor
        elif k == self._last:  # pure Python: the same int object, not one more per item
            k = self._last
        else:
            self._last = k
        if k != item._slot:
            item._slot = k
            self._put(k, item)

    def file_earlier(self, item: T, due: float) -> None:
        """Move a filed ``item`` to ``due`` if that is in an earlier slot; else do nothing."""
        k = max(int(due * self._inv_tick), self._cursor)
        if k < item._slot:
            item._slot = k
            self._put(k, item)

    def discard(self, item: T) -> bool:
        """Unfile ``item``; False if it was not filed. Its list entry goes when swept."""
        if item._slot == UNFILED:
            return False
        item._slot = UNFILED
        return True

    def sweep(self, now: float, budget: int = 1000) -> list[T]:
        """The items due at ``now``, unfiled, in slot order; touches at most ``budget`` entries.

        Items met that are not due are filed again at their new due time.
        """
        inv = self._inv_tick
        last = int(now * inv)
        cursor = self._cursor
        if last < cursor or budget <= 0:
            return []
        slots = self._slots
        due = self._due
        out: list[T] = []
        emit = out.append
        order: range | list[int]
        if last - cursor > len(slots):  # a long gap: visit only the slots that hold something
            order = sorted(k for k in slots if cursor <= k <= last)
        else:
            order = range(cursor, last + 1)
        for slot in order:
            bucket = slots.pop(slot, None)
            if bucket is None:
                continue
            rest: list[T] = []
            if len(bucket) > budget:  # the budget ends inside this slot
                rest = bucket[budget:]
                bucket = bucket[:budget]
            budget -= len(bucket)
            keep: list[T] = []
            for item in bucket:
                if item._slot != slot:  # discarded, or filed again elsewhere
                    continue
                t = due(item, now)
                if t <= now:
                    item._slot = UNFILED
                    emit(item)
                    continue
                k = int(t * inv)
                if k == slot:  # only in the slot being swept: due later within it
                    keep.append(item)
                else:  # k > slot, as t > now puts it in slot ``last`` or after; _put inlined
                    item._slot = k
                    other = slots.get(k)
                    if other is None:
                        slots[k] = [item]
                    else:
                        other.append(item)
            if rest or keep:  # the slot was popped and nothing refiles into it: a new list
                slots[slot] = rest + keep  # the unvisited first, so the next sweep starts there
            if rest:
                self._cursor = slot
                return out
        self._cursor = last
        return out

    def _put(self, k: int, item: T) -> None:
        bucket = self._slots.get(k)
        if bucket is None:
            self._slots[k] = [item]
        else:
            bucket.append(item)
