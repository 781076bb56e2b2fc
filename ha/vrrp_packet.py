"""VRRPv3 advertisement codec for IPv4 (RFC 5798 §5), pure: bytes in, values out.

Rules of this module:

- :func:`encode_advert` builds the VRRP message only; the kernel puts the IPv4 header around it
  (raw socket without ``IP_HDRINCL``). The checksum is the RFC one (§5.2.8): over the IPv4
  pseudo-header (source, destination, zero, protocol 112, VRRP length) and the message.
- :func:`parse_advert` takes what a raw IPv4 socket delivers on Linux: the whole IP packet,
  header included. It applies the receive checks of RFC 5798 §7.1 that need nothing but the
  packet (TTL 255, version 3, complete message, checksum) plus the ones a raw socket does not
  do for us (protocol 112, advertisement type). Checks that need configuration (VRID, address
  list, sender) belong to the state machine and the I/O shell; they reuse
  :class:`RejectReason`.
- Both checksum forms are accepted: the RFC form and keepalived's ``v3_checksum_as_v2`` form
  (the message alone, no pseudo-header).
- It never raises on received bytes: every malformed packet is a :class:`Reject` with one
  reason. Encoding raises :class:`ValueError` on out-of-range fields, which is our own bug.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

VRRP_PROTOCOL = 112
"""IP protocol number of VRRP."""
VRRP_MULTICAST_GROUP = 0xE0000012
"""224.0.0.18, the IPv4 multicast group adverts are sent to (RFC 5798 §5.1.1.2)."""
VRRP_TTL = 255
"""Adverts are sent with TTL 255 and a receiver drops any other TTL (§5.1.1.3, §7.1)."""
VRRP_VERSION = 3
ADVERTISEMENT = 1
"""The only VRRP packet type (§5.2.2)."""
MAX_ADVER_INT_CS = 0x0FFF
"""Max Adver Int is a 12-bit count of centiseconds (§5.2.7)."""

_HEADER = struct.Struct("!BBBBHH")  # ver|type, vrid, priority, count, rsvd|max adver int, csum
_IPV4_MIN = struct.Struct("!BBHHHBBH4s4s")
_ADDRESS = struct.Struct("!I")


class RejectReason(enum.Enum):
    """Why an advert was dropped. The value is a stable label for metrics and logs."""

    IP_HEADER = "ip_header"
    """Not a well-formed IPv4 header (version, header length)."""
    PROTOCOL = "protocol"
    """IP protocol is not 112."""
    TTL = "ttl"
    """IP TTL is not 255: the sender is not on our link (§7.1)."""
    LENGTH = "length"
    """Packet too short for the VRRP header or for the announced address count."""
    VERSION = "version"
    """VRRP version is not 3."""
    TYPE = "type"
    """VRRP type is not 1 (advertisement)."""
    CHECKSUM = "checksum"
    """Neither the RFC checksum nor keepalived's v2-style checksum matches."""
    VRID = "vrid"
    """No instance of ours has this VRID (I/O shell) or it is not this instance's (machine)."""
    ADDRESS_LIST = "address_list"
    """The advertised address set differs from ours (dropped, as keepalived 2.x does)."""
    INTERVAL = "interval"
    """Max Adver Int of zero (RFC 9568 §7.1, erratum 8301 to RFC 5798)."""
    OWN_ADDRESS = "own_address"
    """The advert comes from our own primary address (looped back)."""
    UNKNOWN_PEER = "unknown_peer"
    """Unicast mode: the sender is not one of the instance's configured peers."""


@dataclass(frozen=True, slots=True)
class Advert:
    """A VRRPv3 advertisement that passed the packet-level checks."""

    src: int
    """IPv4 source of the packet: the sender's primary address, used as the tie-break."""
    vrid: int
    priority: int
    """0 means the sender stops being master (§5.2.4); 255 means it owns the addresses."""
    max_adver_int_cs: int
    """The sender's advertisement interval in centiseconds."""
    addresses: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reject:
    """A packet that was dropped, and why."""

    reason: RejectReason


def _ones_sum(data: bytes | memoryview, initial: int = 0) -> int:
    """One's-complement sum of 16-bit big-endian words, folded to 16 bits."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = initial + sum(words)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo_header_sum(src: int, dst: int, length: int) -> int:
    return _ones_sum(struct.pack("!IIBBH", src, dst, 0, VRRP_PROTOCOL, length))


def encode_advert(
    vrid: int,
    priority: int,
    max_adver_int_cs: int,
    addresses: Sequence[int],
    src: int,
    dst: int,
    *,
    checksum_as_v2: bool = False,
) -> bytes:
    """The VRRPv3 message (no IP header) for one advertisement.

    ``src`` and ``dst`` are the IPv4 source and destination the packet will carry; they only
    enter the checksum. ``checksum_as_v2`` computes keepalived's non-RFC form instead, for a
    peer configured with ``v3_checksum_as_v2``.
    """
    if not 1 <= vrid <= 255:
        raise ValueError(f"VRID out of range 1..255: {vrid}")
    if not 0 <= priority <= 255:
        raise ValueError(f"priority out of range 0..255: {priority}")
    if not 1 <= max_adver_int_cs <= MAX_ADVER_INT_CS:
        raise ValueError(f"Max Adver Int out of range 1..4095 cs: {max_adver_int_cs}")
    if not 1 <= len(addresses) <= 255:
        raise ValueError(f"an advert carries 1..255 addresses, not {len(addresses)}")
    body = b"".join(_ADDRESS.pack(address) for address in addresses)
    header = _HEADER.pack(
        (VRRP_VERSION << 4) | ADVERTISEMENT, vrid, priority, len(addresses), max_adver_int_cs, 0
    )
    length = len(header) + len(body)
    initial = 0 if checksum_as_v2 else _pseudo_header_sum(src, dst, length)
    checksum = ~_ones_sum(header + body, initial) & 0xFFFF
    return header[:6] + struct.pack("!H", checksum) + body


def ipv4_packet(src: int, dst: int, payload: bytes, *, ttl: int = VRRP_TTL,
                protocol: int = VRRP_PROTOCOL) -> bytes:
    """An IPv4 packet (20-byte header, valid header checksum) around ``payload``.

    This is what the kernel builds around an advert sent on a raw socket, and so what
    :func:`parse_advert` receives; tests and fakes use it to stand in for the kernel.
    """
    header = bytearray(
        _IPV4_MIN.pack(0x45, 0xC0, 20 + len(payload), 0, 0, ttl, protocol, 0,
                       _ADDRESS.pack(src), _ADDRESS.pack(dst))
    )
    struct.pack_into("!H", header, 10, ~_ones_sum(bytes(header)) & 0xFFFF)
    return bytes(header) + payload


def parse_advert(packet: bytes | bytearray | memoryview) -> Advert | Reject:
    """Check and decode one received IPv4 packet (IP header included). Never raises."""
    data = memoryview(packet)
    if len(data) < 20:
        return Reject(RejectReason.LENGTH)
    version_ihl = data[0]
    header_len = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header_len < 20:
        return Reject(RejectReason.IP_HEADER)
    if data[9] != VRRP_PROTOCOL:
        return Reject(RejectReason.PROTOCOL)
    if data[8] != VRRP_TTL:
        return Reject(RejectReason.TTL)
    # Linux hands raw sockets the packet trimmed to Total Length; anything shorter is damaged.
    total_len = (data[2] << 8) | data[3]
    if header_len > total_len or total_len > len(data):
        return Reject(RejectReason.LENGTH)
    message = data[header_len:total_len]
    if len(message) < _HEADER.size:
        return Reject(RejectReason.LENGTH)
    version_type, vrid, priority, count, rsvd_interval, _ = _HEADER.unpack_from(message)
    if version_type >> 4 != VRRP_VERSION:
        return Reject(RejectReason.VERSION)
    if version_type & 0x0F != ADVERTISEMENT:
        return Reject(RejectReason.TYPE)
    if len(message) < _HEADER.size + 4 * count:
        return Reject(RejectReason.LENGTH)
    src = int.from_bytes(data[12:16], "big")
    dst = int.from_bytes(data[16:20], "big")
    plain = _ones_sum(message)
    if plain != 0xFFFF and _ones_sum(message, _pseudo_header_sum(src, dst, len(message))) != 0xFFFF:
        return Reject(RejectReason.CHECKSUM)
    addresses = tuple(
        _ADDRESS.unpack_from(message, _HEADER.size + 4 * i)[0] for i in range(count)
    )
    # The 4 reserved bits are ignored on receipt (§5.2.6).
    return Advert(src, vrid, priority, rsvd_interval & MAX_ADVER_INT_CS, addresses)
