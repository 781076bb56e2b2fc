"""Per-source limits on new and concurrent sessions (HAProxy's ``conn_rate`` / ``conn_cur``).

Pure and sans-I/O: time is always the ``now`` argument (float seconds, monotonic); no clock,
no I/O. One :class:`SourceTracker` holds, per (virtual server, client source address), an
:class:`SourceEntry`: how many sessions of that source this node opened and still counts
(``conns``), and a token bucket for the rate of new ones.

Guarantees:

- **Rate.** A virtual server with ``max_rate = N`` per ``period`` gives each source a bucket of
  N tokens refilled continuously at N / period per second; a new session takes one. Over any
  interval of length T a source is admitted at most ``N + N * T / period`` new sessions, and a
  source that stays within N per period is never refused. Fixed memory: two floats.
- **Concurrency.** A source with ``conns >= max_conns`` is refused a new session. The caller
  counts a session by keeping the entry :meth:`SourceTracker.admit` returned and gives it back
  with :meth:`SourceTracker.release` exactly once (``lb.sessions`` clears its reference first).
- **Bounded memory.** At most ``capacity`` entries. An entry whose count is 0 and whose bucket
  is full again says nothing a fresh entry would not, so it is dropped as soon as it is both
  (at the release that empties it, or, when its bucket is still refilling, from the front of
  the idle list when a new source needs room). When a new source finds the tracker full, the
  least recently used idle entry is recycled early (``evicted``: that source loses its rate
  history and starts again with a full bucket). Entries with sessions are never evicted: they
  are what the concurrent limits and the exactly-once release rest on. When every entry has
  sessions, the new source's session is admitted *untracked* (``untracked``): refusing it
  would let a flood of spoofed sources, each holding one half-open session, lock every new
  client out — the failure these limits are meant to prevent. Entries with sessions are
  bounded by the session table itself (each holds at least one session), so ``capacity``
  above the half-open cap keeps a pure spoofed SYN flood from ever reaching that point.
- **Bounded work.** :meth:`admit` and :meth:`release` do O(1) work (at most
  :data:`RECYCLE_PER_ADMIT` idle entries looked at per new source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "CONN_LIMIT",
    "RATE_LIMIT",
    "RECYCLE_PER_ADMIT",
    "SourceEntry",
    "SourceLimits",
    "SourceTracker",
    "source_key",
]

CONN_LIMIT: Final = "source_conn_limit"
"""Refusal: the source has ``max_conns`` sessions counted (a drop reason of the forwarder)."""
RATE_LIMIT: Final = "source_rate_limit"
"""Refusal: the source's bucket is empty (a drop reason of the forwarder)."""

RECYCLE_PER_ADMIT: Final = 2
"""Idle entries whose bucket is full that a new source drops from the front of the idle list."""


@dataclass(frozen=True, slots=True)
class SourceLimits:
    """One virtual server's limits per client source address (0 = unlimited).

    ``max_conns``: sessions counted at once; ``max_rate``: new sessions per ``period``
    seconds (also the bucket's size, the burst).
    """

    max_conns: int = 0
    max_rate: int = 0
    period: float = 1.0
    refill: float = field(init=False, repr=False, compare=False)  # tokens per second

    def __post_init__(self) -> None:
        if self.max_conns < 0 or self.max_rate < 0:
            raise ValueError("source limits must be >= 0")
        if not self.period > 0:
            raise ValueError("the rate period must be positive")
        object.__setattr__(self, "refill", self.max_rate / self.period)

    @property
    def active(self) -> bool:
        """Does any limit apply (else no session of this virtual server is tracked)?"""
        return self.max_conns > 0 or self.max_rate > 0


UNLIMITED: Final = SourceLimits()


def source_key(service_key: int, caddr: int) -> int:
    """The tracker's key of a client address on a virtual server (``Service.key``)."""
    return (service_key << 32) | caddr


class SourceEntry:
    """One source on one virtual server. ``conns``: sessions counted; ``tokens`` as of
    ``stamp``; ``full_at``: when the bucket is full again (``stamp`` while it is full)."""

    __slots__ = ("conns", "full_at", "key", "stamp", "tokens")

    def __init__(self, key: int, tokens: float, now: float) -> None:
        self.key = key
        self.conns = 0
        self.tokens = tokens
        self.stamp = now
        self.full_at = now

    def __repr__(self) -> str:
        return (f"SourceEntry(key={self.key:#x}, conns={self.conns}, tokens={self.tokens:.3f}, "
                f"stamp={self.stamp}, full_at={self.full_at})")


class SourceTracker:
    """The per-source counters of every virtual server with limits (see the module docstring).

    Counters (plain ints, read at scrape time): ``untracked`` (sessions admitted without an
    entry: the tracker was full of sources with sessions), ``evicted`` (idle entries recycled
    before their bucket was full). Refusals are the caller's to count (the forwarder's drops).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._entries: dict[int, SourceEntry] = {}
        # Entries with no sessions whose bucket is still refilling, least recently used first.
        self._idle: dict[int, SourceEntry] = {}
        self.untracked = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def idle(self) -> int:
        """Entries without sessions that are kept for their rate history."""
        return len(self._idle)

    def get(self, key: int) -> SourceEntry | None:
        """The entry of ``key`` (for views and tests; the tracker keeps ownership)."""
        return self._entries.get(key)

    def admit(self, key: int, limits: SourceLimits,
              now: float) -> SourceEntry | str | None:
        """A new session of source ``key`` under ``limits``, at ``now``.

        Returns the entry that now counts it (the caller keeps it and calls :meth:`release`
        once when the session stops counting), :data:`CONN_LIMIT` or :data:`RATE_LIMIT` when
        it is refused (nothing is taken), or None when it is admitted and not counted
        (``limits`` are all unlimited, or the tracker is full of sources with sessions).
        """
        if not (limits.max_conns or limits.max_rate):  # (not .active: a call per SYN)
            return None
        entries = self._entries
        e = entries.get(key)
        if e is None:
            e = self._new_entry(key, limits, now)
            if e is None:
                self.untracked += 1
                return None
        elif e.conns == 0:
            self._idle.pop(key, None)  # used again: out of the idle list (back in at its end)
        if limits.max_conns and e.conns >= limits.max_conns:
            return CONN_LIMIT  # (conns > 0: the entry is not idle)
        cap = limits.max_rate
        if cap:
            per_second = limits.refill
            elapsed = now - e.stamp
            tokens = e.tokens + elapsed * per_second if elapsed > 0 else e.tokens
            if tokens > cap:
                tokens = float(cap)
            if elapsed > 0:
                e.stamp = now
            if tokens < 1.0:
                e.tokens = tokens
                e.full_at = e.stamp + (cap - tokens) / per_second
                if e.conns == 0:
                    self._idle_or_drop(e, now)
                return RATE_LIMIT
            tokens -= 1.0
            e.tokens = tokens
            e.full_at = e.stamp + (cap - tokens) / per_second
        e.conns += 1
        return e

    def release(self, e: SourceEntry, now: float) -> None:
        """A session that ``e`` counted stopped counting (call exactly once per session)."""
        n = e.conns - 1
        if n < 0:
            raise ValueError(f"release of {e!r} with no session counted")
        e.conns = n
        if n == 0:
            self._idle_or_drop(e, now)

    def _idle_or_drop(self, e: SourceEntry, now: float) -> None:
        """``e`` has no sessions: forget it when its bucket is full, else keep it as idle."""
        if e.full_at <= now:
            del self._entries[e.key]
        else:
            self._idle[e.key] = e

    def _new_entry(self, key: int, limits: SourceLimits, now: float) -> SourceEntry | None:
        """A fresh entry for ``key``, making room if needed; None when nothing can go."""
        idle = self._idle
        entries = self._entries
        for _ in range(RECYCLE_PER_ADMIT):
            if not idle:
                break
            first = next(iter(idle.values()))
            if first.full_at > now:
                break
            del idle[first.key]
            del entries[first.key]
        if len(entries) >= self.capacity:
            if not idle:
                return None
            oldest = next(iter(idle.values()))
            del idle[oldest.key]
            del entries[oldest.key]
            self.evicted += 1
        e = SourceEntry(key, float(limits.max_rate), now)
        entries[key] = e
        return e
