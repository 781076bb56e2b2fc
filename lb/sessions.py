"""Session table of the NAT data plane: flows, their TCP state, and their expiry.

Keys. A flow is indexed twice, each time by "the packet as it arrives at the LB", packed into
one int so that the data plane builds it from raw header fields with a few shifts::

    flow_key(proto, saddr, sport, daddr, dport)
        = proto << 96 | saddr << 64 | daddr << 32 | sport << 16 | dport

    bits  103..96  95 ........ 64  63 ........ 32  31 .... 16  15 ..... 0
          proto    source addr     dest addr       src port    dst port

    forward key = flow_key(proto, caddr, cport, vaddr, vport)   client -> VIP
    reverse key = flow_key(proto, raddr, rport, caddr, cport)   server -> client

TCP state follows IPVS (``ip_vs_proto_tcp.c``) for a NAT director: what the client sends is
the INPUT direction, what the server sends the OUTPUT direction. The segment's event is the
first of RST, SYN, FIN, ACK that its flags carry (IPVS's ``tcp_state_idx``); a segment with
none of them moves the session to CLOSE, as in IPVS. :data:`TRANSITIONS` is the whole table.
Deviations from IPVS, all because this director only sees flows opened by clients: no
SYN_SENT/LISTEN/SYNACK states (a SYN from the server leaves the state alone, where IPVS would
go to SYN_SENT from a closing state); the initial state comes from the first packet (SYN:
SYN_RECV; anything else is a flow picked up mid-stream, e.g. after a failover, and is taken
as ESTABLISHED before the packet's own event applies); LAST_ACK, unreachable in IPVS's table
too, only arrives through :meth:`SessionTable.install`.

Expiry is a :class:`lb.wheel.TimingWheel` with lazy re-filing, the due time being the
deadline ``last_seen + timeout(state)``. A packet only writes ``last_seen``; a state change
that shortens the deadline files the session again, earlier; a sweep that meets a session
whose deadline moved files it at the new one. A sweep at ``now`` that finishes removes every
session whose deadline is ``<= now``: with a sweep every tick, removal happens in
``[deadline, deadline + tick)``. A removed session stays referenced from its wheel slot until
that slot is swept (at most its deadline), so memory follows the connection rate times the
timeouts.

Pure: time is always the ``now`` argument; no I/O.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Final, Generic, Protocol, TypeVar

from lb.persistence import Binding
from lb.servers import RealServer
from lb.source_limits import SourceEntry, SourceTracker
from lb.wheel import UNFILED, TimingWheel

__all__ = [
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "TCP_ACK",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "TRANSITIONS",
    "Session",
    "SessionObserver",
    "SessionTable",
    "SessionTimeouts",
    "TcpState",
    "flow_key",
]

S = TypeVar("S")

IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10
_EVENT_BITS: Final = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK  # 0x17: what the table reads

_U32: Final = 0xFFFFFFFF
_U16: Final = 0xFFFF


def flow_key(proto: int, saddr: int, sport: int, daddr: int, dport: int) -> int:
    """The table key of a packet as it arrives at the LB (layout in the module docstring)."""
    return (proto << 96) | (saddr << 64) | (daddr << 32) | (sport << 16) | dport


# The same key in two allocations instead of nine (create() is per new flow). The layout is
# also the IPv4 header's: with a 20-byte header, ``int.from_bytes(pkt[12:24], "big")`` is
# saddr, daddr, sport, dport, and ``proto << 96`` completes the key.
_pack_key: Final = struct.Struct("!BIIHH").pack
_from_bytes: Final = int.from_bytes


class TcpState(enum.IntEnum):
    """Session states, IPVS's names. NONE is the state of every non-TCP session."""

    NONE = 0
    SYN_RECV = 1
    ESTABLISHED = 2
    FIN_WAIT = 3
    CLOSE_WAIT = 4
    TIME_WAIT = 5
    CLOSE = 6
    LAST_ACK = 7


_SR = TcpState.SYN_RECV
_ES = TcpState.ESTABLISHED
_FW = TcpState.FIN_WAIT
_CW = TcpState.CLOSE_WAIT
_TW = TcpState.TIME_WAIT
_CL = TcpState.CLOSE
_LA = TcpState.LAST_ACK

#: Next state by (direction, event), one entry per current state in the column order below.
#: "input" = client -> server, "output" = server -> client. Event = first of rst/syn/fin/ack
#: in the segment's flags, "none" when it has none of them.
TRANSITIONS: Final[dict[tuple[str, str], tuple[TcpState, ...]]] = {
    #                  from:  SR   ES   FW   CW   TW   CL   LA
    ("input", "syn"): (_SR, _ES, _SR, _SR, _SR, _SR, _SR),
    ("input", "fin"): (_TW, _CW, _TW, _CW, _TW, _CL, _LA),
    ("input", "ack"): (_ES, _ES, _FW, _CW, _TW, _CL, _CL),
    ("input", "rst"): (_SR, _CL, _CL, _CL, _CL, _CL, _LA),
    ("input", "none"): (_CL, _CL, _CL, _CL, _CL, _CL, _CL),
    ("output", "syn"): (_SR, _ES, _FW, _CW, _TW, _CL, _LA),  # IPVS: SYN_SENT when closing
    ("output", "fin"): (_TW, _FW, _FW, _TW, _TW, _CL, _LA),
    ("output", "ack"): (_ES, _ES, _FW, _CW, _TW, _CL, _LA),
    ("output", "rst"): (_CL, _CL, _CL, _CL, _TW, _CL, _CL),
    ("output", "none"): (_CL, _CL, _CL, _CL, _CL, _CL, _CL),
}
_COLUMNS: Final = (_SR, _ES, _FW, _CW, _TW, _CL, _LA)

#: States in which a new SYN on the same 5-tuple replaces the session (IPVS conn_reuse_mode).
#: ESTABLISHED too: a client's TCP never sends a bare SYN on a connection it has open, so a
#: SYN there opens a new connection on a reused port, and the session it meets is stale (a
#: copy adopted at a takeover whose close the peer never got to send).
CLOSING_STATES: Final = frozenset({_FW, _CW, _TW, _CL, _LA})
REUSABLE_STATES: Final = CLOSING_STATES | {_ES}


def _event(flags: int) -> str:
    if flags & TCP_RST:
        return "rst"
    if flags & TCP_SYN:
        return "syn"
    if flags & TCP_FIN:
        return "fin"
    if flags & TCP_ACK:
        return "ack"
    return "none"


def _compile(direction: str) -> tuple[int, ...]:
    """The table flattened for the hot path: index ``state << 5 | flags & 0x17``."""
    out = [0] * (len(TcpState) << 5)
    for state in TcpState:
        for flags in range(32):
            if state is TcpState.NONE:
                nxt = int(TcpState.NONE)  # not TCP: no state machine
            else:
                row = TRANSITIONS[(direction, _event(flags))]
                nxt = int(row[_COLUMNS.index(state)])
            out[(state << 5) | flags] = nxt
    return tuple(out)


_NEXT_INPUT: Final = _compile("input")
_NEXT_OUTPUT: Final = _compile("output")
_N_STATES: Final = len(TcpState)  # Enum.__len__ is a Python call: not per install
_REUSABLE: Final = tuple(st in REUSABLE_STATES for st in TcpState)
_CLOSING: Final = tuple(st in CLOSING_STATES for st in TcpState)
#: Stale entries the half-open index may hold beyond the live ones before it is compacted.
HALF_OPEN_SLACK: Final = 16


@dataclass(frozen=True, slots=True)
class SessionTimeouts:
    """Idle timeouts in seconds, by state (IPVS's defaults where it has one)."""

    tcp_syn: float = 60.0
    tcp_established: float = 900.0
    tcp_fin: float = 120.0  # FIN_WAIT, CLOSE_WAIT, LAST_ACK
    tcp_time_wait: float = 120.0
    tcp_close: float = 10.0
    udp: float = 300.0  # and every other non-TCP protocol

    def __post_init__(self) -> None:
        for f in fields(self):  # (not __slots__: mypyc-compiled classes have none)
            if getattr(self, f.name) <= 0:
                raise ValueError(f"timeout {f.name} must be positive")

    def timeout(self, state: int) -> float:
        """The idle timeout of a session in ``state``."""
        if state == TcpState.NONE:
            return self.udp
        if state == TcpState.SYN_RECV:
            return self.tcp_syn
        if state == TcpState.ESTABLISHED:
            return self.tcp_established
        if state == TcpState.TIME_WAIT:
            return self.tcp_time_wait
        if state == TcpState.CLOSE:
            return self.tcp_close
        if state in (TcpState.FIN_WAIT, TcpState.CLOSE_WAIT, TcpState.LAST_ACK):
            return self.tcp_fin
        raise ValueError(f"unknown session state {state}")


class Session:
    """One flow. Fields are plain attributes the data plane reads directly.

    Not generic (``service`` is ``Any``; its users annotate what they read): mypyc gives an
    instance of a ``Generic`` class a ``__dict__`` and ``__weakref__`` pointer and checks every
    attribute read for "undefined" (a bitmap word): 24 bytes per session.

    ``fkey``: the forward key; ``rkey`` (derived from ``fkey`` and ``server``: the table's
    ``_rev`` holds the int already, a slot for it would cost 8 bytes per session): the reverse
    key; ``server``: the real server;
    ``service``: the data plane's virtual-server runtime (opaque here); ``state``: a
    :class:`TcpState` value as a plain int; ``last_seen``: time of the last packet;
    ``binding``: the persistence binding it holds a reference on, or None; ``source``: the
    per-source counter (:mod:`lb.source_limits`) that counts it, or None (not counted: a copy
    from the peer, a flow picked up mid-stream, a virtual server without limits, or closing).
    """

    __slots__ = ("_slot", "binding", "fkey", "last_seen", "server", "service", "source", "state")

    def __init__(
        self,
        fkey: int,
        server: RealServer,
        service: Any,
        state: int,
        last_seen: float,
        binding: Binding[Any] | None,
    ) -> None:
        self.fkey = fkey
        self.server = server
        self.service = service
        self.state = state
        self.last_seen = last_seen
        self.binding = binding
        self.source: SourceEntry | None = None
        self._slot = UNFILED  # owned by the table's TimingWheel; UNFILED once removed

    @property
    def rkey(self) -> int:
        """The reverse key: the flow as the server's packets arrive (not per packet)."""
        f = self.fkey
        srv = self.server
        return _from_bytes(_pack_key(f >> 96, srv.addr, (f >> 64) & _U32, srv.port,
                                     (f >> 16) & _U16), "big")

    # Derived from the keys: for APIs and tests, not the hot path.
    @property
    def proto(self) -> int:
        return self.fkey >> 96

    @property
    def caddr(self) -> int:
        return (self.fkey >> 64) & _U32

    @property
    def cport(self) -> int:
        return (self.fkey >> 16) & _U16

    @property
    def vaddr(self) -> int:
        return (self.fkey >> 32) & _U32

    @property
    def vport(self) -> int:
        return self.fkey & _U16

    @property
    def raddr(self) -> int:
        return self.server.addr

    @property
    def rport(self) -> int:
        return self.server.port

    @property
    def tcp_state(self) -> TcpState:
        return TcpState(self.state)

    @property
    def in_table(self) -> bool:
        """False once the session was removed from its table."""
        return self._slot != UNFILED

    def __repr__(self) -> str:
        return (
            f"Session(proto={self.proto}, client={self.caddr:#010x}:{self.cport}, "
            f"virtual={self.vaddr:#010x}:{self.vport}, server={self.server.key}, "
            f"state={self.tcp_state.name}, last_seen={self.last_seen})"
        )


class SessionObserver(Protocol):
    """Sees every mutation of a :class:`SessionTable`, once each (feeds the peer-sync stream).

    A per-packet refresh of ``last_seen`` is not an event.
    """

    def session_added(self, s: Session) -> None: ...

    def session_changed(self, s: Session) -> None:
        """The TCP state (or, through install, the server/service/binding) changed."""

    def session_removed(self, s: Session, reason: str) -> None: ...


class SessionTable(Generic[S]):
    """All sessions, indexed by forward and reverse key, expired by a timing wheel.

    ``lookup(fkey)`` and ``lookup_reply(rkey)`` are the two dicts' bound ``get`` methods: no
    Python frame on the hot path. Counters are plain ints: ``created_total``,
    ``installed_total`` (from the peer), ``expired_total``, ``removed_total`` (every removal,
    expiry included), ``full_drops`` (flows refused because ``max_sessions`` were in the table),
    ``conflict_drops`` (flows refused because another session already owns their reverse key:
    the same client ip:port reaching the same real server through two virtual servers).

    Half-open sessions (SYN_RECV) are also kept in arrival order, at most ``max_half_open``
    of them (default an eighth of ``max_sessions``): a new SYN beyond that, or one that finds
    the table full while half-open sessions are in it, evicts the oldest half-open session
    (``half_open_evictions``) instead of being refused — the BSD syncache's overflow rule and
    IPVS's ``drop_entry`` in one. A spoofed SYN flood then cycles through the half-open
    slots; a real client's handshake completes within a round trip, long before its slot's
    turn comes (a slot lives ``max_half_open`` / flood rate seconds), and established
    sessions are never touched.

    The arrival order is a deque of sessions with lazy deletion: a session that leaves
    SYN_RECV or the table stays in it, stale, and is skipped when it reaches the front; a
    session that enters SYN_RECV again (a SYN on a closing session, or the peer's record of a
    new flow on a reused 5-tuple) is queued anew, wrapped in a 1-tuple that
    ``_reentered`` names as its current entry, so that its older entry is stale too.
    ``half_open`` is an exact count kept on every way into and out of SYN_RECV; when the
    stale entries exceed the live ones (by more than :data:`HALF_OPEN_SLACK`) the deque is
    compacted, so it holds at most ``2 * half_open + HALF_OPEN_SLACK`` entries
    (``half_open_index``), 8 bytes each, at amortised O(1) work per session.

    ``sources`` (:class:`lb.source_limits.SourceTracker`, by default one of ``max_sessions``
    / 4 entries) holds the per-source counts of the sessions this node opened
    (:meth:`create` with ``source``). A counted session gives its count back exactly once
    (:meth:`_uncount`, which clears ``Session.source``): when it leaves the table, however
    it leaves (every removal goes through :meth:`_drop`), or earlier, when it first enters a
    closing state (a FIN or RST seen: like HAProxy's ``conn_cur``, a connection that is
    closing or in TIME_WAIT is no longer open, and counting the TIME_WAIT sessions of a
    client behind a NAT would refuse it for two minutes after a burst of short requests).
    """

    lookup: Callable[[int], Session | None]
    lookup_reply: Callable[[int], Session | None]

    def __init__(
        self,
        timeouts: SessionTimeouts,
        max_sessions: int,
        tick: float = 0.1,
        observer: SessionObserver | None = None,
        max_half_open: int | None = None,
        sources: SourceTracker | None = None,
    ) -> None:
        timeout_of = tuple(timeouts.timeout(st) for st in TcpState)

        def deadline(s: Session, now: float) -> float:  # deadline(), without self lookups
            return s.last_seen + timeout_of[s.state]

        self._wheel: TimingWheel[Session] = TimingWheel(tick, deadline)
        self._timeout_of = timeout_of
        self.timeout_of = timeout_of  # idle timeout by state value
        self.timeouts = timeouts
        self.max_sessions = max_sessions
        self.tick = tick
        self.observer = observer
        self._fwd: dict[int, Session] = {}
        self._rev: dict[int, Session] = {}
        self.lookup = self._fwd.get
        self.lookup_reply = self._rev.get
        self.created_total = 0
        self.installed_total = 0
        self.expired_total = 0
        self.removed_total = 0
        self.full_drops = 0
        self.conflict_drops = 0
        self.max_half_open = (max(1, max_sessions // 8) if max_half_open is None
                              else max_half_open)
        # SYN_RECV sessions, oldest first, stale entries included (see the class docstring).
        # (A re-entry's 1-tuple is typed ``tuple[X, ...]``: mypyc keeps that one object, where
        # it would box a ``tuple[X]`` anew at each use and break the identity test.)
        self._half_open: deque[Session | tuple[Session, ...]] = deque()
        self._half_open_count = 0
        self._reentered: dict[Session, tuple[Session, ...]] = {}
        self.half_open_evictions = 0
        self.sources = (SourceTracker(max(1, max_sessions // 4)) if sources is None
                        else sources)

    # --- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._fwd)

    @property
    def half_open(self) -> int:
        """Sessions in SYN_RECV now."""
        return self._half_open_count

    @property
    def half_open_index(self) -> int:
        """Entries in the half-open index, stale ones included: at most
        ``2 * half_open + HALF_OPEN_SLACK``."""
        return len(self._half_open)

    def __iter__(self) -> Iterator[Session]:
        """The sessions (do not mutate the table while iterating)."""
        return iter(self._fwd.values())

    def sessions_for_server(self, server: RealServer) -> list[Session]:
        """The sessions pointing at ``server`` (a full scan: for the rare on-server-down)."""
        return [s for s in self._fwd.values() if s.server is server]

    def deadline(self, s: Session) -> float:
        """When ``s`` expires unless a packet refreshes it."""
        return s.last_seen + self._timeout_of[s.state]

    def is_reusable(self, s: Session) -> bool:
        """Should a new SYN on the 5-tuple of ``s`` replace it (``s`` is closing, or an
        ESTABLISHED session the client has evidently left)?"""
        return _REUSABLE[s.state]

    def is_closing(self, s: Session) -> bool:
        """Has ``s`` seen a FIN or RST (a TCP state in :data:`CLOSING_STATES`)?"""
        return _CLOSING[s.state]

    # --- per packet ----------------------------------------------------------------------

    def seen_forward(self, s: Session, tcp_flags: int, now: float) -> None:
        """A packet from the client (``tcp_flags`` = 0 for non-TCP)."""
        s.last_seen = now
        state = s.state
        if state == 2:  # ESTABLISHED: a plain ACK (PSH, ECE, ...) is the common case
            if tcp_flags & 0x17 == 0x10:
                return
        elif state == 0:  # not TCP
            return
        new = _NEXT_INPUT[(state << 5) | (tcp_flags & 0x17)]
        if new != state:
            self._set_state(s, new, now)

    def seen_reply(self, s: Session, tcp_flags: int, now: float) -> None:
        """A packet from the real server (``tcp_flags`` = 0 for non-TCP)."""
        s.last_seen = now
        state = s.state
        if state == 2:  # ESTABLISHED: a plain ACK (PSH, ECE, ...) is the common case
            if tcp_flags & 0x17 == 0x10:
                return
        elif state == 0:  # not TCP
            return
        new = _NEXT_OUTPUT[(state << 5) | (tcp_flags & 0x17)]
        if new != state:
            self._set_state(s, new, now)

    # --- mutations -----------------------------------------------------------------------

    def create(
        self,
        proto: int,
        caddr: int,
        cport: int,
        vaddr: int,
        vport: int,
        server: RealServer,
        service: S,
        tcp_flags: int,
        now: float,
        binding: Binding[S] | None = None,
        source: SourceEntry | None = None,
    ) -> Session | None:
        """A new flow from its first (client) packet; None when refused (table full, or
        reverse key taken). The caller has checked that ``lookup`` finds no session.

        Takes a reference on ``binding`` (released by :meth:`remove`) and the count that
        ``source`` (admitted by ``sources``) took for it; a refused flow gives that back.
        """
        fkey = _from_bytes(_pack_key(proto, caddr, vaddr, cport, vport), "big")
        rkey = _from_bytes(_pack_key(proto, server.addr, caddr, server.port, cport), "big")
        if rkey in self._rev:
            self.conflict_drops += 1
            if source is not None:
                self.sources.release(source, now)
            return None
        if fkey in self._fwd:
            raise ValueError("create() of a flow that already has a session")
        if proto != IPPROTO_TCP:
            state = 0
        elif tcp_flags & TCP_SYN:
            state = 1
        else:  # picked up mid-stream: established, then this packet's own event
            state = _NEXT_INPUT[(2 << 5) | (tcp_flags & 0x17)]
        if state == 1 and self._half_open_count and (
                self._half_open_count >= self.max_half_open
                or len(self._fwd) >= self.max_sessions):
            self._evict_half_open(now)
        if len(self._fwd) >= self.max_sessions:
            self.full_drops += 1
            if source is not None:
                self.sources.release(source, now)
            return None
        s: Session = Session(fkey, server, service, state, now, binding)
        if source is not None:
            if _CLOSING[state]:  # picked up mid-stream with a FIN or RST: not open
                self.sources.release(source, now)
            else:
                s.source = source
        self._fwd[fkey] = s
        self._rev[rkey] = s
        if state == 1:
            self._half_open.append(s)
            self._half_open_count += 1
        server.active += 1
        server.created_total += 1
        if binding is not None:
            binding.attach(now)
        self.created_total += 1
        self._wheel.file(s, now + self._timeout_of[state])
        if self.observer is not None:
            self.observer.session_added(s)
        return s

    def install(
        self,
        proto: int,
        caddr: int,
        cport: int,
        vaddr: int,
        vport: int,
        server: RealServer,
        service: S,
        state: int,
        last_seen: float,
        now: float,
        binding: Binding[S] | None = None,
    ) -> Session | None:
        """Create or update a session received from the peer; None when refused.

        ``last_seen`` is in this node's clock (the sync layer converts ages); an older value
        than the local one is ignored. Counts against ``max_sessions``; not against
        ``created_total`` or the server's ``created_total`` (the peer created it). Fires
        ``session_added``, or ``session_changed`` when anything but ``last_seen`` changed.
        """
        if proto != IPPROTO_TCP:
            state = 0
        elif not 0 < state < _N_STATES:
            raise ValueError(f"not a TCP session state: {state}")
        state = int(state)
        fkey = _from_bytes(_pack_key(proto, caddr, vaddr, cport, vport), "big")
        rkey = _from_bytes(_pack_key(proto, server.addr, caddr, server.port, cport), "big")
        s = self._fwd.get(fkey)
        other = self._rev.get(rkey)
        if other is not None and other is not s:
            if not _CLOSING[other.state]:
                self.conflict_drops += 1
                return None
            # The peer opened this flow over a closing session of another virtual server that
            # held the server-side 5-tuple here (the client reused its port for the other VIP):
            # its forwarder replaced that session (``Forwarder`` does the same), so this copy
            # does too, or the flow's replies arriving here would find no session.
            self.remove(other, "reused", now)
        if s is None:
            if len(self._fwd) >= self.max_sessions:
                self.full_drops += 1
                return None
            s = Session(fkey, server, service, state, last_seen, binding)
            self._fwd[fkey] = s
            self._rev[rkey] = s
            if state == 1:
                self._half_open.append(s)
                self._half_open_count += 1
            server.active += 1
            if binding is not None:
                binding.attach(last_seen)
            self.installed_total += 1
            self._wheel.file(s, last_seen + self._timeout_of[state])
            if self.observer is not None:
                self.observer.session_added(s)
            return s
        changed = False
        if server is not s.server:
            del self._rev[s.rkey]
            s.server.active -= 1
            s.server = server
            self._rev[rkey] = s
            server.active += 1
            changed = True
        if service is not s.service:
            s.service = service
            changed = True
        if binding is not s.binding:
            if s.binding is not None:
                s.binding.release(now)
            if binding is not None:
                binding.attach(last_seen)
            s.binding = binding
            changed = True
        s.last_seen = max(s.last_seen, last_seen)
        if state != s.state:
            self._change_state(s, state, now)
            changed = True
            self._wheel.file_earlier(s, s.last_seen + self._timeout_of[state])
        if changed and self.observer is not None:
            self.observer.session_changed(s)
        return s

    def adopt_state(self, s: Session, state: int, now: float) -> None:
        """``s`` is in TCP ``state`` by someone else's account (the kernel's conntrack,
        which forwards the flow: lb.offload). Its deadline follows ``last_seen`` (which the
        caller sets first), not ``now``: the flow may have been idle for a while."""
        if s.state in (state, 0) or s._slot == UNFILED:  # (0: not TCP; removed)
            return
        self._change_state(s, state, now)
        self._wheel.file_earlier(s, s.last_seen + self._timeout_of[state])
        if self.observer is not None:
            self.observer.session_changed(s)

    def remove(self, s: Session, reason: str, now: float) -> None:
        """Remove ``s`` (reason e.g. "reused", "reset", "peer"); idempotent."""
        if self._wheel.discard(s):
            self._drop(s, reason, now)

    def expire(self, now: float, budget: int = 1000,
               keep: Callable[[Session], bool] | None = None) -> int:
        """Remove the sessions whose deadline is ``<= now`` (reason "expired").

        Touches at most ``budget`` sessions; the next call resumes where this one stopped.
        Called every ``tick``, it removes each session within a tick after its deadline, and
        never before. A due session that ``keep`` says to keep (a copy whose owner, the peer,
        decides when it ends) is filed again one timeout later instead. Returns how
        many it removed.
        """
        due = self._wheel.sweep(now, budget)
        n = 0
        for s in due:
            if keep is not None and keep(s):
                self._wheel.file(s, now + self._timeout_of[s.state])
                continue
            self._drop(s, "expired", now)
            n += 1
        self.expired_total += n
        return n

    def refresh(self, owned: Callable[[S], bool], now: float) -> int:
        """Mark every session of the services ``owned`` says as just seen (a takeover adopts
        the peer's sessions with fresh idle clocks). Returns how many it touched."""
        n = 0
        for s in self._fwd.values():
            if owned(s.service):
                s.last_seen = max(s.last_seen, now)
                n += 1
        return n

    # --- internals -----------------------------------------------------------------------

    def _drop(self, s: Session, reason: str, now: float) -> None:
        """Take ``s``, already out of the wheel, out of everything else."""
        del self._fwd[s.fkey]
        del self._rev[s.rkey]
        if s.state == 1:
            self._left_half_open(s)
        s.server.active -= 1
        if s.binding is not None:
            s.binding.release(now)
        if s.source is not None:
            self._uncount(s, now)
        self.removed_total += 1
        if self.observer is not None:
            self.observer.session_removed(s, reason)

    def _uncount(self, s: Session, now: float) -> None:
        """``s`` stops counting against its source: the one place a count is given back."""
        e = s.source
        if e is not None:
            s.source = None
            self.sources.release(e, now)

    def _change_state(self, s: Session, new: int, now: float) -> None:
        """``s`` moves to state ``new``: keep the half-open index and the source count in
        step."""
        old = s.state
        s.state = new
        if old == 1:
            self._left_half_open(s)
        elif new == 1:  # a new SYN on a closing session: newest now, its old entry stale
            entry: tuple[Session, ...] = (s,)
            self._reentered[s] = entry
            self._half_open.append(entry)
            self._half_open_count += 1
        if _CLOSING[new] and s.source is not None:
            self._uncount(s, now)

    def _left_half_open(self, s: Session) -> None:
        """``s`` left SYN_RECV, or the table while in it: its entry is stale now. Compacts
        the index when the stale entries outnumber the live ones."""
        if self._reentered:
            self._reentered.pop(s, None)
        n = self._half_open_count - 1
        self._half_open_count = n
        if len(self._half_open) > 2 * n + HALF_OPEN_SLACK:
            self._compact_half_open()

    def _live_entry(self, e: Session | tuple[Session, ...]) -> Session | None:
        """The session of index entry ``e`` if ``e`` is its current entry, else None."""
        if isinstance(e, tuple):
            s = e[0]
            if self._reentered.get(s) is not e:
                return None
        else:
            s = e
            if s in self._reentered:
                return None
        if s.state != 1 or self._fwd.get(s.fkey) is not s:
            return None
        return s

    def _compact_half_open(self) -> None:
        """Drop the stale entries of the half-open index."""
        live = self._live_entry
        self._half_open = deque([e for e in self._half_open if live(e) is not None])

    def _evict_half_open(self, now: float) -> None:
        """Remove the oldest session in SYN_RECV (skipping, and dropping, stale entries)."""
        queue = self._half_open
        live = self._live_entry
        while queue:
            s = live(queue.popleft())
            if s is not None:
                self.half_open_evictions += 1
                self.remove(s, "half_open_evicted", now)
                return

    def _set_state(self, s: Session, new: int, now: float) -> None:
        if s._slot == UNFILED:  # a stale reference to a removed session: nothing to track
            return
        self._change_state(s, new, now)
        self._wheel.file_earlier(s, now + self._timeout_of[new])
        if self.observer is not None:
            self.observer.session_changed(s)
