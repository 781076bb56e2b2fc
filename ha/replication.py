"""Replication policy of one node (pure): table events in, records to send out; the peer's
records in, table operations out.

Who owns what (see :mod:`ha.roles`): a session or binding belongs to the VRRP instance that
holds its virtual server's address, and ``service.owned`` says whether this node masters that
instance now. The rules, for both nodes at once (active-active):

- **Outbound.** Every mutation the tables report for an *owned* service (a session added,
  its TCP state changed, removed; a binding added, re-pointed, removed) becomes one record in
  :attr:`Replicator.pending`, which the transport takes with :meth:`take` and frames. Never
  per-packet refreshes. Nothing is queued while the stream to the peer is down
  (:attr:`connected`); the transport sends a :meth:`snapshot` of the owned tables when it
  (re)connects.
- **Return path.** The node that forwards the replies of a session it does not own (it holds
  the servers' gateway) tells the owner what the server side did: a reply with FIN or RST,
  and, at most once per half the session's timeout, that replies still flow
  (:meth:`reply_seen`, a :class:`~ha.sync_codec.ReplySeen`). The owner applies the flags to
  its state machine as if it had seen the packet, and its state change comes back as a
  session record. So the two directions of a flow may cross different boxes and the owner's
  table still knows when the flow closed, and a flow whose only traffic is replies stays
  alive.
- **Inbound.** A session or binding record for a service this node does *not* own is
  installed as the peer's copy (same server, the peer's idle age). One for a service it owns
  never changes what this node has: when the flow or client is already in its table the
  record is refused and counted as ``master`` (split brain: our own table wins). When it is
  not, the flow exists only on the peer (opened in the instant of a handback, before the
  peer saw our first advert) and the record is installed, counted as ``late``; otherwise
  that flow's next packet, or its server's SYN-ACK held for the record, would find nothing.
  A record naming an unknown virtual server or server is skipped and counted.
- **Snapshots** replace only what belongs to the peer: the records of a snapshot are
  installed as they come (no gap: the return path keeps forwarding from the old copy), and
  at its end every copy of a not-owned service that the snapshot did not carry is removed.
  A node's own sessions are never touched by the peer's snapshot.
- **Expiry** of a copy is the owner's job while the peer's stream is up (it sends the
  removal); see :meth:`keep`.
- **Restored entries** (loaded from this node's table snapshot on disk at start, see
  :mod:`lb.table_snapshot`) are installed like the peer's copies and marked *provisional*
  (:meth:`restored`): neither side may know yet who masters their instance — after a
  blackout both nodes start mastering nothing and their first snapshots to each other are
  empty. So a peer's snapshot removes a provisional entry only when it carried records of the
  entry's instance (proof that the peer masters it: a node snapshots only what it owns); any
  record from the peer for it replaces it and confirms it (the peer's live state wins); a
  provisional copy is not held for the peer (:meth:`keep`): unless confirmed it ends by its
  own idle clock. When this node
  takes an instance over (:meth:`adopted`), its provisional entries become its own and are
  sent to the peer, which then holds them as copies.

Time: :meth:`apply` takes ``now``; records carry ages, computed with the injected clock when
an event is turned into a record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from ha.sync_codec import (
    BindingGone,
    BindingRecord,
    Record,
    ReplySeen,
    SessionGone,
    SessionRecord,
    SnapshotBegin,
    SnapshotEnd,
)
from lb.persistence import Binding, PersistenceTable
from lb.servers import RealServer
from lb.services import Service, ServiceSet, service_key
from lb.sessions import TCP_FIN, TCP_RST, Session, SessionTable, flow_key

__all__ = ["SNAPSHOT_CHUNK", "Replicator"]

SNAPSHOT_CHUNK: Final = 2000
"""Records per chunk of a snapshot (the transport writes one chunk at a time)."""

_STATE_FLAGS: Final = TCP_FIN | TCP_RST
_NONE: Final[frozenset[int]] = frozenset()


class Replicator:
    """One node's side of the replication; see the module docstring for the rules."""

    def __init__(self, sessions: SessionTable[Service], persistence: PersistenceTable[Service],
                 services: Callable[[], ServiceSet], clock: Callable[[], float],
                 on_installed: Callable[[Session], None] | None = None,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.sessions = sessions
        self.persistence = persistence
        self.services = services
        self.clock = clock
        self.on_installed = on_installed
        self.wake = wake  # called when ``pending`` stops being empty (the shell flushes later)
        self.connected = False  # the stream to the peer is up: queue records
        self.pending: list[Record] = []
        self.pending_since = 0.0  # when the first of ``pending`` was queued (the clock's time)
        self.snapshot_wanted = False  # send the peer a snapshot (the transport clears it)
        self.holding = False  # the peer's stream is up: copies are expired by their owner
        self._snap_sessions: set[int] | None = None  # forward keys a snapshot carried
        self._snap_bindings: set[tuple[int, int]] | None = None
        self._snap_instances: set[str] = set()  # instances a snapshot carried records of
        self.snapshot_done = False  # a complete snapshot from the peer was applied
        # Restored from disk, not yet confirmed by the peer or adopted (see the docstring).
        # Forward keys by the instance of their virtual server: a takeover adopts one
        # instance's in one step (10⁶ of them took 1.4 s one by one, at the takeover).
        self._provisional_s: dict[str, set[int]] = {}
        self._provisional_b: set[tuple[int, int]] = set()  # (service key, client net)
        # counters
        self.records_received = 0
        self.replies_reported = 0
        self.opened_unowned = 0  # sessions scheduled here for a service the peer owns
        self.late = 0  # records installed for an owned service whose flow was not here
        self.snapshots_received = 0
        self.skipped: dict[str, int] = {}

    # ---- outbound: table observers ----------------------------------------------------------
    def session_added(self, s: Session) -> None:
        if self.connected and s.service.owned:
            self._push(self._session_record(s))

    session_changed = session_added

    def session_removed(self, s: Session, reason: str) -> None:
        if self._provisional_s and (mine := self._provisional_s.get(s.service.owner)):
            mine.discard(s.fkey)
        if self.connected and s.service.owned:
            self._push(SessionGone(s.proto, s.caddr, s.cport, s.vaddr, s.vport))

    def binding_added(self, b: Binding[Service]) -> None:
        if self.connected and b.service.owned:
            self._push(self._binding_record(b))

    binding_changed = binding_added

    def binding_removed(self, b: Binding[Service], reason: str) -> None:
        if self._provisional_b:
            self._provisional_b.discard((b.service.key, b.client_net))
        if self.connected and b.service.owned:
            svc = b.service
            self._push(BindingGone(svc.proto, svc.vaddr, svc.vport, b.client_net))

    def reply_seen(self, s: Session, flags: int) -> None:
        """The data plane forwarded a reply of a session this node does not own."""
        if self.connected:
            self.replies_reported += 1
            self._push(ReplySeen(s.proto, s.caddr, s.cport, s.vaddr, s.vport,
                                          flags & _STATE_FLAGS))

    def opened_here(self, s: Session, new_binding: bool) -> None:
        """The data plane scheduled ``s`` for a service this node does not own: in the
        instant after a handback (this node lost the instance, its address has not left yet)
        or for a client whose ARP cache still names this node. The owner gets the session,
        and its binding when this scheduling made it (``new_binding``; one the client had
        is the owner's already), as records installed there as ``late``: the flow's replies
        reach the owner, and its later packets too once the client's ARP cache follows."""
        if not self.connected:
            return
        self.opened_unowned += 1
        if new_binding and s.binding is not None:
            self._push(self._binding_record(s.binding))
        self._push(self._session_record(s))

    def _push(self, record: Record) -> None:
        self.pending.append(record)
        if len(self.pending) == 1:
            self.pending_since = self.clock()
            self.wake()

    @property
    def in_snapshot(self) -> bool:
        """Between a peer's SnapshotBegin and its SnapshotEnd."""
        return self._snap_sessions is not None

    def take(self) -> list[Record]:
        """The records queued since the last call, in order."""
        out, self.pending = self.pending, []
        return out

    def snapshot(self) -> Iterator[list[Record]]:
        """The owned tables in chunks: SnapshotBegin, bindings, sessions, SnapshotEnd. The
        chunks may be taken across event-loop iterations (the tables change meanwhile): a
        session removed before its chunk is built is left out."""
        chunk: list[Record] = [SnapshotBegin()]
        n_b = n_s = 0
        # Copies of the tables: the transport sends chunk by chunk while the tables change.
        for b in list(self.persistence):
            if b.service.owned:
                chunk.append(self._binding_record(b))
                n_b += 1
                if len(chunk) >= SNAPSHOT_CHUNK:
                    yield chunk
                    chunk = []
        lookup = self.sessions.lookup
        for s in list(self.sessions):
            if s.service.owned and lookup(s.fkey) is s:  # not removed since the copy
                chunk.append(self._session_record(s))
                n_s += 1
                if len(chunk) >= SNAPSHOT_CHUNK:
                    yield chunk
                    chunk = []
        chunk.append(SnapshotEnd(n_s, n_b))
        yield chunk

    def _session_record(self, s: Session) -> SessionRecord:
        return SessionRecord(s.proto, s.caddr, s.cport, s.vaddr, s.vport, s.raddr, s.rport,
                             s.state, max(0.0, self.clock() - s.last_seen))

    def _binding_record(self, b: Binding[Service]) -> BindingRecord:
        svc = b.service
        idle = 0.0 if b.refs else max(0.0, self.clock() - max(b.idle_since, b.last_used))
        return BindingRecord(svc.proto, svc.vaddr, svc.vport, b.client_net, b.server.addr,
                             b.server.port, b.timeout, idle)

    # ---- expiry -----------------------------------------------------------------------------
    def keep(self, entry: Session | Binding[Service]) -> bool:
        """Should a due session or binding stay? Yes for the peer's copies while the peer's
        stream is up (their owner sends the removal), unless it is a provisional entry
        restored from disk that the peer never confirmed."""
        if not self.holding or entry.service.owned:
            return False
        if isinstance(entry, Session):
            return entry.fkey not in self._provisional_s.get(entry.service.owner, _NONE)
        return (entry.service.key, entry.client_net) not in self._provisional_b

    # ---- restored from disk -----------------------------------------------------------------
    def restored(self, sessions: Iterable[Session],
                 bindings: Iterable[Binding[Service]]) -> None:
        """These entries were installed from this node's snapshot on disk: provisional."""
        by_instance = self._provisional_s
        for s in sessions:
            owner = s.service.owner
            if (keys := by_instance.get(owner)) is None:
                keys = by_instance[owner] = set()
            keys.add(s.fkey)
        self._provisional_b.update((b.service.key, b.client_net) for b in bindings)

    @property
    def provisional(self) -> tuple[int, int]:
        """Restored sessions and bindings not yet confirmed by the peer or adopted."""
        return sum(map(len, self._provisional_s.values())), len(self._provisional_b)

    def adopted(self, instance: str, now: float) -> int:
        """This node took ``instance`` over: its provisional entries are this node's own now,
        and the peer is sent them (it holds them as copies): as records, or, when there are
        more than a snapshot chunk of them, as a snapshot (:attr:`snapshot_wanted`: the
        transport sends it in the background, where 10⁶ records at once would stall the
        loop). Returns how many sessions."""
        if not self._provisional_s and not self._provisional_b:
            return 0
        by_key = self.services().by_key
        mine_b = []
        for key in list(self._provisional_b):
            svc = by_key.get(key[0])
            if svc is None or svc.owner != instance:
                continue
            self._provisional_b.discard(key)
            b = self.persistence.lookup(svc, key[1], now)
            if b is not None:
                mine_b.append(b)
        mine = self._provisional_s.pop(instance, set())  # removals kept it up to date
        if not self.connected:
            return len(mine)
        if len(mine) + len(mine_b) > SNAPSHOT_CHUNK:
            self.snapshot_wanted = True
            self.wake()
            return len(mine)
        for b in mine_b:
            if b.service.owned:
                self._push(self._binding_record(b))
        lookup = self.sessions.lookup
        for fkey in mine:
            s = lookup(fkey)
            if s is not None and s.service.owned:
                self._push(self._session_record(s))
        return len(mine)

    # ---- inbound ----------------------------------------------------------------------------
    def apply(self, ev: Record, now: float) -> None:
        """Apply one record received from the peer."""
        self.records_received += 1
        if isinstance(ev, SessionRecord):
            self._apply_session(ev, now)
        elif isinstance(ev, SessionGone):
            s = self.sessions.lookup(flow_key(ev.proto, ev.caddr, ev.cport, ev.vaddr, ev.vport))
            if s is not None:
                if s.service.owned:
                    self._skip("master")
                else:
                    self.sessions.remove(s, "peer", now)
        elif isinstance(ev, ReplySeen):
            self._apply_reply_seen(ev, now)
        elif isinstance(ev, BindingRecord):
            found = self._service_and_server(ev.proto, ev.vaddr, ev.vport, ev.raddr, ev.rport)
            if found is not None:
                svc, server = found
                if svc.owned:
                    if self.persistence.lookup(svc, ev.client_net, now) is not None:
                        self._skip("master")  # split brain: our own binding wins
                        return
                    self.late += 1
                if self._snap_bindings is not None:
                    self._snap_bindings.add((svc.key, ev.client_net))
                    self._snap_instances.add(svc.owner)
                self._provisional_b.discard((svc.key, ev.client_net))
                if self.persistence.install(svc, ev.client_net, server, ev.timeout,
                                            now - ev.idle, now) is None:
                    self._skip("table_refused")
        elif isinstance(ev, BindingGone):
            gone = self.services().by_key.get(service_key(ev.proto, ev.vaddr, ev.vport))
            if gone is None:
                self._skip("unknown_service")
            elif gone.owned:
                self._skip("master")
            else:
                b = self.persistence.lookup(gone, ev.client_net, now)
                if b is not None:
                    self.persistence.unbind(b, "peer")
        elif isinstance(ev, SnapshotBegin):
            self._snap_sessions, self._snap_bindings = set(), set()
            self._snap_instances = set()
        elif isinstance(ev, SnapshotEnd):
            self._finish_snapshot(now)

    def _apply_session(self, ev: SessionRecord, now: float) -> None:
        found = self._service_and_server(ev.proto, ev.vaddr, ev.vport, ev.raddr, ev.rport)
        if found is None:
            return
        svc, server = found
        fkey = flow_key(ev.proto, ev.caddr, ev.cport, ev.vaddr, ev.vport)
        if svc.owned:
            if self.sessions.lookup(fkey) is not None:
                self._skip("master")  # split brain: our own session wins
                return
            self.late += 1
        if self._snap_sessions is not None:
            self._snap_sessions.add(fkey)
            self._snap_instances.add(svc.owner)
        if self._provisional_s and (mine := self._provisional_s.get(svc.owner)):
            mine.discard(fkey)
        binding = None
        if svc.persistence:
            binding = self.persistence.lookup(svc, ev.caddr & svc.persistence_mask, now)
        s = self.sessions.install(ev.proto, ev.caddr, ev.cport, ev.vaddr, ev.vport, server,
                                  svc, ev.state, now - ev.idle, now, binding)
        if s is None:
            self._skip("table_refused")
        elif self.on_installed is not None:
            self.on_installed(s)

    def _apply_reply_seen(self, ev: ReplySeen, now: float) -> None:
        s = self.sessions.lookup(flow_key(ev.proto, ev.caddr, ev.cport, ev.vaddr, ev.vport))
        if s is None:
            self._skip("unknown_session")
            return
        if not s.service.owned:
            self._skip("not_owner")
            return
        if ev.flags & _STATE_FLAGS:
            self.sessions.seen_reply(s, ev.flags & _STATE_FLAGS, now)
        elif s.last_seen < now:
            s.last_seen = now

    def _finish_snapshot(self, now: float) -> None:
        carried_s, carried_b = self._snap_sessions, self._snap_bindings
        self._snap_sessions = self._snap_bindings = None
        if carried_s is None or carried_b is None:
            self._skip("snapshot_end_without_begin")
            return
        # A provisional entry stays unless the snapshot carried records of its instance: then
        # the peer masters that instance, and what it did not carry has ended there.
        keep_s, keep_b, peers = self._provisional_s, self._provisional_b, self._snap_instances
        stale = [s for s in self.sessions if not s.service.owned and s.fkey not in carried_s
                 and (s.fkey not in keep_s.get(s.service.owner, _NONE)
                      or s.service.owner in peers)]
        for s in stale:
            self.sessions.remove(s, "resync", now)
        gone = [b for b in self.persistence
                if not b.service.owned and (b.service.key, b.client_net) not in carried_b
                and ((b.service.key, b.client_net) not in keep_b or b.service.owner in peers)]
        for b in gone:
            self.persistence.unbind(b, "resync")
        self.snapshots_received += 1
        self.snapshot_done = True

    def _service_and_server(self, proto: int, vaddr: int, vport: int, raddr: int,
                            rport: int) -> tuple[Service, RealServer] | None:
        svc = self.services().by_key.get(service_key(proto, vaddr, vport))
        if svc is None:
            self._skip("unknown_service")
            return None
        server = svc.pool.find(raddr, rport)
        if server is None:
            self._skip("unknown_server")
            return None
        return svc, server

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def status(self) -> dict[str, Any]:
        return {"records_received": self.records_received,
                "snapshots_received": self.snapshots_received,
                "replies_reported": self.replies_reported,
                "opened_unowned": self.opened_unowned, "late": self.late,
                "peer_snapshot_done": self.snapshot_done, "skipped": dict(self.skipped),
                "provisional": {"sessions": self.provisional[0],
                                "bindings": self.provisional[1]}}
