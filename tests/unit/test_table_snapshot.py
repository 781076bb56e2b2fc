"""Table snapshot codec: roundtrip, every truncation and flipped byte refused whole, other
version / magic / config refused, expiry across the downtime, remaining time from the age."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.addr import ip_to_int
from lb.persistence import PersistenceTable
from lb.servers import RealServer
from lb.sessions import IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, SessionTable, SessionTimeouts
from lb.table_snapshot import (
    CHECKSUM_SIZE,
    HEADER_SIZE,
    LoadError,
    LoadErrorReason,
    Restored,
    SnapshotWriter,
    decode,
    encode,
)

DIGEST = bytes(range(16))
OTHER_DIGEST = bytes(16)
TIMEOUTS = SessionTimeouts()
WALL = 1_800_000_000.0  # wall clock at writing
MONO = 5000.0  # the tables' monotonic clock at writing
VIP = ip_to_int("198.51.100.10")
S1 = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
S2 = RealServer("web", ip_to_int("198.18.0.12"), 8080, 1)


@dataclass(frozen=True)
class Svc:
    proto: int
    vaddr: int
    vport: int


WEB = Svc(IPPROTO_TCP, VIP, 80)
DNS = Svc(IPPROTO_UDP, VIP, 53)


def tables() -> tuple[SessionTable[Svc], PersistenceTable[Svc]]:
    return SessionTable(TIMEOUTS, 1 << 20), PersistenceTable()


def sample() -> tuple[SessionTable[Svc], PersistenceTable[Svc]]:
    """An established TCP session bound to S1 (10 s idle), a UDP one (100 s idle), an idle
    binding (200 s), a SYN_RECV session (50 s idle)."""
    sessions, pers = tables()
    b1 = pers.bind(WEB, ip_to_int("198.51.100.100"), S1, 600.0, MONO - 10)
    pers.bind(WEB, ip_to_int("198.51.100.101"), S2, 600.0, MONO - 200)
    sessions.create(IPPROTO_TCP, ip_to_int("198.51.100.100"), 40000, VIP, 80, S1, WEB,
                    TCP_ACK, MONO - 10, b1)
    sessions.create(IPPROTO_UDP, ip_to_int("198.51.100.102"), 5000, VIP, 53, S2, DNS, 0,
                    MONO - 100)
    sessions.create(IPPROTO_TCP, ip_to_int("198.51.100.103"), 40001, VIP, 80, S2, WEB,
                    TCP_SYN, MONO - 50)
    return sessions, pers


def snapshot_bytes() -> bytes:
    sessions, pers = sample()
    return encode(DIGEST, WALL, MONO, pers, sessions)


def restored(data: bytes, now: float = WALL, digest: bytes = DIGEST) -> Restored:
    out = decode(data, digest, now, TIMEOUTS)
    assert isinstance(out, Restored), out
    return out


def test_roundtrip_of_a_small_table() -> None:
    out = restored(snapshot_bytes(), now=WALL + 5)
    assert out.age == 5 and out.expired_sessions == 0 and out.expired_bindings == 0
    assert [(b.raddr, b.rport, b.in_use, b.timeout) for b in out.bindings] == [
        (S1.addr, 8080, True, 600.0), (S2.addr, 8080, False, 600.0)]
    assert out.bindings[0].idle == 5  # in use at writing: idle from the write on
    assert out.bindings[1].idle == 205 and out.bindings[1].remaining == 395
    tcp, udp, syn = out.sessions
    assert (tcp.proto, tcp.caddr, tcp.cport, tcp.vaddr, tcp.vport) == (
        IPPROTO_TCP, ip_to_int("198.51.100.100"), 40000, VIP, 80)
    assert (tcp.raddr, tcp.rport, tcp.state, tcp.binding) == (S1.addr, 8080, 2, 0)
    assert tcp.idle == 15 and tcp.remaining == 900 - 15
    assert (udp.state, udp.binding, udp.idle, udp.remaining) == (0, None, 105, 300 - 105)
    assert (syn.state, syn.idle, syn.remaining) == (1, 55, 5)


def test_entries_whose_timeout_passed_while_down_are_skipped_and_counted() -> None:
    data = snapshot_bytes()
    out = restored(data, now=WALL + 10)  # SYN_RECV: 50 s idle + 10 s down = its 60 s timeout
    assert [s.state for s in out.sessions] == [2, 0] and out.expired_sessions == 1
    out = restored(data, now=WALL + 400)  # the idle binding (200 + 400 s) expired too
    assert [s.state for s in out.sessions] == [2] and out.expired_sessions == 2
    assert out.expired_bindings == 1 and [b.raddr for b in out.bindings] == [S1.addr]
    assert out.sessions[0].binding == 0


def test_a_binding_in_use_survives_its_timeout_while_its_session_does() -> None:
    out = restored(snapshot_bytes(), now=WALL + 700)
    (tcp,) = out.sessions
    (b,) = out.bindings
    assert tcp.binding == 0 and b.in_use and b.remaining < 0
    assert out.expired_bindings == 1  # the idle one


def test_bindings_are_renumbered_when_an_earlier_one_expired() -> None:
    sessions, pers = tables()
    pers.bind(WEB, 1, S2, 60.0, MONO - 50)  # expires while down
    b = pers.bind(WEB, ip_to_int("198.51.100.100"), S1, 600.0, MONO)
    sessions.create(IPPROTO_TCP, ip_to_int("198.51.100.100"), 1, VIP, 80, S1, WEB, TCP_ACK,
                    MONO, b)
    out = restored(encode(DIGEST, WALL, MONO, pers, sessions), now=WALL + 30)
    assert [x.raddr for x in out.bindings] == [S1.addr] and out.sessions[0].binding == 0


def test_everything_expires_after_a_long_downtime() -> None:
    out = restored(snapshot_bytes(), now=WALL + 10_000)
    assert out.sessions == [] and out.bindings == []
    assert (out.expired_sessions, out.expired_bindings) == (3, 2)


def test_a_clock_that_went_back_counts_as_no_downtime() -> None:
    out = restored(snapshot_bytes(), now=WALL - 3600)
    assert out.age == 0 and len(out.sessions) == 3


def test_removed_entries_are_left_out() -> None:
    sessions, pers = sample()
    gone = next(iter(sessions))
    sessions.remove(gone, "test", MONO)
    w = SnapshotWriter(DIGEST, WALL, MONO)
    w.add_bindings(pers)
    w.add_sessions([gone, *sessions])  # a chunk taken before the removal
    out = restored(b"".join(w.finish()))
    assert len(out.sessions) == 2 and w.sessions == 2


def test_chunks_make_the_same_file_as_one_call() -> None:
    sessions, pers = sample()
    w = SnapshotWriter(DIGEST, WALL, MONO)
    w.add_bindings(pers)
    items = list(sessions)
    for i in range(len(items)):
        w.add_sessions(items[i : i + 1])
    assert b"".join(w.finish()) == encode(DIGEST, WALL, MONO, pers, sessions)


def test_bindings_come_first_in_chunks_each_once() -> None:
    sessions, pers = sample()
    w = SnapshotWriter(DIGEST, WALL, MONO)
    bindings = list(pers)
    w.add_bindings(bindings[:1])
    w.add_bindings(bindings)  # the first one again: written once
    w.add_sessions(sessions)
    assert w.bindings == 2
    assert b"".join(w.finish()) == encode(DIGEST, WALL, MONO, pers, sessions)
    with pytest.raises(ValueError, match="before the sessions"):
        w.add_bindings([])


def test_an_empty_table_roundtrips() -> None:
    sessions, pers = tables()
    data = encode(DIGEST, WALL, MONO, pers, sessions)
    assert len(data) == HEADER_SIZE + CHECKSUM_SIZE
    out = restored(data)
    assert out.sessions == [] and out.bindings == []


def test_truncated_at_every_length_is_refused_whole() -> None:
    data = snapshot_bytes()
    for n in range(len(data)):
        out = decode(data[:n], DIGEST, WALL, TIMEOUTS)
        assert isinstance(out, LoadError), n
        assert out.reason in (LoadErrorReason.TRUNCATED, LoadErrorReason.MAGIC), (n, out)
        if n >= 4:
            assert out.reason is LoadErrorReason.TRUNCATED
    extra = decode(data + b"\0", DIGEST, WALL, TIMEOUTS)
    assert isinstance(extra, LoadError) and extra.reason is LoadErrorReason.TRUNCATED


def test_a_flipped_byte_anywhere_is_refused() -> None:
    data = snapshot_bytes()
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            out = decode(bytes(bad), DIGEST, WALL, TIMEOUTS)
            assert isinstance(out, LoadError), (i, bit)
            if i >= 8:  # past magic and version: counts (length) or the checksum says it
                assert out.reason in (LoadErrorReason.CHECKSUM, LoadErrorReason.TRUNCATED)
    bad = bytearray(data)
    bad[HEADER_SIZE + 3] ^= 1
    out = decode(bytes(bad), DIGEST, WALL, TIMEOUTS)
    assert isinstance(out, LoadError) and out.reason is LoadErrorReason.CHECKSUM


def _rehash(data: bytes) -> bytes:
    """``data`` with its checksum recomputed (a file altered on purpose, not by accident)."""
    import hashlib

    body = data[:-CHECKSUM_SIZE]
    h = hashlib.blake2b(body, digest_size=CHECKSUM_SIZE, person=b"lbd-tables")
    return body + h.digest()


@pytest.mark.parametrize(("offset", "value", "reason"), [
    (0, b"XBDT", LoadErrorReason.MAGIC),
    (4, struct.pack("!H", 2), LoadErrorReason.VERSION),
    (4, struct.pack("!H", 0), LoadErrorReason.VERSION),
    (6, struct.pack("!H", 1), LoadErrorReason.VALUE),
])
def test_header_fields_are_checked(offset: int, value: bytes, reason: LoadErrorReason) -> None:
    bad = bytearray(snapshot_bytes())
    bad[offset : offset + len(value)] = value
    out = decode(_rehash(bytes(bad)), DIGEST, WALL, TIMEOUTS)
    assert isinstance(out, LoadError) and out.reason is reason, out


def test_another_configs_file_is_refused() -> None:
    out = decode(snapshot_bytes(), OTHER_DIGEST, WALL, TIMEOUTS)
    assert isinstance(out, LoadError) and out.reason is LoadErrorReason.CONFIG
    assert DIGEST.hex() in out.detail


def test_garbage_is_not_a_snapshot() -> None:
    for data in (b"", b"{}", b"hello world" * 10):
        out = decode(data, DIGEST, WALL, TIMEOUTS)
        assert isinstance(out, LoadError)
        assert out.reason in (LoadErrorReason.MAGIC, LoadErrorReason.TRUNCATED)


@pytest.mark.parametrize(("field_offset", "value", "what"), [
    (19, b"\x00", "a TCP session in state 0"),
    (19, b"\x09", "state 9"),
    (24, b"\x00\x00\x00\x07", "a binding index past the bindings"),
])
def test_out_of_range_session_values_are_refused(field_offset: int, value: bytes,
                                                 what: str) -> None:
    data = snapshot_bytes()
    first = HEADER_SIZE + 2 * 26  # the first session record (the TCP one)
    bad = bytearray(data)
    bad[first + field_offset : first + field_offset + len(value)] = value
    out = decode(_rehash(bytes(bad)), DIGEST, WALL, TIMEOUTS)
    assert isinstance(out, LoadError) and out.reason is LoadErrorReason.VALUE, what


def test_a_udp_session_with_a_tcp_state_is_refused() -> None:
    data = snapshot_bytes()
    second = HEADER_SIZE + 2 * 26 + 28  # the UDP session
    bad = bytearray(data)
    bad[second + 19] = 2
    out = decode(_rehash(bytes(bad)), DIGEST, WALL, TIMEOUTS)
    assert isinstance(out, LoadError) and out.reason is LoadErrorReason.VALUE


def test_a_bindings_reserved_flags_are_refused() -> None:
    bad = bytearray(snapshot_bytes())
    bad[HEADER_SIZE + 25] |= 0x02
    out = decode(_rehash(bytes(bad)), DIGEST, WALL, TIMEOUTS)
    assert isinstance(out, LoadError) and out.reason is LoadErrorReason.VALUE


flows = st.lists(
    st.tuples(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP]), st.integers(0, 2**32 - 1),
              st.integers(1, 65535), st.integers(1, 65535), st.sampled_from([S1, S2]),
              st.integers(1, 7), st.floats(0, 5000), st.booleans()),
    # Unique by the client's key and by the reply's: two flows of one client ip:port to one
    # real server are ambiguous for NAT, and the table refuses the second (install: None).
    max_size=40, unique_by=(lambda f: (f[0], f[1], f[2], f[3]),
                            lambda f: (f[0], f[1], f[2], f[4].addr, f[4].port)))


@settings(max_examples=200, deadline=None)
@given(flows, st.floats(0, 1000))
def test_roundtrip_property(items: list[tuple[int, int, int, int, RealServer, int, float, bool]],
                            down: float) -> None:
    """Every entry comes back with its fields, its idle age plus the downtime (to the
    millisecond), or is counted as expired; no entry is lost or invented."""
    sessions, pers = tables()
    services = {IPPROTO_TCP: Svc(IPPROTO_TCP, VIP, 80), IPPROTO_UDP: Svc(IPPROTO_UDP, VIP, 53)}
    for proto, caddr, cport, vport, server, state, idle, bound in items:
        svc = Svc(proto, VIP, vport)
        services[proto] = svc
        b = pers.bind(svc, caddr, server, 600.0, MONO - idle) if bound else None
        s = sessions.install(proto, caddr, cport, VIP, vport, server, svc, state, MONO - idle,
                             MONO, b)
        assert s is not None
    data = encode(DIGEST, WALL, MONO, pers, sessions)
    out = restored(data, now=WALL + down)
    assert len(out.sessions) + out.expired_sessions == len(sessions)
    assert len(out.bindings) + out.expired_bindings == len(pers)
    want = {}
    for s in sessions:
        idle = MONO - s.last_seen + down
        if TIMEOUTS.timeout(s.state) - idle > 0.002:
            want[(s.proto, s.caddr, s.cport, s.vaddr, s.vport)] = (s.raddr, s.rport, s.state,
                                                                   idle, s.binding)
    got = {(s.proto, s.caddr, s.cport, s.vaddr, s.vport): s for s in out.sessions}
    assert want.keys() <= got.keys()
    for key, (raddr, rport, state, idle, binding) in want.items():
        r = got[key]
        assert (r.raddr, r.rport, r.state) == (raddr, rport, state)
        assert abs(r.idle - idle) < 0.002
        assert abs(r.remaining - (TIMEOUTS.timeout(state) - r.idle)) < 1e-9
        if binding is None:
            assert r.binding is None
        else:
            assert r.binding is not None
            rb = out.bindings[r.binding]
            assert (rb.client_net, rb.raddr, rb.rport) == (binding.client_net,
                                                           binding.server.addr,
                                                           binding.server.port)
