"""What the targets share: one input carrying several messages, byte mutation, IPv4 builders.

A fuzz input is bytes, whatever the engine. Targets that feed a sequence of messages to one
object (packets to a forwarder, chunks to a stream decoder) cut their input into records of
``u16 length + bytes``; a length running past the end takes what is left, so every byte
string is a valid input and a mutation of the length is just another split.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hypothesis import strategies as st

from lb.packet import PROTO_ICMP, PROTO_TCP, PROTO_UDP, checksum, pseudo_sum

_LEN = struct.Struct("!H")


def split(data: bytes) -> list[bytes]:
    """The records of ``data`` (see the module docstring)."""
    out: list[bytes] = []
    pos = 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        pos += _LEN.size
        out.append(data[pos : pos + n])
        pos += n
    return out


def join(records: Sequence[bytes]) -> bytes:
    """The inverse of :func:`split`."""
    return b"".join(_LEN.pack(len(r)) + r for r in records)


# --- mutation (for hypothesis; atheris mutates by itself) -------------------------------------

_edit = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
)


def mutated(base: st.SearchStrategy[bytes], max_edits: int = 4) -> st.SearchStrategy[bytes]:
    """``base``, then up to ``max_edits`` byte edits (set, bit flip, truncate, insert)."""

    def apply(args: tuple[bytes, list[tuple[str, int, int]]]) -> bytes:
        data, edits = bytearray(args[0]), args[1]
        for kind, at, value in edits:
            if kind == "insert":
                data.insert(at % (len(data) + 1), value)
            elif not data:
                continue
            elif kind == "set":
                data[at % len(data)] = value
            elif kind == "flip":
                data[at % len(data)] ^= 1 << value
            else:
                del data[at % len(data) :]
        return bytes(data)

    return st.tuples(base, st.lists(_edit, max_size=max_edits)).map(apply)


# --- IPv4 packets with valid checksums ----------------------------------------------------------

_IP = struct.Struct("!BBHHHBBH4s4s")


def ipv4(src: int, dst: int, proto: int, payload: bytes, *, ttl: int = 64, ident: int = 1,
         frag: int = 0x4000, tot_len: int | None = None, options: bytes = b"") -> bytes:
    """An IPv4 header (valid checksum) in front of ``payload``."""
    hl = 20 + len(options)
    length = hl + len(payload) if tot_len is None else tot_len
    head = bytearray(_IP.pack(0x40 | (hl >> 2), 0, length & 0xFFFF, ident, frag, ttl, proto, 0,
                              src.to_bytes(4, "big"), dst.to_bytes(4, "big")) + options)
    struct.pack_into("!H", head, 10, checksum(head))
    return bytes(head) + payload


def _l4_check(src: int, dst: int, proto: int, seg: bytearray, at: int) -> bytes:
    struct.pack_into("!H", seg, at, 0)
    value = checksum(seg, 0, len(seg), pseudo_sum(src, dst, proto, len(seg)))
    if proto == PROTO_UDP and value == 0:
        value = 0xFFFF
    struct.pack_into("!H", seg, at, value)
    return bytes(seg)


def tcp(src: int, dst: int, sport: int, dport: int, flags: int, *, seq: int = 1000,
        ack: int = 0, payload: bytes = b"") -> bytes:
    """A TCP segment (no IP header) with a valid checksum for ``src`` → ``dst``."""
    seg = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 29200, 0, 0)
                    + payload)
    return _l4_check(src, dst, PROTO_TCP, seg, 16)


def udp(src: int, dst: int, sport: int, dport: int, payload: bytes = b"ping") -> bytes:
    """A UDP datagram (no IP header) with a valid checksum for ``src`` → ``dst``."""
    seg = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    return _l4_check(src, dst, PROTO_UDP, seg, 6)


def icmp(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    """An ICMP message: type, code, checksum, 4 bytes ``rest``, then ``body``."""
    msg = bytearray(struct.pack("!BBH", icmp_type, code, 0) + rest[:4].ljust(4, b"\0") + body)
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


def ip_tcp(src: int, dst: int, sport: int, dport: int, flags: int, *, seq: int = 1000,
           ack: int = 0, payload: bytes = b"") -> bytes:
    segment = tcp(src, dst, sport, dport, flags, seq=seq, ack=ack, payload=payload)
    return ipv4(src, dst, PROTO_TCP, segment)


def ip_udp(src: int, dst: int, sport: int, dport: int, payload: bytes = b"ping") -> bytes:
    return ipv4(src, dst, PROTO_UDP, udp(src, dst, sport, dport, payload))


def ip_icmp(src: int, dst: int, icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    return ipv4(src, dst, PROTO_ICMP, icmp(icmp_type, code, rest, body))
