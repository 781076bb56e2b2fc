"""The TUN I/O shell: drain a batch of packets per wake-up, hand each to the forwarder, write
back what it says. No protocol logic lives here.

Reads go into one reusable buffer (``FileIO.readinto``, no allocation), a batch of up to
``batch`` packets per readiness callback (one packet per callback halves throughput), and the
batch is bounded so that VRRP adverts and health checks on the same loop leave on time.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable

from lb.forwarder import FORWARD, SEND, Forwarder
from lb.packet import VNET_HDR_LEN

MAX_PACKET = VNET_HDR_LEN + 65535


class DataPlane:
    def __init__(self, fd: int, forwarder: Forwarder, *, batch: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fd = fd
        self.forwarder = forwarder
        self.batch = batch
        self.clock = clock
        self._file = io.FileIO(fd, "r+", closefd=False)
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)
        self._out_view = memoryview(forwarder.out)
        self._loop: asyncio.AbstractEventLoop | None = None
        # counters
        self.wakeups = 0
        self.rx_packets = 0
        self.tx_errors = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.fd, self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    def _on_readable(self) -> None:
        self.wakeups += 1
        now = self.clock()
        readinto = self._file.readinto
        handle = self.forwarder.handle
        fwd = self.forwarder
        buf, view, fd, write = self._buf, self._view, self.fd, os.write
        n_read = 0
        for _ in range(self.batch):
            try:
                n = readinto(buf)
            except OSError:
                break
            if not n:
                break
            n_read += 1
            try:
                verdict = handle(buf, n, now)
                if verdict == FORWARD:
                    write(fd, view[:n])
                elif verdict == SEND:
                    write(fd, self._out_view[: fwd.out_len])
            except OSError:
                self.tx_errors += 1
            except Exception:
                # One bad packet must never stop the loop: count it and go on.
                fwd.errors += 1
        self.rx_packets += n_read

    def write_ready(self) -> int:
        """Write the packets the forwarder made ready outside a read (replies that were held
        for the peer's session record). Returns how many."""
        ready = self.forwarder.ready
        if not ready:
            return 0
        self.forwarder.ready = []
        for pkt in ready:
            try:
                os.write(self.fd, pkt)
            except OSError:
                self.tx_errors += 1
        return len(ready)
