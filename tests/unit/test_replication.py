"""Replication of an active-active pair, wired back to back (no sockets, a float clock).

Two nodes, A and B, each with its tables, a Forwarder and a Replicator; VIP A belongs to
VRRP instance "va" (mastered by A), VIP B to "vb" (mastered by B). Records travel through
the real codec (Encoder → Decoder) on a :class:`Link`. Packets are real frames built with
scapy, so the data plane's decisions (forward a reply from a copy, report FIN/RST to the
owner, hold a reply whose record has not arrived) are exercised as in the daemon.
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Packet

from ha.replication import Replicator
from ha.roles import Lost, PeerSnapshotComplete, Roles, Took
from ha.sync_codec import (
    BindingGone,
    BindingRecord,
    DecodeError,
    Decoder,
    Encoder,
    Record,
    ReplySeen,
    SessionGone,
    SessionRecord,
    SnapshotBegin,
    SnapshotEnd,
)
from lb import packet as pk
from lb.addr import ip_to_int
from lb.config import parse_config
from lb.forwarder import DROP, FORWARD, Forwarder, ServiceCounts
from lb.persistence import PersistenceTable
from lb.reply_hold import ReplyHold
from lb.services import Service, ServiceSet, build_services
from lb.sessions import SessionTable, SessionTimeouts, TcpState

VIP_A, VIP_B = "198.51.100.10", "198.51.100.11"
S1, S2 = "198.18.0.11", "198.18.0.12"
C1 = "198.51.100.100"
KEY = b"k" * 16
TCP_P = 6
EST = int(TcpState.ESTABLISHED)
VNET = bytes(pk.VNET_HDR_LEN)


def config(node: str) -> Any:
    mine, theirs = (200, 100) if node == "a" else (100, 200)
    return parse_config({
        "node": {"name": node},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": {
            "web-a": {"address": VIP_A, "port": 80, "pool": "web", "scheduler": "maglev",
                      "persistence": "client-ip"},
            "web-b": {"address": VIP_B, "port": 80, "pool": "web", "scheduler": "maglev"},
        },
        "pools": {"web": {"servers": [{"address": S1, "port": 8080},
                                      {"address": S2, "port": 8080}]}},
        "vrrp": {"instances": {
            "va": {"interface": "eth0", "vrid": 51, "priority": mine, "addresses": [VIP_A]},
            "vb": {"interface": "eth0", "vrid": 53, "priority": theirs, "addresses": [VIP_B]},
            "gw": {"interface": "eth1", "vrid": 52, "priority": mine,
                   "addresses": ["198.18.0.1/24"]},
        }},
        "sync": {"listen": "198.19.0.2:7411", "peer": "198.19.0.3:7411",
                 "key_file": "/nonexistent"},
    }, f"{node}.toml")


class Node:
    """One node's tables, roles, forwarder and replicator, on a settable clock."""

    def __init__(self, name: str, clock: list[float]) -> None:
        cfg = config(name)
        self.clock = clock
        self.roles = Roles(ic.name for ic in cfg.vrrp_instances)
        self.services: ServiceSet = build_services(cfg)
        self.counts = ServiceCounts()
        self.sessions: SessionTable[Service] = SessionTable(SessionTimeouts(), 1000,
                                                            observer=self.counts)
        self.bindings: PersistenceTable[Service] = PersistenceTable()
        self.rep = Replicator(self.sessions, self.bindings, lambda: self.services,
                              lambda: self.clock[0], on_installed=self._installed)
        self.fwd = Forwarder(self.services, self.sessions, self.bindings, peer=self.rep,
                             hold=ReplyHold(0.1, 16))
        self.counts.downstream = self.rep
        self.bindings.observer = self.rep
        self.rep.connected = self.rep.holding = True
        self.written: list[bytes] = []  # packets the data plane would write

    def master(self, *instances: str) -> None:
        for inst in self.roles.instances:
            self.roles.vrrp_state(inst, master=inst in instances)
        self.services.follow(self.roles.masters)
        while self.roles.next_event() is not None:
            pass

    def _installed(self, s: Any) -> None:
        if self.fwd.release_held(s, self.clock[0]):
            self.written.extend(bytes(p) for p in self.fwd.ready)
            self.fwd.ready = []

    def packet(self, p: Packet) -> tuple[int, bytes]:
        buf = bytearray(VNET + bytes(p)) + bytearray(64)
        n = pk.VNET_HDR_LEN + len(bytes(p))
        verdict = self.fwd.handle(buf, n, self.clock[0])
        return verdict, bytes(buf[pk.VNET_HDR_LEN:n])

    def table(self) -> dict[tuple[str, int], tuple[int, int]]:
        """{(vip, cport): (server address, state)}."""
        names = {ip_to_int(VIP_A): VIP_A, ip_to_int(VIP_B): VIP_B}
        return {(names[s.vaddr], s.cport): (s.raddr, s.state) for s in self.sessions}


class Link:
    """One direction of the stream, through the real codec."""

    def __init__(self, src: Node, dst: Node) -> None:
        self.src, self.dst = src, dst
        self.enc, self.dec = Encoder(KEY), Decoder(KEY)
        self.carried: list[Record] = []

    def deliver(self, records: list[Record] | None = None) -> list[Record]:
        out = self.src.rep.take() if records is None else records
        self.dec.feed(self.enc.frame(out))
        got: list[Record] = []
        for ev in self.dec.events():
            assert not isinstance(ev, DecodeError), ev
            got.append(ev)
            self.dst.rep.apply(ev, self.dst.clock[0])
        self.carried.extend(got)
        return got


class Pair:
    def __init__(self) -> None:
        self.clock = [100.0]
        self.a, self.b = Node("a", self.clock), Node("b", self.clock)
        self.a.master("va", "gw")
        self.b.master("vb")
        self.ab, self.ba = Link(self.a, self.b), Link(self.b, self.a)

    def sync(self) -> None:
        for _ in range(3):  # what one side applies may queue records the other way
            self.ab.deliver()
            self.ba.deliver()


def syn(client: str, cport: int, vip: str) -> Packet:
    p: Packet = IP(src=client, dst=vip) / TCP(sport=cport, dport=80, flags="S")
    return p


def reply(server: str, client: str, cport: int, flags: str) -> Packet:
    p: Packet = IP(src=server, dst=client) / TCP(sport=8080, dport=cport, flags=flags)
    return p


def to_server(node: Node, vip: str, cport: int) -> str:
    """The server the node forwarded the client's SYN to."""
    verdict, out = node.packet(syn(C1, cport, vip))
    assert verdict == FORWARD
    return str(IP(out).dst)


# ---- roles --------------------------------------------------------------------------------


def test_roles_emit_every_transition_in_order_even_a_flip_between_ticks() -> None:
    roles = Roles(["va", "vb"])
    roles.vrrp_state("va", master=True)
    roles.vrrp_state("va", master=False)  # MASTER → BACKUP → MASTER before anyone looked
    roles.vrrp_state("va", master=True)
    roles.vrrp_state("vb", master=False)  # BACKUP from INIT: no change of role
    roles.peer_snapshot()
    roles.peer_snapshot()
    events = []
    while (ev := roles.next_event()) is not None:
        events.append(ev)
    assert events == [Took("va"), Lost("va"), Took("va"), PeerSnapshotComplete()]
    assert roles.mastered == {"va"} and roles.masters("va") and not roles.masters("vb")


def test_a_standalone_node_masters_everything_from_the_start() -> None:
    roles = Roles.standalone()
    assert roles.mastered == {""} and roles.next_event() == Took("")


def test_roles_refuse_an_unknown_instance() -> None:
    with pytest.raises(KeyError):
        Roles(["va"]).vrrp_state("nope", master=True)


# ---- both directions at once ----------------------------------------------------------------


def test_each_node_streams_its_own_instances_and_installs_the_peers() -> None:
    p = Pair()
    sa = to_server(p.a, VIP_A, 40000)
    sb = to_server(p.b, VIP_B, 40001)
    p.sync()
    want = {(VIP_A, 40000): (ip_to_int(sa), 1), (VIP_B, 40001): (ip_to_int(sb), 1)}
    assert p.a.table() == want and p.b.table() == want
    assert p.a.services.by_key[next(iter(p.a.services.by_key))].created_total == 1
    # Each sent only what it owns: A's records name VIP A, B's VIP B.
    assert {r.vaddr for r in p.ab.carried if isinstance(r, SessionRecord)} == {ip_to_int(VIP_A)}
    assert {r.vaddr for r in p.ba.carried if isinstance(r, SessionRecord)} == {ip_to_int(VIP_B)}
    assert p.a.rep.skipped == {} and p.b.rep.skipped == {}


def test_a_record_for_an_instance_this_node_masters_never_changes_its_own_state() -> None:
    p = Pair()
    own = to_server(p.a, VIP_A, 40000)  # A's own session and binding for C1 on VIP A
    other = next(s for s in (S1, "198.18.0.12") if s != own)
    p.sync()
    before = (p.a.table(), [(b.client_net, b.server.addr) for b in p.a.bindings])
    p.ba.deliver([
        SessionRecord(TCP_P, ip_to_int(C1), 40000, ip_to_int(VIP_A), 80, ip_to_int(other),
                      8080, EST, 0.0),
        BindingRecord(TCP_P, ip_to_int(VIP_A), 80, ip_to_int(C1), ip_to_int(other), 8080,
                      600.0, 0.0)])
    assert (p.a.table(), [(b.client_net, b.server.addr) for b in p.a.bindings]) == before
    assert p.a.rep.skipped == {"master": 2} and p.a.rep.late == 0


def test_a_flow_only_the_peer_has_is_installed_even_for_an_owned_instance() -> None:
    """A handback: B still mastered VIP A for a moment after A took it and opened a flow; its
    record reaches A, which has nothing for that flow and must now forward it."""
    p = Pair()
    p.ba.deliver([
        SessionRecord(TCP_P, ip_to_int(C1), 40000, ip_to_int(VIP_A), 80, ip_to_int(S1), 8080,
                      EST, 0.0),
        BindingRecord(TCP_P, ip_to_int(VIP_A), 80, ip_to_int(C1), ip_to_int(S1), 8080, 600.0,
                      0.0),
        SessionGone(TCP_P, ip_to_int(C1), 40000, ip_to_int(VIP_B), 80)])
    assert p.a.table() == {(VIP_A, 40000): (ip_to_int(S1), EST)}
    assert len(p.a.bindings) == 1 and p.a.rep.late == 2 and p.a.rep.skipped == {}


def test_a_flow_opened_on_the_node_that_just_lost_the_instance_reaches_the_owner() -> None:
    """The other half of a handback: B has lost VIP A (A preempted it) but a client's SYN
    still reaches it (its address had not left yet, or the client's ARP cache still names B).
    B forwards it, and sends the session and its binding although it does not own them:
    the server's SYN-ACK goes to A, the gateway holder, which would otherwise hold it for a
    record that never comes and drop it (the client saw its request time out)."""
    p = Pair()
    server = to_server(p.b, VIP_A, 40000)
    assert p.b.rep.opened_unowned == 1
    p.ba.deliver()
    assert p.a.table() == {(VIP_A, 40000): (ip_to_int(server), int(TcpState.SYN_RECV))}
    assert len(p.a.bindings) == 1 and p.a.rep.late == 2 and p.a.rep.skipped == {}
    verdict, out = p.a.packet(reply(server, C1, 40000, "SA"))
    assert verdict == FORWARD and IP(out).src == VIP_A and p.a.fwd.drops == {}
    # A owns the flow now: its state changes go to B as ordinary records.
    p.ab.deliver()
    assert p.b.table() == p.a.table()


def test_a_binding_the_client_had_is_not_sent_back_with_a_flow_opened_here() -> None:
    """The client already holds a binding on VIP A (A's, copied to B): B's flow in the
    handback's instant goes to the owner alone; sending the binding back would count on A
    as a split brain (``master``)."""
    p = Pair()
    server = to_server(p.a, VIP_A, 40000)
    p.sync()
    assert to_server(p.b, VIP_A, 40001) == server  # the binding holds on B too
    got = p.ba.deliver()
    assert [type(r) for r in got] == [SessionRecord]
    assert p.a.rep.late == 1 and p.a.rep.skipped == {}
    assert p.a.table()[(VIP_A, 40001)] == (ip_to_int(server), int(TcpState.SYN_RECV))


def test_a_copy_of_the_peers_flow_is_never_sent_back_as_opened_here() -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40000)
    p.sync()
    verdict, _ = p.b.packet(IP(src=C1, dst=VIP_A) / TCP(sport=40000, dport=80, flags="A"))
    assert verdict == FORWARD and p.b.rep.opened_unowned == 0 and p.b.rep.take() == []


@pytest.mark.parametrize(("record", "reason"), [
    (SessionRecord(TCP_P, 1, 1, ip_to_int(VIP_B), 81, ip_to_int(S1), 8080, EST, 0.0),
     "unknown_service"),
    (SessionRecord(TCP_P, 1, 1, ip_to_int(VIP_B), 80, ip_to_int("198.18.0.99"), 8080, EST,
                   0.0), "unknown_server"),
    (ReplySeen(TCP_P, 1, 1, ip_to_int(VIP_A), 80, 1), "unknown_session"),
    (BindingGone(TCP_P, ip_to_int(VIP_B), 81, 1), "unknown_service"),
])
def test_records_naming_unknown_things_are_skipped_and_counted(record: Record,
                                                               reason: str) -> None:
    p = Pair()
    p.ba.deliver([record])
    assert p.a.table() == {} and p.a.rep.skipped == {reason: 1}


def test_a_session_that_ends_on_its_owner_disappears_from_the_peer() -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40000)
    p.sync()
    s = next(iter(p.a.sessions))
    p.a.sessions.remove(s, "reset", p.clock[0])
    p.sync()
    assert p.b.table() == {}


# ---- the return path (B's VIP, A holds the gateway) --------------------------------------


def test_the_gateway_holder_forwards_the_peers_replies_and_reports_fin_to_the_owner() -> None:
    p = Pair()
    server = to_server(p.b, VIP_B, 40001)
    p.sync()
    verdict, out = p.a.packet(reply(server, C1, 40001, "SA"))
    assert verdict == FORWARD and IP(out).src == VIP_B and IP(out).sport == 80
    assert p.a.rep.pending == []  # a SYN-ACK moves nothing: no report
    p.b.packet(IP(src=C1, dst=VIP_B) / TCP(sport=40001, dport=80, flags="A"))
    p.sync()
    assert p.a.table()[(VIP_B, 40001)][1] == EST
    # The server closes; only A sees its FIN. B's state machine learns it from A's report.
    p.a.packet(reply(server, C1, 40001, "FA"))
    assert [type(r) for r in p.a.rep.pending] == [ReplySeen]
    p.sync()
    assert p.b.table()[(VIP_B, 40001)][1] == TcpState.FIN_WAIT
    # The client's FIN reaches B: both FINs seen, the session is closing (short timeout).
    p.b.packet(IP(src=C1, dst=VIP_B) / TCP(sport=40001, dport=80, flags="FA"))
    p.sync()
    assert p.b.table()[(VIP_B, 40001)][1] == TcpState.TIME_WAIT
    assert p.a.table()[(VIP_B, 40001)][1] == TcpState.TIME_WAIT  # the owner's state, synced


def test_a_server_reset_seen_by_the_gateway_holder_closes_the_owners_session() -> None:
    p = Pair()
    server = to_server(p.b, VIP_B, 40001)
    p.b.packet(IP(src=C1, dst=VIP_B) / TCP(sport=40001, dport=80, flags="A"))
    p.sync()
    p.a.packet(reply(server, C1, 40001, "R"))
    p.sync()
    assert p.b.table()[(VIP_B, 40001)][1] == TcpState.CLOSE


def test_replies_keep_the_owners_session_alive_with_one_report_per_half_timeout() -> None:
    p = Pair()
    server = to_server(p.b, VIP_B, 40001)
    p.b.packet(IP(src=C1, dst=VIP_B) / TCP(sport=40001, dport=80, flags="A"))
    p.sync()
    established = SessionTimeouts().tcp_established
    reports = 0
    for _ in range(40):  # 40 replies over 2.5 established timeouts, the client silent
        p.clock[0] += established / 16
        p.a.packet(reply(server, C1, 40001, "A"))
        reports += len(p.a.rep.pending)
        p.sync()
        p.b.sessions.expire(p.clock[0], keep=p.b.rep.keep)
    assert (VIP_B, 40001) in p.b.table()  # alive on its owner
    assert 4 <= reports <= 6  # about one per half timeout, not one per reply


def test_a_reply_that_outruns_its_record_is_held_then_sent_rewritten() -> None:
    p = Pair()
    server = to_server(p.b, VIP_B, 40001)
    verdict, _ = p.a.packet(reply(server, C1, 40001, "SA"))  # B's record not there yet
    assert verdict == DROP and p.a.fwd.drops == {} and len(p.a.fwd.hold or []) == 1
    p.clock[0] += 0.002
    p.sync()
    (frame,) = p.a.written
    sent = IP(frame[pk.VNET_HDR_LEN:])  # written with its virtio-net header, as read
    assert sent.src == VIP_B and sent[TCP].sport == 80 and sent[TCP].flags == "SA"
    fresh = sent.copy()
    del fresh.chksum, fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    assert (sent.chksum, sent[TCP].chksum) == (fresh.chksum, fresh[TCP].chksum)
    hold = p.a.fwd.hold
    assert hold is not None and hold.released_total == 1 and hold.wait_max == pytest.approx(0.002)


def test_a_held_reply_whose_record_never_comes_is_dropped_and_counted() -> None:
    p = Pair()
    p.a.packet(reply(S1, C1, 40009, "SA"))
    p.clock[0] += 0.2
    p.a.fwd.expire_held(p.clock[0])
    assert p.a.fwd.drops == {"reply_hold_timeout": 1} and len(p.a.fwd.hold or []) == 0


def test_with_the_peers_stream_down_a_reply_of_its_flow_is_forwarded_and_copied() -> None:
    """The sync link is cut: B's record of a new flow on VIP B cannot reach A, the gateway
    holder. The server's SYN-ACK is forwarded at once from VIP B (the one virtual server B
    masters that has this server) and A keeps a copy; B's next snapshot replaces it."""
    p = Pair()
    p.a.fwd.peer_streaming = lambda: False
    server = to_server(p.b, VIP_B, 40011)
    p.b.rep.pending.clear()  # lost with the link
    verdict, out = p.a.packet(reply(server, C1, 40011, "SA"))
    sent = IP(out)
    assert verdict == FORWARD and sent.src == VIP_B and sent[TCP].sport == 80
    assert p.a.fwd.replies_inferred == 1 and len(p.a.fwd.hold or []) == 0
    assert p.a.table()[(VIP_B, 40011)] == (ip_to_int(server), int(TcpState.SYN_RECV))
    verdict, _ = p.a.packet(reply(server, C1, 40011, "A"))  # the copy serves the next one
    assert verdict == FORWARD and p.a.fwd.replies_inferred == 1
    p.a.fwd.peer_streaming = lambda: True  # healed: B's snapshot carries the real session
    p.ba.deliver([r for chunk in p.b.rep.snapshot() for r in chunk])
    assert p.a.table()[(VIP_B, 40011)] == p.b.table()[(VIP_B, 40011)]


def test_with_the_peers_stream_down_a_reply_of_an_ambiguous_server_is_not_guessed() -> None:
    """A masters neither VIP (only the gateway): both virtual servers have S1:8080, so which
    VIP a reply of S1 should come from is unknown — held (and dropped when no record
    comes), never sent from a guessed address."""
    p = Pair()
    p.a.master("gw")
    p.a.fwd.peer_streaming = lambda: False
    verdict, _ = p.a.packet(reply(S1, C1, 40012, "SA"))
    assert verdict == DROP and p.a.fwd.replies_inferred == 0
    assert p.a.fwd.replies_ambiguous == 1 and len(p.a.sessions) == 0


# ---- snapshots and takeover -----------------------------------------------------------------


def test_a_snapshot_replaces_only_the_peers_copies_never_own_sessions() -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40000)
    to_server(p.b, VIP_B, 40001)
    to_server(p.b, VIP_B, 40002)
    p.sync()
    stale = next(s for s in p.b.sessions if s.cport == 40002)
    p.b.sessions.remove(stale, "x", p.clock[0])
    p.b.rep.pending.clear()  # A never hears of that removal: its copy is stale
    assert (VIP_B, 40002) in p.a.table()
    got = p.ba.deliver([r for chunk in p.b.rep.snapshot() for r in chunk])
    assert set(p.a.table()) == {(VIP_A, 40000), (VIP_B, 40001)}  # own kept, stale copy gone
    assert p.a.rep.snapshot_done
    assert [type(r) for r in got] == [SnapshotBegin, SessionRecord, SnapshotEnd]


def test_takeover_adopts_the_peers_sessions_and_bindings_as_they_are() -> None:
    p = Pair()
    server = to_server(p.a, VIP_A, 40000)
    p.sync()
    assert len(p.b.bindings) == 1
    p.clock[0] += 30
    p.b.master("va", "vb", "gw")  # A died
    of_va = lambda svc: svc.owner == "va"  # noqa: E731
    p.b.sessions.refresh(of_va, p.clock[0])
    p.b.bindings.refresh(of_va, p.clock[0])
    (s,) = [s for s in p.b.sessions if s.cport == 40000]
    assert s.last_seen == p.clock[0] and s.server.key == f"{server}:8080"
    # The client's next packet on the open connection goes to the same server ...
    verdict, out = p.b.packet(IP(src=C1, dst=VIP_A) / TCP(sport=40000, dport=80, flags="A"))
    assert verdict == FORWARD and IP(out).dst == server
    # ... and its next connection too (the binding came along).
    assert to_server(p.b, VIP_A, 40005) == server


def test_copies_are_kept_past_their_timeout_while_the_owner_streams() -> None:
    p = Pair()
    to_server(p.b, VIP_B, 40001)
    p.sync()
    p.clock[0] += SessionTimeouts().tcp_syn + 1
    p.a.sessions.expire(p.clock[0], keep=p.a.rep.keep)
    assert (VIP_B, 40001) in p.a.table()
    p.a.rep.holding = False  # the owner's stream is gone: the copy expires by its own clock
    p.clock[0] += SessionTimeouts().tcp_syn + 1
    p.a.sessions.expire(p.clock[0], keep=p.a.rep.keep)
    assert (VIP_B, 40001) not in p.a.table()


def test_nothing_is_queued_while_the_stream_is_down() -> None:
    p = Pair()
    p.a.rep.connected = False
    to_server(p.a, VIP_A, 40000)
    assert p.a.rep.pending == []


def test_the_transport_is_woken_once_per_burst_with_the_records_queued() -> None:
    p = Pair()
    seen: list[int] = []
    p.a.rep.wake = lambda: seen.append(len(p.a.rep.pending))
    to_server(p.a, VIP_A, 40000)
    to_server(p.a, VIP_A, 40001)
    assert seen == [1]  # woken at the first record, which is there to flush
    p.a.rep.take()
    to_server(p.a, VIP_A, 40002)
    assert seen == [1, 1]


def test_a_consistent_scheduler_picks_up_a_flow_whose_record_was_lost() -> None:
    p = Pair()
    server = to_server(p.a, VIP_A, 40000)
    p.a.rep.take()  # A dies before its record leaves
    p.b.master("va", "vb", "gw")
    verdict, out = p.b.packet(IP(src=C1, dst=VIP_A) / TCP(sport=40000, dport=80, flags="PA"))
    assert verdict == FORWARD and IP(out).dst == server  # maglev: the server A picked
    assert p.b.fwd.picked_up == 1
