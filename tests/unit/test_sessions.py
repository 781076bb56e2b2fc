"""Session table: keys, TCP states, reuse, expiry timing, accounting, events, memory."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lb import native
from lb.addr import ip_to_int
from lb.persistence import PersistenceTable
from lb.servers import RealServer
from lb.sessions import (
    HALF_OPEN_SLACK,
    IPPROTO_TCP,
    IPPROTO_UDP,
    REUSABLE_STATES,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TRANSITIONS,
    Session,
    SessionTable,
    SessionTimeouts,
    TcpState,
    flow_key,
)
from lb.source_limits import SourceEntry, SourceLimits, source_key

TCP, UDP = IPPROTO_TCP, IPPROTO_UDP
SYNACK = TCP_SYN | TCP_ACK
FINACK = TCP_FIN | TCP_ACK
PSHACK = TCP_PSH | TCP_ACK
RSTACK = TCP_RST | TCP_ACK

CLIENT = ip_to_int("198.51.100.7")
VIP = ip_to_int("198.51.100.10")
SVC = "web"  # the service is opaque to the table


def servers(n: int = 2) -> list[RealServer]:
    return [RealServer("web", ip_to_int(f"198.18.0.{11 + i}"), 8080, 1, index=i) for i in range(n)]


@dataclass
class Recorder:
    """Observer that records every event and keeps a shadow copy of the table."""

    events: list[tuple[str, Session, str]] = field(default_factory=list)
    live: dict[int, Session] = field(default_factory=dict)

    def session_added(self, s: Session) -> None:
        assert s.fkey not in self.live
        self.live[s.fkey] = s
        self.events.append(("added", s, ""))

    def session_changed(self, s: Session) -> None:
        assert self.live[s.fkey] is s
        self.events.append(("changed", s, s.tcp_state.name))

    def session_removed(self, s: Session, reason: str) -> None:
        assert self.live.pop(s.fkey) is s
        self.events.append(("removed", s, reason))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def table(
    max_sessions: int = 100,
    tick: float = 0.1,
    timeouts: SessionTimeouts | None = None,
) -> tuple[SessionTable[str], Recorder]:
    rec = Recorder()
    t: SessionTable[str] = SessionTable(timeouts or SessionTimeouts(), max_sessions, tick, rec)
    return t, rec


def open_tcp(
    t: SessionTable[str], srv: RealServer, cport: int = 40000, now: float = 0.0
) -> Session:
    s = t.create(TCP, CLIENT, cport, VIP, 80, srv, SVC, TCP_SYN, now)
    assert s is not None
    return s


# --- keys ------------------------------------------------------------------------------------


def test_flow_key_layout() -> None:
    key = flow_key(0x06, 0x01020304, 0x0506, 0x0A0B0C0D, 0x0E0F)
    assert key == 0x06_01020304_0A0B0C0D_0506_0E0F
    # The same bytes as an IPv4 header (20 bytes) followed by the L4 ports.
    header = bytes(9) + b"\x06" + bytes(2) + bytes.fromhex("01020304 0A0B0C0D 0506 0E0F")
    assert key == (header[9] << 96) | int.from_bytes(header[12:24], "big")


@given(
    proto=st.sampled_from([TCP, UDP]),
    caddr=st.integers(0, 2**32 - 1),
    cport=st.integers(0, 2**16 - 1),
    vaddr=st.integers(0, 2**32 - 1),
    vport=st.integers(0, 2**16 - 1),
    raddr=st.integers(0, 2**32 - 1),
    rport=st.integers(0, 2**16 - 1),
)
def test_create_indexes_both_directions(
    proto: int, caddr: int, cport: int, vaddr: int, vport: int, raddr: int, rport: int
) -> None:
    t, rec = table()
    srv = RealServer("p", raddr, rport, 1)
    s = t.create(proto, caddr, cport, vaddr, vport, srv, SVC, TCP_SYN, 5.0)
    assert s is not None
    assert s.fkey == flow_key(proto, caddr, cport, vaddr, vport)
    assert s.rkey == flow_key(proto, raddr, rport, caddr, cport)
    assert t.lookup(s.fkey) is s
    assert t.lookup_reply(s.rkey) is s
    assert t.lookup(s.rkey) is None or s.rkey == s.fkey
    got = (s.proto, s.caddr, s.cport, s.vaddr, s.vport, s.raddr, s.rport)
    assert got == (proto, caddr, cport, vaddr, vport, raddr, rport)
    assert (s.server, s.service, s.last_seen, s.binding) == (srv, SVC, 5.0, None)
    assert s.tcp_state is (TcpState.SYN_RECV if proto == TCP else TcpState.NONE)
    assert (srv.active, srv.created_total, t.created_total, len(t)) == (1, 1, 1, 1)
    assert rec.kinds() == ["added"]
    assert list(t) == [s]


def test_full_table_drops_new_flows_and_leaves_the_rest() -> None:
    t, rec = table(max_sessions=2)
    t.max_half_open = 2
    a, b = servers()
    s1 = open_tcp(t, a, 1)
    s2 = open_tcp(t, b, 2)
    # (a SYN would take a half-open session's place: the next tests)
    assert t.create(UDP, CLIENT, 3, VIP, 80, a, SVC, 0, 1.0) is None
    assert t.full_drops == 1
    assert (len(t), t.created_total, a.active, a.created_total, b.active) == (2, 2, 1, 1, 1)
    assert rec.kinds() == ["added", "added"]
    assert t.lookup(s1.fkey) is s1
    assert t.lookup(s2.fkey) is s2
    assert t.lookup(flow_key(UDP, CLIENT, 3, VIP, 80)) is None
    t.remove(s1, "reset", 2.0)  # room again
    assert t.create(TCP, CLIENT, 3, VIP, 80, a, SVC, TCP_SYN, 2.0) is not None


def test_reverse_key_conflict_is_refused() -> None:
    # One client ip:port reaching the same server through two virtual servers.
    t, _ = table()
    (a,) = servers(1)
    open_tcp(t, a)
    assert t.create(TCP, CLIENT, 40000, VIP + 1, 80, a, SVC, TCP_SYN, 0.0) is None
    assert (t.conflict_drops, len(t), a.active) == (1, 1, 1)


@pytest.mark.parametrize(("held_by", "installed"), [
    (TcpState.TIME_WAIT, True), (TcpState.CLOSE, True), (TcpState.FIN_WAIT, True),
    (TcpState.ESTABLISHED, False), (TcpState.SYN_RECV, False),
])
def test_a_peer_record_replaces_a_closing_session_that_holds_its_reverse_key(
    held_by: TcpState, installed: bool
) -> None:
    # The client reused its port for the other VIP and the peer's forwarder sent the new flow
    # to the same server: its copy must replace the closing session here, as the peer did, or
    # the new flow's replies through this node find no session.
    t, rec = table()
    (a,) = servers(1)
    old = t.install(TCP, CLIENT, 40000, VIP, 80, a, SVC, held_by, 1.0, 1.0)
    assert old is not None
    new = t.install(TCP, CLIENT, 40000, VIP + 1, 80, a, SVC, TcpState.SYN_RECV, 2.0, 2.0)
    assert (new is not None) is installed
    assert t.conflict_drops == (0 if installed else 1)
    assert t.lookup_reply(old.rkey) is (new if installed else old)
    assert (len(t), a.active) == (1, 1)
    assert rec.kinds() == (["added", "removed", "added"] if installed else ["added"])


def test_a_syn_beyond_max_half_open_evicts_the_oldest_half_open_session() -> None:
    t, rec = table(max_sessions=10)
    t.max_half_open = 3
    (a,) = servers(1)
    first, second, third = (open_tcp(t, a, port) for port in (1, 2, 3))
    t.seen_reply(first, SYNACK, 0.5)
    t.seen_forward(first, TCP_ACK, 0.5)  # first completes its handshake: no longer half-open
    assert (t.half_open, first.tcp_state) == (2, TcpState.ESTABLISHED)
    fourth = open_tcp(t, a, 4, now=1.0)
    assert (t.half_open, t.half_open_evictions) == (3, 0)
    open_tcp(t, a, 5, now=2.0)  # the cap: the oldest half-open one (second) goes
    assert t.half_open_evictions == 1
    assert t.lookup(second.fkey) is None and t.lookup(first.fkey) is first
    assert [r for kind, s, r in rec.events if kind == "removed"] == ["half_open_evicted"]
    assert t.lookup(third.fkey) is third and t.lookup(fourth.fkey) is fourth
    # A UDP flow or a mid-stream pick-up is no SYN: it never evicts.
    assert t.create(UDP, CLIENT, 6, VIP, 53, a, SVC, 0, 3.0) is not None
    assert t.half_open_evictions == 1


def test_a_full_table_takes_a_syn_in_place_of_a_half_open_session_only() -> None:
    t, _ = table(max_sessions=3)
    (a,) = servers(1)
    established = [t.install(TCP, CLIENT, p, VIP, 80, a, SVC, TcpState.ESTABLISHED, 0.0, 0.0)
                   for p in (1, 2)]
    flood = open_tcp(t, a, 3)
    legit = open_tcp(t, a, 4, now=1.0)  # full: the half-open one makes room
    assert (len(t), t.half_open, t.half_open_evictions, t.full_drops) == (3, 1, 1, 0)
    assert t.lookup(flood.fkey) is None and t.lookup(legit.fkey) is legit
    assert all(t.lookup(s.fkey) is s for s in established if s is not None)
    t.seen_reply(legit, SYNACK, 1.1)
    t.seen_forward(legit, TCP_ACK, 1.1)  # now every session is established
    assert t.create(TCP, CLIENT, 5, VIP, 80, a, SVC, TCP_SYN, 2.0) is None
    assert (t.full_drops, t.half_open) == (1, 0)


def test_half_open_index_follows_every_way_into_and_out_of_syn_recv() -> None:
    t, _ = table()
    (a,) = servers(1)
    s = t.install(TCP, CLIENT, 1, VIP, 80, a, SVC, TcpState.SYN_RECV, 0.0, 0.0)
    assert s is not None and t.half_open == 1
    t.install(TCP, CLIENT, 1, VIP, 80, a, SVC, TcpState.ESTABLISHED, 0.1, 0.1)
    assert t.half_open == 0
    t.seen_reply(s, TCP_RST, 0.2)  # closed; a new SYN on it opens it again
    t.seen_forward(s, TCP_SYN, 0.3)
    assert (s.tcp_state, t.half_open) == (TcpState.SYN_RECV, 1)
    t.remove(s, "reset", 0.4)
    assert t.half_open == 0
    assert t.expire(1000.0) == 0


def test_a_session_back_in_syn_recv_is_the_newest_half_open_session() -> None:
    t, rec = table()
    t.max_half_open = 3
    (a,) = servers(1)
    old, mid = open_tcp(t, a, 1), open_tcp(t, a, 2, now=0.1)
    t.seen_forward(old, TCP_ACK, 0.2)
    t.seen_reply(old, FINACK, 0.3)  # closing; the client's SYN-ACK opens it again
    t.seen_forward(old, SYNACK, 0.4)
    assert (old.tcp_state, t.half_open) == (TcpState.SYN_RECV, 2)
    # The peer's record of a new flow on a reused 5-tuple does the same through install.
    peer = t.install(TCP, CLIENT, 3, VIP, 80, a, SVC, TcpState.TIME_WAIT, 0.5, 0.5)
    assert peer is not None and t.half_open == 2
    t.install(TCP, CLIENT, 3, VIP, 80, a, SVC, TcpState.SYN_RECV, 0.6, 0.6)
    assert t.half_open == 3
    evicted = []
    for port in (4, 5, 6):  # each SYN at the cap evicts the oldest: mid, old, then peer
        open_tcp(t, a, port, now=1.0)
        evicted.append(next(s for kind, s, r in reversed(rec.events) if kind == "removed"))
    assert evicted == [mid, old, peer]
    assert (t.half_open, t.half_open_evictions) == (3, 3)


def test_the_half_open_index_stays_within_twice_the_half_open_sessions() -> None:
    t, _ = table(max_sessions=100_000)
    t.max_half_open = 100
    (a,) = servers(1)
    rng = random.Random(7)
    opened = []
    for port in range(1, 20_001):  # a flood at the cap, with some handshakes completing
        opened.append(open_tcp(t, a, port, now=port * 1e-4))
        if rng.random() < 0.3:
            s = rng.choice(opened[-50:])
            t.seen_forward(s, TCP_ACK, port * 1e-4)
        assert t.half_open_index <= 2 * t.half_open + HALF_OPEN_SLACK
    assert t.half_open == sum(1 for s in t if s.tcp_state is TcpState.SYN_RECV) == 100
    for s in list(t):  # every handshake completes: nothing half-open, the index shrinks
        t.seen_forward(s, TCP_ACK, 3.0)
    assert t.half_open == 0
    assert t.half_open_index <= HALF_OPEN_SLACK


# --- TCP states ------------------------------------------------------------------------------

IN, OUT = "in", "out"
ES, SR, FW, CW = TcpState.ESTABLISHED, TcpState.SYN_RECV, TcpState.FIN_WAIT, TcpState.CLOSE_WAIT
TW, CL = TcpState.TIME_WAIT, TcpState.CLOSE

HANDSHAKE = [(OUT, SYNACK, SR), (IN, TCP_ACK, ES), (IN, PSHACK, ES), (OUT, PSHACK, ES)]
WALKS: list[tuple[str, int, TcpState, list[tuple[str, int, TcpState]]]] = [
    (
        "client closes first",
        TCP_SYN,
        SR,
        [*HANDSHAKE, (IN, FINACK, CW), (OUT, TCP_ACK, CW), (OUT, FINACK, TW), (IN, TCP_ACK, TW)],
    ),
    (
        "server closes first",
        TCP_SYN,
        SR,
        [*HANDSHAKE, (OUT, FINACK, FW), (IN, TCP_ACK, FW), (IN, FINACK, TW), (OUT, TCP_ACK, TW)],
    ),
    ("client resets", TCP_SYN, SR, [*HANDSHAKE, (IN, RSTACK, CL), (OUT, TCP_ACK, CL)]),
    ("server resets", TCP_SYN, SR, [*HANDSHAKE, (OUT, TCP_RST, CL)]),
    ("port closed on the server", TCP_SYN, SR, [(OUT, RSTACK, CL)]),
    ("client RST during handshake ignored", TCP_SYN, SR, [(IN, TCP_RST, SR), (IN, TCP_ACK, ES)]),
    ("server ACK completes handshake", TCP_SYN, SR, [(OUT, TCP_ACK, ES)]),
    ("picked up mid-stream", TCP_ACK, ES, [(OUT, PSHACK, ES), (IN, FINACK, CW)]),
    ("picked up on a FIN", FINACK, CW, [(OUT, FINACK, TW)]),
    ("picked up on a RST", TCP_RST, CL, []),
    ("segment without flags closes", TCP_SYN, SR, [(IN, TCP_ACK, ES), (IN, 0, CL)]),
    ("new SYN on a closing session", TCP_SYN, SR, [(OUT, TCP_RST, CL), (IN, TCP_SYN, SR)]),
    ("SYN on established ignored", TCP_ACK, ES, [(IN, TCP_SYN, ES), (OUT, SYNACK, ES)]),
    ("server SYN on closing ignored", FINACK, CW, [(OUT, TCP_SYN, CW)]),
]


@pytest.mark.parametrize(
    ("first", "initial", "steps"), [w[1:] for w in WALKS], ids=[w[0] for w in WALKS]
)
def test_tcp_state_walk(
    first: int, initial: TcpState, steps: list[tuple[str, int, TcpState]]
) -> None:
    t, rec = table()
    (a,) = servers(1)
    s = t.create(TCP, CLIENT, 40000, VIP, 80, a, SVC, first, 0.0)
    assert s is not None
    assert s.tcp_state is initial
    changes = 0
    for i, (direction, flags, expected) in enumerate(steps, 1):
        before = s.state
        if direction == IN:
            t.seen_forward(s, flags, float(i))
        else:
            t.seen_reply(s, flags, float(i))
        assert s.tcp_state is expected, f"step {i}"
        assert s.last_seen == float(i)
        changes += before != s.state
    assert rec.kinds() == ["added"] + ["changed"] * changes


def test_transition_table_covers_every_state_and_event() -> None:
    for (direction, event), row in TRANSITIONS.items():
        assert direction in {"input", "output"}
        assert event in {"syn", "fin", "ack", "rst", "none"}
        assert len(row) == len(TcpState) - 1
        assert TcpState.NONE not in row
    assert len(TRANSITIONS) == 10


@given(flags=st.integers(0, 255), reply=st.booleans())
def test_udp_has_no_state_machine(flags: int, reply: bool) -> None:
    t, rec = table()
    (a,) = servers(1)
    s = t.create(UDP, CLIENT, 5353, VIP, 53, a, SVC, flags, 0.0)
    assert s is not None
    (t.seen_reply if reply else t.seen_forward)(s, flags, 1.0)
    assert (s.tcp_state, s.last_seen, rec.kinds()) == (TcpState.NONE, 1.0, ["added"])


# --- timeouts --------------------------------------------------------------------------------

TIMEOUTS = SessionTimeouts(
    tcp_syn=60, tcp_established=900, tcp_fin=120, tcp_time_wait=120, tcp_close=10, udp=300
)
PER_STATE = [
    (TcpState.NONE, 300.0),
    (TcpState.SYN_RECV, 60.0),
    (TcpState.ESTABLISHED, 900.0),
    (TcpState.FIN_WAIT, 120.0),
    (TcpState.CLOSE_WAIT, 120.0),
    (TcpState.TIME_WAIT, 120.0),
    (TcpState.CLOSE, 10.0),
    (TcpState.LAST_ACK, 120.0),
]


def test_default_timeouts_are_the_brief() -> None:
    assert SessionTimeouts() == TIMEOUTS
    with pytest.raises(ValueError, match="positive"):
        SessionTimeouts(tcp_close=0)


@pytest.mark.parametrize(("state", "timeout"), PER_STATE, ids=[s.name for s, _ in PER_STATE])
def test_timeout_per_state(state: TcpState, timeout: float) -> None:
    assert TIMEOUTS.timeout(state) == timeout
    t, rec = table(timeouts=TIMEOUTS)
    (a,) = servers(1)
    proto = UDP if state is TcpState.NONE else TCP
    s = t.install(proto, CLIENT, 40000, VIP, 80, a, SVC, state, 100.0, 100.0)
    assert s is not None
    assert t.deadline(s) == 100.0 + timeout
    for now in (100.0, 100.0 + timeout / 2, 100.0 + timeout - 0.01):
        assert t.expire(now) == 0
    assert t.lookup(s.fkey) is s
    assert t.expire(100.0 + timeout) == 1
    assert t.lookup(s.fkey) is None
    assert (a.active, t.expired_total, t.removed_total) == (0, 1, 1)
    assert rec.events[-1] == ("removed", s, "expired")


def test_traffic_defers_expiry() -> None:
    t, _ = table(timeouts=TIMEOUTS)
    (a,) = servers(1)
    s = t.create(TCP, CLIENT, 40000, VIP, 80, a, SVC, TCP_ACK, 0.0)
    assert s is not None
    for now in range(100, 5000, 100):
        t.seen_forward(s, TCP_ACK, float(now))
        assert t.expire(float(now)) == 0
    assert t.expire(4900.0 + 899.0) == 0
    assert t.expire(4900.0 + 900.0) == 1


def test_closing_shortens_the_deadline() -> None:
    t, _ = table(timeouts=TIMEOUTS)
    (a,) = servers(1)
    s = t.create(TCP, CLIENT, 40000, VIP, 80, a, SVC, TCP_ACK, 0.0)  # filed at 900 s
    assert s is not None
    t.seen_reply(s, TCP_RST, 50.0)
    assert t.expire(59.99) == 0
    assert t.expire(60.0) == 1


# --- reuse -----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(TcpState), ids=[s.name for s in TcpState])
def test_is_reusable(state: TcpState) -> None:
    t, _ = table()
    (a,) = servers(1)
    s = t.install(TCP if state else UDP, CLIENT, 1, VIP, 80, a, SVC, state, 0.0, 0.0)
    assert s is not None
    assert t.is_reusable(s) is (state in REUSABLE_STATES)
    closing = {TcpState.FIN_WAIT, TcpState.CLOSE_WAIT, TcpState.TIME_WAIT, TcpState.CLOSE}
    # ESTABLISHED too (a bare SYN there is a new connection on a reused port); not
    # SYN_RECV, where a SYN is the client's retransmission.
    assert closing | {TcpState.LAST_ACK, TcpState.ESTABLISHED} == REUSABLE_STATES


def test_connection_reuse() -> None:
    t, rec = table()
    a, b = servers()
    old = open_tcp(t, a, now=0.0)
    for direction, flags, _ in WALKS[0][3]:
        (t.seen_forward if direction == IN else t.seen_reply)(old, flags, 1.0)
    assert old.tcp_state is TcpState.TIME_WAIT
    # The client reuses its port within a second: the SYN finds the closing session.
    found = t.lookup(flow_key(TCP, CLIENT, 40000, VIP, 80))
    assert found is old
    assert t.is_reusable(found)
    t.remove(found, "reused", 1.5)
    new = t.create(TCP, CLIENT, 40000, VIP, 80, b, SVC, TCP_SYN, 1.5)
    assert new is not None
    assert new is not old
    assert t.lookup(new.fkey) is new
    assert t.lookup_reply(old.rkey) is None
    assert t.lookup_reply(new.rkey) is new
    assert (a.active, b.active, a.created_total, b.created_total) == (0, 1, 1, 1)
    assert rec.events[-2:] == [("removed", old, "reused"), ("added", new, "")]
    # The old session's wheel entry is stale and must not expire the new one.
    assert t.expire(200.0) == 1
    assert t.lookup(new.fkey) is None


# --- events and accounting -------------------------------------------------------------------


def test_refreshes_are_not_events_and_remove_is_idempotent() -> None:
    t, rec = table()
    (a,) = servers(1)
    s = t.create(TCP, CLIENT, 40000, VIP, 80, a, SVC, TCP_ACK, 0.0)
    assert s is not None
    for i in range(100):
        t.seen_forward(s, PSHACK, i * 0.5)
        t.seen_reply(s, TCP_ACK, i * 0.5)
    assert rec.kinds() == ["added"]
    t.remove(s, "reset", 60.0)
    t.remove(s, "reset", 61.0)
    assert rec.kinds() == ["added", "removed"]
    assert (a.active, t.removed_total, len(t), s.in_table) == (0, 1, 0, False)
    t.seen_forward(s, TCP_RST, 62.0)  # a stale reference: no event, no resurrection
    assert rec.kinds() == ["added", "removed"]
    assert t.expire(10_000.0) == 0


def test_sessions_for_server() -> None:
    t, _ = table()
    a, b = servers()
    on_a = [open_tcp(t, a, p) for p in range(1, 6)]
    on_b = [open_tcp(t, b, p) for p in range(6, 9)]
    assert set(t.sessions_for_server(a)) == set(on_a)
    for s in t.sessions_for_server(b):
        t.remove(s, "reset", 1.0)
    assert t.sessions_for_server(b) == []
    assert (a.active, b.active, len(t)) == (5, 0, 5)
    assert all(not s.in_table for s in on_b)


def test_install_creates_updates_and_counts() -> None:
    t, rec = table(max_sessions=1)
    a, b = servers()
    s = t.install(TCP, CLIENT, 1, VIP, 80, a, SVC, TcpState.ESTABLISHED, 10.0, 12.0)
    assert s is not None
    assert (t.installed_total, t.created_total, a.active, a.created_total) == (1, 0, 1, 0)
    # Only last_seen: no event; an older last_seen is ignored.
    assert t.install(TCP, CLIENT, 1, VIP, 80, a, SVC, TcpState.ESTABLISHED, 11.0, 12.0) is s
    assert t.install(TCP, CLIENT, 1, VIP, 80, a, SVC, TcpState.ESTABLISHED, 5.0, 12.0) is s
    assert s.last_seen == 11.0
    assert rec.kinds() == ["added"]
    # State and server change: one event, indices and counts follow.
    old_rkey = s.rkey
    assert t.install(TCP, CLIENT, 1, VIP, 80, b, SVC, TcpState.CLOSE, 11.0, 12.0) is s
    assert (s.tcp_state, s.server, a.active, b.active) == (TcpState.CLOSE, b, 0, 1)
    assert t.lookup_reply(old_rkey) is None
    assert t.lookup_reply(s.rkey) is s
    assert rec.kinds() == ["added", "changed"]
    # The shorter CLOSE timeout is honoured (deadline 21).
    assert t.expire(20.9) == 0
    # Full table: a new one is refused.
    assert t.install(TCP, CLIENT, 2, VIP, 80, a, SVC, TcpState.ESTABLISHED, 12.0, 12.0) is None
    assert t.full_drops == 1
    assert t.expire(21.0) == 1
    with pytest.raises(ValueError, match="TCP session state"):
        t.install(TCP, CLIENT, 3, VIP, 80, a, SVC, TcpState.NONE, 12.0, 12.0)


def test_deadline_inside_a_slot_is_not_anticipated() -> None:
    t, _ = table(tick=0.1, timeouts=TIMEOUTS)
    (a,) = servers(1)
    s = t.create(UDP, CLIENT, 1, VIP, 53, a, SVC, 0, 0.05)  # deadline 300.05, mid-slot
    assert s is not None
    for now in (299.99, 300.0, 300.02, 300.049):
        assert t.expire(now) == 0
    assert t.expire(300.05) == 1


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tick=st.sampled_from([0.1, 0.25, 1.0]))
def test_random_schedule_expires_on_time(seed: int, tick: float) -> None:
    """Random packets at random instants, a sweep at most a tick apart: never early, and
    after each sweep nothing due is left (so never later than deadline + tick)."""
    rng = random.Random(seed)
    now = 0.0

    class Checker(Recorder):
        def session_removed(self, s: Session, reason: str) -> None:
            assert reason == "expired"
            assert t.deadline(s) <= now
            super().session_removed(s, reason)

    rec = Checker()
    t: SessionTable[str] = SessionTable(SMALL, 1000, tick, rec)
    srvs = servers(2)
    for _ in range(400):
        r = rng.random()
        if r < 0.5:
            proto = rng.choice([TCP, UDP])
            cport = rng.randrange(40)
            flags = rng.choice(FLAGS)
            s = t.lookup(flow_key(proto, CLIENT, cport, VIP, 80))
            if s is None:
                t.create(proto, CLIENT, cport, VIP, 80, rng.choice(srvs), SVC, flags, now)
            elif rng.random() < 0.5:
                t.seen_forward(s, flags, now)
            else:
                t.seen_reply(s, flags, now)
        else:
            now += rng.uniform(0.0, tick) + rng.choice([0.0, 0.0, 0.0, 0.0, 4.0])
            t.expire(now, budget=10**9)
            assert all(t.deadline(s) > now for s in t)
        assert sum(srv.active for srv in srvs) == len(t) == len(rec.live)


def test_expire_budget_bounds_the_work() -> None:
    t, _ = table(max_sessions=1000, timeouts=TIMEOUTS)
    (a,) = servers(1)
    for p in range(50):
        t.create(UDP, CLIENT, p, VIP, 53, a, SVC, 0, p * 0.01)
    calls = []
    while len(t):
        n = t.expire(1000.0, budget=7)
        assert 0 < n <= 7
        calls.append(n)
    assert sum(calls) == 50
    assert len(calls) == 8
    assert a.active == 0


def test_a_long_gap_between_sweeps() -> None:
    t, _ = table(timeouts=TIMEOUTS)
    (a,) = servers(1)
    t.expire(1e6)  # a monotonic clock starts far from zero
    s = t.create(UDP, CLIENT, 1, VIP, 53, a, SVC, 0, 1e6)
    assert s is not None
    assert t.expire(1e6 + 299.0) == 0
    assert t.expire(1e6 + 300.0) == 1


def test_binding_is_attached_and_released() -> None:
    t, _ = table()
    (a,) = servers(1)
    p: PersistenceTable[str] = PersistenceTable()
    b = p.bind(SVC, CLIENT, a, 60.0, 0.0)
    s1 = t.create(TCP, CLIENT, 1, VIP, 80, a, SVC, TCP_SYN, 1.0, b)
    s2 = t.create(TCP, CLIENT, 2, VIP, 80, a, SVC, TCP_SYN, 2.0, b)
    assert s1 is not None
    assert s2 is not None
    assert (b.refs, b.last_used, s1.binding) == (2, 2.0, b)
    t.remove(s1, "reset", 3.0)
    assert b.refs == 1
    t.expire(100.0)  # s2 expires (SYN_RECV, 60 s): the binding idles from then
    assert (b.refs, b.idle_since) == (0, 100.0)
    assert p.lookup(SVC, CLIENT, 159.9) is b
    assert p.lookup(SVC, CLIENT, 160.0) is None


# --- a random model --------------------------------------------------------------------------

SMALL = SessionTimeouts(
    tcp_syn=1.0, tcp_established=5.0, tcp_fin=2.0, tcp_time_wait=2.0, tcp_close=0.5, udp=3.0
)
FLAGS = [TCP_SYN, SYNACK, TCP_ACK, PSHACK, FINACK, TCP_RST, RSTACK, 0]


class SessionModel(RuleBasedStateMachine):
    """Random packets, removals, reuse and sweeps against a float clock.

    Checked: no session is removed before its deadline; after each sweep at ``now`` no live
    session has a deadline ``<= now`` (so with a sweep every tick nothing lives past deadline
    + tick); server.active matches the table; the observer saw each mutation exactly once;
    every per-source count equals the open sessions that hold it, however sessions left
    (expiry, reset, reuse, half-open eviction, a close), so each was given back exactly once.
    """

    TICK = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.rec = Recorder()
        self.now = 0.0
        self.table: SessionTable[str] = SessionTable(SMALL, 40, self.TICK, self,
                                                     max_half_open=6)
        self.servers = servers(3)
        self.changes = 0
        self.limits = SourceLimits(max_conns=8, max_rate=1000)
        self.counted: set[int] = set()  # ids of the entries handed to create()

    # observer: check "never early" at the moment of removal, then record
    def session_added(self, s: Session) -> None:
        self.rec.session_added(s)

    def session_changed(self, s: Session) -> None:
        self.changes += 1
        self.rec.session_changed(s)

    def session_removed(self, s: Session, reason: str) -> None:
        if reason == "expired":
            assert self.table.deadline(s) <= self.now
        assert s.source is None  # its count was given back before anyone hears of it
        self.rec.session_removed(s, reason)

    @rule(
        proto=st.sampled_from([TCP, TCP, UDP]),
        cport=st.integers(1, 30),
        server=st.integers(0, 2),
        flags=st.sampled_from(FLAGS),
    )
    def client_packet(self, proto: int, cport: int, server: int, flags: int) -> None:
        t = self.table
        s = t.lookup(flow_key(proto, CLIENT, cport, VIP, 80))
        if s is not None and flags & TCP_SYN and t.is_reusable(s):
            t.remove(s, "reused", self.now)
            s = None
        if s is None:
            before = (len(t), t.full_drops, t.half_open, t.half_open_evictions)
            source = t.sources.admit(source_key(1, cport % 3), self.limits, self.now)
            if isinstance(source, str):  # the source's limit: no session
                return
            s = t.create(proto, CLIENT, cport, VIP, 80, self.servers[server], SVC, flags,
                         self.now, source=source)
            if s is None:  # a full table, and no half-open session a SYN could replace
                assert before[0] == 40
                assert not (proto == TCP and flags & TCP_SYN and before[2])
                assert t.full_drops == before[1] + 1
            elif t.half_open_evictions > before[3]:
                assert before[2] == 6 or before[0] == 40
        else:
            t.seen_forward(s, flags, self.now)

    @precondition(lambda self: len(self.table) > 0)
    @rule(data=st.data(), flags=st.sampled_from(FLAGS))
    def server_packet(self, data: st.DataObject, flags: int) -> None:
        s = data.draw(st.sampled_from(sorted(self.table, key=lambda x: x.fkey)))
        found = self.table.lookup_reply(s.rkey)
        assert found is s
        self.table.seen_reply(s, flags, self.now)

    @precondition(lambda self: len(self.table) > 0)
    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(sorted(self.table, key=lambda x: x.fkey)))
        self.table.remove(s, "reset", self.now)

    @rule(
        dt=st.floats(0.0, TICK) | st.sampled_from([0.013, 0.037, 0.071]),
        jump=st.sampled_from([0.0, 0.0, 0.0, 0.0, 3.7, 50.0]),
    )
    def tick(self, dt: float, jump: float) -> None:
        self.now += dt + jump
        self.table.expire(self.now, budget=10**9)
        for s in self.table:
            assert self.table.deadline(s) > self.now

    @invariant()
    def accounting(self) -> None:
        t = self.table
        assert self.rec.live == {s.fkey: s for s in t}
        assert len(t) == len(self.rec.live)
        for srv in self.servers:
            assert srv.active == sum(1 for s in t if s.server is srv)
            assert srv.active <= srv.created_total
        assert t.created_total == sum(srv.created_total for srv in self.servers)
        assert t.removed_total == self.rec.kinds().count("removed")
        assert t.expired_total == sum(1 for e in self.rec.events if e[2] == "expired")
        assert self.changes == self.rec.kinds().count("changed")
        for s in t:
            assert t.lookup(s.fkey) is s
            assert t.lookup_reply(s.rkey) is s
        assert t.half_open == sum(1 for s in t if s.tcp_state is TcpState.SYN_RECV) <= 6
        assert t.half_open_evictions == sum(1 for e in self.rec.events
                                            if e[2] == "half_open_evicted")
        holders: dict[int, list[Session]] = {}
        for s in t:
            if s.source is not None:
                assert not t.is_closing(s)  # a closing session no longer counts
                holders.setdefault(s.source.key, []).append(s)
        for key, held in holders.items():
            entry = t.sources.get(key)
            assert isinstance(entry, SourceEntry)
            assert all(s.source is entry for s in held)
            assert entry.conns == len(held) <= self.limits.max_conns
        assert len(t.sources) - t.sources.idle == len(holders)  # no count left behind


SessionModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestSessionModel = SessionModel.TestCase


class HalfOpenModel(RuleBasedStateMachine):
    """Random ways into and out of SYN_RECV against a reference list of the half-open
    sessions in the order they entered it.

    Checked: ``half_open`` is exact; an eviction takes the reference's oldest session, a
    session in SYN_RECV and in the table (so never one already removed, nor twice); every
    other session stays; the index holds at most ``2 * half_open + HALF_OPEN_SLACK`` entries.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rec = Recorder()
        self.now = 0.0
        self.table: SessionTable[str] = SessionTable(SMALL, 8, 0.1, self.rec, max_half_open=3)
        self.servers = servers(2)
        self.order: list[Session] = []  # the reference: half-open, oldest first

    def _run(self, op: Callable[[], object]) -> None:
        t = self.table
        oldest = self.order[0] if self.order else None
        seen = len(self.rec.events)
        evictions = t.half_open_evictions
        op()
        evicted = [s for kind, s, r in self.rec.events[seen:]
                   if kind == "removed" and r == "half_open_evicted"]
        assert len(evicted) == t.half_open_evictions - evictions <= 1
        if evicted:
            assert evicted[0] is oldest
        live = {id(s) for s in t if s.state == TcpState.SYN_RECV}
        known = {id(s) for s in self.order}
        self.order = [s for s in self.order if id(s) in live]
        self.order += [s for s in t if id(s) in live and id(s) not in known]  # at most one

    def _find(self, cport: int) -> Session | None:
        return self.table.lookup(flow_key(TCP, CLIENT, cport, VIP, 80))

    @rule(cport=st.integers(1, 10), server=st.integers(0, 1),
          flags=st.sampled_from([TCP_SYN, TCP_SYN, TCP_SYN, SYNACK, TCP_ACK]))
    def client_packet(self, cport: int, server: int, flags: int) -> None:
        s = self._find(cport)
        if s is None:
            srv = self.servers[server]
            self._run(lambda: self.table.create(TCP, CLIENT, cport, VIP, 80, srv, SVC,
                                                flags, self.now))
        else:
            self._run(lambda: self.table.seen_forward(s, flags, self.now))

    @rule(cport=st.integers(1, 10), flags=st.sampled_from([SYNACK, TCP_ACK, FINACK, RSTACK]))
    def server_packet(self, cport: int, flags: int) -> None:
        s = self._find(cport)
        if s is not None:
            self._run(lambda: self.table.seen_reply(s, flags, self.now))

    @rule(cport=st.integers(1, 10), server=st.integers(0, 1),
          state=st.sampled_from([TcpState.SYN_RECV, TcpState.ESTABLISHED,
                                 TcpState.TIME_WAIT, TcpState.CLOSE]))
    def peer_record(self, cport: int, server: int, state: TcpState) -> None:
        srv = self.servers[server]
        self._run(lambda: self.table.install(TCP, CLIENT, cport, VIP, 80, srv, SVC, state,
                                             self.now, self.now))

    @rule(cport=st.integers(1, 10))
    def removed(self, cport: int) -> None:
        s = self._find(cport)
        if s is not None:
            self._run(lambda: self.table.remove(s, "reset", self.now))

    @rule(dt=st.sampled_from([0.05, 0.05, 0.2, 0.7, 2.5]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._run(lambda: self.table.expire(self.now, budget=10**9))

    @invariant()
    def exact_and_bounded(self) -> None:
        t = self.table
        assert t.half_open == len(self.order)
        assert t.half_open == sum(1 for s in t if s.state == TcpState.SYN_RECV)
        assert t.half_open_index <= 2 * t.half_open + HALF_OPEN_SLACK
        assert self.rec.live == {s.fkey: s for s in t}


HalfOpenModel.TestCase.settings = settings(max_examples=300, stateful_step_count=100,
                                           deadline=None)
TestHalfOpenModel = HalfOpenModel.TestCase


# --- memory ----------------------------------------------------------------------------------


def test_memory_per_session_with_a_million_sessions() -> None:
    n = 1_000_000
    srvs = servers(4)
    t: SessionTable[str] = SessionTable(SessionTimeouts(), n, max_half_open=n)  # all half-open
    args = [(CLIENT + (i >> 16), i & 0xFFFF, srvs[i & 3]) for i in range(n)]
    first = 16_666_667  # * 6e-5 = 1000.00002 s; the ints exist before tracing, not the floats
    stamps = list(range(first, first + n))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        # One distinct float per session, as last_seen would be after real traffic: the
        # sessions arrive over one minute, from t = 1000 s.
        clock = [k * 6e-5 for k in stamps]
        create = t.create
        for (caddr, cport, srv), now in zip(args, clock, strict=True):
            create(TCP, caddr, cport, VIP, 80, srv, SVC, TCP_SYN, now)
        del clock  # the floats stay alive in the sessions; the list itself is not theirs
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        if gc_was_enabled:
            gc.enable()
    assert len(t) == n
    per_session = used / n
    print(f"\n{per_session:.1f} bytes per session with {n} sessions")
    assert per_session <= (300 if native.status().modules else 320)  # issue 10: 285 and 301 B


# --- per-source counts ---------------------------------------------------------------------

LIMITS = SourceLimits(max_conns=10)
KEY = source_key(1, CLIENT)


def _counted(t: SessionTable[str], srv: RealServer, cport: int, now: float = 0.0,
             flags: int = TCP_SYN) -> Session:
    source = t.sources.admit(KEY, LIMITS, now)
    assert isinstance(source, SourceEntry)
    s = t.create(TCP, CLIENT, cport, VIP, 80, srv, SVC, flags, now, source=source)
    assert s is not None
    return s


def _out_by_expiry(t: SessionTable[str], s: Session) -> None:
    t.expire(t.deadline(s) + 1, budget=10**6)


def _out_by_rst(t: SessionTable[str], s: Session) -> None:
    t.seen_forward(s, TCP_ACK, 0.5)  # (a client's RST in SYN_RECV leaves it there, as IPVS)
    t.seen_forward(s, TCP_RST, 1.0)


def _out_by_fin(t: SessionTable[str], s: Session) -> None:
    t.seen_forward(s, TCP_ACK, 0.5)
    t.seen_reply(s, FINACK, 1.0)


def _out_by_server_rst(t: SessionTable[str], s: Session) -> None:
    t.seen_reply(s, RSTACK, 1.0)


def _out_by_eviction(t: SessionTable[str], s: Session) -> None:
    for port in range(2, 6):  # max_half_open is 2 below: the oldest (s) goes first
        t.create(TCP, CLIENT + 1, port, VIP, 80, s.server, SVC, TCP_SYN, 1.0)


def _out_by_remove(t: SessionTable[str], s: Session) -> None:
    t.remove(s, "killed", 1.0)  # lbctl kill-sessions, reset on server down, reuse
    t.remove(s, "killed", 1.0)  # idempotent: nothing given back twice


def _out_by_peer_sweep(t: SessionTable[str], s: Session) -> None:
    t.remove(s, "peer", 1.0)  # a peer's snapshot that did not carry it


@pytest.mark.parametrize("leave", [_out_by_expiry, _out_by_rst, _out_by_fin,
                                   _out_by_server_rst, _out_by_eviction, _out_by_remove,
                                   _out_by_peer_sweep],
                         ids=lambda f: f.__name__.removeprefix("_out_by_"))
def test_a_session_gives_its_source_count_back_once_however_it_goes(
        leave: Callable[[SessionTable[str], Session], None]) -> None:
    t: SessionTable[str] = SessionTable(SessionTimeouts(), 100, max_half_open=2)
    srv = servers(1)[0]
    keep = _counted(t, srv, 1)
    t.seen_forward(keep, TCP_ACK, 0.0)  # established: stays through what happens to s
    s = _counted(t, srv, 2)
    entry = t.sources.get(KEY)
    assert entry is not None and entry.conns == 2
    leave(t, s)
    assert s.source is None and keep.source is entry
    assert entry.conns == 1
    t.remove(s, "again", 2.0)
    t.remove(keep, "done", 2.0)
    assert entry.conns == 0 and t.sources.get(KEY) is None  # forgotten: nothing to recall


def test_copies_from_the_peer_and_pick_ups_do_not_count() -> None:
    t: SessionTable[str] = SessionTable(SessionTimeouts(), 100)
    srv = servers(1)[0]
    copy = t.install(TCP, CLIENT, 1, VIP, 80, srv, SVC, int(TcpState.ESTABLISHED), 0.0, 0.0)
    assert copy is not None and copy.source is None
    picked = _counted(t, srv, 2, flags=FINACK)  # mid-stream with a FIN: not an open session
    assert picked.source is None and len(t.sources) == 0


def test_a_refused_create_gives_the_count_back() -> None:
    t: SessionTable[str] = SessionTable(SessionTimeouts(), 1)
    srv = servers(1)[0]
    t.install(TCP, CLIENT, 9, VIP, 80, srv, SVC, int(TcpState.ESTABLISHED), 0.0, 0.0)
    source = t.sources.admit(KEY, LIMITS, 0.0)
    assert isinstance(source, SourceEntry)
    assert t.create(TCP, CLIENT, 1, VIP, 80, srv, SVC, TCP_SYN, 0.0, source=source) is None
    assert source.conns == 0 and t.sources.get(KEY) is None
