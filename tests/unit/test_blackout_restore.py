"""Tables restored from disk, wired into the replication rig of test_replication.

A blackout: both nodes' tables are written with the real snapshot codec, both nodes start
afresh (mastering nothing), load their file, exchange the empty snapshots of two nodes that
master nothing yet, then take their instances: every session and binding is where it was,
on both nodes, and each node holds the other's as confirmed copies. And a restart of one
node while the peer lives: the peer's live state wins.
"""

from __future__ import annotations

import pytest

from lb.addr import ip_to_int
from lb.services import Service
from lb.sessions import TcpState
from lb.table_snapshot import Installed, Restored, decode, encode, install
from tests.unit.test_replication import VIP_A, VIP_B, Link, Node, Pair, to_server

WALL = 1_800_000_000.0
DIGEST = bytes(range(16))


def saved(node: Node) -> bytes:
    return encode(DIGEST, WALL, node.clock[0], node.bindings, node.sessions)


def restart(node: Node, name: str, data: bytes, down: float) -> tuple[Node, Installed]:
    """A fresh node (masters nothing yet) that loaded ``data`` after ``down`` seconds."""
    node.clock[0] += down
    fresh = Node(name, node.clock)
    fresh.master()  # INIT/BACKUP everywhere: nothing owned
    got = decode(data, DIGEST, WALL + down, fresh.sessions.timeouts)
    assert isinstance(got, Restored)
    done = install(got, fresh.sessions, fresh.bindings, fresh.services, fresh.clock[0])
    fresh.rep.restored(done.sessions, done.bindings)
    return fresh, done


def take(node: Node, *instances: str) -> None:
    """What lb.node does on Took: follow roles, adopt with fresh clocks, tell the peer."""
    node.master(*instances)
    now = node.clock[0]
    for name in instances:
        def of(svc: Service, name: str = name) -> bool:
            return svc.owner == name
        node.sessions.refresh(of, now)
        node.bindings.refresh(of, now)
        node.rep.adopted(name, now)


def snapshots(src: Node, dst: Node) -> None:
    link = Link(src, dst)
    for chunk in src.rep.snapshot():
        link.deliver(chunk)


def view(node: Node) -> dict[tuple[str, int], tuple[int, int]]:
    return node.table()


def test_a_blackout_of_both_nodes_keeps_every_session_and_binding() -> None:
    p = Pair()
    sa = to_server(p.a, VIP_A, 40001)  # A's own, with a persistence binding
    to_server(p.b, VIP_B, 40002)  # B's own
    p.sync()
    before_a, before_b = view(p.a), view(p.b)
    assert before_a == before_b and len(before_a) == 2 and len(p.b.bindings) == 1
    a, done_a = restart(p.a, "a", saved(p.a), down=5)
    b, _ = restart(p.b, "b", saved(p.b), down=0)
    assert (len(done_a.sessions), len(done_a.bindings)) == (2, 1) and done_a.skipped == {}
    assert a.rep.provisional == (2, 1) and b.rep.provisional == (2, 1)
    # Both start mastering nothing: their first snapshots to each other are empty, and must
    # not wipe what each loaded.
    snapshots(a, b)
    snapshots(b, a)
    assert view(a) == before_a and view(b) == before_b
    assert len(a.bindings) == len(b.bindings) == 1
    take(a, "va", "gw")
    take(b, "vb")
    ab, ba = Link(a, b), Link(b, a)
    for _ in range(3):
        ab.deliver()
        ba.deliver()
    assert view(a) == before_a and view(b) == before_b
    assert a.rep.provisional == (0, 0) and b.rep.provisional == (0, 0)  # adopted or confirmed
    # New flows still go where they went: the client's binding sent it to the same server.
    assert to_server(a, VIP_A, 40003) == sa
    # The copies are now held for the owner like any copy: past their timeout, still there.
    a.clock[0] += 2 * a.sessions.timeouts.tcp_syn
    b.sessions.expire(b.clock[0], budget=10**6, keep=b.rep.keep)
    assert (VIP_A, 40001) in view(b)


def test_a_restarted_node_takes_the_live_peers_state() -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40001)
    to_server(p.b, VIP_B, 40002)
    p.sync()
    data = saved(p.b)
    # B dies; A masters everything and the flow B owned ends on A meanwhile.
    p.a.master("va", "vb", "gw")
    gone = p.a.sessions.lookup(next(s.fkey for s in p.a.sessions if s.cport == 40002))
    assert gone is not None
    p.a.sessions.remove(gone, "reset", p.clock[0])
    new_srv = to_server(p.a, VIP_B, 40005)  # and a new one starts there
    b, _ = restart(p.b, "b", data, down=3)
    snapshots(p.a, b)  # the live peer's snapshot: carried entries replace and confirm
    table = view(b)
    assert table[(VIP_B, 40005)][0] == ip_to_int(new_srv)
    assert (VIP_A, 40001) in table
    # The snapshot carried records of vb: A masters it, so the flow that ended there is gone.
    assert (VIP_B, 40002) not in table
    assert b.rep.provisional == (0, 0)


def test_a_provisional_copy_the_peer_never_confirms_ends_by_its_own_clock() -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40001)
    p.sync()
    b, _ = restart(p.b, "b", saved(p.b), down=1)
    a = Node("a", p.clock)  # restarted with nothing on disk, mastering nothing yet
    a.master()
    snapshots(a, b)  # an empty snapshot
    assert (VIP_A, 40001) in view(b) and b.rep.provisional == (1, 1)  # session, binding
    b.clock[0] += b.sessions.timeouts.tcp_syn + 1  # no record ever comes for them
    b.sessions.expire(b.clock[0], budget=10**6, keep=b.rep.keep)
    assert view(b) == {} and b.rep.provisional == (0, 1)
    b.clock[0] += 3600
    b.bindings.expire(b.clock[0], budget=10**6, keep=b.rep.keep)
    assert len(b.bindings) == 0 and b.rep.provisional == (0, 0)


def test_entries_naming_what_an_operator_removed_are_skipped_and_counted() -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40001)
    data = saved(p.a)
    fresh = Node("a", p.clock)
    for pool in fresh.services.pools.values():
        pool.servers.clear()  # every server removed at run time
    got = decode(data, DIGEST, WALL, fresh.sessions.timeouts)
    assert isinstance(got, Restored)
    done = install(got, fresh.sessions, fresh.bindings, fresh.services, fresh.clock[0])
    assert done.sessions == [] and done.skipped == {"unknown_server": 2}  # session, binding
    assert len(fresh.sessions) == 0


@pytest.mark.parametrize("state", [TcpState.ESTABLISHED, TcpState.TIME_WAIT])
def test_restored_sessions_keep_their_state(state: TcpState) -> None:
    p = Pair()
    to_server(p.a, VIP_A, 40001)
    (s,) = list(p.a.sessions)
    s.state = int(state)
    a, _ = restart(p.a, "a", saved(p.a), down=1)
    (r,) = list(a.sessions)
    assert r.state == state and r.server.addr == s.server.addr
    assert a.sessions.deadline(r) == pytest.approx(a.clock[0] - 1 + a.sessions.timeout_of[state])


def test_a_takeover_of_many_restored_sessions_sends_them_as_a_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ha.replication.SNAPSHOT_CHUNK", 3)
    p = Pair()
    for port in range(40001, 40006):
        to_server(p.a, VIP_A, port)
    p.sync()
    before = view(p.a)
    a, done = restart(p.a, "a", saved(p.a), down=1)
    assert len(done.sessions) == 5 and a.rep.provisional == (5, 1)
    take(a, "va", "gw")
    # More than a chunk: not five records queued at once, but a snapshot for the transport.
    assert a.rep.snapshot_wanted and a.rep.pending == []
    assert a.rep.provisional == (0, 0)
    b, _ = restart(p.b, "b", saved(p.b), down=1)
    snapshots(a, b)
    assert view(b) == before and b.rep.provisional == (0, 0)
