"""The VRRP thread's seam: calls run on the thread's own loop and come back to the caller's
loop with their result or exception; posts run in order; stop ends the thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ha.vrrp_thread import VrrpThread


def test_calls_run_on_the_vrrp_thread_and_return_their_result() -> None:
    vt = VrrpThread()
    vt.start()
    try:
        async def main() -> None:
            caller = threading.get_ident()
            ran_on = await vt.call(threading.get_ident)
            assert ran_on != caller
            assert await vt.call(vt.loop.is_running) is True
            with pytest.raises(ZeroDivisionError):
                await vt.call(lambda: 1 // 0)
            seen: list[int] = []
            for i in range(5):
                vt.post(lambda i=i: seen.append(i))  # type: ignore[misc]
            vt.post(lambda: 1 // 0)  # logged on the thread, does not stop it
            assert await vt.call(lambda: list(seen)) == [0, 1, 2, 3, 4]
        asyncio.run(main())
    finally:
        vt.stop()
    assert not vt._thread.is_alive()
    assert vt.scheduling in ("normal", "fifo:1")
