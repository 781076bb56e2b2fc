"""lab.fill: a table snapshot made from a config alone, loaded as lbd's start loads it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab import fill
from lb.config import Config, parse_config
from lb.node import Node

VIP = "198.51.100.10"


def config(state: Path, *, persistence: str = "client-ip", established: str = "15m") -> Config:
    return parse_config({
        "node": {"name": "fill", "state_dir": str(state)},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "sessions": {"tcp_established_timeout": established},
        "virtual_servers": {
            "web": {"address": VIP, "port": 80, "pool": "web", "persistence": persistence},
            "alt": {"address": VIP, "port": 8443, "pool": "web"},
            "dns": {"address": VIP, "port": 53, "protocol": "udp", "pool": "web"},
        },
        "pools": {"web": {"servers": [{"address": "198.18.0.11", "port": 8080},
                                      {"address": "198.18.0.12", "port": 8080},
                                      {"address": "198.18.0.13", "port": 8080,
                                       "backup": True}]}},
    }, str(state / "lbd.toml"))


def test_a_node_starts_with_every_session_written_and_its_bindings(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    got = fill.write(cfg, 70_001, bindings=True)
    assert (got.sessions, got.bindings) == (70_001, 1)  # web: 35,001 sessions, 1 client
    node = Node(cfg)
    done = node.snapshots.load(node.services, time.monotonic(), time.time())
    assert done is not None and node.snapshots.report.result == "loaded"
    assert len(node.sessions) == 70_001 and len(node.persistence) == 1
    per_vs: dict[str, int] = {}
    for s in node.sessions:
        per_vs[s.service.name] = per_vs.get(s.service.name, 0) + 1
        assert s.server.addr != 0xC612000D  # never the backup server
        assert s.binding is None or s.binding.server is s.server
    assert per_vs == {"web": 35_001, "alt": 35_000}
    assert sum(1 for s in node.sessions if s.binding is not None) == 35_001


def test_sessions_that_would_expire_during_the_test_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tcp_established_timeout"):
        fill.write(config(tmp_path, established="1m"), 10, survive=600)


def test_more_sessions_than_the_table_holds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_sessions"):
        fill.write(config(tmp_path), 2_000_000)
