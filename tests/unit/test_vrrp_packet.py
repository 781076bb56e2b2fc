"""VRRPv3 codec: round trips, scapy as an independent reference, and hostile packets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ha.vrrp_packet import (
    VRRP_MULTICAST_GROUP,
    Advert,
    Reject,
    RejectReason,
    encode_advert,
    ipv4_packet,
    parse_advert,
)
from lb.addr import ip_to_int

SRC = ip_to_int("198.51.100.2")
VIP = ip_to_int("198.51.100.10")
GW = ip_to_int("198.18.0.1")


def _packet(payload: bytes, *, src: int = SRC, dst: int = VRRP_MULTICAST_GROUP,
            ttl: int = 255, protocol: int = 112) -> bytes:
    return ipv4_packet(src, dst, payload, ttl=ttl, protocol=protocol)


def _advert(**overrides: int) -> bytes:
    fields = {"vrid": 51, "priority": 200, "max_adver_int_cs": 10}
    fields.update(overrides)
    return encode_advert(fields["vrid"], fields["priority"], fields["max_adver_int_cs"],
                         [VIP, GW], SRC, VRRP_MULTICAST_GROUP)


def _with_checksum(message: bytes, src: int = SRC, dst: int = VRRP_MULTICAST_GROUP,
                   *, pseudo: bool = True) -> bytes:
    """Recompute the checksum of a (possibly tampered) message, so one check fails alone."""
    zeroed = message[:6] + b"\x00\x00" + message[8:]
    data = zeroed + (b"\x00" if len(zeroed) % 2 else b"")
    if pseudo:
        data = struct.pack("!IIBBH", src, dst, 0, 112, len(zeroed)) + data
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return zeroed[:6] + struct.pack("!H", ~total & 0xFFFF) + zeroed[8:]


def test_round_trip() -> None:
    parsed = parse_advert(_packet(_advert()))
    assert parsed == Advert(src=SRC, vrid=51, priority=200, max_adver_int_cs=10,
                            addresses=(VIP, GW))


@given(
    vrid=st.integers(1, 255),
    priority=st.integers(0, 255),
    interval=st.integers(1, 4095),
    addresses=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40),
    src=st.integers(0, 2**32 - 1),
    dst=st.integers(0, 2**32 - 1),
    as_v2=st.booleans(),
)
def test_round_trip_property(*, vrid: int, priority: int, interval: int, addresses: list[int],
                             src: int, dst: int, as_v2: bool) -> None:
    message = encode_advert(vrid, priority, interval, addresses, src, dst, checksum_as_v2=as_v2)
    assert parse_advert(ipv4_packet(src, dst, message)) == Advert(
        src, vrid, priority, interval, tuple(addresses)
    )


def test_checksum_matches_scapy_vrrpv3() -> None:
    from scapy.layers.inet import IP
    from scapy.layers.vrrp import VRRPv3

    reference = bytes(
        IP(src="198.51.100.2", dst="224.0.0.18", ttl=255)
        / VRRPv3(vrid=51, priority=200, adv=10, addrlist=["198.51.100.10", "198.18.0.1"])
    )
    assert reference[20:] == _advert()
    assert parse_advert(reference) == parse_advert(_packet(_advert()))


def test_unicast_checksum_matches_scapy() -> None:
    from scapy.layers.inet import IP
    from scapy.layers.vrrp import VRRPv3

    peer = ip_to_int("198.51.100.3")
    reference = bytes(
        IP(src="198.51.100.2", dst="198.51.100.3", ttl=255)
        / VRRPv3(vrid=7, priority=0, adv=100, addrlist=["198.51.100.10"])
    )
    assert reference[20:] == encode_advert(7, 0, 100, [VIP], SRC, peer)


def test_scapy_dissects_our_packet() -> None:
    from scapy.layers.inet import IP
    from scapy.layers.vrrp import VRRPv3

    dissected = IP(_packet(_advert()))
    layer = dissected[VRRPv3]
    assert (layer.vrid, layer.priority, layer.adv) == (51, 200, 10)
    assert layer.addrlist == ["198.51.100.10", "198.18.0.1"]
    original = layer.chksum
    del layer.chksum
    assert IP(bytes(dissected))[VRRPv3].chksum == original


def test_keepalived_v2_style_checksum_accepted() -> None:
    """keepalived's v3_checksum_as_v2: the message alone, as scapy's VRRPv2 computes it."""
    from scapy.utils import checksum

    message = encode_advert(51, 200, 10, [VIP, GW], SRC, VRRP_MULTICAST_GROUP,
                            checksum_as_v2=True)
    zeroed = message[:6] + b"\x00\x00" + message[8:]
    assert struct.unpack("!H", message[6:8])[0] == checksum(zeroed)
    assert message != _advert()
    assert parse_advert(_packet(message)) == parse_advert(_packet(_advert()))


def test_rfc_checksum_depends_on_destination() -> None:
    """The pseudo-header binds the checksum to src and dst: delivered elsewhere, it fails."""
    other = ip_to_int("198.51.100.99")
    assert parse_advert(_packet(_advert(), dst=other)) == Reject(RejectReason.CHECKSUM)


def _tamper(offset: int, value: int, *, fix_checksum: bool = True) -> bytes:
    message = bytearray(_advert())
    message[offset] = value
    return _with_checksum(bytes(message)) if fix_checksum else bytes(message)


HOSTILE: list[tuple[str, bytes, RejectReason]] = [
    ("empty", b"", RejectReason.LENGTH),
    ("short of an IP header", _packet(_advert())[:19], RejectReason.LENGTH),
    ("IPv6 version nibble", b"\x65" + _packet(_advert())[1:], RejectReason.IP_HEADER),
    ("IHL below 5", b"\x44" + _packet(_advert())[1:], RejectReason.IP_HEADER),
    ("IHL beyond packet", b"\x4f" + _packet(_advert())[1:], RejectReason.LENGTH),
    ("protocol 17", _packet(_advert(), protocol=17), RejectReason.PROTOCOL),
    ("TTL 254: routed from elsewhere", _packet(_advert(), ttl=254), RejectReason.TTL),
    ("TTL 1", _packet(_advert(), ttl=1), RejectReason.TTL),
    ("total length beyond data", _packet(_advert())[:-4], RejectReason.LENGTH),
    ("VRRP header cut", _packet(_advert()[:7]), RejectReason.LENGTH),
    ("VRRPv2", _packet(_tamper(0, 0x21)), RejectReason.VERSION),
    ("version 15", _packet(_tamper(0, 0xF1)), RejectReason.VERSION),
    ("type 2", _packet(_tamper(0, 0x32)), RejectReason.TYPE),
    ("count says 3, carries 2", _packet(_tamper(3, 3)), RejectReason.LENGTH),
    ("count 255, carries 2", _packet(_tamper(3, 255)), RejectReason.LENGTH),
    ("priority changed after checksum", _packet(_tamper(2, 255, fix_checksum=False)),
     RejectReason.CHECKSUM),
    ("zero checksum", _packet(_advert()[:6] + b"\x00\x00" + _advert()[8:]),
     RejectReason.CHECKSUM),
    ("address changed after checksum", _packet(_advert()[:-1] + b"\x02"), RejectReason.CHECKSUM),
]


@pytest.mark.parametrize(("packet", "reason"), [(p, r) for _, p, r in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_hostile_packets_rejected(packet: bytes, reason: RejectReason) -> None:
    assert parse_advert(packet) == Reject(reason)


def test_reserved_bits_ignored() -> None:
    message = _with_checksum(_advert()[:4] + b"\xf0" + _advert()[5:])
    parsed = parse_advert(_packet(message))
    assert isinstance(parsed, Advert)
    assert parsed.max_adver_int_cs == 10


def test_zero_interval_passes_codec() -> None:
    """Max Adver Int 0 is well formed; the machine drops it (RejectReason.INTERVAL)."""
    message = _with_checksum(_advert()[:4] + b"\x00\x00" + _advert()[6:])
    parsed = parse_advert(_packet(message))
    assert isinstance(parsed, Advert)
    assert parsed.max_adver_int_cs == 0


def test_trailing_padding_beyond_total_length_ignored() -> None:
    assert parse_advert(_packet(_advert()) + b"\x00" * 14) == parse_advert(_packet(_advert()))


def test_ip_options_skipped() -> None:
    payload = _advert()
    header = bytearray(_packet(payload)[:20])
    header[0] = 0x46
    struct.pack_into("!H", header, 2, 24 + len(payload))
    assert parse_advert(bytes(header) + b"\x94\x04\x00\x00" + payload) == parse_advert(
        _packet(payload)
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 100, 100, [VIP]), "VRID"),
        ((256, 100, 100, [VIP]), "VRID"),
        ((1, 256, 100, [VIP]), "priority"),
        ((1, -1, 100, [VIP]), "priority"),
        ((1, 100, 0, [VIP]), "Max Adver Int"),
        ((1, 100, 4096, [VIP]), "Max Adver Int"),
        ((1, 100, 100, []), "addresses"),
    ],
)
def test_encode_refuses_out_of_range(args: tuple[int, int, int, list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_advert(*args, SRC, VRRP_MULTICAST_GROUP)


@given(st.binary(max_size=600))
def test_parse_never_raises_on_random_bytes(data: bytes) -> None:
    assert isinstance(parse_advert(data), Advert | Reject)


@given(st.lists(st.tuples(st.integers(0, 35), st.integers(0, 255)), max_size=6),
       st.integers(0, 40))
def test_parse_never_raises_on_mutated_adverts(edits: list[tuple[int, int]], cut: int) -> None:
    packet = bytearray(_packet(_advert()))
    for offset, value in edits:
        packet[offset] = value
    result = parse_advert(bytes(packet[: len(packet) - cut]))
    assert isinstance(result, Advert | Reject)
    if edits == [] and cut == 0:
        assert isinstance(result, Advert)


@given(st.binary(min_size=8, max_size=200), st.integers(0, 255))
def test_parse_never_raises_on_vrrp_shaped_garbage(body: bytes, first: int) -> None:
    assert isinstance(parse_advert(_packet(bytes([first]) + body)), Advert | Reject)
