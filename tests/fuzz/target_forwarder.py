"""Fuzz target: TUN frames (virtio-net header + IPv4/TCP/UDP/ICMP) through ``Forwarder.handle``.

Input: one setup byte, then frames as :func:`tests.fuzz.wire.split` records, fed in order to
one fresh forwarder that already holds three sessions (a TCP flow answered by its server, a
UDP flow, a TCP flow through a second virtual server on the same pool). The setup byte's bits
turn on client-ip persistence, a table with no room left, a server down, all servers down.

Invariants, per frame:

- no exception; the verdict is DROP, FORWARD or SEND; the buffer keeps its size and nothing
  past ``end`` is written;
- DROP and SEND leave the tables alone (session count, persistence bindings and where they
  point, every server's and virtual server's ``active``) and add exactly one to the drops;
- FORWARD adds no drop, the rewritten packet still parses as the same protocol, and checksums
  that were right stay right (IPv4 header; TCP/UDP complete or NEEDS_CSUM partial; ICMP);
- SEND's output is a 10-byte zero vnet header and a well-formed RST with valid checksums,
  addressed back to the sender.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from hypothesis import strategies as st

from lb import packet as pk
from lb.addr import ip_to_int
from lb.config import Config, parse_config
from lb.forwarder import DROP, FORWARD, SEND, Forwarder, ServiceCounts
from lb.persistence import PersistenceTable
from lb.services import Service, build_services
from lb.sessions import SessionTable, SessionTimeouts
from tests.fuzz import wire
from tests.fuzz.targets import Target

VIP = ip_to_int("198.51.100.10")
CLIENT = ip_to_int("198.51.100.77")
S1, S2 = ip_to_int("198.18.0.11"), ip_to_int("198.18.0.12")
HTTP, DNS = 8080, 5353
PRESET = 3
"""Sessions every world starts with."""

F_PERSIST, F_FULL, F_S1_DOWN, F_ALL_DOWN = 1, 2, 4, 8

BUF_SIZE = 2048
SENTINEL = 0xA5
T0 = 1000.0


@functools.cache
def _config(flags: int) -> Config:
    def pool(port: int) -> list[dict[str, Any]]:
        return [{"address": "198.18.0.11", "port": port}, {"address": "198.18.0.12", "port": port}]

    persistence = "client-ip" if flags & F_PERSIST else "none"
    return parse_config({
        "node": {"name": "fuzz"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "sessions": {"max_sessions": PRESET if flags & F_FULL else 64},
        "virtual_servers": {
            "web": {"address": "198.51.100.10", "port": 80, "pool": "web", "scheduler": "rr",
                    "persistence": persistence, "persistence_netmask": 24},
            "alt": {"address": "198.51.100.10", "port": 81, "pool": "web", "scheduler": "rr",
                    "persistence": persistence},
            "dns": {"address": "198.51.100.10", "port": 53, "protocol": "udp", "pool": "dns",
                    "scheduler": "rr"},
        },
        "pools": {"web": {"servers": pool(HTTP)}, "dns": {"servers": pool(DNS)}},
    }, "fuzz")


def _frame(packet: bytes, vnet: bytes = pk.VNET_HDR_NONE) -> bytes:
    return vnet + packet


PRESET_FRAMES = (
    _frame(wire.ip_tcp(CLIENT, VIP, 40000, 80, pk.SYN)),  # → S1 (rr)
    _frame(wire.ip_tcp(S1, CLIENT, HTTP, 40000, pk.SYN | pk.ACK, seq=5000, ack=1001)),
    _frame(wire.ip_udp(CLIENT, VIP, 40001, 53)),  # → S1
    _frame(wire.ip_tcp(CLIENT, VIP, 40002, 81, pk.SYN)),  # → S1 (each service has its rr)
    # The clients' ACKs: both TCP sessions established, so that a full table refuses a new
    # SYN (a half-open one would give it its place: SessionTable.max_half_open).
    _frame(wire.ip_tcp(CLIENT, VIP, 40000, 80, pk.ACK, seq=1001, ack=5001)),
    _frame(wire.ip_tcp(CLIENT, VIP, 40002, 81, pk.ACK, seq=1001, ack=1)),
)


def make_forwarder(flags: int) -> Forwarder:
    """A fresh forwarder with the preset sessions, then the setup byte's server states."""
    cfg = _config(flags & 0x0F)
    services = build_services(cfg)
    sessions: SessionTable[Service] = SessionTable(
        SessionTimeouts(), cfg.sessions.max_sessions, tick=0.1, observer=ServiceCounts(),
        max_half_open=cfg.sessions.max_sessions)
    persistence: PersistenceTable[Service] = PersistenceTable()
    fwd = Forwarder(services, sessions, persistence)
    buf = bytearray(BUF_SIZE)
    for frame in PRESET_FRAMES:
        buf[: len(frame)] = frame
        fwd.handle(buf, len(frame), T0)
    assert len(sessions) == PRESET, "preset sessions were not created"
    for pool in services.pools.values():
        for srv in pool.servers:
            srv.up = not (flags & F_ALL_DOWN or (flags & F_S1_DOWN and srv.addr == S1))
        pool.refresh()
    return fwd


def _tables(fwd: Forwarder) -> tuple[object, ...]:
    return (
        len(fwd.sessions),
        tuple((id(b), id(b.server)) for b in fwd.persistence),
        tuple(srv.active for srv in fwd.services.servers()),
        tuple(svc.active for svc in fwd.services.services),
    )


def _ip_ok(buf: bytes | bytearray, off: int) -> bool:
    return pk.checksum(buf, off, off + ((buf[off] & 0x0F) << 2)) == 0


def _l4_sum_ok(buf: bytes | bytearray, off: int, proto: int, l4: int, end: int) -> bool:
    """Is the complete TCP/UDP (or, for ICMP, ICMP) checksum right? UDP 0 counts as right."""
    if proto == pk.PROTO_ICMP:
        return pk.checksum(buf, l4, end) == 0
    if proto == pk.PROTO_UDP and struct.unpack_from("!H", buf, l4 + 6)[0] == 0:
        return True
    saddr, daddr = struct.unpack_from("!II", buf, off + 12)
    return pk.checksum(buf, l4, end, pk.pseudo_sum(saddr, daddr, proto, end - l4)) == 0


def _partial_ok(buf: bytes | bytearray, off: int, proto: int, l4: int, end: int) -> bool:
    """Does a NEEDS_CSUM L4 checksum field hold the pseudo-header sum (mod 0xFFFF)?"""
    at = l4 + (16 if proto == pk.PROTO_TCP else 6)
    field: int = struct.unpack_from("!H", buf, at)[0]
    saddr, daddr = struct.unpack_from("!II", buf, off + 12)
    return field % 0xFFFF == pk.pseudo_sum(saddr, daddr, proto, end - l4) % 0xFFFF


def _check_rst(fwd: Forwarder, saddr: int, daddr: int) -> None:
    out, n = fwd.out, fwd.out_len
    off = pk.VNET_HDR_LEN
    assert n == off + pk.RST_LEN <= len(out), f"SEND of {n} bytes"
    assert out[:off] == pk.VNET_HDR_NONE, "RST vnet header is not zero"
    r = pk.parse(out, off, n)
    assert type(r) is tuple, f"RST does not parse: {r}"
    proto, rsrc, rdst, _, _, l4, flags = r
    assert proto == pk.PROTO_TCP and flags & pk.RST, "SEND is not a TCP RST"
    assert (rsrc, rdst) == (daddr, saddr), "RST is not addressed back to the sender"
    assert _ip_ok(out, off) and _l4_sum_ok(out, off, proto, l4, n), "RST checksum wrong"


def _check_forward(before: bytes, buf: bytearray, off: int, r: pk.ParseResult) -> None:
    proto, _, _, sport, _, l4, _ = r
    pkt_end = pk.packet_end(before, off)
    after = pk.parse(buf, off, pkt_end)
    assert type(after) is tuple and after[0] == proto, f"FORWARD output does not parse: {after}"
    if _ip_ok(before, off):
        assert _ip_ok(buf, off), "IPv4 header checksum broken by the rewrite"
    if proto == pk.PROTO_ICMP:
        if sport != pk.ICMP_ECHO_REQUEST:  # an error, translated: checksum recomputed in full
            assert _l4_sum_ok(buf, off, proto, l4, pkt_end), "translated ICMP checksum wrong"
        elif _l4_sum_ok(before, off, proto, l4, pkt_end):
            assert _l4_sum_ok(buf, off, proto, l4, pkt_end), "echo reply checksum broken"
    elif before[0] & pk.VNET_F_NEEDS_CSUM:
        if _partial_ok(before, off, proto, l4, pkt_end):
            assert _partial_ok(buf, off, proto, l4, pkt_end), "partial L4 checksum broken"
    elif _l4_sum_ok(before, off, proto, l4, pkt_end):
        assert _l4_sum_ok(buf, off, proto, l4, pkt_end), "L4 checksum broken by the rewrite"


def check(data: bytes) -> None:
    if not data:
        return
    fwd = make_forwarder(data[0])
    buf = bytearray(BUF_SIZE)
    off = pk.VNET_HDR_LEN
    for i, frame in enumerate(wire.split(data[1:])):
        end = min(len(frame), BUF_SIZE)
        buf[:end] = frame[:end]
        buf[end:] = bytes([SENTINEL]) * (BUF_SIZE - end)
        before = bytes(buf)
        tables = _tables(fwd)
        drops = sum(fwd.drops.values())

        verdict = fwd.handle(buf, end, T0 + 0.25 * (i + 1))

        assert len(buf) == BUF_SIZE, "handle() resized the buffer"
        assert buf[end:] == before[end:], "handle() wrote past end"
        assert len(fwd.sessions) <= fwd.sessions.max_sessions, "session table over its limit"
        if verdict in (DROP, SEND):
            assert _tables(fwd) == tables, f"verdict {verdict} changed the tables"
            assert sum(fwd.drops.values()) == drops + 1, "a refused packet is not counted once"
            assert buf == before, "a refused packet was rewritten"
            r = pk.parse(before, off, end)
            if verdict == SEND:
                assert type(r) is tuple
                _check_rst(fwd, r[1], r[2])
            else:
                assert fwd.out_len == 0, "DROP with output pending"
        else:
            assert verdict == FORWARD, f"unknown verdict {verdict!r}"
            assert sum(fwd.drops.values()) == drops, "a forwarded packet counted as a drop"
            r = pk.parse(before, off, end)
            assert type(r) is tuple, "forwarded a packet that does not parse"
            _check_forward(before, buf, off, r)


# --- seeds and generation ----------------------------------------------------------------------

def _quote(packet: bytes, n: int = 28) -> bytes:
    return packet[:n]


def seed_frames() -> list[bytes]:
    """One frame for each path through handle()."""
    partial_vnet = struct.pack("<BBHHHH", pk.VNET_F_NEEDS_CSUM, 0, 0, 0, 30, 16)
    syn = wire.ip_tcp(CLIENT, VIP, 41000, 80, pk.SYN)
    reply = wire.ip_tcp(S1, CLIENT, HTTP, 40000, pk.ACK | pk.PSH, seq=5001, ack=1001,
                        payload=b"HTTP/1.1 200 OK\r\n")
    to_client = wire.ip_tcp(VIP, CLIENT, 80, 40000, pk.ACK, seq=5001)
    to_server = wire.ip_tcp(CLIENT, S1, 40000, HTTP, pk.ACK, seq=1001)
    partial_syn = bytearray(syn)
    struct.pack_into("!H", partial_syn, 36, pk.pseudo_sum(CLIENT, VIP, pk.PROTO_TCP, 20))
    return [
        _frame(syn),
        _frame(bytes(partial_syn), partial_vnet),
        _frame(wire.ip_tcp(CLIENT, VIP, 40000, 80, pk.ACK, seq=1001, ack=5001, payload=b"GET /")),
        _frame(wire.ip_tcp(CLIENT, VIP, 40000, 80, pk.FIN | pk.ACK, seq=1006, ack=5001)),
        _frame(wire.ip_tcp(CLIENT, VIP, 40000, 80, pk.RST)),
        _frame(wire.ip_tcp(CLIENT, VIP, 42000, 80, pk.ACK)),  # no session: RST back
        _frame(wire.ip_tcp(CLIENT, VIP, 42000, 8443, pk.SYN)),  # no service
        _frame(wire.ip_tcp(CLIENT, VIP, 40000, 81, pk.SYN)),  # alt: same client port
        _frame(reply),
        _frame(wire.ip_tcp(S1, CLIENT, HTTP, 40002, pk.SYN | pk.ACK, ack=1001)),
        _frame(wire.ip_tcp(S2, CLIENT, HTTP, 49999, pk.ACK)),  # no session
        _frame(wire.ip_udp(CLIENT, VIP, 40001, 53, b"\x12\x34query")),
        _frame(wire.ip_udp(CLIENT, VIP, 43000, 53, b"new")),
        _frame(wire.ip_udp(S1, CLIENT, DNS, 40001, b"answer")),
        _frame(wire.ip_icmp(CLIENT, VIP, 8, 0, b"\0\1\0\1", b"ping-payload")),
        _frame(wire.ip_icmp(CLIENT, VIP, 3, 4, b"\0\0\5\xdc", _quote(to_client))),
        _frame(wire.ip_icmp(CLIENT, VIP, 11, 0, b"", _quote(to_client, 48))),
        _frame(wire.ip_icmp(S1, CLIENT, 3, 3, b"", _quote(to_server))),
        _frame(wire.ip_icmp(S1, CLIENT, 12, 0, b"", _quote(to_server, 40))),
        _frame(wire.ip_icmp(CLIENT, VIP, 13, 0, b"", b"timestamp")),
        _frame(wire.ipv4(CLIENT, VIP, 47, b"gre")),
        _frame(wire.ipv4(CLIENT, VIP, pk.PROTO_TCP, b"", frag=0x2000)),
        _frame(wire.ipv4(CLIENT, VIP, pk.PROTO_UDP, b"short", options=b"\x01\x01\x01\x00")),
    ]


def seeds() -> list[bytes]:
    frames = seed_frames()
    out = [bytes([flags]) + wire.join([f]) for flags in range(16) for f in frames[:2]]
    out += [b"\x00" + wire.join([f]) for f in frames[2:]]
    out.append(b"\x01" + wire.join(frames[:4] + frames[8:10]))
    return out


_addr = st.sampled_from([CLIENT, VIP, S1, S2, CLIENT + 1]) | st.integers(0, 0xFFFFFFFF)
_port = st.sampled_from([80, 81, 53, HTTP, DNS, 40000, 40001, 40002]) | st.integers(0, 0xFFFF)


@st.composite
def _packet(draw: st.DrawFn) -> bytes:
    src, dst = draw(_addr), draw(_addr)
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "error", "other"]))
    if kind == "tcp":
        return wire.ip_tcp(src, dst, draw(_port), draw(_port), draw(st.integers(0, 255)),
                           seq=draw(st.integers(0, 0xFFFFFFFF)), ack=draw(st.integers(0, 99)))
    if kind == "udp":
        return wire.ip_udp(src, dst, draw(_port), draw(_port), draw(st.binary(max_size=16)))
    if kind == "echo":
        return wire.ip_icmp(src, dst, 8, draw(st.integers(0, 1)), b"\0\1\0\1", b"x")
    if kind == "error":
        inner = draw(_packet())
        return wire.ip_icmp(src, dst, draw(st.sampled_from([3, 11, 12, 5])),
                            draw(st.integers(0, 5)), b"", inner[: draw(st.integers(0, 60))])
    return wire.ipv4(src, dst, draw(st.integers(0, 255)), draw(st.binary(max_size=40)),
                     frag=draw(st.sampled_from([0, 0x4000, 0x2000, 0x0001])))


_vnet = st.just(pk.VNET_HDR_NONE) | st.binary(min_size=10, max_size=10) | st.just(
    struct.pack("<BBHHHH", pk.VNET_F_NEEDS_CSUM, 0, 0, 0, 30, 16))


def inputs() -> st.SearchStrategy[bytes]:
    frames = st.lists(wire.mutated(st.builds(_frame, _packet(), _vnet)), min_size=1, max_size=4)
    built = st.builds(lambda flags, fs: bytes([flags]) + wire.join(fs), st.integers(0, 15), frames)
    return wire.mutated(built | st.sampled_from(seeds()), max_edits=2)


TARGET = Target("forwarder", check, seeds, inputs, max_len=2048)
