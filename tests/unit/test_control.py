"""Tests of the control socket (lb.control) and of lbctl (lb.ctl).

``dispatch`` is tested as a table of request line → answer. The round trips run a real
ControlServer on a unix socket in a tmp dir, its event loop in a thread, and talk to it with
the blocking client ``request()`` and with ``lbctl``'s ``main()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lb import ctl
from lb.control import MAX_REQUEST, CommandError, ControlServer, Handler, request

SERVERS = [
    {"pool": "web", "server": "198.18.0.11:8080", "up": True, "state": "UP",
     "admin": "enabled", "weight": 2, "active_sessions": 3, "reason": "http 200"},
    {"pool": "web", "server": "198.18.0.12:8080", "up": False, "state": "DOWN",
     "admin": "enabled", "weight": 1, "active_sessions": 0, "reason": "connection refused"},
]
SESSIONS = [{"protocol": "tcp", "client": "198.51.100.77:40000", "virtual": "198.51.100.10:80",
             "server": "198.18.0.11:8080", "state": "ESTABLISHED", "expires_in": 899.5}]
VRRP = {"front": {"state": "MASTER", "priority": 200, "vrid": 51}}
STATUS = {"node": "lb-a", "vrrp": {"front": {"state": "MASTER"}}, "sessions": 1,
          "sync": {"connected": False}}


def refuse(args: list[str]) -> Any:
    raise CommandError(f"no pool {args[0]!r}")


def crash(args: list[str]) -> Any:
    raise RuntimeError("boom")


async def async_echo(args: list[str]) -> Any:
    await asyncio.sleep(0)
    return {"echo": args}


def handlers() -> dict[str, Handler]:
    return {
        "status": lambda args: STATUS,
        "servers": lambda args: SERVERS,
        "sessions": lambda args: SESSIONS,
        "vrrp": lambda args: VRRP,
        "echo": lambda args: args,
        "drain": refuse,
        "crash": crash,
        "reload": async_echo,
        "sync": lambda args: {1, 2},  # not JSON-serialisable: a handler bug
    }


# --- dispatch ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchCase:
    description: str
    line: bytes
    answer: Mapping[str, Any]


def req(command: Any, args: Any = None) -> bytes:
    body: dict[str, Any] = {"command": command}
    if args is not None:
        body["args"] = args
    return json.dumps(body).encode() + b"\n"


KNOWN = "crash, drain, echo, reload, servers, sessions, status, sync, vrrp"

DISPATCH_CASES = [
    DispatchCase("a command's result", req("status"), {"ok": True, "result": STATUS}),
    DispatchCase("args are passed as strings", req("echo", ["web", 8080, True]),
                 {"ok": True, "result": ["web", "8080", "True"]}),
    DispatchCase("missing args are an empty list", req("echo"), {"ok": True, "result": []}),
    DispatchCase("an async handler is awaited", req("reload", ["x"]),
                 {"ok": True, "result": {"echo": ["x"]}}),
    DispatchCase("unknown command", req("frobnicate"),
                 {"ok": False, "error": f"unknown command 'frobnicate' (known: {KNOWN})"}),
    DispatchCase("malformed JSON", b"{not json\n", {"ok": False, "error": "malformed request"}),
    DispatchCase("empty line", b"", {"ok": False, "error": "malformed request"}),
    DispatchCase("not UTF-8", b"\xff\xfe\n", {"ok": False, "error": "malformed request"}),
    DispatchCase("no command key", b'{"args": []}\n', {"ok": False, "error": "malformed request"}),
    DispatchCase("not an object", b"[1, 2]\n", {"ok": False, "error": "malformed request"}),
    DispatchCase("args not a list", req("echo", 5), {"ok": False, "error": "malformed request"}),
    # Found by fuzzing (docs/fuzzing.md): a string or an object was taken apart as a list.
    DispatchCase("args a string", req("echo", "ab"), {"ok": False, "error": "malformed request"}),
    DispatchCase("args an object", req("echo", {"a": 1}),
                 {"ok": False, "error": "malformed request"}),
    # Found by fuzzing: json.loads raised RecursionError past the nesting limit.
    DispatchCase("nesting deeper than the parser's limit", b'{"args": ' + b"[" * 50_000,
                 {"ok": False, "error": "malformed request"}),
    DispatchCase("command not a string", req(["status"]),
                 {"ok": False, "error": "malformed request"}),
    DispatchCase("command an object", req({"a": 1}),
                 {"ok": False, "error": "malformed request"}),
    DispatchCase("CommandError is the operator's mistake", req("drain", ["nope"]),
                 {"ok": False, "error": "no pool 'nope'"}),
    DispatchCase("a handler exception is an internal error", req("crash"),
                 {"ok": False, "error": "internal error: boom"}),
]


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=[c.description for c in DISPATCH_CASES])
def test_dispatch(case: DispatchCase) -> None:
    server = ControlServer("/nonexistent/control.sock", handlers())
    assert asyncio.run(server.dispatch(case.line)) == case.answer


def test_handler_exception_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    server = ControlServer("/nonexistent/control.sock", handlers())
    with caplog.at_level(logging.ERROR, logger="lbd.control"):
        asyncio.run(server.dispatch(req("crash")))
        asyncio.run(server.dispatch(req("drain", ["nope"])))  # not logged: operator error
    (record,) = caplog.records
    assert "crash" in record.getMessage() and record.exc_info is not None


# --- a real server on a unix socket --------------------------------------------------------------


class ServerThread:
    """A ControlServer on its own event loop in a thread (so the blocking clients can run)."""

    def __init__(self, path: Path, handler_map: Mapping[str, Handler]) -> None:
        self.path = path
        self.server = ControlServer(str(path), handler_map)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "c.sock"  # the parent does not exist yet: start() makes it


@pytest.fixture
def served(sock_path: Path) -> Iterator[ServerThread]:
    with ServerThread(sock_path, handlers()) as st:
        yield st


def test_round_trip(served: ServerThread) -> None:
    path = str(served.path)
    assert request(path, "servers", []) == {"ok": True, "result": SERVERS}
    assert request(path, "echo", ["a", "b"]) == {"ok": True, "result": ["a", "b"]}
    assert request(path, "reload", []) == {"ok": True, "result": {"echo": []}}
    assert request(path, "drain", ["x"]) == {"ok": False, "error": "no pool 'x'"}
    assert request(path, "nope", [])["ok"] is False


def test_socket_mode_and_cleanup(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    sock_path.write_text("stale")  # left behind by a killed lbd
    with ServerThread(sock_path, handlers()):
        assert stat.S_ISSOCK(sock_path.stat().st_mode)
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
        assert request(str(sock_path), "status", [])["ok"]
    assert not sock_path.exists()


def test_bad_clients_do_not_hurt_the_server(served: ServerThread) -> None:
    path = str(served.path)
    for payload in (b"", b"garbage\n", b'{"command": ["x"]}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            if payload:
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            if payload:
                assert json.loads(data)["ok"] is False
    assert request(path, "status", [])["ok"]


def test_request_longer_than_the_limit_gets_an_error_answer(served: ServerThread) -> None:
    """Found by fuzzing: a request line over MAX_REQUEST was dropped without an answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(served.path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * (MAX_REQUEST + 1))
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert json.loads(data) == {"ok": False,
                                "error": f"request longer than {MAX_REQUEST} bytes"}
    assert request(str(served.path), "status", [])["ok"]


def test_result_that_is_not_json_is_an_internal_error(served: ServerThread) -> None:
    answer = request(str(served.path), "sync", [])
    assert answer["ok"] is False and answer["error"].startswith("internal error")
    assert request(str(served.path), "status", [])["ok"]


# --- lbctl ---------------------------------------------------------------------------------------


def lbctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("command", "result"), [("servers", SERVERS), ("sessions", SESSIONS),
                                                 ("vrrp", VRRP), ("status", STATUS)])
def test_lbctl_json(served: ServerThread, capsys: pytest.CaptureFixture[str], command: str,
                    result: Any) -> None:
    rc, out, err = lbctl(capsys, "--socket", str(served.path), "--json", command)
    assert (rc, err) == (0, "")
    assert json.loads(out) == result


def test_lbctl_table(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = lbctl(capsys, "--socket", str(served.path), "servers")
    assert rc == 0
    header, first, second = out.splitlines()
    assert header.split() == ["POOL", "SERVER", "UP", "STATE", "ADMIN", "WEIGHT",
                              "ACTIVE_SESSIONS", "REASON"]
    assert first.split() == ["web", "198.18.0.11:8080", "True", "UP", "enabled", "2", "3",
                             "http", "200"]
    assert second.split()[:7] == ["web", "198.18.0.12:8080", "False", "DOWN", "enabled", "1",
                                  "0"]
    # columns line up: every value starts where its header does
    assert first.index("198.18.0.11") == header.index("SERVER")
    assert second.index("DOWN") == header.index("STATE")


def test_lbctl_passes_arguments(sock_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []

    def drain(args: list[str]) -> dict[str, str]:
        seen.append(args)
        return {"pool": args[0], "server": args[1], "admin": "drain"}

    with ServerThread(sock_path, {"drain": drain}):
        rc, out, _ = lbctl(capsys, "--socket", str(sock_path), "drain", "web",
                           "198.18.0.11:8080")
    assert rc == 0 and seen == [["web", "198.18.0.11:8080"]]
    assert out.splitlines() == ["pool: web", "server: 198.18.0.11:8080", "admin: drain"]


def test_lbctl_error_answer_exits_1(served: ServerThread,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = lbctl(capsys, "--socket", str(served.path), "drain", "nope", "1.2.3.4:80")
    assert (rc, out) == (1, "")
    assert err == "lbctl: no pool 'nope'\n"


def test_lbctl_missing_socket_exits_3(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.sock")
    rc, out, err = lbctl(capsys, "--socket", path, "status")
    assert (rc, out) == (3, "")
    assert err.startswith(f"lbctl: lbd is not running (nothing listens on {path}")


def test_lbctl_socket_nobody_listens_on_exits_3(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A killed lbd leaves its socket file behind: connecting is refused."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening: what a dead daemon leaves
    rc, out, err = lbctl(capsys, "--socket", str(path), "servers")
    assert (rc, out) == (3, "")
    assert "lbd is not running" in err


def test_lbctl_server_closing_without_answer_exits_3(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A peer that is not lbd (or an lbd that dies mid-request) gives a message, not a
    traceback."""
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)

        def accept_and_hang_up() -> None:
            conn, _ = listener.accept()
            conn.recv(4096)
            conn.close()

        t = threading.Thread(target=accept_and_hang_up, daemon=True)
        t.start()
        rc, out, err = lbctl(capsys, "--socket", path, "status")
        t.join(10)
    assert (rc, out) == (3, "")
    assert err.startswith(f"lbctl: cannot reach lbd at {path}")


def test_lbctl_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ctl.main(["--socket", "/nonexistent", "frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- render --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "result", "lines"),
    [
        ("sessions", [], ["(none)"]),
        ("sessions", SESSIONS, [
            "PROTOCOL  CLIENT               VIRTUAL           SERVER            STATE        "
            "EXPIRES_IN",
            "tcp       198.51.100.77:40000  198.51.100.10:80  198.18.0.11:8080  ESTABLISHED  "
            "899.5",
        ]),
        ("vrrp", VRRP, ["INSTANCE  STATE   PRIORITY  VRID", "front     MASTER  200       51"]),
        ("status", STATUS, ["node: lb-a", 'vrrp: {"front": {"state": "MASTER"}}', "sessions: 1",
                            'sync: {"connected": false}']),
        ("reload", "done", ["done"]),
    ],
)
def test_render(command: str, result: Any, lines: list[str]) -> None:
    assert [ln.rstrip() for ln in ctl.render(command, result).splitlines()] == lines


# --- lbctl: the runtime commands -----------------------------------------------------------------


def test_lbctl_every_command_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ctl.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            ctl.main([command, "--help"])
        assert exc.value.code == 0
        assert f"lbctl {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["weight", "web", "198.18.0.11:8080"],  # no weight
    ["weight", "web", "198.18.0.11:8080", "heavy"],
    ["weight", "web", "198.18.0.11:8080", "-1"],
    ["add-server", "web"],
    ["sessions", "--limit", "x"],
    ["demote", "extra"],
    [],
])
def test_lbctl_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ctl.main(["--socket", "/nonexistent", *argv])
    assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize(("argv", "sent"), [
    (["weight", "web", "198.18.0.11:8080", "3"], ["weight", "web", "198.18.0.11:8080", "3"]),
    (["add-server", "web", "198.18.0.14:8080", "--weight", "2", "--backup"],
     ["add-server", "web", "198.18.0.14:8080", "--weight", "2", "--backup"]),
    (["add-server", "web", "198.18.0.14:8080"], ["add-server", "web", "198.18.0.14:8080"]),
    (["sessions", "--virtual", "web", "--client", "198.51.100.7", "--limit", "5"],
     ["sessions", "--virtual", "web", "--client", "198.51.100.7", "--limit", "5"]),
    (["persistence", "--server", "198.18.0.11:8080"],
     ["persistence", "--server", "198.18.0.11:8080"]),
    (["demote"], ["demote"]),
    (["kill-sessions", "web", "198.18.0.11:8080", "--json"],
     ["kill-sessions", "web", "198.18.0.11:8080"]),
])
def test_lbctl_sends_the_command_and_its_args(sock_path: Path, argv: list[str],
                                              sent: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []

    def record(command: str) -> Handler:
        def handler(args: list[str]) -> Any:
            seen.append([command, *args])
            return [] if command in ("sessions", "persistence") else {"done": True}

        return handler

    with ServerThread(sock_path, {c: record(c) for c in ctl.COMMANDS}):
        rc, _, _ = lbctl(capsys, "--socket", str(sock_path), *argv)
    assert rc == 0 and seen == [sent]


def test_lbctl_warns_when_a_change_was_not_saved(sock_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    answer = {"pool": "web", "saved": False, "save_error": "not saved: read-only"}
    with ServerThread(sock_path, {"drain": lambda args: answer}):
        rc, _, err = lbctl(capsys, "--socket", str(sock_path), "drain", "web", "1.2.3.4:80")
    assert rc == 0 and "warning: done, but not saved: read-only" in err
