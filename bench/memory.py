"""Memory per session: fill a :class:`lb.sessions.SessionTable` in-process and let tracemalloc
count what it allocated.

What is counted: everything allocated while the sessions are created, that is still alive
afterwards — the Session objects, their int keys and float timestamps (boxed in pure Python
only), both index dicts, the half-open index and the timing-wheel lists. Sessions are TCP
flows from distinct client addresses and ports to one VIP, spread over three real servers and
over the expiry wheel as a steady stream of new connections would be (one second of creation
time per 10,000 sessions).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from dataclasses import dataclass

from lb.servers import RealServer
from lb.sessions import IPPROTO_TCP, TCP_SYN, SessionTable, SessionTimeouts

VIP_INT = (198 << 24) | (51 << 16) | (100 << 8) | 10
CLIENT_BASE = (198 << 24) | (51 << 16) | (100 << 8)


@dataclass(frozen=True, slots=True)
class MemoryResult:
    sessions: int
    bytes_total: int
    bytes_per_session: float
    seconds: float


def measure(count: int = 1_000_000) -> MemoryResult:
    """Create ``count`` sessions and return what they cost."""
    servers = [RealServer("web", (198 << 24) | (18 << 16) | (11 + i), 8080, 1, index=i)
               for i in range(3)]
    service = object()
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    before = tracemalloc.get_traced_memory()[0]
    # Every session is a SYN here, so all are half-open: none evicted, the index counted.
    table: SessionTable[object] = SessionTable(SessionTimeouts(), max_sessions=count + 1,
                                               max_half_open=count + 1)
    create = table.create
    for i in range(count):
        caddr = CLIENT_BASE + 100 + i // 60000  # 17 clients for a million sessions
        cport = 1024 + i % 60000
        s = create(IPPROTO_TCP, caddr, cport, VIP_INT, 80,
                   servers[i % 3], service, TCP_SYN, i * 1e-4)
        if s is None:
            raise RuntimeError(f"session {i} refused (conflict_drops={table.conflict_drops})")
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    seconds = time.perf_counter() - started
    tracemalloc.stop()
    if len(table) != count:
        raise RuntimeError(f"table holds {len(table)} sessions, expected {count}")
    total = after - before
    return MemoryResult(count, total, total / count, seconds)
