"""What the peer has not acknowledged yet on one sync connection (pure; time passed in).

The sender writes frames, the peer answers :class:`~ha.sync_codec.Applied` with the sequence
number of the last frame it has applied (once per read of its stream, not per frame). This
module keeps the writes not yet covered by such an answer, so the sender knows the peer's
position: how many records it has not applied and how old the oldest of them is — the real
replication lag, where a heartbeat round trip only measures the link.

Rules:

- One entry per write (:meth:`AckWindow.sent`): the sequence number of the last frame it held,
  the number of records in it that count (the caller leaves heartbeats out) and when it was
  written. A write with no counted records adds no entry but still advances the position.
- :meth:`AckWindow.applied` pops every entry whose last frame is at or below the acknowledged
  sequence: a write counts as applied only once all of its frames are. An acknowledgement
  behind the previous one is ignored; one ahead of anything sent is a protocol violation and
  returns False (the caller drops the connection).
- Bytes are kept apart from records (every write counts, heartbeats too):
  :attr:`AckWindow.unacked_bytes` is what the peer has not applied yet wherever it sits —
  our write buffer, the kernel's socket buffers on both ends, the peer's queue — which is
  what :class:`Backlog` bounds (the write buffer alone says nothing until the kernel's
  buffers, several hundred kB, are full).
- The delay of a change (:attr:`AckWindow.delays`, an ``lb.histogram.Histogram``): a write
  of changes may say when the first of them was queued (``queued_at``); when the peer's
  acknowledgement covers it, every record
  of the write is counted with the delay from then to the acknowledgement's arrival (the
  caller's ``now``). Each record was created at or after ``queued_at`` and installed by the
  peer before it sent the acknowledgement, so the delay is an upper bound of the time from a
  session's creation on its owner to its installation on the peer (it adds the
  acknowledgement's way back). Writes without ``queued_at`` (snapshots, hellos) count in no
  delay: a snapshot is not a change, and its bulk waits in socket buffers by design.
- The window belongs to one connection: it is :meth:`~AckWindow.clear`\\ ed when the
  connection ends. Nothing is resent from it on the next connection; a new connection always
  starts with a snapshot of the sender's instances, which supersedes every record the old one
  left unacknowledged.
"""

from __future__ import annotations

from collections import deque

from lb.histogram import Histogram

DELAY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015,
                                    0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the change delay histogram's buckets; +Inf follows."""


class AckWindow:
    """Writes sent on one connection and not yet acknowledged by the peer."""

    def __init__(self) -> None:
        # (last seq, records, sent at, queued at or None)
        self._entries: deque[tuple[int, int, float, float | None]] = deque()
        self._unacked = 0
        self._bytes: deque[tuple[int, int]] = deque()  # (last seq, bytes) of every write
        self._unacked_bytes = 0
        self.sent_sequence = 0
        """Sequence number of the last frame written."""
        self.acked_sequence = 0
        """Highest sequence number the peer acknowledged."""
        self.delays = Histogram(DELAY_BUCKETS)
        """Delays of acknowledged changes; kept across connections (a metric)."""

    @property
    def unacked(self) -> int:
        """Records written and not acknowledged yet."""
        return self._unacked

    @property
    def unacked_bytes(self) -> int:
        """Bytes written (heartbeats included) and not acknowledged yet."""
        return self._unacked_bytes

    def oldest_unacked_age(self, now: float) -> float:
        """Seconds since the oldest write not acknowledged yet (0 when all are)."""
        if not self._entries:
            return 0.0
        return max(0.0, now - self._entries[0][2])

    def sent(self, sequence: int, records: int, now: float, nbytes: int = 0,
             queued_at: float | None = None) -> None:
        """Frames up to ``sequence`` were written, carrying ``records`` counted records in
        ``nbytes`` bytes; ``queued_at``: when the first of these changes was queued (None:
        not changes, no delay is counted)."""
        self.sent_sequence = max(self.sent_sequence, sequence)
        if nbytes > 0:
            self._bytes.append((sequence, nbytes))
            self._unacked_bytes += nbytes
        if records > 0:
            self._entries.append((sequence, records, now, queued_at))
            self._unacked += records

    def applied(self, sequence: int, now: float | None = None) -> bool:
        """The peer applied every frame up to ``sequence``; ``now``: when its acknowledgement
        arrived (None: count no delays). False: it acknowledges a frame that was never sent
        (nothing changes)."""
        if sequence > self.sent_sequence:
            return False
        if sequence <= self.acked_sequence:
            return True
        self.acked_sequence = sequence
        entries = self._entries
        while entries and entries[0][0] <= sequence:
            _, records, _, queued_at = entries.popleft()
            self._unacked -= records
            if queued_at is not None and now is not None:
                self.delays.observe(max(0.0, now - queued_at), records)
        sizes = self._bytes
        while sizes and sizes[0][0] <= sequence:
            self._unacked_bytes -= sizes.popleft()[1]
        return True

    def clear(self) -> None:
        """The connection ended: forget it (see the module docstring: nothing is resent)."""
        self._entries.clear()
        self._unacked = 0
        self._bytes.clear()
        self._unacked_bytes = 0
        self.sent_sequence = self.acked_sequence = 0


class Backlog:
    """How much the peer may leave unapplied before the connection is given up (pure).

    The transport asks :meth:`over` with :attr:`AckWindow.unacked_bytes` after every write
    (which bounds its write buffer too). A peer that stops reading (frozen, overloaded) lets
    that grow with every record; past ``limit`` bytes the sender drops the connection (the
    next one starts with a snapshot) instead of holding an unbounded queue.

    A snapshot is written in one go and may alone exceed the limit (1M sessions are tens of
    MB): its bytes are an allowance on top of ``limit`` (:meth:`snapshot_written`), so a
    snapshot never cuts its own connection, and what a non-reading peer can cost is one
    snapshot plus ``limit``. The allowance ends once the backlog is back within ``limit``
    (the snapshot has been applied)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.allowance = 0
        """Bytes of snapshots written and possibly still buffered."""

    def snapshot_written(self, nbytes: int) -> None:
        """``nbytes`` of a snapshot were written (before :meth:`over` is asked)."""
        self.allowance += nbytes

    def over(self, buffered: int) -> bool:
        """``buffered`` bytes wait for the peer: past the bound (drop the connection)?"""
        if buffered <= self.limit:
            self.allowance = 0
            return False
        return buffered > self.limit + self.allowance

    def clear(self) -> None:
        """The connection ended."""
        self.allowance = 0
