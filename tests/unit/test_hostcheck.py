"""``lbd --check`` looks at the whole config and at the host (lb.hostcheck).

The checks are a table: (what is wrong, the config or host change, the one finding expected).
The host is a fake (interfaces, addresses, files); LocalHost is tried on what every Linux box
has (``lo``, 127.0.0.1) and on files in a tmp dir. The command itself (``lbd --check``) runs
against configs on ``lo``: exit 0 ok, 1 errors, 4 warnings only; ``--config-only`` skips the
host.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lb import daemon
from lb.config import parse_config
from lb.hostcheck import (
    EXIT_ERRORS,
    EXIT_OK,
    EXIT_WARNINGS,
    Finding,
    LocalHost,
    check,
    exit_status,
)

KEY = "/etc/lbd/sync.key"


@dataclass
class FakeHost:
    interfaces: set[str] = field(default_factory=lambda: {"eth0", "eth1", "eth2"})
    addressed: set[str] = field(default_factory=lambda: {"eth0", "eth1"})
    local: set[str] = field(default_factory=lambda: {"127.0.0.1", "198.19.0.2"})
    files: dict[str, tuple[bytes, int]] = field(
        default_factory=lambda: {KEY: (b"k" * 32 + b"\n", 0o100600)})

    def interface_exists(self, name: str) -> bool:
        return name in self.interfaces

    def has_ipv4_address(self, name: str) -> bool:
        return name in self.addressed

    def is_local_address(self, address: str) -> bool:
        return address in self.local

    def _file(self, path: str) -> tuple[bytes, int]:
        if path not in self.files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.files[path]

    def read_file(self, path: str) -> bytes:
        return self._file(path)[0]

    def file_mode(self, path: str) -> int:
        return self._file(path)[1]


def pair() -> dict[str, Any]:
    return {
        "node": {"name": "lb-a"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "metrics": {"listen": "127.0.0.1:9641"},
        "virtual_servers": {"web": {"address": "198.51.100.10", "port": 80, "pool": "web"}},
        "pools": {"web": {"servers": [{"address": "198.18.0.11", "port": 8080}],
                          "health_check": {"type": "tcp", "interval": "1s",
                                           "timeout": "500ms"}}},
        "vrrp": {"instances": {
            "front": {"interface": "eth0", "vrid": 51, "addresses": ["198.51.100.10"],
                      "track_interfaces": ["eth2"]},
            "back": {"interface": "eth1", "vrid": 52, "addresses": ["198.18.0.1/24"]}}},
        "sync": {"listen": "198.19.0.2:7411", "peer": "198.19.0.3:7411", "key_file": KEY},
    }


Edit = Callable[[dict[str, Any], FakeHost], None]


@dataclass(frozen=True)
class Case:
    description: str
    edit: Edit
    severity: str
    path: str
    problem: str  # a part of it


def _set(section: str, key: str, value: Any) -> Edit:
    def edit(d: dict[str, Any], _: FakeHost) -> None:
        d[section][key] = value
    return edit


def _hc(**kw: str) -> Edit:
    def edit(d: dict[str, Any], _: FakeHost) -> None:
        d["pools"]["web"]["health_check"].update(kw)
    return edit


CASES = [
    Case("a client interface that does not exist",
         _set("dataplane", "client_interface", "eth7"),
         "error", "dataplane.client_interface", "interface 'eth7' not found"),
    Case("a server interface that does not exist",
         _set("dataplane", "server_interface", "eth8"),
         "error", "dataplane.server_interface", "interface 'eth8' not found"),
    Case("a VRRP interface that does not exist",
         lambda d, h: d["vrrp"]["instances"]["back"].update(interface="eth9"),
         "error", "vrrp.instances.back.interface", "interface 'eth9' not found"),
    Case("a VRRP interface without an IPv4 address",
         lambda d, h: h.addressed.discard("eth1"),
         "error", "vrrp.instances.back.interface", "'eth1' has no IPv4 address"),
    Case("a tracked interface that is absent",
         lambda d, h: h.interfaces.discard("eth2"),
         "warning", "vrrp.instances.front.track_interfaces[0]", "'eth2' not found"),
    Case("a key file that does not exist",
         lambda d, h: h.files.clear(),
         "error", "sync.key_file", f"cannot read {KEY}: No such file or directory"),
    Case("a key too short",
         lambda d, h: h.files.update({KEY: (b"short\n", 0o100600)}),
         "error", "sync.key_file", "sync key is 5 bytes; at least 16 are required"),
    Case("a key others can read",
         lambda d, h: h.files.update({KEY: (b"k" * 32, 0o100644)}),
         "warning", "sync.key_file", "mode 0644"),
    Case("metrics on the sync port",
         _set("metrics", "listen", "198.19.0.2:7411"),
         "error", "metrics.listen", "takes the port of sync.listen 198.19.0.2:7411"),
    Case("metrics on every address, on the sync port",
         lambda d, h: d["metrics"].update(listen="0.0.0.0:7411"),
         "error", "metrics.listen", "0.0.0.0:7411 takes the port of sync.listen"),
    Case("a sync peer that is our own listen",
         lambda d, h: d["sync"].update(peer="198.19.0.2:7411"),
         "error", "sync.peer", "198.19.0.2:7411 is sync.listen"),
    Case("a sync peer on our own listen host",
         lambda d, h: d["sync"].update(peer="198.19.0.2:7412"),
         "warning", "sync.peer", "also the host of sync.listen"),
    Case("a sync peer that is another address of this host",
         lambda d, h: h.local.add("198.19.0.3"),
         "warning", "sync.peer", "198.19.0.3 is an address of this host"),
    Case("a sync listen address this host lacks",
         lambda d, h: h.local.discard("198.19.0.2"),
         "error", "sync.listen", "198.19.0.2 is not an address of this host"),
    Case("a metrics listen address this host lacks",
         _set("metrics", "listen", "192.0.2.1:9641"),
         "error", "metrics.listen", "192.0.2.1 is not an address of this host"),
    Case("a health-check timeout longer than its interval",
         _hc(timeout="2s"),
         "warning", "pools.web.health_check.timeout",
         "2s is longer than the interval 1s"),
    Case("sub-second durations said as the file says them",
         _hc(interval="200ms", timeout="250ms"),
         "warning", "pools.web.health_check.timeout",
         "250ms is longer than the interval 200ms"),
]


def findings(edit: Edit | None = None) -> list[Finding]:
    data, host = copy.deepcopy(pair()), FakeHost()
    if edit is not None:
        edit(data, host)
    return check(parse_config(data, "lbd.toml"), host)


def test_a_sound_pair_on_its_host_has_no_findings() -> None:
    assert findings() == []


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_each_problem_is_one_finding_at_its_key(case: Case) -> None:
    found = findings(case.edit)
    assert len(found) == 1, found
    f = found[0]
    assert (f.severity, f.path) == (case.severity, case.path)
    assert case.problem in f.problem


@pytest.mark.parametrize("edit", [
    _hc(timeout="1s"),  # timeout equal to the interval
    _set("metrics", "listen", "127.0.0.1:7411"),  # the sync port on another address
    _set("metrics", "listen", "0.0.0.0:9641"),  # every address, not a bound address
], ids=["timeout-equals-interval", "same-port-other-address", "metrics-on-any"])
def test_coherent_variations_are_not_findings(edit: Edit) -> None:
    assert findings(edit) == []


def test_standalone_node_needs_no_sync_key_and_no_vrrp_interfaces() -> None:
    data = pair()
    del data["vrrp"], data["sync"]
    host = FakeHost(interfaces={"eth0", "eth1"}, addressed=set(), files={})
    assert check(parse_config(data, "lbd.toml"), host) == []


def test_errors_come_first_and_render_in_the_file_key_problem_style() -> None:
    def both(d: dict[str, Any], h: FakeHost) -> None:
        _hc(timeout="2s")(d, h)
        d["dataplane"]["client_interface"] = "eth7"

    found = findings(both)
    assert [f.severity for f in found] == ["error", "warning"]
    assert found[0].render("lbd.toml") == (
        "lbd.toml: dataplane.client_interface: interface 'eth7' not found")
    assert found[1].render("lbd.toml").startswith(
        "lbd.toml: pools.web.health_check.timeout: warning: 2s is longer")


@pytest.mark.parametrize(("severities", "status"), [
    ([], EXIT_OK),
    (["warning", "warning"], EXIT_WARNINGS),
    (["warning", "error"], EXIT_ERRORS),
], ids=["clean", "warnings", "errors"])
def test_exit_status(severities: list[Any], status: int) -> None:
    assert exit_status([Finding(s, "k", "p") for s in severities]) == status
    assert (EXIT_OK, EXIT_ERRORS, EXIT_WARNINGS) == (0, 1, 4)


# --- the real host ---------------------------------------------------------------------------


def test_local_host_sees_loopback_and_no_invented_interface(tmp_path: Path) -> None:
    host = LocalHost()
    assert host.interface_exists("lo") and not host.interface_exists("lbd-nope0")
    assert host.has_ipv4_address("lo") and not host.has_ipv4_address("lbd-nope0")
    assert host.is_local_address("127.0.0.1")
    assert not host.is_local_address("192.0.2.1")  # TEST-NET-1: nobody's address
    key = tmp_path / "sync.key"
    key.write_bytes(b"x" * 20)
    key.chmod(0o640)
    assert host.read_file(str(key)) == b"x" * 20
    assert host.file_mode(str(key)) & 0o777 == 0o640
    with pytest.raises(OSError):
        host.read_file(str(tmp_path / "absent"))


# --- lbd --check -----------------------------------------------------------------------------

ON_LO = """
[node]
name = "t"
[dataplane]
client_interface = "lo"
server_interface = "{server_if}"
[metrics]
listen = "127.0.0.1:9641"
[virtual_servers.web]
address = "198.51.100.10"
port = 80
pool = "web"
[pools.web]
health_check = {{ type = "tcp", interval = "1s", timeout = "{timeout}" }}
servers = [{{ address = "198.18.0.11", port = 8080 }}]
"""


def run_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str,
              server_if: str = "lo", timeout: str = "500ms") -> tuple[int, str, str]:
    path = tmp_path / "lbd.toml"
    path.write_text(ON_LO.format(server_if=server_if, timeout=timeout))
    status = daemon.main(["--check", "--config", str(path), *extra])
    out, err = capsys.readouterr()
    return status, out, err


def test_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_check(tmp_path, capsys)
    assert (status, err) == (0, "")
    assert out == f"{tmp_path / 'lbd.toml'}: OK\n"


def test_check_warnings_only_exit_4_and_still_ok(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_check(tmp_path, capsys, timeout="3s")
    assert status == 4
    assert "pools.web.health_check.timeout: warning: 3s is longer" in err
    assert out.endswith(": OK (1 warnings)\n")


def test_check_host_error_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_check(tmp_path, capsys, server_if="lbd-nope0")
    assert (status, out) == (1, "")
    assert err == (f"{tmp_path / 'lbd.toml'}: dataplane.server_interface: "
                   "interface 'lbd-nope0' not found\n")


def test_check_config_only_skips_the_host(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_check(tmp_path, capsys, "--config-only", server_if="lbd-nope0")
    assert (status, err) == (0, "")
    status, _, err = run_check(tmp_path, capsys, "--config-only", timeout="3s")
    assert status == 4 and "warning" in err  # the whole-config checks still run


def test_check_a_bad_file_is_exit_1_as_before(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(ON_LO.format(server_if="lo", timeout="500ms").replace(
        'pool = "web"', 'pool = "nope"'))
    assert daemon.main(["--check", "--config", str(path)]) == 1
    assert "virtual_servers.web.pool" in capsys.readouterr().err


def test_config_only_without_check_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        daemon.main(["--config", os.devnull, "--config-only"])
    assert exc.value.code == 2
    assert "--config-only needs --check" in capsys.readouterr().err


@pytest.mark.usefixtures("root_logger")
def test_lbd_refuses_to_start_on_what_check_calls_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text(ON_LO.format(server_if="lbd-nope0", timeout="500ms"))
    assert daemon.main(["--config", str(path), "--log-format", "journal"]) == 1
    assert capsys.readouterr().err == (
        f"<3>{path}: dataplane.server_interface: interface 'lbd-nope0' not found\n")


@pytest.mark.usefixtures("root_logger")
def test_lbd_logs_a_bad_file_at_start_with_error_priority(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lbd.toml"
    path.write_text("[node]\n")
    assert daemon.main(["--config", str(path), "--log-format", "journal"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith(f"<3>{path}: ") for line in lines)
