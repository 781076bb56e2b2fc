"""The table snapshot file of a node, in-process (no kernel): written in chunks and atomically,
loaded by the next start, and a bad file refused whole with one WARNING, counted, moved aside,
the tables left empty."""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from pathlib import Path

import pytest

from lb import snapshot_store
from lb.addr import ip_to_int
from lb.config import parse_config
from lb.node import Node
from lb.sessions import IPPROTO_TCP, TCP_ACK
from lb.table_snapshot import HEADER_SIZE

CONFIG = """
[node]
name = "t"
state_dir = "@STATE@"
[dataplane]
client_interface = "lo"
server_interface = "lo"
[sessions]
snapshot_interval = "@INTERVAL@"
[virtual_servers.web]
address = "198.51.100.10"
port = 80
pool = "web"
scheduler = "maglev"
persistence = "client-ip"
[pools.web]
servers = [{ address = "198.18.0.11", port = 8080 }, { address = "198.18.0.12", port = 8080 }]
"""


def make_node(tmp_path: Path, interval: str = "2s", pools: str = "") -> Node:
    text = CONFIG.replace("@STATE@", str(tmp_path / "state")).replace("@INTERVAL@", interval)
    text += pools
    return Node(parse_config(tomllib.loads(text), str(tmp_path / "lbd.toml")))


def fill(node: Node, n: int) -> None:
    """``n`` established sessions of one client each, every one with its binding."""
    (svc,) = node.services.services
    now = time.monotonic()
    for i in range(n):
        caddr = ip_to_int("198.51.100.100") + i
        server = svc.pool.servers[i % 2]
        b = node.persistence.bind(svc, caddr, server, svc.persistence_timeout, now)
        node.sessions.create(IPPROTO_TCP, caddr, 40000, svc.vaddr, svc.vport, server, svc,
                             TCP_ACK, now - 1, b)


def table(node: Node) -> dict[tuple[int, int], tuple[int, int]]:
    return {(s.caddr, s.cport): (s.raddr, s.state) for s in node.sessions}


def write(node: Node) -> bool:
    return asyncio.run(node.snapshots.write())


def load(node: Node) -> None:
    node.snapshots.load(node.services, time.monotonic(), time.time())


def test_a_written_snapshot_is_loaded_by_the_next_start(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_store, "CHUNK", 7)  # many chunks, each a turn of the loop
    old = make_node(tmp_path)
    fill(old, 50)
    assert write(old)
    assert old.snapshots.writes_total == 1 and old.snapshots.last_write_sessions == 50
    assert (tmp_path / "state" / "tables.snap").exists()
    assert not (tmp_path / "state" / ".tables.snap.tmp").exists()
    new = make_node(tmp_path)
    with caplog.at_level(logging.INFO, logger="lbd"):
        load(new)
    assert table(new) == table(old) and len(new.persistence) == 50
    assert all(s.binding is not None and s.binding.server is s.server for s in new.sessions)
    (line,) = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert line.startswith("loaded 50 sessions, 50 bindings from ")
    assert line.endswith("; 0 expired skipped")
    status = new.status()["table_snapshot"]
    assert status["load"]["result"] == "loaded" and status["load"]["sessions"] == 50


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:HEADER_SIZE + 5] + bytes([d[HEADER_SIZE + 5] ^ 1]) + d[HEADER_SIZE + 6:],
     "checksum"),
    (lambda d: b"not a snapshot at all, but long enough to hold a header, twice or so",
     "magic"),
    (lambda d: d[:4] + b"\x00\x09" + d[6:], "version"),
])
def test_a_bad_file_is_refused_whole_and_the_tables_start_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str) -> None:
    old = make_node(tmp_path)
    fill(old, 20)
    assert write(old)
    path = tmp_path / "state" / "tables.snap"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    new = make_node(tmp_path)
    with caplog.at_level(logging.INFO, logger="lbd"):
        load(new)
    assert len(new.sessions) == 0 and len(new.persistence) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert f"refused ({reason}:" in msg and "starting with empty tables" in msg, msg
    assert not path.exists() and (tmp_path / "state" / "tables.snap.refused").exists()
    assert new.snapshots.report.result == reason
    assert new.status()["table_snapshot"]["load"]["result"] == reason
    text = scrape(new)
    assert f'lbd_table_snapshot_loads_total{{result="{reason}"}} 1.0' in text


def test_a_file_of_other_virtual_servers_is_refused(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    old = make_node(tmp_path)
    fill(old, 3)
    assert write(old)
    other = make_node(tmp_path, pools="[virtual_servers.api]\naddress = \"198.51.100.11\"\n"
                                      "port = 80\npool = \"web\"\n")
    with caplog.at_level(logging.INFO, logger="lbd"):
        load(other)
    assert len(other.sessions) == 0 and other.snapshots.report.result == "config"
    assert any("other virtual servers or pools" in r.getMessage() for r in caplog.records)


def test_no_file_is_a_fresh_start(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    load(node)
    assert node.snapshots.report.result == "absent" and len(node.sessions) == 0


def test_disabled_writes_and_loads_nothing(tmp_path: Path) -> None:
    old = make_node(tmp_path)
    fill(old, 3)
    assert write(old)
    node = make_node(tmp_path, interval="0s")
    load(node)
    assert node.snapshots.report.result == "disabled" and len(node.sessions) == 0

    async def main() -> None:
        node.snapshots.start()
        await node.snapshots.stop()

    asyncio.run(main())
    assert node.snapshots.writes_total == 0


def test_stop_writes_once_more(tmp_path: Path) -> None:
    node = make_node(tmp_path, interval="1h")

    async def main() -> None:
        node.snapshots.start()
        fill(node, 4)
        await node.snapshots.stop()

    asyncio.run(main())
    assert node.snapshots.writes_total == 1 and node.snapshots.last_write_sessions == 4


def test_a_write_that_fails_keeps_the_old_file_and_is_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(tmp_path)
    fill(node, 2)
    assert write(node)
    before = (tmp_path / "state" / "tables.snap").read_bytes()
    (tmp_path / "state" / ".tables.snap.tmp").mkdir()  # the temp file cannot be opened
    fill_more = make_node(tmp_path)
    fill(fill_more, 5)
    with caplog.at_level(logging.ERROR, logger="lbd"):
        assert not write(fill_more)
    assert fill_more.snapshots.write_failures_total == 1
    assert (tmp_path / "state" / "tables.snap").read_bytes() == before
    assert any("table snapshot not written" in r.getMessage() for r in caplog.records)


def scrape(node: Node) -> str:
    from prometheus_client import generate_latest

    node.collector.sources.append(node.snapshots.metrics)
    return generate_latest(node.registry).decode()
