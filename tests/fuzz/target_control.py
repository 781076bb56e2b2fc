"""Fuzz target: control-socket request lines through ``ControlServer.dispatch``.

Input: the request line (bytes, as ``readline`` hands it over). The handlers stand in for the
daemon's: plain and async results, an operator error, a crash, a result that is not JSON.

Invariants: nothing escapes; the answer is a JSON-serialisable ``{"ok": true, "result": ...}``
exactly when the line is one JSON object naming a known command with an array of arguments
whose handler succeeded, and ``{"ok": false, "error": "<non-empty text>"}`` otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

from hypothesis import strategies as st

from lb.control import CommandError, ControlServer, Handler
from tests.fuzz import wire
from tests.fuzz.targets import Target


def _refuse(args: list[str]) -> Any:
    raise CommandError(f"usage: POOL ADDR:PORT, got {len(args)} arguments")


def _crash(args: list[str]) -> Any:
    raise RuntimeError("handler bug")


async def _async_echo(args: list[str]) -> Any:
    return {"echo": args}


HANDLERS: dict[str, Handler] = {
    "status": lambda args: {"node": "fuzz", "sessions": 0},
    "echo": lambda args: args,
    "drain": _refuse,
    "crash": _crash,
    "reload": _async_echo,
}
SUCCEEDS = frozenset({"status", "echo", "reload"})


def run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run a coroutine that never suspends (dispatch with these handlers) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        answer: dict[str, Any] = stop.value
        return answer
    coro.close()
    raise AssertionError("dispatch suspended")


def well_formed(line: bytes) -> str | None:
    """The command if ``line`` is a request dispatch should run, else None."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(req, dict) or not isinstance(req.get("command"), str):
        return None
    command: str = req["command"]
    args = req.get("args", [])
    return command if isinstance(args, list) else None


def check_answer(answer: object) -> None:
    """An answer is one of the two documented shapes and serialises to one JSON line."""
    assert isinstance(answer, dict), f"answer is {type(answer).__name__}"
    assert isinstance(answer.get("ok"), bool), "answer has no boolean ok"
    if answer["ok"]:
        assert set(answer) == {"ok", "result"}, f"ok answer with keys {sorted(answer)}"
    else:
        assert set(answer) == {"ok", "error"}, f"error answer with keys {sorted(answer)}"
        assert isinstance(answer["error"], str) and answer["error"], "empty error"
    assert "\n" not in json.dumps(answer)


SERVER = ControlServer("/nonexistent/control.sock", HANDLERS)  # dispatch only: never started


def check(data: bytes) -> None:
    answer = run(SERVER.dispatch(data))
    check_answer(answer)
    command = well_formed(data)
    assert answer["ok"] == (command in SUCCEEDS), f"ok={answer['ok']} for {command!r}"


# --- seeds and generation ----------------------------------------------------------------------

def request(command: object, args: object = None) -> bytes:
    body: dict[str, object] = {"command": command}
    if args is not None:
        body["args"] = args
    return json.dumps(body).encode() + b"\n"


def seeds() -> list[bytes]:
    return [
        request("status"), request("echo", ["web", "198.18.0.11:8080"]), request("drain", []),
        request("crash"), request("reload", [1, 2.5, None, True, {"a": 1}]),
        request("nope"), request(7), request("echo", "notalist"), b'["status"]\n', b"\n",
        b'{"command": "echo", "args": [[[[["deep"]]]]]}\n', b"\xff\xfe{}\n",
    ]


_json: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
_command = st.sampled_from([*HANDLERS, "nope", ""]) | _json


def inputs() -> st.SearchStrategy[bytes]:
    built = st.builds(request, _command, st.none() | st.lists(_json, max_size=4) | _json)
    nested = st.integers(1, 5000).map(lambda n: b'{"command": "echo", "args": ' + b"[" * n)
    return wire.mutated(built | nested | st.sampled_from(seeds()) | st.binary(max_size=64))


TARGET = Target("control", check, seeds, inputs, max_len=8192)
