"""The control socket: one JSON request per connection, one JSON answer.

Request:  ``{"command": "servers", "args": []}`` + newline.
Answer:   ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}`` + newline.

The socket file is created mode 0660 so that a group can be given access (systemd unit).
Handlers are plain callables (sync or async) taking the argument list; they live in the
composition root, this module only speaks the protocol.

A large list answer (the session table) is a :class:`Stream`: an async iterator of chunks of
items, which the server encodes and writes one chunk at a time, waiting for the client to
read each (at most ``WRITE_TIMEOUT`` seconds) — the answer is never built or encoded whole,
and the event loop runs between chunks. On the wire it is the same one JSON document.
Arguments are an argv-like list (``["web", "198.18.0.14:8080", "--weight", "2"]``) that
:func:`parse_args` checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lbd.control")

Handler = Callable[[list[str]], Any | Awaitable[Any]]
MAX_REQUEST = 64 * 1024
WRITE_TIMEOUT = 10.0  # seconds a client may leave a chunk of a streamed answer unread


class CommandError(Exception):
    """A request the operator got wrong (unknown pool, bad address): reported, not logged."""


@dataclass(frozen=True, slots=True)
class Stream:
    """A list answer produced in chunks (each a list of JSON-able items)."""

    chunks: AsyncIterator[list[Any]]

    async def collect(self) -> list[Any]:
        """The whole list (for tests and in-process callers)."""
        out: list[Any] = []
        async for chunk in self.chunks:
            out.extend(chunk)
        return out


def parse_args(args: Sequence[str], positional: Sequence[str],
               options: Mapping[str, type[int] | type[str] | None] | None = None,
               ) -> tuple[list[str], dict[str, Any]]:
    """Split ``args`` into the ``positional`` names' values and ``--name VALUE`` options.

    ``options`` maps an option to the type of its value (``int`` or ``str``) or to None for
    a flag (True when present). Anything else is a :class:`CommandError` with the usage.
    """
    options = options or {}
    usage = " ".join([*positional, *(f"[{o}{' N' if t is int else ' X' if t else ''}]"
                                     for o, t in options.items())])
    pos: list[str] = []
    opts: dict[str, Any] = {}
    it = iter(args)
    for arg in it:
        if arg.startswith("--"):
            if arg not in options:
                raise CommandError(f"unknown option {arg} (usage: {usage})")
            kind = options[arg]
            if kind is None:
                opts[arg[2:]] = True
                continue
            value = next(it, None)
            if value is None:
                raise CommandError(f"{arg} needs a value (usage: {usage})")
            if kind is int:
                try:
                    opts[arg[2:]] = int(value)
                except ValueError:
                    raise CommandError(f"{arg}: {value!r} is not an integer") from None
            else:
                opts[arg[2:]] = value
        else:
            pos.append(arg)
    if len(pos) != len(positional):
        raise CommandError(f"usage: {usage}")
    return pos, opts


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
            if isinstance(answer.get("result"), Stream):
                await self._write_stream(writer, answer["result"])
                return
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

    async def _write_stream(self, writer: asyncio.StreamWriter, stream: Stream) -> None:
        """Write ``{"ok": true, "result": [...]}`` one chunk at a time. A failure half-way
        (a handler bug, a client that stops reading) closes the connection: the client sees
        an answer cut short, never a wrong one."""
        chunks = stream.chunks
        try:
            writer.write(b'{"ok": true, "result": [')
            first = True
            async for chunk in chunks:
                if not chunk:
                    continue
                data = json.dumps(chunk)[1:-1]
                writer.write((data if first else ", " + data).encode())
                first = False
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            writer.write(b"]}\n")
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (OSError, TimeoutError):
            writer.transport.abort()
        except Exception:
            log.exception("streamed control answer failed")
            writer.transport.abort()
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

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
