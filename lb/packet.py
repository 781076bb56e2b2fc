"""IPv4/TCP/UDP/ICMP codec and in-place NAT rewrite for the TUN data plane (pure, hot path).

Every function works on the caller's buffer at an offset ``off`` where the IPv4 header starts,
so the same code serves a TUN read with its 10-byte ``virtio_net_hdr`` (``off == 10``) and a
bare IP packet (``off == 0``). ``end`` is the index one past the last byte read.

Rules this module follows (see DESIGN.md section 1):

- Nothing here allocates more than Python forces: headers are read and written with
  ``struct.Struct`` objects compiled once, through ``unpack_from``/``pack_into``.
- Verdicts are values, not exceptions: :func:`parse` returns a :class:`Drop` reason for any
  packet lbd refuses and never raises, whatever the bytes.
- Checksums are updated incrementally (RFC 1624, ``HC' = ~(~HC + ~m + m')``) when the L4
  checksum is complete. When the vnet header carries ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` the
  L4 checksum field holds the *uncomplemented* pseudo-header sum ``P`` that the kernel (or the
  NIC) completes later; an address change then updates it as ``fold(P + ~old + new)`` and a
  port change needs no update at all, since ports are summed when the checksum is completed.
  The IPv4 header checksum is always complete.
- UDP checksum 0 means "no checksum" and stays 0; a computed 0 is sent as 0xFFFF.

Arithmetic note: since ``2**16 == 1 (mod 0xFFFF)``, the ones'-complement sum of 16-bit
big-endian words equals the value of those bytes as one big integer modulo 0xFFFF (with 0xFFFF
standing for a non-zero multiple). That is how sums are folded here, incremental or full.
"""

from __future__ import annotations

import enum
import struct
from typing import TypeAlias

ReadBuffer: TypeAlias = bytes | bytearray | memoryview
"""Anything a packet can be read from."""
WriteBuffer: TypeAlias = bytearray | memoryview
"""A buffer rewritten in place (a writable memoryview or bytearray)."""

# --- virtio_net_hdr (host order, little-endian on every platform lbd runs on) -------------------

VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2

VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP = 3
VNET_GSO_TCPV6 = 4
VNET_GSO_ECN = 0x80

VNET_HDR = struct.Struct("<BBHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
VNET_HDR_NONE = bytes(VNET_HDR_LEN)
"""A vnet header for a packet with complete checksums and no GSO (what builders write)."""

# --- IP protocol numbers, TCP flags, ICMP types ---------------------------------------------------

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAM_PROBLEM = 12
ICMP_FRAG_NEEDED = 4
"""Code of a destination-unreachable message whose bytes 6-7 carry the next-hop MTU."""

IPV4_HDR_LEN = 20
TCP_HDR_LEN = 20
UDP_HDR_LEN = 8
ICMP_HDR_LEN = 8
RST_LEN = IPV4_HDR_LEN + TCP_HDR_LEN
"""Length of what :func:`build_rst` writes."""
DEFAULT_TTL = 64

# Byte offsets inside the headers.
_IP_TTL = 8
_IP_CHECK = 10
_IP_SADDR = 12
_IP_DADDR = 16
_TCP_CHECK = 16
_UDP_CHECK = 6
_ICMP_CHECK = 2

# --- precompiled layouts -------------------------------------------------------------------------

# version/ihl, total length, flags/fragment offset, protocol, saddr, daddr
_IP_PARSE = struct.Struct("!BxH2xHxB2xII")
_TCP_PARSE = struct.Struct("!HH8xBB")  # sport, dport, data offset byte, flags byte
_TCP_SEQ = struct.Struct("!II")  # seq, ack
_UDP_PARSE = struct.Struct("!HHH")  # sport, dport, length
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U16X2 = struct.Struct("!HH")
_U8X2 = struct.Struct("!BB")
_IP_CHECK_SADDR = struct.Struct("!HI")  # at off + 10: header checksum, saddr
_IP_CHECK_ADDRS = struct.Struct("!HII")  # at off + 10: header checksum, saddr, daddr
_RST = struct.Struct("!BBHHHBBHIIHHIIBBHHH")  # IPv4 header (20) + TCP header (20)


class Drop(enum.IntEnum):
    """Why a packet is refused. Values are stable: metrics label them by ``name.lower()``."""

    TRUNCATED = 1
    """Fewer bytes than an IPv4 header."""
    NOT_IPV4 = 2
    """IP version is not 4."""
    BAD_IHL = 3
    """IHL below 5 words."""
    BAD_LENGTH = 4
    """Total length below the header length or beyond the bytes read."""
    FRAGMENT = 5
    """MF set or fragment offset non-zero: lbd does not reassemble (the kernel in front does)."""
    BAD_L4 = 6
    """L4 header truncated, TCP data offset below 5 or beyond the packet, bad UDP length."""
    UNSUPPORTED_PROTO = 7
    """Neither TCP, UDP nor ICMP (or, inside an ICMP error, neither TCP nor UDP)."""
    NOT_ICMP_ERROR = 8
    """An ICMP message that is not destination unreachable, time exceeded or parameter problem."""
    BAD_ICMP_INNER = 9
    """An ICMP error whose quoted packet is not an IPv4 header plus 8 bytes of L4 header."""


ParseResult: TypeAlias = tuple[int, int, int, int, int, int, int]
"""(proto, saddr, daddr, sport, dport, l4_off, tcp_flags) from :func:`parse`."""
IcmpErrorResult: TypeAlias = tuple[int, int, int, int, int, int, int]
"""(inner_proto, inner_saddr, inner_daddr, inner_sport, inner_dport, inner_ip_off,
inner_l4_off) from :func:`parse_icmp_error`."""


# --- vnet header ----------------------------------------------------------------------------------


def vnet_partial(buf: ReadBuffer) -> bool:
    """True when the vnet header at the start of ``buf`` says NEEDS_CSUM (L4 checksum partial)."""
    return bool(buf[0] & VNET_F_NEEDS_CSUM)


def vnet_header(buf: ReadBuffer) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) from the start of ``buf``."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
    return flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


# --- checksum arithmetic --------------------------------------------------------------------------


def _fold(s: int) -> int:
    """Fold a non-negative sum into 16 bits with end-around carry (0 only when ``s`` is 0)."""
    r = s % 0xFFFF
    if r or not s:
        return r
    return 0xFFFF


def csum_replace4(check: int, old: int, new: int) -> int:
    """RFC 1624 eqn 3 update of a complete (complemented) checksum for a 32-bit field change."""
    return 0xFFFF - _fold((check ^ 0xFFFF) + (old ^ 0xFFFFFFFF) + new)


def csum_replace2(check: int, old: int, new: int) -> int:
    """RFC 1624 eqn 3 update of a complete (complemented) checksum for a 16-bit field change."""
    return 0xFFFF - _fold((check ^ 0xFFFF) + (old ^ 0xFFFF) + new)


def pseudo_replace4(partial: int, old: int, new: int) -> int:
    """Update an uncomplemented pseudo-header partial sum for a 32-bit address change."""
    return _fold(partial + (old ^ 0xFFFFFFFF) + new)


def sum16(data: ReadBuffer, start: int = 0, end: int | None = None, initial: int = 0) -> int:
    """Folded, uncomplemented ones'-complement sum of ``data[start:end]`` plus ``initial``.

    The words are big-endian; an odd trailing byte is padded with a zero byte.
    """
    if end is None:
        end = len(data)
    n = int.from_bytes(memoryview(data)[start:end], "big")
    if (end - start) & 1:
        n <<= 8
    return _fold(n + initial)


def checksum(data: ReadBuffer, start: int = 0, end: int | None = None, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of ``data[start:end]``, ``initial`` being a partial sum to add
    (e.g. a pseudo-header sum). The checksum field itself must hold 0 in ``data``.
    """
    return 0xFFFF - sum16(data, start, end, initial)


def pseudo_sum(saddr: int, daddr: int, proto: int, length: int) -> int:
    """Folded uncomplemented IPv4 pseudo-header sum: what a NEEDS_CSUM L4 checksum field holds."""
    return _fold(saddr + daddr + proto + length)


# --- parse ----------------------------------------------------------------------------------------


def parse(buf: ReadBuffer, off: int, end: int) -> ParseResult | Drop:
    """Validate the IPv4 and L4 headers of the packet at ``buf[off:end]``.

    Returns ``(proto, saddr, daddr, sport, dport, l4_off, tcp_flags)``: addresses as 32-bit
    integers, ``l4_off`` absolute in ``buf``, ``tcp_flags`` the TCP flags byte (0 for UDP and
    ICMP); for ICMP, ``sport`` is the type and ``dport`` the code. Otherwise returns the
    :class:`Drop` reason (test with ``isinstance(result, Drop)``). The packet
    ends at IP total length, which must fit in ``end`` (a GSO super-packet's total length covers
    the whole super-packet); bytes after it are ignored. Checksums are not verified: the kernel
    that routed the packet into the TUN device did. Never raises.
    """
    end = min(end, len(buf))
    if end - off < IPV4_HDR_LEN:
        return Drop.TRUNCATED
    vihl, tot_len, frag, proto, saddr, daddr = _IP_PARSE.unpack_from(buf, off)
    if vihl >> 4 != 4:
        return Drop.NOT_IPV4
    hl = (vihl & 0x0F) << 2
    if hl < IPV4_HDR_LEN:
        return Drop.BAD_IHL
    if tot_len < hl or tot_len > end - off:
        return Drop.BAD_LENGTH
    if frag & 0x3FFF:
        return Drop.FRAGMENT
    l4_off = off + hl
    l4_len = tot_len - hl
    if proto == PROTO_TCP:
        if l4_len < TCP_HDR_LEN:
            return Drop.BAD_L4
        sport, dport, doff, flags = _TCP_PARSE.unpack_from(buf, l4_off)
        doff = (doff >> 4) << 2
        if doff < TCP_HDR_LEN or doff > l4_len:
            return Drop.BAD_L4
        return PROTO_TCP, saddr, daddr, sport, dport, l4_off, flags
    if proto == PROTO_UDP:
        if l4_len < UDP_HDR_LEN:
            return Drop.BAD_L4
        sport, dport, ulen = _UDP_PARSE.unpack_from(buf, l4_off)
        if ulen < UDP_HDR_LEN or ulen > l4_len:
            return Drop.BAD_L4
        return PROTO_UDP, saddr, daddr, sport, dport, l4_off, 0
    if proto == PROTO_ICMP:
        if l4_len < ICMP_HDR_LEN:
            return Drop.BAD_L4
        icmp_type, icmp_code = _U8X2.unpack_from(buf, l4_off)
        return PROTO_ICMP, saddr, daddr, icmp_type, icmp_code, l4_off, 0
    return Drop.UNSUPPORTED_PROTO


def packet_end(buf: ReadBuffer, off: int) -> int:
    """Index one past the IP packet at ``off`` according to its total length (parse it first)."""
    tot_len: int = _U16.unpack_from(buf, off + 2)[0]
    return off + tot_len


# --- NAT rewrite ----------------------------------------------------------------------------------


def _l4_check_update(buf: WriteBuffer, check_at: int, udp: bool, delta: int, partial: int) -> None:
    """Add ``delta`` (the ones'-complement change of the summed fields, > 0) to the L4 checksum
    at ``check_at``: to the partial sum as is, to a complete checksum per RFC 1624."""
    check: int = _U16.unpack_from(buf, check_at)[0]
    if partial:
        _U16.pack_into(buf, check_at, (check + delta) % 0xFFFF or 0xFFFF)
    elif udp:
        if check:  # 0: no checksum, stays none
            check = 0xFFFF - (((check ^ 0xFFFF) + delta) % 0xFFFF or 0xFFFF)
            _U16.pack_into(buf, check_at, check or 0xFFFF)
    else:
        _U16.pack_into(buf, check_at, 0xFFFF - (((check ^ 0xFFFF) + delta) % 0xFFFF or 0xFFFF))


def rewrite_dst(
    buf: WriteBuffer,
    off: int,
    l4_off: int,
    proto: int,
    new_addr: int,
    new_port: int,
    partial: int,
) -> None:
    """Set the IPv4 destination address and the TCP/UDP destination port in place.

    Fixes the IPv4 header checksum and the L4 checksum: RFC 1624 when the L4 checksum is
    complete, the pseudo-header rule when ``partial`` is true (the vnet header says
    NEEDS_CSUM; ``buf[0] & VNET_F_NEEDS_CSUM`` or :func:`vnet_partial` both do).
    Fields that do not change are not touched. For protocols without ports (ICMP) only the
    address changes. ``l4_off`` and ``proto`` come from :func:`parse`.
    """
    at = off + _IP_CHECK
    ip_check, saddr, old_addr = _IP_CHECK_ADDRS.unpack_from(buf, at)
    delta = 0
    if old_addr != new_addr:
        delta = (old_addr ^ 0xFFFFFFFF) + new_addr
        ip_check = 0xFFFF - (((ip_check ^ 0xFFFF) + delta) % 0xFFFF or 0xFFFF)
        _IP_CHECK_ADDRS.pack_into(buf, at, ip_check, saddr, new_addr)
    if proto == PROTO_TCP:
        check_at = l4_off + _TCP_CHECK
    elif proto == PROTO_UDP:
        check_at = l4_off + _UDP_CHECK
    else:
        return  # no ports and no pseudo-header (ICMP)
    port_at = l4_off + 2
    old_port: int = _U16.unpack_from(buf, port_at)[0]
    if old_port != new_port:
        _U16.pack_into(buf, port_at, new_port)
        if not partial:
            delta += (old_port ^ 0xFFFF) + new_port
    if delta:
        _l4_check_update(buf, check_at, proto == PROTO_UDP, delta, partial)


def rewrite_src(
    buf: WriteBuffer,
    off: int,
    l4_off: int,
    proto: int,
    new_addr: int,
    new_port: int,
    partial: int,
) -> None:
    """Set the IPv4 source address and the TCP/UDP source port in place (see
    :func:`rewrite_dst` for the checksum rules).
    """
    at = off + _IP_CHECK
    ip_check, old_addr = _IP_CHECK_SADDR.unpack_from(buf, at)
    delta = 0
    if old_addr != new_addr:
        delta = (old_addr ^ 0xFFFFFFFF) + new_addr
        ip_check = 0xFFFF - (((ip_check ^ 0xFFFF) + delta) % 0xFFFF or 0xFFFF)
        _IP_CHECK_SADDR.pack_into(buf, at, ip_check, new_addr)
    if proto == PROTO_TCP:
        check_at = l4_off + _TCP_CHECK
    elif proto == PROTO_UDP:
        check_at = l4_off + _UDP_CHECK
    else:
        return  # no ports and no pseudo-header (ICMP)
    old_port: int = _U16.unpack_from(buf, l4_off)[0]
    if old_port != new_port:
        _U16.pack_into(buf, l4_off, new_port)
        if not partial:
            delta += (old_port ^ 0xFFFF) + new_port
    if delta:
        _l4_check_update(buf, check_at, proto == PROTO_UDP, delta, partial)


# --- ICMP -----------------------------------------------------------------------------------------


def icmp_echo_reply(buf: WriteBuffer, off: int, end: int) -> bool:
    """Turn the ICMP echo request at ``buf[off:end]`` into its echo reply, in place.

    Swaps the addresses, sets type 0 and TTL 64, and updates the IPv4 and ICMP checksums
    incrementally (a corrupt request yields a reply the sender will drop, as it should). The
    caller has checked that the destination is one of ours. Returns False, touching nothing,
    when the packet is not a well-formed, unfragmented IPv4 ICMP echo request. The reply keeps
    the request's length.
    """
    res = parse(buf, off, end)
    if isinstance(res, Drop):
        return False
    proto, saddr, daddr, icmp_type, icmp_code, l4_off, _ = res
    if proto != PROTO_ICMP or icmp_type != ICMP_ECHO_REQUEST or icmp_code != 0:
        return False
    # Swapping the addresses leaves the header sum unchanged; the TTL word does change.
    _U32.pack_into(buf, off + _IP_SADDR, daddr)
    _U32.pack_into(buf, off + _IP_DADDR, saddr)
    ttl_at = off + _IP_TTL
    old_word: int = _U16.unpack_from(buf, ttl_at)[0]
    new_word = (DEFAULT_TTL << 8) | (old_word & 0xFF)
    if new_word != old_word:
        _U16.pack_into(buf, ttl_at, new_word)
        ip_check: int = _U16.unpack_from(buf, off + _IP_CHECK)[0]
        _U16.pack_into(buf, off + _IP_CHECK, csum_replace2(ip_check, old_word, new_word))
    type_code = (ICMP_ECHO_REQUEST << 8) | icmp_code
    _U8.pack_into(buf, l4_off, ICMP_ECHO_REPLY)
    icmp_check: int = _U16.unpack_from(buf, l4_off + _ICMP_CHECK)[0]
    _U16.pack_into(
        buf, l4_off + _ICMP_CHECK, csum_replace2(icmp_check, type_code, ICMP_ECHO_REPLY << 8)
    )
    return True


def parse_icmp_error(buf: ReadBuffer, off: int, l4_off: int, end: int) -> IcmpErrorResult | Drop:
    """Parse the packet quoted in an ICMP error (types 3, 11, 12) whose outer packet
    :func:`parse` has validated (``l4_off`` from it).

    Returns ``(inner_proto, inner_saddr, inner_daddr, inner_sport, inner_dport, inner_ip_off,
    inner_l4_off)`` for a quoted TCP or UDP packet with at least its IPv4 header and 8 bytes of
    L4 header; otherwise a :class:`Drop`. The quoted packet's total length is not checked: it is
    the original's, and the quote is usually shorter. Never raises.
    """
    end = min(end, len(buf))
    if end - off >= 4:
        outer_end = off + _U16.unpack_from(buf, off + 2)[0]
        end = min(end, outer_end)
    if l4_off < off or end - l4_off < ICMP_HDR_LEN:
        return Drop.BAD_L4
    icmp_type = buf[l4_off]
    if icmp_type not in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM):
        return Drop.NOT_ICMP_ERROR
    ip_off = l4_off + ICMP_HDR_LEN
    if end - ip_off < IPV4_HDR_LEN:
        return Drop.BAD_ICMP_INNER
    vihl, _, frag, proto, saddr, daddr = _IP_PARSE.unpack_from(buf, ip_off)
    hl = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or hl < IPV4_HDR_LEN or frag & 0x1FFF:
        return Drop.BAD_ICMP_INNER
    if proto not in (PROTO_TCP, PROTO_UDP):
        return Drop.UNSUPPORTED_PROTO
    inner_l4 = ip_off + hl
    if end - inner_l4 < 8:
        return Drop.BAD_ICMP_INNER
    sport, dport = _U16X2.unpack_from(buf, inner_l4)
    return proto, saddr, daddr, sport, dport, ip_off, inner_l4


def _translate_icmp_error(
    buf: WriteBuffer,
    off: int,
    end: int,
    inner_ip_off: int,
    inner_l4_off: int,
    inner_proto: int,
    outer_addr_at: int,
    inner_addr_at: int,
    inner_port_at: int,
    addr: int,
    port: int,
) -> None:
    """Shared body of the two ICMP error translations (field offsets passed in)."""
    end = min(end, len(buf), off + _U16.unpack_from(buf, off + 2)[0])
    # Outer address: the IPv4 header checksum only (ICMP has no pseudo-header).
    old: int = _U32.unpack_from(buf, off + outer_addr_at)[0]
    if old != addr:
        _U32.pack_into(buf, off + outer_addr_at, addr)
        check: int = _U16.unpack_from(buf, off + _IP_CHECK)[0]
        _U16.pack_into(buf, off + _IP_CHECK, csum_replace4(check, old, addr))
    # Inner address: the quoted IPv4 header checksum, and the quoted L4 checksum if quoted.
    if inner_proto == PROTO_TCP:
        l4_check_at = inner_l4_off + _TCP_CHECK
    else:
        l4_check_at = inner_l4_off + _UDP_CHECK
    l4_quoted = l4_check_at + 2 <= end
    delta = 0
    old = _U32.unpack_from(buf, inner_ip_off + inner_addr_at)[0]
    if old != addr:
        _U32.pack_into(buf, inner_ip_off + inner_addr_at, addr)
        check = _U16.unpack_from(buf, inner_ip_off + _IP_CHECK)[0]
        _U16.pack_into(buf, inner_ip_off + _IP_CHECK, csum_replace4(check, old, addr))
        delta = (old ^ 0xFFFFFFFF) + addr
    old_port: int = _U16.unpack_from(buf, inner_l4_off + inner_port_at)[0]
    if old_port != port:
        _U16.pack_into(buf, inner_l4_off + inner_port_at, port)
        delta += (old_port ^ 0xFFFF) + port
    if delta and l4_quoted:
        check = _U16.unpack_from(buf, l4_check_at)[0]
        if inner_proto == PROTO_TCP:
            _U16.pack_into(buf, l4_check_at, 0xFFFF - _fold((check ^ 0xFFFF) + delta))
        elif check:
            check = 0xFFFF - _fold((check ^ 0xFFFF) + delta)
            _U16.pack_into(buf, l4_check_at, check or 0xFFFF)
    # The ICMP message is small: recompute its checksum in full.
    icmp_off = off + ((buf[off] & 0x0F) << 2)
    _U16.pack_into(buf, icmp_off + _ICMP_CHECK, 0)
    _U16.pack_into(buf, icmp_off + _ICMP_CHECK, checksum(buf, icmp_off, end))


def translate_icmp_error_from_server(
    buf: WriteBuffer,
    off: int,
    end: int,
    inner_ip_off: int,
    inner_l4_off: int,
    inner_proto: int,
    vaddr: int,
    vport: int,
) -> None:
    """Make an ICMP error from the server side, about a client→server packet (inner src =
    client, inner dst = RIP:rport), look to the client as if it came from the VIP.

    Sets outer src := ``vaddr``, inner dst := ``vaddr``, inner dport := ``vport``; fixes the
    outer and inner IPv4 header checksums, applies RFC 1624 to the inner L4 checksum when it
    lies within the quoted bytes (UDP always; TCP only when more than 8 bytes are quoted), and
    recomputes the ICMP checksum in full. The fragmentation-needed MTU is left as is. The
    offsets and ``inner_proto`` come from :func:`parse_icmp_error`.
    """
    _translate_icmp_error(
        buf, off, end, inner_ip_off, inner_l4_off, inner_proto,
        _IP_SADDR, _IP_DADDR, 2, vaddr, vport,
    )  # fmt: skip


def translate_icmp_error_from_client(
    buf: WriteBuffer,
    off: int,
    end: int,
    inner_ip_off: int,
    inner_l4_off: int,
    inner_proto: int,
    raddr: int,
    rport: int,
) -> None:
    """Mirror of :func:`translate_icmp_error_from_server` for an ICMP error a client sends
    about a VIP→client reply: outer dst := ``raddr``, inner src VIP:vport := ``raddr:rport``,
    with the same checksum handling, so that it reaches the real server that sent the reply.
    """
    _translate_icmp_error(
        buf, off, end, inner_ip_off, inner_l4_off, inner_proto,
        _IP_DADDR, _IP_SADDR, 0, raddr, rport,
    )  # fmt: skip


# --- TCP reset ------------------------------------------------------------------------------------


def build_rst(buf: ReadBuffer, off: int, end: int, out: WriteBuffer, out_off: int) -> int:
    """Write at ``out[out_off:]`` an IPv4+TCP RST answering the TCP segment at ``buf[off:end]``.

    The reset goes back to the segment's sender (addresses and ports swapped). Per RFC 793:
    if the segment has ACK, the reset's seq is its ack number and its flags are RST; otherwise
    seq is 0, ack is the segment's seq plus its length (payload, SYN and FIN each count one)
    and flags are RST|ACK. Window 0, TTL 64, DF, full checksums. ``out`` needs
    :data:`RST_LEN` bytes from ``out_off`` (a vnet header before it is the caller's:
    :data:`VNET_HDR_NONE`). Returns the length written, or 0 when the input is not a valid
    TCP segment or is itself a RST (a RST is never answered).
    """
    res = parse(buf, off, end)
    if isinstance(res, Drop):
        return 0
    proto, saddr, daddr, sport, dport, l4_off, flags = res
    if proto != PROTO_TCP or flags & RST:
        return 0
    seq, ack = _TCP_SEQ.unpack_from(buf, l4_off + 4)
    if flags & ACK:
        rst_seq = ack
        rst_ack = 0
        rst_flags = RST
    else:
        tot_len: int = _U16.unpack_from(buf, off + 2)[0]
        seg_len = off + tot_len - l4_off - ((buf[l4_off + 12] >> 4) << 2)
        if flags & SYN:
            seg_len += 1
        if flags & FIN:
            seg_len += 1
        rst_seq = 0
        rst_ack = (seq + seg_len) & 0xFFFFFFFF
        rst_flags = RST | ACK
    ip_check = _rst_ip_check(RST_LEN, DEFAULT_TTL, PROTO_TCP, daddr, saddr)
    tcp_sum = (
        pseudo_sum(daddr, saddr, PROTO_TCP, TCP_HDR_LEN)
        + dport
        + sport
        + rst_seq
        + rst_ack
        + ((5 << 12) | rst_flags)
    )
    _RST.pack_into(
        out, out_off,
        0x45, 0, RST_LEN, 0, 0x4000, DEFAULT_TTL, PROTO_TCP, ip_check, daddr, saddr,
        dport, sport, rst_seq, rst_ack, 5 << 4, rst_flags, 0, 0xFFFF - _fold(tcp_sum), 0,
    )  # fmt: skip
    return RST_LEN


def _rst_ip_check(tot_len: int, ttl: int, proto: int, saddr: int, daddr: int) -> int:
    """IPv4 header checksum of a 20-byte header with version 4, IHL 5, TOS 0, ID 0, DF and the
    given fields (what :func:`build_rst` writes)."""
    return 0xFFFF - _fold(0x4500 + tot_len + 0x4000 + (ttl << 8) + proto + saddr + daddr)
