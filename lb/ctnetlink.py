"""The few ctnetlink messages the kernel fast path needs, encoded and decoded (pure).

lbd creates one conntrack entry per flow it hands to the kernel (:mod:`lb.offload`): the
client's tuple with a destination NAT to the real server, so the kernel translates the rest
of the flow itself. That happens once per new connection, on the data plane's path, so the
messages are packed with one :class:`struct.Struct` call into a reusable buffer instead of
through pyroute2's generic encoder (which the control-plane operations, the flush at start
and stop, still use). ``tests/unit/test_ctnetlink.py`` decodes every message built here with
pyroute2's own ``nfct_msg`` parser.

Layout (``linux/netfilter/nfnetlink_conntrack.h``): a netlink header, the 4-byte
``nfgenmsg`` (AF_INET), then attributes. Header fields are host order, attribute values
network order; the headers of a message are constants here (sequence number and port id 0:
replies are matched by the tuple they carry, and an error echoes the request whole), so the
whole message is one big-endian format in which the header runs are pre-packed bytes.

Decoding covers what comes back: the events lbd subscribes to (an update: the flow became
ASSURED; a destroy), the answer to a GET, and errors, which echo the request they refuse.
Each decodes to a :class:`CtMessage` naming the flow by lbd's forward key
(:func:`lb.sessions.flow_key`: ``proto, client, client port, VIP, VIP port``).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Final

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_CTNETLINK: Final = 1
IPCTNL_MSG_CT_NEW: Final = 0
IPCTNL_MSG_CT_GET: Final = 1
IPCTNL_MSG_CT_DELETE: Final = 2
NFNLGRP_CONNTRACK_UPDATE: Final = 2
NFNLGRP_CONNTRACK_DESTROY: Final = 3

NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
NLA_F_NESTED: Final = 0x8000

CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_REPLY: Final = 2
CTA_STATUS: Final = 3
CTA_PROTOINFO: Final = 4
CTA_TIMEOUT: Final = 7
CTA_MARK: Final = 8
CTA_NAT_DST: Final = 13
CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_IP_V4_SRC: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_PROTO_NUM: Final = 1
CTA_PROTO_SRC_PORT: Final = 2
CTA_PROTO_DST_PORT: Final = 3
CTA_PROTOINFO_TCP: Final = 1
CTA_PROTOINFO_TCP_STATE: Final = 1
CTA_NAT_V4_MINIP: Final = 1
CTA_NAT_V4_MAXIP: Final = 2
CTA_NAT_PROTO: Final = 3
CTA_PROTONAT_PORT_MIN: Final = 1
CTA_PROTONAT_PORT_MAX: Final = 2

IPS_ASSURED: Final = 0x4
"""``ct->status`` bit: the kernel saw the flow's handshake complete (TCP: ESTABLISHED)."""

# The kernel's TCP conntrack states (enum tcp_conntrack).
CT_TCP_SYN_SENT: Final = 1
CT_TCP_SYN_RECV: Final = 2
CT_TCP_ESTABLISHED: Final = 3
CT_TCP_FIN_WAIT: Final = 4
CT_TCP_CLOSE_WAIT: Final = 5
CT_TCP_LAST_ACK: Final = 6
CT_TCP_TIME_WAIT: Final = 7
CT_TCP_CLOSE: Final = 8

_U32: Final = 0xFFFFFFFF
_U16: Final = 0xFFFF
_NLA: Final = struct.Struct("=HH")
_NLMSG: Final = struct.Struct("=IHHII")
_ERRNO: Final = struct.Struct("=i")
_BE32: Final = struct.Struct(">I")
_BE16: Final = struct.Struct(">H")


def _nla(atype: int, length: int, *, nested: bool = False) -> bytes:
    return _NLA.pack(length, atype | (NLA_F_NESTED if nested else 0))


def _header(length: int, msg: int, flags: int) -> tuple[bytes, bytes]:
    """The constant parts of a request's first 20 bytes, around its sequence number: length,
    type and flags; then the port id (0) and the nfgenmsg (family, version, res_id)."""
    return (struct.pack("=IHH", length, (NFNL_SUBSYS_CTNETLINK << 8) | msg, flags),
            bytes(4) + bytes((socket.AF_INET, 0, 0, 0)))


TUPLE_LEN: Final = 52
"""An IPv4 tuple attribute: IP (src, dst) and proto (number, ports), with their headers."""

_TUPLE_FMT: Final = "4s4s4sI4sI4s4sB3x4sH2x4sH2x"


def _tuple_heads(atype: int) -> tuple[bytes, ...]:
    return (_nla(atype, TUPLE_LEN, nested=True), _nla(CTA_TUPLE_IP, 20, nested=True),
            _nla(CTA_IP_V4_SRC, 8), _nla(CTA_IP_V4_DST, 8),
            _nla(CTA_TUPLE_PROTO, 28, nested=True), _nla(CTA_PROTO_NUM, 5),
            _nla(CTA_PROTO_SRC_PORT, 6), _nla(CTA_PROTO_DST_PORT, 6))


_O = _tuple_heads(CTA_TUPLE_ORIG)
_R = _tuple_heads(CTA_TUPLE_REPLY)
_T = _nla(CTA_TIMEOUT, 8)
_M = _nla(CTA_MARK, 8)
_N = (_nla(CTA_NAT_DST, 40, nested=True), _nla(CTA_NAT_V4_MINIP, 8), _nla(CTA_NAT_V4_MAXIP, 8),
      _nla(CTA_NAT_PROTO, 20, nested=True), _nla(CTA_PROTONAT_PORT_MIN, 6),
      _nla(CTA_PROTONAT_PORT_MAX, 6))
_P = (_nla(CTA_PROTOINFO, 16, nested=True), _nla(CTA_PROTOINFO_TCP, 12, nested=True),
      _nla(CTA_PROTOINFO_TCP_STATE, 5))

_HEAD_LEN: Final = 20  # nlmsghdr + nfgenmsg
_NEW_UDP_FMT: Final = (">8sI8s" + _TUPLE_FMT * 2 + "4sI4sI" + "4s4sI4sI4s4sH2x4sH2x")
_NEW_TCP_FMT: Final = _NEW_UDP_FMT + "4s4s4sB3x"
_NEW_UDP: Final = struct.Struct(_NEW_UDP_FMT)
_NEW_TCP: Final = struct.Struct(_NEW_TCP_FMT)
_BY_TUPLE: Final = struct.Struct(">8sI8s" + _TUPLE_FMT)
NEW_TCP_LEN: Final = _NEW_TCP.size
NEW_UDP_LEN: Final = _NEW_UDP.size
BY_TUPLE_LEN: Final = _BY_TUPLE.size
_CREATE: Final = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
_H_NEW_TCP, _H_TAIL = _header(NEW_TCP_LEN, IPCTNL_MSG_CT_NEW, _CREATE)
_H_NEW_UDP = _header(NEW_UDP_LEN, IPCTNL_MSG_CT_NEW, _CREATE)[0]
_H_DELETE = _header(BY_TUPLE_LEN, IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST)[0]
_H_GET = _header(BY_TUPLE_LEN, IPCTNL_MSG_CT_GET, NLM_F_REQUEST)[0]
assert NEW_TCP_LEN == 196 and NEW_UDP_LEN == 180 and BY_TUPLE_LEN == 72

MAX_REQUEST: Final = BY_TUPLE_LEN + NEW_TCP_LEN
"""The largest run of messages one call below writes (a DELETE, then a NEW)."""


def pack_new(buf: bytearray, off: int, fkey: int, raddr: int, rport: int, timeout: int,
             mark: int, tcp_state: int) -> int:
    """Write at ``off`` the NEW that creates flow ``fkey`` (client → VIP) with its
    destination translated to ``raddr:rport``, ``timeout`` seconds to live, ct mark ``mark``
    and, for TCP, the kernel's ``tcp_state``. Returns the offset after it. The sequence
    number is ``mark`` too: an error echoes it, which tells whose NEW was refused.

    The reply tuple is the untranslated one (VIP → client): the kernel derives the
    translated reply (server → client) from it and CTA_NAT_DST, and only a translation that
    changes the tuple marks the entry as NATed (given the translated reply, it would not)."""
    proto = fkey >> 96
    caddr = (fkey >> 64) & _U32
    vaddr = (fkey >> 32) & _U32
    cport = (fkey >> 16) & _U16
    vport = fkey & _U16
    o, r, n = _O, _R, _N
    if proto == socket.IPPROTO_TCP:
        p = _P
        _NEW_TCP.pack_into(
            buf, off, _H_NEW_TCP, mark, _H_TAIL,
            o[0], o[1], o[2], caddr, o[3], vaddr, o[4], o[5], proto, o[6], cport, o[7], vport,
            r[0], r[1], r[2], vaddr, r[3], caddr, r[4], r[5], proto, r[6], vport, r[7], cport,
            _T, timeout, _M, mark,
            n[0], n[1], raddr, n[2], raddr, n[3], n[4], rport, n[5], rport,
            p[0], p[1], p[2], tcp_state)
        return off + NEW_TCP_LEN
    _NEW_UDP.pack_into(
        buf, off, _H_NEW_UDP, mark, _H_TAIL,
        o[0], o[1], o[2], caddr, o[3], vaddr, o[4], o[5], proto, o[6], cport, o[7], vport,
        r[0], r[1], r[2], vaddr, r[3], caddr, r[4], r[5], proto, r[6], vport, r[7], cport,
        _T, timeout, _M, mark,
        n[0], n[1], raddr, n[2], raddr, n[3], n[4], rport, n[5], rport)
    return off + NEW_UDP_LEN


def _pack_by_tuple(head: bytes, buf: bytearray, off: int, fkey: int, seq: int) -> int:
    o = _O
    proto = fkey >> 96
    _BY_TUPLE.pack_into(buf, off, head, seq, _H_TAIL, o[0], o[1], o[2], (fkey >> 64) & _U32, o[3],
                        (fkey >> 32) & _U32, o[4], o[5], proto, o[6], (fkey >> 16) & _U16,
                        o[7], fkey & _U16)
    return off + BY_TUPLE_LEN


def pack_delete(buf: bytearray, off: int, fkey: int, seq: int = 0) -> int:
    """Write at ``off`` the DELETE of the entry whose original tuple is flow ``fkey``."""
    return _pack_by_tuple(_H_DELETE, buf, off, fkey, seq)


def pack_get(buf: bytearray, off: int, fkey: int, seq: int = 0) -> int:
    """Write at ``off`` the GET of the entry whose original tuple is flow ``fkey`` (``seq``:
    echoed by an error, e.g. the mark of the entry the GET expects)."""
    return _pack_by_tuple(_H_GET, buf, off, fkey, seq)


# ---- decoding -------------------------------------------------------------------------------
ENTRY, DESTROYED, ERROR = "entry", "destroyed", "error"


@dataclass(frozen=True, slots=True)
class CtMessage:
    """One decoded message. ``kind``: ENTRY (an update event or a GET's answer), DESTROYED (a
    destroy event) or ERROR (a refused request: ``request`` is its IPCTNL_MSG_CT_* type,
    ``errno`` the error, ``seq`` the sequence number it carried). ``fkey``: the flow by its
    original tuple (0: not an IPv4 TCP/UDP entry); ``mark``, ``status``, ``tcp_state``: the
    entry's (0 when absent); ``timeout``: the seconds it has left (-1 when absent)."""

    kind: str
    fkey: int
    mark: int = 0
    status: int = 0
    tcp_state: int = 0
    request: int = 0
    errno: int = 0
    seq: int = 0
    timeout: int = -1


def _tuple_key(data: bytes | bytearray | memoryview, off: int, end: int) -> int:
    """The forward key of the tuple whose nested attributes span ``off:end`` (0 when it is
    not IPv4 with ports)."""
    src = dst = proto = sport = dport = -1
    while off + 4 <= end:
        length, atype = _NLA.unpack_from(data, off)
        if length < 4:
            return 0
        inner, inner_end = off + 4, min(off + length, end)
        atype &= ~NLA_F_NESTED & _U16
        while inner + 4 <= inner_end:
            ilen, itype = _NLA.unpack_from(data, inner)
            if ilen < 4 or inner + ilen > inner_end:
                return 0
            itype &= ~NLA_F_NESTED & _U16
            if atype == CTA_TUPLE_IP and ilen == 8:
                if itype == CTA_IP_V4_SRC:
                    src = _BE32.unpack_from(data, inner + 4)[0]
                elif itype == CTA_IP_V4_DST:
                    dst = _BE32.unpack_from(data, inner + 4)[0]
            elif atype == CTA_TUPLE_PROTO:
                if itype == CTA_PROTO_NUM and ilen >= 5:
                    proto = data[inner + 4]
                elif itype == CTA_PROTO_SRC_PORT and ilen >= 6:
                    sport = _BE16.unpack_from(data, inner + 4)[0]
                elif itype == CTA_PROTO_DST_PORT and ilen >= 6:
                    dport = _BE16.unpack_from(data, inner + 4)[0]
            inner += (ilen + 3) & ~3
        off += (length + 3) & ~3
    if min(src, dst, proto, sport, dport) < 0:
        return 0
    return (proto << 96) | (src << 64) | (dst << 32) | (sport << 16) | dport


_ORIG_IP_HEAD: Final = _O[0] + _O[1] + _O[2]  # as the kernel writes an IPv4 tuple
_ORIG_FAST: Final = struct.Struct(">12sI4sI8sB3x4sH2x4sH2x")
_ORIG_PARTS: Final = (_O[3], _O[4] + _O[5], _O[6], _O[7])


def _entry(data: bytes | bytearray | memoryview, off: int,
           end: int) -> tuple[int, int, int, int, int]:
    """(forward key, mark, status, TCP state, timeout) of the attributes at ``off:end``."""
    fkey = mark = status = state = 0
    timeout = -1
    if end - off >= TUPLE_LEN:  # the common case, the kernel's own layout: one unpack
        head, src, h_dst, dst, h_proto, proto, h_sport, sport, h_dport, dport = \
            _ORIG_FAST.unpack_from(data, off)
        if head == _ORIG_IP_HEAD and (h_dst, h_proto, h_sport, h_dport) == _ORIG_PARTS:
            fkey = (proto << 96) | (src << 64) | (dst << 32) | (sport << 16) | dport
            off += TUPLE_LEN
    while off + 4 <= end:
        length, atype = _NLA.unpack_from(data, off)
        if length < 4:
            break
        atype &= ~NLA_F_NESTED & _U16
        stop = min(off + length, end)
        if atype == CTA_TUPLE_ORIG:
            fkey = _tuple_key(data, off + 4, stop)
        elif atype == CTA_MARK and length == 8:
            mark = _BE32.unpack_from(data, off + 4)[0]
        elif atype == CTA_STATUS and length == 8:
            status = _BE32.unpack_from(data, off + 4)[0]
        elif atype == CTA_TIMEOUT and length == 8:
            timeout = _BE32.unpack_from(data, off + 4)[0]
        elif atype == CTA_PROTOINFO:
            inner = off + 4  # CTA_PROTOINFO_TCP, then its STATE
            if inner + 4 <= stop and _NLA.unpack_from(data, inner)[1] & 0x7FFF == \
                    CTA_PROTOINFO_TCP:
                tcp = inner + 4
                tcp_end = min(inner + _NLA.unpack_from(data, inner)[0], stop)
                while tcp + 4 <= tcp_end:
                    tlen, ttype = _NLA.unpack_from(data, tcp)
                    if tlen < 4 or tcp + tlen > tcp_end:
                        break
                    if ttype == CTA_PROTOINFO_TCP_STATE and tlen >= 5:
                        state = data[tcp + 4]
                    tcp += (tlen + 3) & ~3
        off += (length + 3) & ~3
    return fkey, mark, status, state, timeout


def parse(data: bytes | bytearray | memoryview, n: int) -> list[CtMessage]:
    """Every message in the first ``n`` bytes of one datagram from a ctnetlink socket.
    Anything malformed or foreign (another family or subsystem) is skipped."""
    out: list[CtMessage] = []
    off = 0
    while off + 16 <= n:
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < 16 or off + length > n:
            break
        end = off + length
        body = off + 16
        if mtype == NLMSG_ERROR and length >= 20 + _HEAD_LEN:
            err = -_ERRNO.unpack_from(data, body)[0]
            if err:  # 0 is an acknowledgement
                req_len, req_type = _NLMSG.unpack_from(data, body + 4)[:2]
                seq = _BE32.unpack_from(data, body + 12)[0]  # as pack_* wrote it
                attrs = body + 4 + _HEAD_LEN
                stop = min(body + 4 + req_len, end)
                fkey = _entry(data, attrs, stop)[0]
                out.append(CtMessage(ERROR, fkey, request=req_type & 0xFF, errno=err,
                                     seq=seq))
        elif mtype >> 8 == NFNL_SUBSYS_CTNETLINK and length >= _HEAD_LEN and \
                data[body] == socket.AF_INET:
            msg = mtype & 0xFF
            if msg in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE):
                fkey, mark, status, state, timeout = _entry(data, off + _HEAD_LEN, end)
                if fkey:
                    out.append(CtMessage(DESTROYED if msg == IPCTNL_MSG_CT_DELETE else ENTRY,
                                         fkey, mark, status, state, timeout=timeout))
        off += (length + 3) & ~3
    return out
