"""Fuzz target: raw bytes to a running ``ControlServer`` over its unix socket.

Input: what a client writes before it shuts its side down. The server (the handlers of
:mod:`tests.fuzz.target_control`) runs on an event loop in a thread, its socket in a temp dir
(under ``$TMPDIR``, which ``make fuzz`` points at a directory it removes afterwards).

Invariant: every connection gets exactly one answer line, ``{"ok": ...}`` of the documented
shape, however the request is broken (not JSON, not a line, longer than ``MAX_REQUEST``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path

from hypothesis import strategies as st

from lb.control import MAX_REQUEST, ControlServer
from tests.fuzz import target_control
from tests.fuzz.targets import Target


class LiveServer:
    """A ControlServer on its own event loop thread."""

    def __init__(self) -> None:
        self.path = str(Path(tempfile.mkdtemp(prefix="lbd-fuzz-")) / "control.sock")
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(self.path, target_control.HANDLERS)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        threading.Thread(target=serve, name="control-fuzz", daemon=True).start()
        if not started.wait(10):
            raise RuntimeError("control server did not start")
        atexit.register(self.close)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        shutil.rmtree(Path(self.path).parent, ignore_errors=True)

    def exchange(self, data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.path)
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before reading everything: fine
            chunks = []
            with contextlib.suppress(ConnectionResetError):
                # The server closed with bytes of ours unread (a request over MAX_REQUEST):
                # the kernel resets the connection once its answer has been read.
                while chunk := sock.recv(1 << 16):
                    chunks.append(chunk)
        return b"".join(chunks)


@functools.cache
def live_server() -> LiveServer:
    return LiveServer()


def check(data: bytes) -> None:
    reply = live_server().exchange(data)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, f"reply {reply[:80]!r}"
    target_control.check_answer(json.loads(reply))


def seeds() -> list[bytes]:
    return [*target_control.seeds(), b'{"command": "status"}', b"x" * (MAX_REQUEST + 10),
            target_control.request("echo", ["a"]) + b"trailing junk\n"]


def inputs() -> st.SearchStrategy[bytes]:
    long_line = st.integers(MAX_REQUEST - 2, MAX_REQUEST + 2).map(lambda n: b"x" * n)
    return target_control.inputs() | long_line


TARGET = Target("control_server", check, seeds, inputs, max_len=MAX_REQUEST + 1024)
