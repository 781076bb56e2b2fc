"""The NAT forwarding decision for one packet (pure: bytes and ``now`` in, verdict out).

The TUN shell reads a packet (virtio-net header + IPv4) into a reusable buffer and calls
:meth:`Forwarder.handle`; the verdict says what to write back:

- ``FORWARD`` — the buffer was rewritten in place (client→server: dst VIP:vport → RIP:rport;
  server→client: src RIP:rport → VIP:vport, or an ICMP echo reply / translated ICMP error);
  write ``buf[:end]`` back into the TUN and the kernel routes it on.
- ``SEND`` — write ``forwarder.out[:forwarder.out_len]`` instead (a TCP RST we generated).
- ``DROP`` — nothing to write; the reason has been counted.

Direction is told by the destination: a packet addressed to a VIP comes from a client (only
VIP routes lead into the TUN from the client side), anything else was steered in by the reply
rules and comes from a real server.

Active-active: a reply may belong to a session this node does not own (its VIP is mastered
by the peer; this node holds the servers' gateway). It is forwarded from the synced copy, and
what the server side did is reported to the owner through ``peer`` (a reply with FIN or RST,
or a refresh at most once per half the session's timeout): the owner's table stays the truth.
A reply that finds no session while a hold is configured waits in :mod:`lb.reply_hold` for
the peer's record (``release_held``), and the packets to write then are pulled from
``ready``. While the peer's sync stream is down (``peer_streaming`` says so) no record will
come: a reply whose server belongs to exactly one virtual server the peer masters is
forwarded as that virtual server's at once, and a copy of its flow is made here, as the
owner's record would have made it (``replies_inferred``; the peer's next snapshot replaces
or removes it). Without this, every new connection to the peer's VIP would fail for as long
as the sync link is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lb.packet import (
    ACK,
    FIN,
    PROTO_ICMP,
    PROTO_TCP,
    RST,
    SYN,
    VNET_HDR_LEN,
    build_rst,
    icmp_echo_reply,
    parse,
    parse_icmp_error,
    rewrite_dst,
    rewrite_src,
    translate_icmp_error_from_client,
    translate_icmp_error_from_server,
)
from lb.persistence import Binding, PersistenceTable
from lb.reply_hold import ReplyHold
from lb.servers import RealServer
from lb.services import Service, ServiceSet
from lb.sessions import Session, SessionTable, TcpState, flow_key
from lb.source_limits import CONN_LIMIT, RATE_LIMIT, SourceEntry

DROP, FORWARD, SEND = 0, 1, 2

ICMP_ECHO_REQUEST = 8
ICMP_ERROR_TYPES = frozenset((3, 11, 12))

_ZERO_VNET = bytes(VNET_HDR_LEN)
_SYN_RECV = int(TcpState.SYN_RECV)  # the state of a flow inferred from its server's SYN-ACK
_ESTABLISHED = int(TcpState.ESTABLISHED)

DROP_REASONS = ("no_session", "no_service", "no_server", "table_full", "flow_conflict",
                "icmp_bad", "icmp_unsupported", "icmp_no_session", "reply_hold_timeout",
                CONN_LIMIT, RATE_LIMIT)
"""Every reason :meth:`Forwarder.drop` is called with (the metrics show each from 0)."""


class SessionEvents(Protocol):
    def session_added(self, s: Session) -> None: ...
    def session_changed(self, s: Session) -> None: ...
    def session_removed(self, s: Session, reason: str) -> None: ...


class PeerReports(Protocol):
    def reply_seen(self, s: Session, flags: int) -> None: ...
    def opened_here(self, s: Session, new_binding: bool) -> None: ...


class ServiceCounts:
    """Session observer that keeps each virtual server's active-session count, and passes
    every event on to ``downstream`` (the sync stream) when there is one."""

    def __init__(self, downstream: SessionEvents | None = None) -> None:
        self.downstream = downstream
        # Told of every removal first (the kernel fast path deletes the flow's entry).
        self.on_removed: Callable[[Session, str], None] | None = None

    def session_added(self, s: Session) -> None:
        svc: Service = s.service
        svc.active += 1
        if self.downstream is not None:
            self.downstream.session_added(s)

    def session_changed(self, s: Session) -> None:
        if self.downstream is not None:
            self.downstream.session_changed(s)

    def session_removed(self, s: Session, reason: str) -> None:
        svc: Service = s.service
        svc.active -= 1
        if self.on_removed is not None:
            self.on_removed(s, reason)
        if self.downstream is not None:
            self.downstream.session_removed(s, reason)


class Forwarder:
    """Holds the tables and the service map; counts everything as plain integers."""

    def __init__(self, services: ServiceSet, sessions: SessionTable[Service],
                 persistence: PersistenceTable[Service], *, peer: PeerReports | None = None,
                 hold: ReplyHold | None = None) -> None:
        self.sessions = sessions
        self._admit = sessions.sources.admit
        self.persistence = persistence
        self.peer = peer
        self.hold = hold
        # Set by the node with [sync]: False while the peer's stream is down (no record of a
        # flow the peer opens can arrive; see the module docstring).
        self.peer_streaming: Callable[[], bool] | None = None
        self.ready: list[bytearray] = []  # released held replies, rewritten, to write
        self.echo_addresses: frozenset[int] = frozenset()  # held addresses that are no VIP
        # The kernel fast path (lb.offload): told of each new session, with the flags of its
        # first packet, before that packet is written back.
        self.offload: Callable[[Session, int], None] | None = None
        # ... and of every other packet it forwards itself (of an offloaded flow: one the
        # kernel refused).
        self.offload_seen: Callable[[Session, int], None] | None = None
        # A copy's state is its owner's: report a reply after half its timeout of silence.
        self._refresh_after = tuple(t / 2 for t in sessions.timeout_of)
        self.set_services(services)
        self.out = bytearray(VNET_HDR_LEN + 128)
        self.out_len = 0
        # counters (read by the metrics collector at scrape time)
        self.packets_in = 0  # client → server, forwarded
        self.bytes_in = 0
        self.packets_out = 0  # server → client, forwarded
        self.bytes_out = 0
        self.icmp_replies = 0
        self.picked_up = 0  # TCP flows taken over mid-stream (consistent schedulers only)
        self.replies_inferred = 0  # the peer's flows copied from a reply while sync was down
        self.replies_ambiguous = 0  # ... not: their server serves several such services
        self.resets_sent = 0
        self.errors = 0
        self.drops: dict[str, int] = {}

    def set_services(self, services: ServiceSet) -> None:
        self.services = services
        self._by_key = services.by_key
        self._vips = services.vips

    # ---- entry point ------------------------------------------------------------------------
    def handle(self, buf: bytearray, end: int, now: float) -> int:
        off = VNET_HDR_LEN
        r = parse(buf, off, end)
        if type(r) is not tuple:
            return self.drop(r.name.lower())  # type: ignore[union-attr]
        proto, saddr, daddr, sport, dport, l4, flags = r
        partial = buf[0] & 1
        if daddr in self._vips:
            if proto == PROTO_ICMP:
                return self._icmp_from_client(buf, off, l4, end, sport)
            key = (proto << 96) | (saddr << 64) | (daddr << 32) | (sport << 16) | dport
            s = self.sessions.lookup(key)
            if s is None or (flags & SYN and not flags & ACK and self.sessions.is_reusable(s)):
                # A new flow; or a SYN that reuses the 5-tuple of a closing session, which
                # _new_session replaces only once the new session is sure to be made.
                s = self._new_session(buf, off, end, proto, saddr, sport, daddr, dport, flags,
                                      now, s)
                if s is None:
                    return SEND if self.out_len else DROP
                if self.offload is not None:
                    self.offload(s, flags)
            else:
                self.sessions.seen_forward(s, flags, now)
                if self.offload_seen is not None:
                    self.offload_seen(s, flags)
            srv = s.server
            rewrite_dst(buf, off, l4, proto, srv.addr, srv.port, partial)
            self.packets_in += 1
            self.bytes_in += end - off
            return FORWARD
        if proto == PROTO_ICMP:
            if sport == ICMP_ECHO_REQUEST and daddr in self.echo_addresses:
                return self._icmp_from_client(buf, off, l4, end, sport)  # ping the gateway
            return self._icmp_from_server(buf, off, l4, end, sport)
        rkey = (proto << 96) | (saddr << 64) | (daddr << 32) | (sport << 16) | dport
        s = self.sessions.lookup_reply(rkey)
        if s is None:  # (one test on the path of every reply that has its session)
            if self.peer_streaming is not None and not self.peer_streaming():
                s = self._infer(proto, saddr, sport, daddr, dport, flags, now)  # no record
            if s is None:
                if self.hold is not None and self.hold.hold(rkey, bytes(buf[:end]), now):
                    self.out_len = 0
                    return DROP  # held, not dropped: counted by the hold
                return self.drop("no_session")
        svc: Service = s.service
        if svc.owned:
            self.sessions.seen_reply(s, flags, now)
            if self.offload_seen is not None:
                self.offload_seen(s, flags)
        elif flags & (FIN | RST):
            if self.peer is not None:
                self.peer.reply_seen(s, flags)
        elif now - s.last_seen >= self._refresh_after[s.state]:
            s.last_seen = now
            if self.peer is not None:
                self.peer.reply_seen(s, 0)
        rewrite_src(buf, off, l4, proto, svc.vaddr, svc.vport, partial)
        self.packets_out += 1
        self.bytes_out += end - off
        return FORWARD

    def _infer(self, proto: int, saddr: int, sport: int, daddr: int, dport: int, flags: int,
               now: float) -> Session | None:
        """A reply from server ``saddr:sport`` to client ``daddr:dport`` that no session knows,
        with the peer's stream down: the peer's flow, if exactly one virtual server the peer
        masters has this server (otherwise which VIP to answer from is unknown: None)."""
        found: tuple[Service, RealServer] | None = None
        for svc in self.services.services:
            if svc.owned or svc.proto != proto:
                continue
            for srv in svc.pool.servers:
                if srv.addr == saddr and srv.port == sport:
                    if found is not None:
                        self.replies_ambiguous += 1
                        return None
                    found = (svc, srv)
        if found is None:
            return None
        svc, srv = found
        state = 0 if proto != PROTO_TCP else (_SYN_RECV if flags & SYN else _ESTABLISHED)
        s = self.sessions.install(proto, daddr, dport, svc.vaddr, svc.vport, srv, svc, state,
                                  now, now)
        if s is not None:
            self.replies_inferred += 1
        return s

    def release_held(self, s: Session, now: float) -> int:
        """The peer's record for ``s`` arrived: rewrite the replies held for it into
        ``ready``. Returns how many."""
        if self.hold is None:
            return 0
        packets = self.hold.take(s.rkey, now)
        svc: Service = s.service
        for pkt in packets:
            buf = bytearray(pkt)
            r = parse(buf, VNET_HDR_LEN, len(buf))
            if type(r) is not tuple:  # it parsed when it was held
                continue
            proto, _, _, _, _, l4, _ = r
            rewrite_src(buf, VNET_HDR_LEN, l4, proto, svc.vaddr, svc.vport, buf[0] & 1)
            self.packets_out += 1
            self.bytes_out += len(buf) - VNET_HDR_LEN
            self.ready.append(buf)
        return len(packets)

    def expire_held(self, now: float) -> None:
        if self.hold is not None:
            n = self.hold.expire(now)
            if n:
                self.drops["reply_hold_timeout"] = self.drops.get("reply_hold_timeout", 0) + n

    def drop(self, reason: str) -> int:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.out_len = 0
        return DROP

    # ---- new flows --------------------------------------------------------------------------
    def _new_session(self, buf: bytearray, off: int, end: int, proto: int, saddr: int,
                     sport: int, daddr: int, dport: int, flags: int, now: float,
                     reused: Session | None) -> Session | None:
        """Schedule and create the session of a new flow (replacing ``reused``, a closing
        session with the same 5-tuple), or refuse it. A refused flow changes no table: the
        checks that can refuse it all run before anything is removed, bound or rebound."""
        skey = (proto << 48) | (daddr << 16) | dport  # Service.key
        svc = self._by_key.get(skey)
        if svc is None:
            self._refuse(buf, off, end, proto, flags, "no_service")
            return None
        # Only a SYN opens a TCP session; anything else mid-stream (a session that expired,
        # or was reset because its server went down) is answered with RST, except a plain
        # ACK where the scheduler is consistent: then the peer that scheduled this flow (and
        # died before its record reached us) picked the server we pick now, so the flow is
        # picked up mid-stream, as IPVS's sloppy_tcp does.
        if proto == PROTO_TCP and flags & (SYN | ACK | RST) != SYN and (
                flags & (SYN | ACK | RST) != ACK or not svc.scheduler.consistent):
            self._refuse(buf, off, end, proto, flags, "no_session")
            return None
        if (len(self.sessions) - (reused is not None) >= self.sessions.max_sessions
                and not (flags & SYN and self.sessions.half_open)):
            # (a SYN takes the place of the oldest half-open session: SessionTable.create)
            self.drop("table_full")
            return None
        server, bound = self._schedule(svc, saddr, sport, now)
        if server is None:
            self._refuse(buf, off, end, proto, flags, "no_server")
            return None
        owner = self.sessions.lookup_reply(flow_key(proto, server.addr, server.port, saddr,
                                                    sport))
        if owner is reused:
            owner = None
        if owner is not None and not self.sessions.is_closing(owner):
            # The same client ip:port already reaches this server through another virtual
            # server: the replies could not be told apart.
            self.drop("flow_conflict")
            return None
        # Per-source limits, last of the checks (a refused flow takes no count or token):
        # a new session opened here (a SYN, a UDP flow's first packet) counts; a TCP flow
        # picked up mid-stream is an existing connection and does not. A refused SYN is
        # dropped, not answered (docs/architecture.md, "Per-source limits").
        source: SourceEntry | None = None
        limits = svc.source_limits
        if limits is not None and (flags & SYN or proto != PROTO_TCP):
            admitted = self._admit((skey << 32) | saddr, limits, now)  # source_key()
            if isinstance(admitted, str):
                self.drop(admitted)
                return None
            source = admitted
        # A closing session of another virtual server that holds the reverse key (the
        # client reused the port for the other VIP, and the server is the same) is over: the
        # new flow replaces it, as a new SYN replaces a closing session of its own 5-tuple.
        for old in (reused, owner):
            if old is not None:
                self.sessions.remove(old, "reused", now)
        binding = self._bind(svc, saddr, server, bound, now)
        s = self.sessions.create(proto, saddr, sport, daddr, dport, server, svc, flags, now,
                                 binding, source)
        if s is None:  # not reached: create() refuses only what was checked above
            self.drop("table_full")
            return None
        svc.created_total += 1
        if proto == PROTO_TCP and not flags & SYN:
            self.picked_up += 1
        if not svc.owned and self.peer is not None:
            # Scheduled for an instance this node does not master (a packet that came in the
            # instant between losing it and its address leaving): the owner must learn of
            # the flow, or its replies, which reach the owner, find nothing there.
            self.peer.opened_here(s, bound is None)
        return s

    def _schedule(self, svc: Service, caddr: int, cport: int,
                  now: float) -> tuple[RealServer | None, Binding[Service] | None]:
        """The server for a new flow, and the client's persistence binding if it has one,
        left as it is (:meth:`_bind` records the choice once the session is certain)."""
        if not svc.persistence:
            return svc.scheduler.pick(caddr, cport), None
        b = self.persistence.lookup(svc, caddr & svc.persistence_mask, now)
        if b is not None:
            bound = b.server
            if bound.accepts_bound() and svc.pool.holds(bound) and \
                    not (bound.backup and svc.pool.has_primary):
                return bound, b
        return svc.scheduler.pick(caddr, cport), b

    def _bind(self, svc: Service, caddr: int, server: RealServer, b: Binding[Service] | None,
              now: float) -> Binding[Service] | None:
        """Bind the client's network to ``server``, or move its binding there."""
        if not svc.persistence:
            return None
        if b is None:
            return self.persistence.bind(svc, caddr & svc.persistence_mask, server,
                                         svc.persistence_timeout, now)
        self.persistence.rebind(b, server, now)  # nothing when it already points there
        return b

    def _refuse(self, buf: bytearray, off: int, end: int, proto: int, flags: int,
                reason: str) -> None:
        """Count the drop; a TCP segment (other than a RST) is answered with a RST."""
        self.drop(reason)
        if proto == PROTO_TCP and not flags & RST:
            n = build_rst(buf, off, end, self.out, VNET_HDR_LEN)
            if n:
                self.out[:VNET_HDR_LEN] = _ZERO_VNET
                self.out_len = VNET_HDR_LEN + n
                self.resets_sent += 1

    # ---- ICMP -------------------------------------------------------------------------------
    def _icmp_from_client(self, buf: bytearray, off: int, l4: int, end: int,
                          icmp_type: int) -> int:
        if icmp_type == ICMP_ECHO_REQUEST:
            if icmp_echo_reply(buf, off, end):
                self.icmp_replies += 1
                return FORWARD
            return self.drop("icmp_bad")
        return self._icmp_error(buf, off, l4, end, icmp_type, from_client=True)

    def _icmp_from_server(self, buf: bytearray, off: int, l4: int, end: int,
                          icmp_type: int) -> int:
        return self._icmp_error(buf, off, l4, end, icmp_type, from_client=False)

    def _icmp_error(self, buf: bytearray, off: int, l4: int, end: int, icmp_type: int, *,
                    from_client: bool) -> int:
        """Translate an ICMP error about a session so that its sender's peer understands it.

        From a client it quotes a reply we sent (VIP:vport → client:cport) and goes on to the
        real server; from a server it quotes a packet we forwarded (client:cport →
        RIP:rport) and goes back to the client as if from the VIP. Either way the quoted
        packet, read as arriving at the LB, gives the session's key.
        """
        if icmp_type not in ICMP_ERROR_TYPES:
            return self.drop("icmp_unsupported")
        inner = parse_icmp_error(buf, off, l4, end)
        if type(inner) is not tuple:
            return self.drop("icmp_bad")
        iproto, isrc, idst, isport, idport, iip, il4 = inner
        key = (iproto << 96) | (idst << 64) | (isrc << 32) | (idport << 16) | isport
        if from_client:
            s = self.sessions.lookup(key)
            if s is None:
                return self.drop("icmp_no_session")
            srv = s.server
            translate_icmp_error_from_client(buf, off, end, iip, il4, iproto, srv.addr,
                                             srv.port)
            self.packets_in += 1
            self.bytes_in += end - off
        else:
            s = self.sessions.lookup_reply(key)
            if s is None:
                return self.drop("icmp_no_session")
            svc: Service = s.service
            translate_icmp_error_from_server(buf, off, end, iip, il4, iproto, svc.vaddr,
                                             svc.vport)
            self.packets_out += 1
            self.bytes_out += end - off
        return FORWARD
