"""lb.offload, pure part: what each kernel message does to the session table, which flows
the kernel still has alone, and the nft table and conntrack settings lbd asks for."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from lb import ctnetlink as ct
from lb.addr import ip_to_int
from lb.offload import CT_MARK, REPLY_MARK, ConntrackOffload, Offloads, conntrack_sysctls, ruleset
from lb.servers import RealServer
from lb.sessions import TCP_ACK, TCP_SYN, Session, SessionTable, SessionTimeouts, TcpState

CLIENT, VIP = ip_to_int("198.51.100.100"), ip_to_int("198.51.100.10")
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP


class Removed:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def session_added(self, s: Session) -> None:
        pass

    def session_changed(self, s: Session) -> None:
        pass

    def session_removed(self, s: Session, reason: str) -> None:
        self.reasons.append(reason)


def setup(proto: int = TCP) -> tuple[SessionTable[str], Offloads, Session, Removed]:
    rec = Removed()
    table: SessionTable[str] = SessionTable(SessionTimeouts(), 100, 0.1, rec)
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    s = table.create(proto, CLIENT, 40000, VIP, 80, srv, "web", TCP_SYN if proto == TCP else 0,
                     1.0)
    assert s is not None
    return table, Offloads(table), s, rec


def entry(s: Session, mark: int, state: int, timeout: int = -1) -> ct.CtMessage:
    return ct.CtMessage(ct.ENTRY, s.fkey, mark, 0, state, timeout=timeout)


def test_the_session_follows_the_kernels_state_and_leaves_with_its_entry() -> None:
    table, off, s, rec = setup()
    mark = off.take(s)
    assert mark & CT_MARK and len(off) == 1
    off.on_message(entry(s, mark, ct.CT_TCP_ESTABLISHED), 2.0)
    assert s.state == TcpState.ESTABLISHED and off.established_total == 1
    off.on_message(entry(s, mark, ct.CT_TCP_TIME_WAIT), 3.0)
    assert s.state == TcpState.TIME_WAIT
    off.on_message(ct.CtMessage(ct.DESTROYED, s.fkey, mark), 4.0)
    assert table.lookup(s.fkey) is None and rec.reasons == ["conntrack"]
    assert len(off) == 0 and off.closed_total == 1
    assert not off.removed(s)  # already gone: no DELETE to send


def test_the_idle_clock_follows_the_kernels() -> None:
    """What the entry has left of its state's timeout says when the kernel last saw a
    packet of the flow: the session's ``last_seen`` (read by the table snapshot and the
    peer's copy) follows it, never backwards."""
    _, off, s, _ = setup()
    mark = off.take(s)
    off.on_message(entry(s, mark, ct.CT_TCP_ESTABLISHED, timeout=900), 500.0)
    assert s.last_seen == 500.0  # a packet just now
    off.on_message(entry(s, mark, ct.CT_TCP_ESTABLISHED, timeout=600), 1000.0)
    assert s.last_seen == 700.0  # idle 300 s
    off.on_message(entry(s, mark, ct.CT_TCP_ESTABLISHED, timeout=100), 1000.0)
    assert s.last_seen == 700.0


def test_messages_of_another_entry_change_nothing() -> None:
    table, off, s, rec = setup()
    mark = off.take(s)
    for m in (ct.CtMessage(ct.DESTROYED, s.fkey, mark + 1),  # an older entry of this tuple
              ct.CtMessage(ct.DESTROYED, s.fkey, 0),  # not one of lbd's
              ct.CtMessage(ct.DESTROYED, s.fkey + 1, mark),  # another flow
              ct.CtMessage(ct.ENTRY, s.fkey, 0, 0, ct.CT_TCP_CLOSE),
              ct.CtMessage(ct.ERROR, s.fkey, request=ct.IPCTNL_MSG_CT_GET, errno=errno.ENOENT,
                           seq=mark - 1),  # a GET about the tuple's older entry
              ct.CtMessage(ct.ERROR, s.fkey, request=ct.IPCTNL_MSG_CT_NEW, errno=errno.EEXIST,
                           seq=mark - 1)):
        off.on_message(m, 2.0)
    assert table.lookup(s.fkey) is s and s.state == TcpState.SYN_RECV and rec.reasons == []
    assert len(off) == 1


def test_a_flow_lbd_forwarded_itself_is_lbds_again() -> None:
    """A packet of the flow reached lbd (the kernel refused it): the flow is lbd's, its
    entry to be deleted, and the entry's DESTROY then leaves the session alone."""
    table, off, s, rec = setup()
    mark = off.take(s)
    assert off.returned(s) and not off.returned(s)
    assert off.returned_total == 1 and not off.keep(s)
    off.on_message(ct.CtMessage(ct.DESTROYED, s.fkey, mark), 6.0)
    assert table.lookup(s.fkey) is s and rec.reasons == []


def test_a_refused_new_leaves_the_flow_on_lbds_path() -> None:
    table, off, s, _ = setup()
    mark = off.take(s)
    off.on_message(ct.CtMessage(ct.ERROR, s.fkey, request=ct.IPCTNL_MSG_CT_NEW,
                                errno=errno.EEXIST, seq=mark), 2.0)
    assert len(off) == 0 and off.failed_total == 1 and off.offloaded_total == 0
    assert table.lookup(s.fkey) is s
    assert not off.keep(s)  # expires by lbd's own clock


def test_a_deadline_asks_the_kernel_and_a_missing_entry_ends_the_session() -> None:
    table, off, s, rec = setup()
    mark = off.take(s)
    assert off.keep(s) == mark and off.checks_total == 1
    off.on_message(ct.CtMessage(ct.ERROR, s.fkey, request=ct.IPCTNL_MSG_CT_DELETE,
                                errno=errno.ENOENT, seq=mark), 2.0)  # a DELETE's: nothing
    assert table.lookup(s.fkey) is s
    off.on_message(ct.CtMessage(ct.ERROR, s.fkey, request=ct.IPCTNL_MSG_CT_GET,
                                errno=errno.ENOENT, seq=mark), 3.0)
    assert table.lookup(s.fkey) is None and rec.reasons == ["conntrack"]


def test_the_peers_flow_outlives_this_nodes_entry() -> None:
    """The instance moved to the peer: the entry here idles out, the session (the peer's
    copy now) stays."""
    rec = Removed()
    table: SessionTable[str] = SessionTable(SessionTimeouts(), 100, 0.1, rec)
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    s = table.create(TCP, CLIENT, 40000, VIP, 80, srv, "web", TCP_SYN, 1.0)
    assert s is not None
    owned = {"yes": True}
    off = Offloads(table, owned=lambda _: owned["yes"])
    mark = off.take(s)
    owned["yes"] = False
    off.on_message(ct.CtMessage(ct.DESTROYED, s.fkey, mark), 2.0)
    assert table.lookup(s.fkey) is s and len(off) == 0 and rec.reasons == []


def test_the_kernels_account_of_the_peers_flow_changes_nothing() -> None:
    table: SessionTable[str] = SessionTable(SessionTimeouts(), 100, 0.1, Removed())
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    s = table.create(TCP, CLIENT, 40000, VIP, 80, srv, "web", TCP_SYN, 1.0)
    assert s is not None
    off = Offloads(table, owned=lambda _: False)
    mark = off.take(s)
    off.on_message(entry(s, mark, ct.CT_TCP_ESTABLISHED, timeout=900), 50.0)
    assert s.state == TcpState.SYN_RECV and s.last_seen == 1.0


def test_the_peer_learns_a_state_with_the_idle_clock_it_goes_with() -> None:
    seen: list[tuple[str, float]] = []

    class Changes(Removed):
        def session_changed(self, s: Session) -> None:
            seen.append((s.tcp_state.name, s.last_seen))

    table: SessionTable[str] = SessionTable(SessionTimeouts(), 100, 0.1, Changes())
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    s = table.create(TCP, CLIENT, 40000, VIP, 80, srv, "web", TCP_SYN, 1.0)
    assert s is not None
    off = Offloads(table)
    mark = off.take(s)
    off.on_message(entry(s, mark, ct.CT_TCP_FIN_WAIT, timeout=110), 1800.0)
    assert seen == [("FIN_WAIT", 1790.0)]  # 10 s into FIN_WAIT's 120 s


def test_lbd_removing_an_offloaded_session_deletes_its_entry() -> None:
    _, off, s, _ = setup()
    off.take(s)
    assert off.removed(s) and not off.removed(s)


def test_udp_sessions_have_no_state_to_follow() -> None:
    _, off, s, _ = setup(UDP)
    mark = off.take(s)
    off.on_message(entry(s, mark, ct.CT_TCP_ESTABLISHED), 2.0)
    assert s.state == TcpState.NONE and off.established_total == 0


def test_a_reused_tuple_is_not_ended_by_the_old_entrys_destroy() -> None:
    table, off, s, rec = setup()
    old = off.take(s)
    table.remove(s, "reused", 2.0)
    assert off.removed(s)
    srv = RealServer("web", ip_to_int("198.18.0.12"), 8080, 1)
    s2 = table.create(TCP, CLIENT, 40000, VIP, 80, srv, "web", TCP_SYN, 2.0)
    assert s2 is not None
    new = off.take(s2)
    assert new != old and new & CT_MARK
    off.on_message(ct.CtMessage(ct.DESTROYED, s2.fkey, old), 2.1)
    assert table.lookup(s2.fkey) is s2 and rec.reasons == ["reused"]


class Sent:
    """A stand-in for the netlink socket: what was sent, as decoded messages."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def send(self, data: memoryview) -> int:
        self.sends.append(bytes(data))
        return len(data)

    def types(self) -> list[list[int]]:
        out = []
        for d in self.sends:
            kinds, off = [], 0
            while off < len(d):
                length, mtype = struct.unpack_from("=IH", d, off)
                kinds.append(mtype & 0xFF)
                off += length
            out.append(kinds)
        return out


def shell() -> tuple[SessionTable[Any], ConntrackOffload, Sent]:
    table: SessionTable[Any] = SessionTable(SessionTimeouts(), 100, 0.1, Removed())
    off = ConntrackOffload(table, SessionTimeouts(), lambda: 0.0)
    sent = Sent()
    off._sock = sent  # type: ignore[assignment]
    return table, off, sent


class Svc:
    owned = True


def test_a_retransmitted_syn_leaves_the_flow_in_the_kernel_another_packet_takes_it_back(
        ) -> None:
    table, off, sent = shell()
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    s = table.create(TCP, CLIENT, 40000, VIP, 80, srv, Svc(), TCP_SYN, 1.0)
    assert s is not None
    off.opened(s, TCP_SYN)
    assert sent.types() == [[ct.IPCTNL_MSG_CT_NEW]] and len(off.table) == 1
    off.seen(s, TCP_SYN)  # the client's SYN again: untracked, so it always reaches lbd
    assert len(off.table) == 1
    off.seen(s, TCP_ACK)  # a segment the kernel refused
    assert len(off.table) == 0
    off.send_pending()
    assert sent.types()[-1] == [ct.IPCTNL_MSG_CT_DELETE]


class Refusing(Sent):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def send(self, data: memoryview) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError(105, "No buffer space available")
        return super().send(data)


def test_a_failed_send_keeps_the_deletes_for_the_next_try() -> None:
    table, off, _ = shell()
    sock = Refusing(2)
    off._sock = sock  # type: ignore[assignment]
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    off._queue(ct.pack_delete, (TCP << 96) | 1234, 0)
    s = table.create(TCP, CLIENT, 40000, VIP, 80, srv, Svc(), TCP_SYN, 1.0)
    assert s is not None
    off.opened(s, TCP_SYN)  # DELETE + NEW refused: the flow stays on lbd's path
    assert len(off.table) == 0 and off.table.failed_total == 1
    off.send_pending()  # refused again: kept
    off.send_pending()
    assert sock.types() == [[ct.IPCTNL_MSG_CT_DELETE]]


def test_queued_requests_never_overrun_the_buffer() -> None:
    table, off, sent = shell()
    srv = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
    for port in range(1000, 1300):  # more than one buffer of DELETEs, then a UDP flow
        off._queue(ct.pack_delete, (UDP << 96) | port, 0)
    s = table.create(UDP, CLIENT, 40000, VIP, 53, srv, Svc(), 0, 1.0)
    assert s is not None
    off.opened(s, 0)
    kinds = [k for batch in sent.types() for k in batch]
    assert kinds.count(ct.IPCTNL_MSG_CT_DELETE) == 301 and kinds[-1] == ct.IPCTNL_MSG_CT_NEW


def test_ruleset() -> None:
    text = ruleset("eth0", "lbtun0", [("198.51.100.10", 80), ("198.51.100.10", 80)])
    assert 'iifname "lbtun0" notrack' in text
    assert "elements = { 198.51.100.10 . 80 }" in text
    assert "tcp flags & (syn | ack) == syn notrack" in text
    assert "type nat hook prerouting" in text and "type nat hook postrouting" in text
    assert f"meta mark set meta mark | {REPLY_MARK:#x}" in text
    assert "ct event set assured, destroy" in text and "protoinfo" not in text
    assert "tcp_targets" not in ruleset("eth0", "lbtun0", [])  # UDP only: no SYN untracked


def test_conntrack_keeps_entries_as_long_as_lbd_keeps_sessions() -> None:
    t = SessionTimeouts(tcp_syn=30, tcp_established=600, tcp_fin=20, tcp_time_wait=5,
                        tcp_close=0.4, udp=90)
    got = conntrack_sysctls(t)
    assert got["nf_conntrack_tcp_timeout_syn_sent"] == "30"
    assert got["nf_conntrack_tcp_timeout_established"] == "600"
    assert got["nf_conntrack_tcp_timeout_last_ack"] == "20"
    assert got["nf_conntrack_tcp_timeout_time_wait"] == "5"
    assert got["nf_conntrack_tcp_timeout_close"] == "1"  # whole seconds, at least one
    assert got["nf_conntrack_udp_timeout_stream"] == "90"
    assert got["nf_conntrack_tcp_be_liberal"] == "1"
    assert got["nf_conntrack_tcp_timeout_unacknowledged"] == "600"  # no 300 s cap
    assert got["nf_conntrack_tcp_timeout_max_retrans"] == "600"
