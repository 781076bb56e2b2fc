"""The VRRP machines' own thread and event loop, so that adverts leave on time whatever the
data plane does.

One Python process runs the data plane, health checks, sync, the control socket and
metrics on its main event loop. Under a saturating load that loop is busy for tens of
milliseconds between two looks at its timers (issue 10 measured advert gaps of 48-160 ms
at a 30 ms interval, and false failovers). Here the VRRP runners (``ha.vrrp_io``: the
sockets, the timers, the pure machines) live on a second asyncio loop in a thread of their
own. That thread sleeps in the kernel (``epoll_wait``, the GIL released) until an advert is
due or arrives, and then needs the GIL for a few tens of microseconds: the interpreter hands
it over within its switch interval (``sys.getswitchinterval()``, 5 ms by default) however
busy the main thread is, and the kernel's scheduler favours a thread that slept.

The seam is narrow and one-way per direction:

- main loop -> VRRP thread: :meth:`VrrpThread.call` (await a function's result) and
  :meth:`VrrpThread.post` (fire and forget) — priorities, faults, reconfiguration, demotion,
  start and stop. Nothing else touches a runner or a machine from the main thread except
  reads of plain attributes for status and metrics.
- VRRP thread -> main loop: the controller posts each state change with
  ``call_soon_threadsafe`` (in order), where ownership, roles and notify scripts follow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["RT_PRIORITY", "SWITCH_INTERVAL", "VrrpThread"]

RT_PRIORITY = 1
"""SCHED_FIFO priority of the VRRP thread (keepalived's ``vrrp_rt_priority``): the lowest
real-time one, above every normal task, so a busy box (iperf3, the servers, the data plane
itself) cannot keep an advert waiting for a CPU. The thread runs for microseconds per advert.
Without CAP_SYS_NICE it keeps normal scheduling (logged once)."""

SWITCH_INTERVAL = 0.002
"""The interpreter's GIL switch interval (default 5 ms): how long the VRRP thread may wait for
the data plane's thread to hand the GIL over. Only a thread that asks for the GIL causes a
switch, so a shorter interval costs the data plane nothing while the others sleep."""

T = TypeVar("T")
log = logging.getLogger("lbd.vrrp")


class VrrpThread:
    """A daemon thread running an asyncio loop for the VRRP runners."""

    def __init__(self, name: str = "lbd-vrrp") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self.scheduling = "normal"  # or "fifo:N" once the thread runs real-time

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.scheduling = _realtime()
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def start(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread.start()
        self._started.wait()

    def post(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the VRRP thread soon; its errors are logged there."""
        self.loop.call_soon_threadsafe(self._guarded, fn)

    @staticmethod
    def _guarded(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("VRRP thread: %r failed", fn)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the VRRP thread and wait (without blocking the caller's loop) for its
        result or its exception."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller, who re-raises it
                done.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        return await asyncio.wrap_future(done)

    def stop(self) -> None:
        """Stop the loop and wait for the thread (after the runners were stopped)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


def _realtime() -> str:
    """Make the calling thread SCHED_FIFO at :data:`RT_PRIORITY` (pid 0: this thread)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except (OSError, AttributeError) as exc:
        log.info("VRRP thread: normal scheduling (real-time priority refused: %s)", exc)
        return "normal"
    return f"fifo:{RT_PRIORITY}"
