"""Replies held for a session record that is on its way from the peer (pure).

Active-active NAT with one shared server gateway: node B schedules a new flow for its VIP and
forwards the SYN; the server's SYN-ACK goes to its gateway, node A, which can rewrite it only
once B's session record has arrived over the sync link. The SYN-ACK often wins that race (the
kernel delivers it in microseconds; the record waits for B's next flush and A's next read).

pfsync answers this on the sender ("defer": hold the first packet until the peer acks the
state). We hold on the receiver instead: a reply that finds no session is kept here, keyed by
its reverse key, until the record installs that session (then it is rewritten and sent) or
``timeout`` passes (then it is dropped and counted; the server retransmits its SYN-ACK a
second later, and by then the record is there). A new connection pays nothing when its record
wins the race, and the time the reply waited when it loses; no round trip is added to every
SYN. Bounded: at most ``limit`` packets are held; a reply beyond that is dropped at once.

Time is the ``now`` argument.
"""

from __future__ import annotations

from collections import deque

__all__ = ["ReplyHold"]


class ReplyHold:
    """Held packets by reverse key, expired in arrival order."""

    def __init__(self, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        self._held: dict[int, list[tuple[float, bytes]]] = {}
        self._order: deque[tuple[float, int]] = deque()
        self.count = 0
        # counters, read at scrape time
        self.held_total = 0
        self.released_total = 0
        self.timeouts = 0
        self.full_drops = 0
        self.wait_total = 0.0  # seconds released packets waited, summed
        self.wait_max = 0.0

    def __len__(self) -> int:
        return self.count

    def hold(self, rkey: int, packet: bytes, now: float) -> bool:
        """Keep ``packet`` for the session of ``rkey``; False when full (drop it)."""
        if self.count >= self.limit:
            self.full_drops += 1
            return False
        waiting = self._held.get(rkey)
        if waiting is None:
            self._held[rkey] = [(now, packet)]
            self._order.append((now, rkey))
        else:
            waiting.append((now, packet))
        self.count += 1
        self.held_total += 1
        return True

    def take(self, rkey: int, now: float) -> list[bytes]:
        """The packets held for ``rkey`` (its session arrived), oldest first."""
        waiting = self._held.pop(rkey, None)
        if waiting is None:
            return []
        self.count -= len(waiting)
        self.released_total += len(waiting)
        for since, _ in waiting:
            wait = now - since
            self.wait_total += wait
            self.wait_max = max(self.wait_max, wait)
        return [pkt for _, pkt in waiting]

    def expire(self, now: float) -> int:
        """Drop what has waited ``timeout`` or longer; returns how many packets."""
        dropped = 0
        limit = now - self.timeout
        order = self._order
        while order and order[0][0] <= limit:
            _, rkey = order.popleft()
            waiting = self._held.get(rkey)
            # (A key taken and held again since has a newer entry of its own in the order.)
            if waiting is not None and waiting[0][0] <= limit:
                del self._held[rkey]
                dropped += len(waiting)
        self.count -= dropped
        self.timeouts += dropped
        return dropped
