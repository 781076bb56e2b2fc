"""SyncService.apply: what a backup does with each record of its master's stream (no sockets:
the records are fed directly; a float clock)."""

from __future__ import annotations

from typing import Any

import pytest

from ha.sync import SyncService
from ha.sync_codec import (
    BindingGone,
    BindingRecord,
    Hello,
    SessionGone,
    SessionRecord,
    SnapshotBegin,
    SnapshotEnd,
)
from lb.addr import ip_to_int
from lb.config import parse_config
from lb.forwarder import ServiceCounts
from lb.persistence import PersistenceTable
from lb.services import Service, ServiceSet, build_services
from lb.sessions import SessionTable, SessionTimeouts, TcpState

VIP, S1, S2, C = (ip_to_int(a) for a in ("198.51.100.10", "198.18.0.11", "198.18.0.12",
                                         "198.51.100.100"))
TCP = 6
EST = int(TcpState.ESTABLISHED)


class Backup:
    """A backup node's tables behind a SyncService, with a settable clock and role."""

    def __init__(self) -> None:
        cfg = parse_config({
            "node": {"name": "b"},
            "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
            "virtual_servers": {"web": {"address": "198.51.100.10", "port": 80, "pool": "web",
                                        "persistence": "client-ip"}},
            "pools": {"web": {"servers": [{"address": "198.18.0.11", "port": 8080},
                                          {"address": "198.18.0.12", "port": 8080}]}},
            "sync": {"listen": "198.19.0.3:7411", "peer": "198.19.0.2:7411",
                     "key_file": "/nonexistent"},
        }, "test.toml")
        assert cfg.sync is not None
        self.now = 100.0
        self.master = False
        self.services: ServiceSet = build_services(cfg)
        self.counts = ServiceCounts()
        self.sessions: SessionTable[Service] = SessionTable(SessionTimeouts(), 100,
                                                            observer=self.counts)
        self.bindings: PersistenceTable[Service] = PersistenceTable()
        self.sync = SyncService(cfg.sync, b"k" * 16, "b", self.sessions, self.bindings,
                                lambda: self.services, lambda: self.master,
                                clock=lambda: self.now)
        self.counts.downstream = self.sync
        self.bindings.observer = self.sync

    @property
    def web(self) -> Service:
        return self.services.services[0]

    def session_servers(self) -> dict[int, int]:
        return {s.cport: s.raddr for s in self.sessions}


def session(cport: int, raddr: int = S1, state: int = EST, idle: float = 0.0) -> SessionRecord:
    return SessionRecord(TCP, C, cport, VIP, 80, raddr, 8080, state, idle)


def test_sessions_are_installed_changed_and_removed() -> None:
    b = Backup()
    b.sync.apply(session(40000, idle=2.5))
    b.sync.apply(session(40001, S2))
    assert b.session_servers() == {40000: S1, 40001: S2}
    s = next(s for s in b.sessions if s.cport == 40000)
    assert s.last_seen == pytest.approx(97.5) and s.state == EST
    assert b.web.active == 2 and b.web.pool.servers[0].active == 1
    assert b.web.created_total == 0  # synced, not scheduled here
    b.sync.apply(session(40000, state=int(TcpState.FIN_WAIT)))
    assert next(s for s in b.sessions if s.cport == 40000).state == TcpState.FIN_WAIT
    b.sync.apply(SessionGone(TCP, C, 40000, VIP, 80))
    assert b.session_servers() == {40001: S2}
    assert b.web.active == 1
    assert b.sync.records_received == 4


def test_bindings_are_installed_and_sessions_attach_to_them() -> None:
    b = Backup()
    b.sync.apply(BindingRecord(TCP, VIP, 80, C, S2, 8080, 600.0, 0.0))
    b.sync.apply(session(40000, S2))
    (binding,) = list(b.bindings)
    assert binding.server.addr == S2 and binding.refs == 1
    b.sync.apply(BindingGone(TCP, VIP, 80, C))
    assert list(b.bindings) == []


def test_a_snapshot_replaces_the_table() -> None:
    b = Backup()
    b.sync.apply(session(40000))
    b.sync.apply(BindingRecord(TCP, VIP, 80, C, S1, 8080, 600.0, 0.0))
    b.sync.apply(SnapshotBegin())
    assert len(b.sessions) == 0 and len(b.bindings) == 0
    assert not b.sync.peer_snapshot_done
    b.sync.apply(session(40002, S2))
    b.sync.apply(SnapshotEnd(1, 0))
    assert b.session_servers() == {40002: S2}
    assert b.sync.peer_snapshot_done and b.sync.snapshots_received == 1


@pytest.mark.parametrize(("record", "reason"), [
    (SessionRecord(TCP, C, 1, VIP, 81, S1, 8080, EST, 0.0), "unknown_service"),
    (SessionRecord(TCP, C, 1, VIP, 80, ip_to_int("198.18.0.99"), 8080, EST, 0.0),
     "unknown_server"),
])
def test_records_for_unknown_services_or_servers_are_skipped_and_counted(
        record: Any, reason: str) -> None:
    b = Backup()
    b.sync.apply(record)
    assert len(b.sessions) == 0
    assert b.sync.apply_skipped == {reason: 1}


def test_a_master_ignores_the_stream_its_table_wins() -> None:
    b = Backup()
    b.master = True
    b.sync.apply(session(40000))
    b.sync.apply(SnapshotBegin())
    assert len(b.sessions) == 0 and b.sync.apply_skipped == {"master": 2}


def test_hello_names_the_peer_and_a_backup_does_not_echo() -> None:
    b = Backup()
    b.sync.apply(Hello("lb-a", 7))
    b.sync.apply(session(40000))
    assert b.sync.peer_node == "lb-a"
    assert b.sync.records_sent == 0  # not master, not connected: nothing goes back


def test_the_gate_opens_on_the_snapshot_or_after_the_timeout() -> None:
    b = Backup()
    assert not b.sync.gate_open
    b.sync.apply(SnapshotEnd(0, 0))
    assert b.sync.gate_open
    late = Backup()
    late.now += 5.0
    assert late.sync.gate_open
