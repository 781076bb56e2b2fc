"""lbd under systemd (``Type=notify``), against a fake ``NOTIFY_SOCKET``: a unix datagram
socket the test binds and reads, as systemd would.

- lb.sdnotify: the wire format, path and abstract (``@``) sockets, a no-op without the
  variable, a vanished socket costs a message and not the daemon, the watchdog period.
- lb.daemon.Supervisor: READY=1 with a readable STATUS= once started, RELOADING=1 with
  MONOTONIC_USEC then READY=1 around a reload, STOPPING=1, WATCHDOG=1 from a loop callback
  (driven by a fake loop, so no clock), STATUS= sent again only when it changed.
- lb.daemon.SupervisedNode: a reload refused by the node, asked by SIGHUP's path or by the
  control socket's ``reload`` (what ``lbctl reload`` and ExecReload send), is wrapped in
  RELOADING=1 … READY=1 and the STATUS= line says it was refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lb import ctl
from lb.config import parse_config
from lb.control import CommandError
from lb.daemon import SupervisedNode, Supervisor, status_text
from lb.sdnotify import Notifier, encode, watchdog_period
from tests.unit.test_control import ServerThread

Message = dict[str, str]


class FakeSystemd:
    """The service manager's end: a bound unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def messages(self) -> list[Message]:
        out: list[Message] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    # A short directory: a unix socket path must fit in 108 bytes, tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="lbd-") as d:
        fake = FakeSystemd(str(Path(d) / "notify"))
        yield fake
        fake.close()


# --- the sender ----------------------------------------------------------------------------


def test_encode_writes_key_value_lines_and_keeps_a_value_on_its_line() -> None:
    assert encode({"READY": 1, "STATUS": "up"}) == b"READY=1\nSTATUS=up\n"
    assert encode({"STATUS": "a\nFAKE=1"}) == b"STATUS=a; FAKE=1\n"


def test_a_path_socket_receives_the_datagram(systemd: FakeSystemd) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": systemd.address})
    assert n.enabled and n.notify(READY=1, STATUS="serving")
    assert systemd.messages() == [{"READY": "1", "STATUS": "serving"}]
    n.close()


def test_an_abstract_socket_is_written_with_a_leading_at() -> None:
    fake = FakeSystemd(f"@lbd-test-{os.getpid()}")
    try:
        n = Notifier(fake.address)
        assert n.notify(WATCHDOG=1)
        assert fake.messages() == [{"WATCHDOG": "1"}]
        n.close()
    finally:
        fake.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.notify(READY=1)
    assert n.sent == 0 and n.failed == 0


def test_a_vanished_socket_costs_one_warning_and_never_raises(
        systemd: FakeSystemd, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(systemd.address)
    systemd.close()
    Path(systemd.address).unlink()
    with caplog.at_level(logging.WARNING, "lbd.systemd"):
        assert not n.notify(READY=1)
        assert not n.notify(WATCHDOG=1)
    assert n.failed == 2
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "3000000"}, 1.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 1.0),  # this process
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # meant for another
], ids=["unset", "zero", "garbage", "set", "for-us", "for-another"])
def test_watchdog_period_is_a_third_of_watchdog_usec_for_this_process(
        environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_period(environ, 4242) == expected


# --- the supervisor ------------------------------------------------------------------------


@dataclass
class Handle:
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeLoop:
    """Records call_later; the test runs the due callback by hand."""

    pending: list[tuple[float, Callable[[], object], Handle]] = field(default_factory=list)

    def call_later(self, delay: float, callback: Callable[[], object], /) -> Handle:
        handle = Handle()
        self.pending.append((delay, callback, handle))
        return handle

    def run_next(self) -> float:
        delay, callback, handle = self.pending.pop(0)
        assert not handle.cancelled
        callback()
        return delay


PAIR_STATUS: dict[str, Any] = {"vrrp": {"front": {"state": "MASTER"},
                                        "back": {"state": "MASTER"}},
                               "sessions": 12, "sync": {"configured": True, "connected": True}}


@pytest.mark.parametrize(("status", "line"), [
    (PAIR_STATUS, "front=MASTER back=MASTER; 12 sessions; sync connected"),
    ({"vrrp": {"front": {"state": "BACKUP"}}, "sessions": 0,
      "sync": {"configured": True, "connected": False}},
     "front=BACKUP; 0 sessions; sync not connected"),
    ({"vrrp": {}, "sessions": 3, "sync": {"configured": False, "connected": False}},
     "standalone; 3 sessions; no sync"),
], ids=["pair-master", "backup-unsynced", "standalone"])
def test_status_text_names_roles_sessions_and_sync(status: dict[str, Any], line: str) -> None:
    assert status_text(status) == line


def supervised(systemd: FakeSystemd, watchdog: float | None = 1.0) -> tuple[Supervisor, FakeLoop]:
    sup = Supervisor(Notifier(systemd.address), watchdog=watchdog, status_every=5.0,
                     monotonic_usec=lambda: 123456789)
    loop = FakeLoop()
    sup.start(loop)
    return sup, loop


def test_start_ready_reload_stop_is_what_systemd_hears(systemd: FakeSystemd) -> None:
    sup, _ = supervised(systemd)
    assert systemd.messages() == [{"STATUS": "starting"}, {"WATCHDOG": "1"}]
    sup.ready(lambda: PAIR_STATUS)
    assert systemd.messages() == [
        {"READY": "1", "STATUS": "front=MASTER back=MASTER; 12 sessions; sync connected"}]
    sup.reloading()
    sup.reloaded([])
    assert systemd.messages() == [
        {"RELOADING": "1", "MONOTONIC_USEC": "123456789", "STATUS": "reloading"},
        {"READY": "1", "STATUS": "front=MASTER back=MASTER; 12 sessions; sync connected"}]
    sup.stopping()
    assert systemd.messages() == [{"STOPPING": "1", "STATUS": "stopping"}]
    sup.close()


def test_a_refused_reload_is_ready_again_and_says_so_until_one_succeeds(
        systemd: FakeSystemd) -> None:
    sup, _ = supervised(systemd)
    sup.ready(lambda: PAIR_STATUS)
    systemd.messages()
    sup.reloading()
    sup.reloaded(["f.toml: pools.web: bad", "f.toml: pools.dns: bad"])
    ready = systemd.messages()[-1]
    assert ready["READY"] == "1"
    assert ready["STATUS"].endswith("; last reload refused: f.toml: pools.web: bad "
                                    "(and 1 more)")
    sup.reloading()
    sup.reloaded([])
    assert "refused" not in systemd.messages()[-1]["STATUS"]


def test_the_watchdog_is_pinged_by_loop_callbacks_and_status_only_when_it_changed(
        systemd: FakeSystemd) -> None:
    sup, loop = supervised(systemd, watchdog=1.0)
    status = dict(PAIR_STATUS)
    sup.ready(lambda: status)
    systemd.messages()
    # Nothing is sent between callbacks: a stalled loop stops pinging.
    assert systemd.messages() == []
    assert loop.run_next() == 1.0
    assert systemd.messages() == [{"WATCHDOG": "1"}]
    status["sessions"] = 13
    loop.run_next()
    assert systemd.messages() == [
        {"WATCHDOG": "1", "STATUS": "front=MASTER back=MASTER; 13 sessions; sync connected"}]
    assert len(loop.pending) == 1  # one timer, re-armed by each tick
    sup.close()
    assert loop.pending[0][2].cancelled


def test_without_a_watchdog_the_tick_only_refreshes_status(systemd: FakeSystemd) -> None:
    sup, loop = supervised(systemd, watchdog=None)
    systemd.messages()
    status = dict(PAIR_STATUS)
    sup.ready(lambda: status)
    systemd.messages()
    assert loop.run_next() == 5.0
    assert systemd.messages() == []
    status["sessions"] = 0
    loop.run_next()
    assert systemd.messages() == [
        {"STATUS": "front=MASTER back=MASTER; 0 sessions; sync connected"}]


def test_without_notify_socket_the_supervisor_arms_no_timer() -> None:
    sup = Supervisor(Notifier(None), watchdog=1.0)
    loop = FakeLoop()
    sup.start(loop)
    sup.ready(lambda: PAIR_STATUS)
    assert loop.pending == []


def test_a_real_event_loop_pings_the_watchdog(systemd: FakeSystemd) -> None:
    got: list[Message] = []

    async def run() -> None:
        sup = Supervisor(Notifier(systemd.address), watchdog=0.01)
        sup.start(asyncio.get_running_loop())
        deadline = asyncio.get_running_loop().time() + 5
        while sum("WATCHDOG" in m for m in got) < 3:
            assert asyncio.get_running_loop().time() < deadline, got
            await asyncio.sleep(0.01)
            got.extend(systemd.messages())
        sup.close()

    asyncio.run(run())


# --- the node's reloads --------------------------------------------------------------------

GOOD = """
[node]
name = "t"
[dataplane]
client_interface = "lo"
server_interface = "lo"
[virtual_servers.web]
address = "198.51.100.10"
port = 80
pool = "web"
[pools.web]
servers = [{ address = "198.18.0.11", port = 8080 }]
"""


@pytest.fixture
def node(tmp_path: Path, systemd: FakeSystemd) -> SupervisedNode:
    path = tmp_path / "lbd.toml"
    path.write_text(GOOD)
    cfg = parse_config(tomllib.loads(GOOD), str(path))
    sup, _ = supervised(systemd)
    sup.ready(lambda: {"vrrp": {}, "sessions": 0, "sync": {"configured": False}})
    systemd.messages()
    return SupervisedNode(cfg, sup)


def test_a_reload_by_signal_is_announced(node: SupervisedNode, systemd: FakeSystemd) -> None:
    Path(node.config.source).write_text(GOOD.replace('name = "t"', 'name = "renamed"'))
    errors = asyncio.run(node.reload())
    assert errors and "node" in errors[0]
    msgs = systemd.messages()
    assert [m.get("RELOADING") or m.get("READY") for m in msgs] == ["1", "1"]
    assert "MONOTONIC_USEC" in msgs[0] and "READY" in msgs[1]
    assert "last reload refused" in msgs[1]["STATUS"]


def test_a_reload_by_the_control_socket_is_announced_and_refused(
        node: SupervisedNode, systemd: FakeSystemd) -> None:
    Path(node.config.source).write_text("this is not toml")
    handler = node.control_handlers()["reload"]
    with pytest.raises(CommandError, match="reload refused"):
        asyncio.run(handler([]))
    msgs = systemd.messages()
    assert msgs[0]["RELOADING"] == "1" and msgs[1]["READY"] == "1"
    assert "TOML syntax error" in msgs[1]["STATUS"]


def test_exec_reload_lbctl_reload_fails_when_the_node_refuses(
        node: SupervisedNode, systemd: FakeSystemd, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The unit's ExecReload is ``lbctl reload``: its exit status is what systemd reports."""
    Path(node.config.source).write_text("this is not toml")
    sock = tmp_path / "c.sock"
    with ServerThread(sock, node.control_handlers()):
        rc = ctl.main(["--socket", str(sock), "reload"])
    assert rc == 1
    assert "reload refused, old config kept" in capsys.readouterr().err
    assert [next(iter(m)) for m in systemd.messages()] == ["RELOADING", "READY"]
