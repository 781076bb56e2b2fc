"""Tests of lb.packet: parse verdicts, NAT rewrite checksums (complete and partial), ICMP, RST.

scapy builds the reference packets and recomputes reference checksums; lb.packet never sees
scapy objects, only their bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from lb import packet as pk
from lb.packet import Drop

CLIENT = "198.51.100.77"
VIP = "198.51.100.10"
RIP = "198.18.0.11"
ROUTER = "198.18.0.254"
VNET = bytes(pk.VNET_HDR_LEN)

addrs = st.integers(min_value=0, max_value=0xFFFFFFFF)
ports = st.integers(min_value=0, max_value=0xFFFF)
payloads = st.binary(max_size=1500)
offsets = st.sampled_from([0, pk.VNET_HDR_LEN])


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def txt(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def framed(pkt: Packet | bytes, off: int) -> bytearray:
    """The packet's bytes behind ``off`` bytes of (zero) vnet header, as a TUN read gives it."""
    return bytearray(VNET[:off] + bytes(pkt))


def ref_sum(data: bytes) -> int:
    """Independent reference: ones'-complement sum of 16-bit words, word by word."""
    if len(data) & 1:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_pseudo(saddr: int, daddr: int, proto: int, length: int) -> int:
    return ref_sum(struct.pack("!IIBBH", saddr, daddr, 0, proto, length))


def recomputed(data: bytes) -> Packet:
    """The IPv4 packet in ``data`` with every checksum scapy knows recomputed."""
    p = IP(data)
    for layer in (IP, TCP, UDP, ICMP):
        if p.haslayer(layer):
            del p[layer].chksum
    return IP(bytes(p))


def assert_checksums_valid(data: bytes) -> None:
    """IP and L4 checksums in ``data`` are what a full recomputation gives (UDP 0 allowed)."""
    got = IP(data)
    want = recomputed(data)
    assert got[IP].chksum == want[IP].chksum
    for layer in (TCP, ICMP):
        if got.haslayer(layer):
            assert got[layer].chksum == want[layer].chksum, layer.__name__
    if got.haslayer(UDP) and got[UDP].chksum != 0:
        assert got[UDP].chksum == want[UDP].chksum


def finish_partial(data: bytes, l4: int) -> int:
    """What the kernel does with a NEEDS_CSUM packet: sum from csum_start (the L4 header) to the
    end with the checksum field holding the partial sum, and complement."""
    return 0xFFFF - ref_sum(data[l4:])


# --- vnet header and checksum primitives -------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "partial"),
    [(0, False), (pk.VNET_F_NEEDS_CSUM, True), (pk.VNET_F_DATA_VALID, False), (3, True)],
)
def test_vnet_partial(flags: int, partial: bool) -> None:
    hdr = pk.VNET_HDR.pack(flags, pk.VNET_GSO_TCPV4, 54, 1448, 34, 16)
    assert pk.vnet_partial(hdr) is partial
    assert pk.vnet_header(hdr) == (flags, pk.VNET_GSO_TCPV4, 54, 1448, 34, 16)
    assert len(hdr) == pk.VNET_HDR_LEN
    assert len(pk.VNET_HDR_NONE) == pk.VNET_HDR_LEN


@given(st.binary(max_size=200), st.data())
def test_checksum_matches_reference(data: bytes, draw: st.DataObject) -> None:
    start = draw.draw(st.integers(0, len(data)))
    end = draw.draw(st.integers(start, len(data)))
    initial = draw.draw(st.integers(0, 0xFFFF))
    want = ref_sum(data[start:end])
    want = (want + initial) % 0xFFFF or (0xFFFF if want + initial else 0)
    assert pk.sum16(data, start, end, initial) == want
    assert pk.checksum(data, start, end, initial) == 0xFFFF - want
    assert pk.checksum(bytearray(data), start, end, initial) == 0xFFFF - want


def test_checksum_of_scapy_ip_header() -> None:
    raw = bytes(IP(src=CLIENT, dst=VIP, ttl=33, id=77) / TCP())
    header = bytearray(raw[:20])
    header[10:12] = b"\0\0"
    assert pk.checksum(header) == IP(raw).chksum


@given(st.binary(min_size=20, max_size=60).map(bytearray), st.data())
def test_csum_replace_matches_full_recomputation(data: bytearray, draw: st.DataObject) -> None:
    n = len(data) & ~1
    data = data[:n]
    data[0:2] = b"\0\0"  # the checksum field
    data[2:4] = b"\x45\x00"  # never changed: a real header never sums to zero
    check = pk.checksum(data)
    data[0:2] = check.to_bytes(2, "big")
    assert pk.sum16(data) == 0xFFFF  # the data verifies
    at2 = draw.draw(st.integers(2, n // 2 - 1)) * 2
    new2 = draw.draw(ports)
    old2 = int.from_bytes(data[at2 : at2 + 2], "big")
    data[at2 : at2 + 2] = new2.to_bytes(2, "big")
    check2 = pk.csum_replace2(check, old2, new2)
    data[0:2] = b"\0\0"
    assert check2 == pk.checksum(data)
    data[0:2] = check2.to_bytes(2, "big")
    if n >= 8:
        at4 = draw.draw(st.integers(2, n // 2 - 2)) * 2
        new4 = draw.draw(addrs)
        old4 = int.from_bytes(data[at4 : at4 + 4], "big")
        data[at4 : at4 + 4] = new4.to_bytes(4, "big")
        check4 = pk.csum_replace4(check2, old4, new4)
        data[0:2] = b"\0\0"
        assert check4 == pk.checksum(data)


@given(addrs, addrs, addrs, st.sampled_from([pk.PROTO_TCP, pk.PROTO_UDP]), ports)
def test_pseudo_replace4_matches_recomputed_pseudo_sum(
    saddr: int, daddr: int, new: int, proto: int, length: int
) -> None:
    partial = ref_pseudo(saddr, daddr, proto, length)
    assert pk.pseudo_sum(saddr, daddr, proto, length) == partial
    assert pk.pseudo_replace4(partial, daddr, new) == ref_pseudo(saddr, new, proto, length)
    assert pk.pseudo_replace4(partial, saddr, new) == ref_pseudo(new, daddr, proto, length)


# --- parse ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseCase:
    name: str
    pkt: Packet | bytes
    want: tuple[int, int, int, int, int, int, int] | Drop
    """Expected result with l4_off relative to the IP header."""


def _ip_bytes(pkt: Packet, **patch: int) -> bytes:
    """bytes(pkt) with raw IPv4 header fields overwritten (what scapy would otherwise fix)."""
    raw = bytearray(bytes(pkt))
    if "ihl" in patch:
        raw[0] = 0x40 | patch["ihl"]
    if "tot_len" in patch:
        raw[2:4] = patch["tot_len"].to_bytes(2, "big")
    if "proto" in patch:
        raw[9] = patch["proto"]
    return bytes(raw)


def _tcp(**kw: Any) -> Packet:
    return IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, **kw)


def _udp(payload: bytes = b"q" * 12, **kw: Any) -> Packet:
    return IP(src=CLIENT, dst=VIP) / UDP(sport=5353, dport=53, **kw) / payload


C, V = ip(CLIENT), ip(VIP)

PARSE_CASES = [
    ParseCase("tcp syn", _tcp(flags="S"), (6, C, V, 40000, 80, 20, pk.SYN)),
    ParseCase(
        "tcp with options and payload",
        _tcp(flags="PA", options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]) / (b"x" * 100),
        (6, C, V, 40000, 80, 20, pk.PSH | pk.ACK),
    ),
    ParseCase(
        "tcp with ip options",
        IP(src=CLIENT, dst=VIP, options=[b"\x01\x01\x01\x00"]) / TCP(sport=1, dport=2, flags="A"),
        (6, C, V, 1, 2, 24, pk.ACK),
    ),
    ParseCase("tcp with DF", _tcp(flags="F") / b"", (6, C, V, 40000, 80, 20, pk.FIN)),
    ParseCase("udp", _udp(), (17, C, V, 5353, 53, 20, 0)),
    ParseCase("udp empty payload", _udp(b""), (17, C, V, 5353, 53, 20, 0)),
    ParseCase(
        "udp with ethernet-style padding after total length",
        bytes(_udp(b"ab")) + b"\0" * 6,
        (17, C, V, 5353, 53, 20, 0),
    ),
    ParseCase(
        "icmp echo",
        IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=7, seq=1) / b"ping",
        (1, C, V, 8, 0, 20, 0),
    ),
    ParseCase(
        "icmp frag needed",
        IP(src=RIP, dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1400) / (b"\0" * 28),
        (1, ip(RIP), C, 3, 4, 20, 0),
    ),
    ParseCase("empty", b"", Drop.TRUNCATED),
    ParseCase("19 bytes", bytes(_tcp())[:19], Drop.TRUNCATED),
    ParseCase("ipv6", IPv6() / TCP(), Drop.NOT_IPV4),
    ParseCase("version 0", b"\x05" + bytes(_tcp())[1:], Drop.NOT_IPV4),
    ParseCase("ihl 4", _ip_bytes(_tcp(), ihl=4), Drop.BAD_IHL),
    ParseCase("ihl 0", _ip_bytes(_tcp(), ihl=0), Drop.BAD_IHL),
    ParseCase("ihl beyond packet", _ip_bytes(_udp(b""), ihl=15), Drop.BAD_LENGTH),
    ParseCase("total length < header", _ip_bytes(_tcp(), tot_len=19), Drop.BAD_LENGTH),
    ParseCase("total length beyond bytes", bytes(_tcp() / b"abc")[:-1], Drop.BAD_LENGTH),
    ParseCase("total length 0", _ip_bytes(_tcp(), tot_len=0), Drop.BAD_LENGTH),
    ParseCase("fragment MF", IP(src=CLIENT, dst=VIP, flags="MF") / TCP(), Drop.FRAGMENT),
    ParseCase("fragment offset", IP(src=CLIENT, dst=VIP, frag=185) / TCP(), Drop.FRAGMENT),
    ParseCase("last fragment of udp", IP(src=CLIENT, dst=VIP, frag=1) / b"tail", Drop.FRAGMENT),
    ParseCase("tcp data offset 4", _tcp(dataofs=4), Drop.BAD_L4),
    ParseCase("tcp data offset 0", _tcp(dataofs=0), Drop.BAD_L4),
    ParseCase("tcp data offset beyond packet", _tcp(dataofs=15) / (b"x" * 20), Drop.BAD_L4),
    ParseCase("tcp header truncated", _ip_bytes(_tcp(), tot_len=39)[:39], Drop.BAD_L4),
    ParseCase("tcp header absent", _ip_bytes(IP(proto=6), proto=6), Drop.BAD_L4),
    ParseCase("udp length 7", _udp(len=7), Drop.BAD_L4),
    ParseCase("udp length beyond packet", _udp(b"ab", len=11), Drop.BAD_L4),
    ParseCase("udp header truncated", _ip_bytes(_udp(b""), tot_len=27)[:27], Drop.BAD_L4),
    ParseCase(
        "icmp header truncated",
        _ip_bytes(IP(src=CLIENT, dst=VIP) / ICMP(), tot_len=24)[:24],
        Drop.BAD_L4,
    ),
    ParseCase("gre", IP(src=CLIENT, dst=VIP, proto=47) / (b"\0" * 8), Drop.UNSUPPORTED_PROTO),
]


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c.name for c in PARSE_CASES])
@pytest.mark.parametrize("off", [0, pk.VNET_HDR_LEN])
def test_parse(case: ParseCase, off: int) -> None:
    buf = framed(case.pkt, off)
    got = pk.parse(buf, off, len(buf))
    if isinstance(case.want, Drop):
        assert got == case.want
        assert isinstance(got, Drop)
    else:
        proto, saddr, daddr, sport, dport, l4, flags = case.want
        assert got == (proto, saddr, daddr, sport, dport, off + l4, flags)
        assert not isinstance(got, Drop)
    assert pk.parse(bytes(buf), off, len(buf)) == got
    assert pk.parse(memoryview(buf), off, len(buf)) == got


def test_parse_gso_super_packet() -> None:
    """A 60 KB TCP super-packet whose total length covers it all parses as one packet."""
    buf = framed(_tcp(flags="A") / (b"z" * 60000), pk.VNET_HDR_LEN)
    got = pk.parse(buf, pk.VNET_HDR_LEN, len(buf))
    assert got == (6, C, V, 40000, 80, pk.VNET_HDR_LEN + 20, pk.ACK)
    assert pk.packet_end(buf, pk.VNET_HDR_LEN) == len(buf)


def test_parse_end_beyond_buffer_is_clamped() -> None:
    buf = framed(_tcp(), 0)
    assert pk.parse(buf, 0, len(buf) + 100) == (6, C, V, 40000, 80, 20, pk.SYN)
    assert pk.parse(buf[:30], 0, 100) == Drop.BAD_LENGTH


def test_drop_reasons_are_stable_and_truthy() -> None:
    assert all(reason for reason in Drop)
    assert int(Drop.TRUNCATED) == 1
    assert len({r.name.lower() for r in Drop}) == len(Drop)


def _exercise_everything(buf: bytearray, off: int) -> None:
    """Run every entry point that accepts untrusted bytes; none may raise."""
    end = len(buf)
    res = pk.parse(buf, off, end)
    out = bytearray(pk.VNET_HDR_LEN + pk.RST_LEN)
    pk.build_rst(buf, off, end, out, pk.VNET_HDR_LEN)
    pk.icmp_echo_reply(bytearray(buf), off, end)
    if isinstance(res, Drop):
        return
    proto, _, _, _, _, l4, _ = res
    pk.rewrite_dst(bytearray(buf), off, l4, proto, 1, 2, False)
    pk.rewrite_src(bytearray(buf), off, l4, proto, 3, 4, True)
    err = pk.parse_icmp_error(buf, off, l4, end)
    if proto == pk.PROTO_ICMP and not isinstance(err, Drop):
        iproto, _, _, _, _, iip, il4 = err
        pk.translate_icmp_error_from_server(bytearray(buf), off, end, iip, il4, iproto, 5, 6)
        pk.translate_icmp_error_from_client(bytearray(buf), off, end, iip, il4, iproto, 7, 8)


@given(st.binary(max_size=120), offsets)
def test_random_bytes_never_raise(data: bytes, off: int) -> None:
    _exercise_everything(framed(data, off), off)


_SEEDS = [
    bytes(_tcp(flags="PA", seq=5, ack=9) / b"hello"),
    bytes(_tcp(flags="S", options=[("MSS", 1460)])),
    bytes(_udp()),
    bytes(IP(src=CLIENT, dst=VIP) / ICMP(type=8) / b"ping"),
    bytes(
        IP(src=RIP, dst=CLIENT)
        / ICMP(type=3, code=4, nexthopmtu=1400)
        / bytes(IP(src=CLIENT, dst=RIP) / UDP(sport=1, dport=2) / b"abcdef")
    ),
    bytes(
        IP(src=ROUTER, dst=CLIENT)
        / ICMP(type=11)
        / bytes(IP(src=CLIENT, dst=RIP) / TCP(sport=1, dport=2))[:28]
    ),
]


@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.one_of(st.just(0), st.integers(1, 60)),
    offsets,
)
def test_mutated_packets_never_raise(
    seed: bytes, edits: list[tuple[int, int]], cut: int, off: int
) -> None:
    data = bytearray(seed)
    for at, value in edits:
        if at < len(data):
            data[at] = value
    del data[len(data) - min(cut, len(data)) :]
    _exercise_everything(framed(bytes(data), off), off)


# --- rewrite: complete checksums ------------------------------------------------------------------


def _l4(proto: int, sport: int, dport: int, udp_zero: bool = False) -> Packet:
    if proto == pk.PROTO_TCP:
        return TCP(sport=sport, dport=dport, flags="PA", seq=123456, ack=654321)
    if udp_zero:
        return UDP(sport=sport, dport=dport, chksum=0)
    return UDP(sport=sport, dport=dport)


@dataclass(frozen=True)
class Seg:
    """A TCP or UDP segment to build with scapy."""

    proto: int
    saddr: int
    daddr: int
    sport: int
    dport: int
    payload: bytes
    udp_zero: bool = False

    def build(self, saddr: int | None = None, daddr: int | None = None, **ports: int) -> Packet:
        """The packet, with the given fields replaced."""
        s = txt(self.saddr if saddr is None else saddr)
        d = txt(self.daddr if daddr is None else daddr)
        sport = ports.get("sport", self.sport)
        dport = ports.get("dport", self.dport)
        return IP(src=s, dst=d) / _l4(self.proto, sport, dport, self.udp_zero) / self.payload


_l4_protos = st.sampled_from([pk.PROTO_TCP, pk.PROTO_UDP])
segs = st.builds(Seg, _l4_protos, addrs, addrs, ports, ports, payloads)
segs_maybe_udp_zero = st.builds(
    Seg, _l4_protos, addrs, addrs, ports, ports, payloads, udp_zero=st.booleans()
)


@settings(max_examples=300)
@given(segs_maybe_udp_zero, st.tuples(addrs, ports), st.booleans(), offsets)
def test_rewrite_complete_checksum_equals_full_recomputation(
    seg: Seg, new: tuple[int, int], dst: bool, off: int
) -> None:
    assert seg.proto in (pk.PROTO_TCP, pk.PROTO_UDP)
    new_addr, new_port = new
    buf = framed(seg.build(), off)
    res = pk.parse(buf, off, len(buf))
    assert not isinstance(res, Drop)
    if dst:
        pk.rewrite_dst(buf, off, res[5], seg.proto, new_addr, new_port, False)
        want = seg.build(daddr=new_addr, dport=new_port)
    else:
        pk.rewrite_src(buf, off, res[5], seg.proto, new_addr, new_port, False)
        want = seg.build(saddr=new_addr, sport=new_port)
    assert bytes(buf[off:]) == bytes(want)
    assert buf[:off] == VNET[:off]


def _edge_payload(proto: int, dst: str, dport: int) -> bytes:
    """A 2-byte payload that makes the L4 sum fold to 0xFFFF, so that the computed checksum is
    0 (sent as 0xFFFF for UDP)."""
    zero = IP(bytes(IP(src=CLIENT, dst=dst) / _l4(proto, 1000, dport) / b"\0\0"))
    check: int = zero[TCP if proto == pk.PROTO_TCP else UDP].chksum
    return (check if check != 0xFFFF else 0).to_bytes(2, "big")


@pytest.mark.parametrize("proto", [pk.PROTO_TCP, pk.PROTO_UDP])
@pytest.mark.parametrize("edge_before", [True, False])
def test_rewrite_checksum_zero_edges(proto: int, edge_before: bool) -> None:
    """A checksum that computes to 0 (UDP: sent as 0xFFFF) before or after the rewrite."""
    payload = _edge_payload(proto, VIP if edge_before else RIP, 80 if edge_before else 8080)
    before = bytes(IP(src=CLIENT, dst=VIP) / _l4(proto, 1000, 80) / payload)
    after = bytes(IP(src=CLIENT, dst=RIP) / _l4(proto, 1000, 8080) / payload)
    edge = before if edge_before else after
    assert edge[36 if proto == pk.PROTO_TCP else 26 :][:2] in (b"\0\0", b"\xff\xff")
    buf = bytearray(before)
    pk.rewrite_dst(buf, 0, 20, proto, ip(RIP), 8080, False)
    assert bytes(buf) == after
    pk.rewrite_dst(buf, 0, 20, proto, V, 80, False)
    assert bytes(buf) == before


def test_rewrite_unchanged_fields_are_not_touched() -> None:
    raw = bytearray(bytes(_tcp(flags="A") / b"data"))
    raw[10:12] = b"\xde\xad"  # bogus checksums must survive a no-op rewrite
    raw[36:38] = b"\xbe\xef"
    before = bytes(raw)
    pk.rewrite_dst(raw, 0, 20, pk.PROTO_TCP, V, 80, False)
    pk.rewrite_src(raw, 0, 20, pk.PROTO_TCP, C, 40000, True)
    assert bytes(raw) == before


def test_rewrite_port_only_and_address_only() -> None:
    raw = bytearray(bytes(_udp()))
    pk.rewrite_dst(raw, 0, 20, pk.PROTO_UDP, V, 5300, False)
    assert bytes(raw) == bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5353, dport=5300) / (b"q" * 12))
    pk.rewrite_dst(raw, 0, 20, pk.PROTO_UDP, ip(RIP), 5300, False)
    assert bytes(raw) == bytes(IP(src=CLIENT, dst=RIP) / UDP(sport=5353, dport=5300) / (b"q" * 12))


def test_rewrite_icmp_changes_address_only() -> None:
    raw = bytearray(bytes(IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=5, seq=6) / b"abc"))
    pk.rewrite_dst(raw, 0, 20, pk.PROTO_ICMP, ip(RIP), 999, False)
    assert bytes(raw) == bytes(IP(src=CLIENT, dst=RIP) / ICMP(type=8, id=5, seq=6) / b"abc")


# --- rewrite: partial (NEEDS_CSUM) checksums ------------------------------------------------------


def _partial_packet(seg: Seg, off: int) -> bytearray:
    """A packet as a NEEDS_CSUM TUN read gives it: the L4 checksum field holds the folded
    uncomplemented pseudo-header sum (computed here independently of lb.packet)."""
    buf = framed(seg.build(), off)
    l4 = off + 20
    at = l4 + (16 if seg.proto == pk.PROTO_TCP else 6)
    partial = ref_pseudo(seg.saddr, seg.daddr, seg.proto, len(buf) - l4)
    buf[at : at + 2] = partial.to_bytes(2, "big")
    buf[:off] = pk.VNET_HDR.pack(pk.VNET_F_NEEDS_CSUM, 0, 0, 0, 20, at - l4)[:off]
    return buf


def _check_partial_rewrite(seg: Seg, new_addr: int, new_port: int, dst: bool, off: int) -> None:
    buf = _partial_packet(seg, off)
    if off:
        assert pk.vnet_partial(buf)
    res = pk.parse(buf, off, len(buf))
    assert not isinstance(res, Drop)
    l4 = res[5]
    if dst:
        pk.rewrite_dst(buf, off, l4, seg.proto, new_addr, new_port, True)
        want = seg.build(daddr=new_addr, dport=new_port)
        new_s, new_d = seg.saddr, new_addr
    else:
        pk.rewrite_src(buf, off, l4, seg.proto, new_addr, new_port, True)
        want = seg.build(saddr=new_addr, sport=new_port)
        new_s, new_d = new_addr, seg.daddr
    want_raw = bytes(want)
    at = 20 + (16 if seg.proto == pk.PROTO_TCP else 6)
    got = bytes(buf[off:])
    # Everything but the L4 checksum field is byte-exact, IP header checksum included.
    assert got[:at] == want_raw[:at]
    assert got[at + 2 :] == want_raw[at + 2 :]
    # Finishing the partial checksum as the kernel does gives scapy's full checksum.
    finished = finish_partial(got, 20)
    if seg.proto == pk.PROTO_UDP and finished == 0:
        finished = 0xFFFF
    assert finished == int.from_bytes(want_raw[at : at + 2], "big")
    # And the field still is the pseudo-header sum, now of the new addresses.
    field = int.from_bytes(got[at : at + 2], "big")
    assert field == ref_pseudo(new_s, new_d, seg.proto, len(got) - 20)


@settings(max_examples=300)
@given(segs, st.tuples(addrs, ports), st.booleans(), offsets)
def test_rewrite_partial_checksum_finishes_to_full_checksum(
    seg: Seg, new: tuple[int, int], dst: bool, off: int
) -> None:
    _check_partial_rewrite(seg, new[0], new[1], dst, off)


@pytest.mark.parametrize("proto", [pk.PROTO_TCP, pk.PROTO_UDP])
@pytest.mark.parametrize("dst", [True, False])
def test_rewrite_partial_gso_super_packet(proto: int, dst: bool) -> None:
    payload = bytes(range(256)) * 234 + b"odd"  # 59,907 bytes: odd length on purpose
    seg = Seg(proto, C, V, 40000, 80, payload)
    _check_partial_rewrite(seg, ip(RIP), 8080, dst, pk.VNET_HDR_LEN)


# --- ICMP echo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("off", [0, pk.VNET_HDR_LEN])
@pytest.mark.parametrize("ttl", [1, 64, 250])
def test_icmp_echo_reply(off: int, ttl: int) -> None:
    req = IP(src=CLIENT, dst=VIP, ttl=ttl, id=4242) / ICMP(type=8, id=0x1234, seq=7) / (b"x" * 56)
    buf = framed(req, off)
    assert pk.icmp_echo_reply(buf, off, len(buf))
    want = IP(src=VIP, dst=CLIENT, ttl=64, id=4242) / ICMP(type=0, id=0x1234, seq=7) / (b"x" * 56)
    assert bytes(buf[off:]) == bytes(want)
    assert_checksums_valid(bytes(buf[off:]))


@pytest.mark.parametrize(
    "pkt",
    [
        IP(src=CLIENT, dst=VIP) / ICMP(type=0) / b"reply",
        IP(src=CLIENT, dst=VIP) / ICMP(type=8, code=1),
        IP(src=CLIENT, dst=VIP) / ICMP(type=3, code=3) / (b"\0" * 28),
        IP(src=CLIENT, dst=VIP, flags="MF") / ICMP(type=8) / b"frag",
        IP(src=CLIENT, dst=VIP) / UDP() / b"not icmp",
        b"\x45\x00",
    ],
    ids=["reply", "bad code", "unreachable", "fragment", "udp", "garbage"],
)
def test_icmp_echo_reply_refuses_others(pkt: Packet | bytes) -> None:
    buf = bytearray(bytes(pkt))
    before = bytes(buf)
    assert not pk.icmp_echo_reply(buf, 0, len(buf))
    assert bytes(buf) == before


# --- ICMP errors ----------------------------------------------------------------------------------


def _icmp_error(src: str, dst: str, quoted: bytes, icmp_type: int = 3, code: int = 3) -> Packet:
    if icmp_type == 3 and code == 4:
        return IP(src=src, dst=dst, ttl=60) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted
    return IP(src=src, dst=dst, ttl=60) / ICMP(type=icmp_type, code=code) / quoted


def _inner(proto: int, src: str, dst: str, ports: tuple[int, int], payload: bytes) -> bytes:
    sport, dport = ports
    return bytes(IP(src=src, dst=dst, ttl=63, id=999) / _l4(proto, sport, dport) / payload)


ERROR_KINDS = [(3, 3), (3, 4), (11, 0), (12, 0)]


@pytest.mark.parametrize("proto", [pk.PROTO_TCP, pk.PROTO_UDP])
@pytest.mark.parametrize(("icmp_type", "code"), ERROR_KINDS)
@pytest.mark.parametrize("quote_all", [False, True])
@pytest.mark.parametrize("off", [0, pk.VNET_HDR_LEN])
def test_icmp_error_from_server_reaches_client_as_from_vip(
    proto: int, icmp_type: int, code: int, quote_all: bool, off: int
) -> None:
    payload = b"payload!" * 5
    sent = _inner(proto, CLIENT, RIP, (40000, 8080), payload)  # as lbd forwarded it
    seen = _inner(proto, CLIENT, VIP, (40000, 80), payload)  # as the client sent it
    cut = len(sent) if quote_all else 28
    router = ROUTER if icmp_type == 11 else RIP
    buf = framed(_icmp_error(router, CLIENT, sent[:cut], icmp_type, code), off)
    res = pk.parse(buf, off, len(buf))
    assert not isinstance(res, Drop)
    assert res[0] == pk.PROTO_ICMP
    err = pk.parse_icmp_error(buf, off, res[5], len(buf))
    assert err == (proto, C, ip(RIP), 40000, 8080, off + 28, off + 48)
    assert not isinstance(err, Drop)
    pk.translate_icmp_error_from_server(buf, off, len(buf), err[5], err[6], proto, V, 80)
    want = _icmp_error(VIP, CLIENT, seen[:cut], icmp_type, code)
    assert bytes(buf[off:]) == bytes(want)
    assert_checksums_valid(bytes(buf[off:]))


@pytest.mark.parametrize("proto", [pk.PROTO_TCP, pk.PROTO_UDP])
@pytest.mark.parametrize(("icmp_type", "code"), ERROR_KINDS)
@pytest.mark.parametrize("quote_all", [False, True])
def test_icmp_error_from_client_reaches_server(
    proto: int, icmp_type: int, code: int, quote_all: bool
) -> None:
    payload = b"response" * 3
    seen = _inner(proto, VIP, CLIENT, (80, 40000), payload)  # the reply as the client got it
    sent = _inner(proto, RIP, CLIENT, (8080, 40000), payload)  # as the server sent it
    cut = len(seen) if quote_all else 28
    buf = framed(_icmp_error(CLIENT, VIP, seen[:cut], icmp_type, code), 0)
    res = pk.parse(buf, 0, len(buf))
    assert not isinstance(res, Drop)
    err = pk.parse_icmp_error(buf, 0, res[5], len(buf))
    assert err == (proto, V, C, 80, 40000, 28, 48)
    assert not isinstance(err, Drop)
    pk.translate_icmp_error_from_client(buf, 0, len(buf), err[5], err[6], proto, ip(RIP), 8080)
    want = _icmp_error(CLIENT, RIP, sent[:cut], icmp_type, code)
    assert bytes(buf) == bytes(want)
    assert_checksums_valid(bytes(buf))


def test_icmp_error_keeps_udp_zero_checksum_and_mtu() -> None:
    sent = bytes(IP(src=CLIENT, dst=RIP) / UDP(sport=1, dport=8080, chksum=0) / b"x")
    buf = bytearray(bytes(_icmp_error(RIP, CLIENT, sent, 3, 4)))
    err = pk.parse_icmp_error(buf, 0, 20, len(buf))
    assert not isinstance(err, Drop)
    pk.translate_icmp_error_from_server(buf, 0, len(buf), err[5], err[6], err[0], V, 53)
    got = IP(bytes(buf))
    assert got[ICMP].nexthopmtu == 1400
    inner = IP(bytes(buf)[28:])
    assert (inner.dst, inner[UDP].dport, inner[UDP].chksum) == (VIP, 53, 0)
    assert_checksums_valid(bytes(buf))


def test_icmp_error_with_trailing_bytes_after_total_length() -> None:
    sent = _inner(pk.PROTO_UDP, CLIENT, RIP, (1, 8080), b"abc")
    raw = bytes(_icmp_error(RIP, CLIENT, sent))
    buf = bytearray(raw + b"\xff" * 5)  # padding beyond total length is not part of ICMP
    err = pk.parse_icmp_error(buf, 0, 20, len(buf))
    assert not isinstance(err, Drop)
    pk.translate_icmp_error_from_server(buf, 0, len(buf), err[5], err[6], err[0], V, 53)
    assert buf[len(raw) :] == b"\xff" * 5
    assert_checksums_valid(bytes(buf[: len(raw)]))


_Q = _inner(pk.PROTO_TCP, CLIENT, RIP, (1, 2), b"")

ICMP_ERROR_DROPS = [
    ("echo request", IP() / ICMP(type=8) / _Q, Drop.NOT_ICMP_ERROR),
    ("redirect", IP() / ICMP(type=5) / _Q, Drop.NOT_ICMP_ERROR),
    ("quote shorter than ip header", IP() / ICMP(type=3) / _Q[:19], Drop.BAD_ICMP_INNER),
    ("quote without 8 l4 bytes", IP() / ICMP(type=11) / _Q[:27], Drop.BAD_ICMP_INNER),
    ("quoted ipv6", IP() / ICMP(type=3) / bytes(IPv6() / UDP()), Drop.BAD_ICMP_INNER),
    ("quoted ihl 4", IP() / ICMP(type=3) / (b"\x44" + _Q[1:]), Drop.BAD_ICMP_INNER),
    (
        "quoted non-first fragment",
        IP() / ICMP(type=3) / bytes(IP(frag=3, proto=6) / (b"\0" * 8)),
        Drop.BAD_ICMP_INNER,
    ),
    (
        "quoted icmp",
        IP() / ICMP(type=3) / bytes(IP(src=CLIENT, dst=VIP) / ICMP(type=8)),
        Drop.UNSUPPORTED_PROTO,
    ),
]


@pytest.mark.parametrize(
    ("pkt", "want"),
    [(p, w) for _, p, w in ICMP_ERROR_DROPS],
    ids=[n for n, _, _ in ICMP_ERROR_DROPS],
)
def test_parse_icmp_error_drops(pkt: Packet, want: Drop) -> None:
    buf = bytes(pkt)
    assert pk.parse_icmp_error(buf, 0, 20, len(buf)) == want


def test_parse_icmp_error_accepts_quoted_first_fragment() -> None:
    quoted = bytes(IP(src=CLIENT, dst=RIP, flags="MF") / UDP(sport=9, dport=8080) / (b"x" * 100))
    buf = bytes(IP() / ICMP(type=3, code=4, nexthopmtu=576) / quoted[:28])
    assert pk.parse_icmp_error(buf, 0, 20, len(buf)) == (17, C, ip(RIP), 9, 8080, 28, 48)


# --- TCP reset ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RstCase:
    name: str
    seg: Packet
    want: Packet | None


RST_CASES = [
    RstCase(
        "ack: seq from ack, RST only",
        _tcp(flags="PA", seq=1000, ack=5000) / b"hello",
        IP(src=VIP, dst=CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=80, dport=40000, flags="R", seq=5000, ack=0, window=0),
    ),
    RstCase(
        "syn without ack",
        _tcp(flags="S", seq=100, options=[("MSS", 1460)]),
        IP(src=VIP, dst=CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=80, dport=40000, flags="RA", seq=0, ack=101, window=0),
    ),
    RstCase(
        "payload and fin without ack",
        _tcp(flags="F", seq=7) / (b"p" * 10),
        IP(src=VIP, dst=CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=80, dport=40000, flags="RA", seq=0, ack=18, window=0),
    ),
    RstCase(
        "seq wraps",
        _tcp(flags="S", seq=0xFFFFFFFF),
        IP(src=VIP, dst=CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=80, dport=40000, flags="RA", seq=0, ack=0, window=0),
    ),
    RstCase(
        "syn-ack with payload",
        _tcp(flags="SA", seq=1, ack=0xFFFFFFFF) / b"data",
        IP(src=VIP, dst=CLIENT, ttl=64, id=0, flags="DF")
        / TCP(sport=80, dport=40000, flags="R", seq=0xFFFFFFFF, ack=0, window=0),
    ),
    RstCase("rst", _tcp(flags="R", seq=5), None),
    RstCase("rst-ack", _tcp(flags="RA", seq=5, ack=6), None),
    RstCase("udp", _udp(), None),
    RstCase("fragment", IP(src=CLIENT, dst=VIP, flags="MF") / TCP(flags="S"), None),
]


@pytest.mark.parametrize("case", RST_CASES, ids=[c.name for c in RST_CASES])
@pytest.mark.parametrize("off", [0, pk.VNET_HDR_LEN])
def test_build_rst(case: RstCase, off: int) -> None:
    buf = framed(case.seg, off)
    out = bytearray(b"\xaa" * 64)
    n = pk.build_rst(buf, off, len(buf), out, off)
    if case.want is None:
        assert n == 0
        assert out == b"\xaa" * 64
        return
    assert n == pk.RST_LEN == 40
    assert bytes(out[off : off + n]) == bytes(case.want)
    assert_checksums_valid(bytes(out[off : off + n]))
    assert out[off + n :] == b"\xaa" * (64 - off - n)


@given(
    segs,  # only addresses, ports and payload are used
    st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
    st.sampled_from(["S", "A", "PA", "F", "FA", "", "SF", "SAF"]),
)
def test_build_rst_checksums_valid(seg: Seg, seq_ack: tuple[int, int], flags: str) -> None:
    seq, ack = seq_ack
    tcp = TCP(sport=seg.sport, dport=seg.dport, seq=seq, ack=ack, flags=flags)
    raw = bytes(IP(src=txt(seg.saddr), dst=txt(seg.daddr)) / tcp / seg.payload)
    out = bytearray(pk.RST_LEN)
    assert pk.build_rst(raw, 0, len(raw), out, 0) == pk.RST_LEN
    assert_checksums_valid(bytes(out))
    rst = IP(bytes(out))
    got = (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport, rst[TCP].window)
    assert got == (txt(seg.daddr), txt(seg.saddr), seg.dport, seg.sport, 0)
    if "A" in flags:
        assert (rst[TCP].flags, rst[TCP].seq) == ("R", ack)
    else:
        n = len(seg.payload) + ("S" in flags) + ("F" in flags)
        assert (rst[TCP].flags, rst[TCP].seq, rst[TCP].ack) == ("RA", 0, (seq + n) % 2**32)
