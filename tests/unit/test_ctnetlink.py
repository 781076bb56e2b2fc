"""lb.ctnetlink: the messages lbd packs decode, field for field, with pyroute2's own
ctnetlink parser; what the kernel sends back (events, a GET's answer, errors that echo the
request) decodes to the flow lbd named; nothing malformed raises."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from lb import ctnetlink as ct
from lb.addr import ip_to_int
from lb.sessions import flow_key

CLIENT, VIP, SERVER = "198.51.100.100", "198.51.100.10", "198.18.0.11"


def key(proto: int = socket.IPPROTO_TCP, cport: int = 40000, vport: int = 80) -> int:
    return flow_key(proto, ip_to_int(CLIENT), cport, ip_to_int(VIP), vport)


def decoded(buf: bytes) -> nfct_msg:
    msg = nfct_msg(buf)
    msg.decode()
    return msg


def tuple_of(attr: nfct_msg) -> tuple[str, str, int, int, int]:
    ip, proto = attr.get_attr("CTA_TUPLE_IP"), attr.get_attr("CTA_TUPLE_PROTO")
    return (ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST"),
            proto.get_attr("CTA_PROTO_NUM"), proto.get_attr("CTA_PROTO_SRC_PORT"),
            proto.get_attr("CTA_PROTO_DST_PORT"))


@pytest.mark.parametrize(("proto", "state", "length"), [
    (socket.IPPROTO_TCP, ct.CT_TCP_SYN_SENT, ct.NEW_TCP_LEN),
    (socket.IPPROTO_UDP, 0, ct.NEW_UDP_LEN)])
def test_new_decodes_as_pyroute2_reads_it(proto: int, state: int, length: int) -> None:
    buf = bytearray(ct.MAX_REQUEST)
    end = ct.pack_new(buf, 0, key(proto), ip_to_int(SERVER), 8080, 60, 0x80000007, state)
    assert end == length
    msg = decoded(bytes(buf[:end]))
    assert msg["header"]["length"] == length
    assert msg["header"]["type"] == (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW
    assert msg["header"]["flags"] == ct.NLM_F_REQUEST | ct.NLM_F_CREATE | ct.NLM_F_EXCL
    assert msg["nfgen_family"] == socket.AF_INET
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == (CLIENT, VIP, proto, 40000, 80)
    # the untranslated reply: the kernel derives the translated one from CTA_NAT_DST
    assert tuple_of(msg.get_attr("CTA_TUPLE_REPLY")) == (VIP, CLIENT, proto, 80, 40000)
    nat = msg.get_attr("CTA_NAT_DST")
    assert nat.get_attr("CTA_NAT_V4_MINIP") == nat.get_attr("CTA_NAT_V4_MAXIP") == SERVER
    ports = nat.get_attr("CTA_NAT_PROTO")
    assert ports.get_attr("CTA_PROTONAT_PORT_MIN") == ports.get_attr(
        "CTA_PROTONAT_PORT_MAX") == 8080
    assert msg.get_attr("CTA_TIMEOUT") == 60
    assert msg.get_attr("CTA_MARK") == 0x80000007
    info = msg.get_attr("CTA_PROTOINFO")
    if proto == socket.IPPROTO_TCP:
        assert info.get_attr("CTA_PROTOINFO_TCP").get_attr("CTA_PROTOINFO_TCP_STATE") == state
    else:
        assert info is None


@pytest.mark.parametrize(("pack", "msg_type"), [(ct.pack_delete, ct.IPCTNL_MSG_CT_DELETE),
                                                 (ct.pack_get, ct.IPCTNL_MSG_CT_GET)])
def test_by_tuple_requests(pack: object, msg_type: int) -> None:
    buf = bytearray(ct.MAX_REQUEST)
    end = pack(buf, 8, key())  # type: ignore[operator]
    assert end == 8 + ct.BY_TUPLE_LEN
    msg = decoded(bytes(buf[8:end]))
    assert msg["header"]["type"] & 0xFF == msg_type
    assert tuple_of(msg.get_attr("CTA_TUPLE_ORIG")) == (CLIENT, VIP, 6, 40000, 80)
    assert msg.get_attr("CTA_TUPLE_REPLY") is None


def nla(atype: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), atype | (ct.NLA_F_NESTED if nested else 0))
    return head + payload + bytes(-len(payload) % 4)


def orig(cport: int = 40000) -> bytes:
    ip = nla(ct.CTA_IP_V4_SRC, socket.inet_aton(CLIENT)) + nla(ct.CTA_IP_V4_DST,
                                                                socket.inet_aton(VIP))
    proto = (nla(ct.CTA_PROTO_NUM, b"\x06") + nla(ct.CTA_PROTO_SRC_PORT, struct.pack(">H", cport))
             + nla(ct.CTA_PROTO_DST_PORT, struct.pack(">H", 80)))
    return nla(ct.CTA_TUPLE_ORIG, nla(ct.CTA_TUPLE_IP, ip, True)
               + nla(ct.CTA_TUPLE_PROTO, proto, True), True)


def message(msg: int, attrs: bytes, family: int = socket.AF_INET) -> bytes:
    body = bytes((family, 0, 0, 0)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (ct.NFNL_SUBSYS_CTNETLINK << 8) | msg, 0, 0,
                       0) + body


def event(msg: int, *, mark: int = 0x80000003, state: int = ct.CT_TCP_ESTABLISHED,
          status: int = 0x4, timeout: int | None = 431999) -> bytes:
    info = nla(ct.CTA_PROTOINFO, nla(ct.CTA_PROTOINFO_TCP,
                                     nla(ct.CTA_PROTOINFO_TCP_STATE, bytes((state,))), True),
               True)
    left = b"" if timeout is None else nla(ct.CTA_TIMEOUT, struct.pack(">I", timeout))
    return message(msg, orig() + nla(ct.CTA_STATUS, struct.pack(">I", status)) + left + info
                   + nla(ct.CTA_MARK, struct.pack(">I", mark)))


def test_events_decode_to_the_flow_and_its_state() -> None:
    data = event(ct.IPCTNL_MSG_CT_NEW) + event(ct.IPCTNL_MSG_CT_DELETE, state=ct.CT_TCP_CLOSE,
                                               timeout=None)
    assert ct.parse(data, len(data)) == [
        ct.CtMessage(ct.ENTRY, key(), 0x80000003, 0x4, ct.CT_TCP_ESTABLISHED, timeout=431999),
        ct.CtMessage(ct.DESTROYED, key(), 0x80000003, 0x4, ct.CT_TCP_CLOSE)]


def test_an_error_names_the_request_and_the_flow_it_echoes() -> None:
    buf = bytearray(ct.MAX_REQUEST)
    end = ct.pack_new(buf, 0, key(), ip_to_int(SERVER), 8080, 60, 0x80000001, 1)
    body = struct.pack("=i", -17) + bytes(buf[:end])  # EEXIST, the request echoed whole
    err = struct.pack("=IHHII", 16 + len(body), ct.NLMSG_ERROR, 0, 0, 0) + body
    ack = struct.pack("=IHHII", 36, ct.NLMSG_ERROR, 0, 0, 0) + bytes(20)  # error 0: an ack
    data = err + ack
    # the sequence number is the entry's mark: the refusal says whose NEW it was
    assert ct.parse(data, len(data)) == [
        ct.CtMessage(ct.ERROR, key(), request=ct.IPCTNL_MSG_CT_NEW, errno=17,
                     seq=0x80000001)]


def test_foreign_messages_are_skipped() -> None:
    v6 = message(ct.IPCTNL_MSG_CT_NEW, orig(), family=socket.AF_INET6)
    other = struct.pack("=IHHII", 20, (2 << 8) | 0, 0, 0, 0) + bytes(4)  # another subsystem
    done = struct.pack("=IHHII", 20, ct.NLMSG_DONE, 0, 0, 0) + bytes(4)
    data = v6 + other + done
    assert ct.parse(data, len(data)) == []


@given(st.binary(max_size=400))
def test_garbage_never_raises(data: bytes) -> None:
    ct.parse(data, len(data))


@given(st.integers(0, 200), st.binary(max_size=8))
def test_a_cut_or_damaged_event_never_raises(cut: int, junk: bytes) -> None:
    data = bytearray(event(ct.IPCTNL_MSG_CT_DELETE))
    data[20:20 + len(junk)] = junk  # damage the first attributes' headers
    data = data[:cut] if cut else data
    ct.parse(bytes(data), len(data))
