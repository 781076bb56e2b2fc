"""The control socket: one JSON request per connection, one JSON answer.

Request:  ``{"command": "servers", "args": []}`` + newline.
Answer:   ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}`` + newline.

The socket file is created mode 0660 so that a group can be given access (systemd unit).
Handlers are plain callables (sync or async) taking the argument list; they live in the
composition root, this module only speaks the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("lbd.control")

Handler = Callable[[list[str]], Any | Awaitable[Any]]
MAX_REQUEST = 64 * 1024


class CommandError(Exception):
    """A request the operator got wrong (unknown pool, bad address): reported, not logged."""


class ControlServer:
    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                       limit=MAX_REQUEST)
        p.chmod(0o660)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
            except ValueError:  # no newline within MAX_REQUEST bytes
                answer: dict[str, Any] = {"ok": False,
                                          "error": f"request longer than {MAX_REQUEST} bytes"}
            else:
                answer = await self.dispatch(line)
            try:
                data = json.dumps(answer)
            except (TypeError, ValueError, RecursionError) as exc:  # a handler returned non-JSON
                log.error("control answer is not JSON: %s", exc)
                data = json.dumps({"ok": False, "error": f"internal error: {exc}"})
            writer.write(data.encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            command = req["command"]
            if not isinstance(command, str):
                raise TypeError("command is not a string")
            raw_args = req.get("args", [])
            if not isinstance(raw_args, list):
                raise TypeError("args is not an array")
            args = [str(a) for a in raw_args]
        except (ValueError, KeyError, TypeError, RecursionError):  # deep nesting: RecursionError
            return {"ok": False, "error": "malformed request"}
        handler = self.handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {command!r} (known: {known})"}
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %s failed", command)
            return {"ok": False, "error": f"internal error: {exc}"}
        return {"ok": True, "result": result}


def request(path: str, command: str, args: list[str], timeout: float = 10) -> dict[str, Any]:
    """Blocking client used by lbctl and tests."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    return answer
