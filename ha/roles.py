"""Roles: which VRRP instances this node masters, and what changed (pure, sans-I/O).

Ownership is per instance. A session or a persistence binding belongs to the instance that
holds its virtual server's address; the node that masters that instance is the session's
*owner*: it schedules it, expires it and streams it to the peer. The other node keeps a copy
(it forwards the session's replies when it holds the servers' gateway, and it adopts the
session when it takes the instance over).

:class:`Roles` is the one place that knows which instances this node masters. It is fed the
VRRP machines' state changes one by one, in the order they happened (never polled, so a
MASTER → BACKUP → MASTER flip between two ticks still yields both transitions), and the sync
layer's "the peer's snapshot is applied"; the caller pulls what changed with
:meth:`Roles.next_event` and makes the data plane, the sync stream, expiry and the takeover
gate follow it.

A standalone node (no ``[vrrp]``) masters one implicit instance, :data:`STANDALONE`, from
the start: every virtual server belongs to it, so a standalone node owns everything, as
before. The single-master pair is the case where one node masters every instance.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = ["STANDALONE", "Lost", "PeerSnapshotComplete", "RoleEvent", "Roles", "Took"]

STANDALONE: Final = ""
"""The instance name every virtual server of a node without ``[vrrp]`` belongs to."""


@dataclass(frozen=True, slots=True)
class Took:
    """This node became master of ``instance``: adopt its sessions, hold its addresses."""

    instance: str


@dataclass(frozen=True, slots=True)
class Lost:
    """This node stopped being master of ``instance``: its sessions are now the peer's."""

    instance: str


@dataclass(frozen=True, slots=True)
class PeerSnapshotComplete:
    """The peer's snapshot of the instances it masters has been applied here."""


RoleEvent: TypeAlias = Took | Lost | PeerSnapshotComplete


class Roles:
    """The set of instances this node masters; events out, pulled by the caller."""

    def __init__(self, instances: Iterable[str]) -> None:
        self.instances: tuple[str, ...] = tuple(instances)
        self._mastered: set[str] = set()
        self._events: deque[RoleEvent] = deque()
        self.peer_snapshot_done = False

    @classmethod
    def standalone(cls) -> Roles:
        """A node without VRRP: it masters :data:`STANDALONE` from the start."""
        roles = cls((STANDALONE,))
        roles.vrrp_state(STANDALONE, master=True)
        return roles

    # ---- inputs -----------------------------------------------------------------------------
    def vrrp_state(self, instance: str, *, master: bool) -> None:
        """An instance's machine entered a state (``master``: it is MASTER now)."""
        if instance not in self.instances:
            raise KeyError(f"unknown VRRP instance {instance!r}")
        if master and instance not in self._mastered:
            self._mastered.add(instance)
            self._events.append(Took(instance))
        elif not master and instance in self._mastered:
            self._mastered.discard(instance)
            self._events.append(Lost(instance))

    def peer_snapshot(self) -> None:
        """The sync layer applied a complete snapshot from the peer."""
        first = not self.peer_snapshot_done
        self.peer_snapshot_done = True
        if first:
            self._events.append(PeerSnapshotComplete())

    # ---- outputs ----------------------------------------------------------------------------
    def next_event(self) -> RoleEvent | None:
        """The oldest change not yet taken, or None."""
        return self._events.popleft() if self._events else None

    # ---- queries ----------------------------------------------------------------------------
    def masters(self, instance: str) -> bool:
        """Does this node master ``instance``?"""
        return instance in self._mastered

    @property
    def mastered(self) -> frozenset[str]:
        return frozenset(self._mastered)

    @property
    def masters_any(self) -> bool:
        return bool(self._mastered)
