"""Cost of the table snapshot on disk, in-process (no namespaces): a node's tables filled with
``count`` established sessions (ten per client, each client with its persistence binding),
written by :class:`lb.snapshot_store.SnapshotStore` on a running event loop while a 1 ms
ticker measures how late the loop runs it (the worst stall a VRRP advert would see), then
loaded by a fresh node (read, decode, install), as at a start.

    python -m bench.snapshot [COUNT]      → one JSON line
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from lb.config import parse_config
from lb.node import Node
from lb.sessions import IPPROTO_TCP, TCP_ACK

CONFIG = """
[node]
name = "bench"
state_dir = "@STATE@"
[dataplane]
client_interface = "lo"
server_interface = "lo"
[sessions]
max_sessions = 2000000
[virtual_servers.web]
address = "198.51.100.10"
port = 80
pool = "web"
scheduler = "rr"
persistence = "client-ip"
[pools.web]
servers = [{ address = "198.18.0.11", port = 8080 }, { address = "198.18.0.12", port = 8080 },
           { address = "198.18.0.13", port = 8080 }]
"""


def node(state: Path) -> Node:
    text = CONFIG.replace("@STATE@", str(state))
    return Node(parse_config(tomllib.loads(text), str(state / "lbd.toml")))


def fill(n: Node, count: int) -> None:
    (svc,) = n.services.services
    now = time.monotonic()
    base = (10 << 24)
    for i in range(count):
        caddr, cport = base + i // 10, 10000 + i % 10
        server = svc.pool.servers[(i // 10) % 3]
        b = n.persistence.bind(svc, caddr, server, svc.persistence_timeout, now)
        n.sessions.create(IPPROTO_TCP, caddr, cport, svc.vaddr, svc.vport, server, svc,
                          TCP_ACK, now, b)


async def with_ticker(work: Awaitable[Any]) -> tuple[Any, float]:
    """Await ``work``; its result and the worst lateness of a 1 ms ticker meanwhile."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    done = False

    def tick(due: float) -> None:
        nonlocal worst
        worst = max(worst, loop.time() - due)
        if not done:
            loop.call_at(loop.time() + 0.001, tick, loop.time() + 0.001)

    loop.call_at(loop.time() + 0.001, tick, loop.time() + 0.001)
    result = await work
    done = True
    return result, worst


async def write_with_ticker(n: Node) -> float:
    """Write once; the worst lateness of a 1 ms ticker meanwhile, in seconds."""
    ok, worst = await with_ticker(n.snapshots.write())
    assert ok
    return float(worst)


async def load_with_ticker(n: Node) -> float:
    """Load as lbd's start does (in a thread); the worst lateness of the ticker meanwhile."""
    work = asyncio.to_thread(n.snapshots.load, n.services, time.monotonic(), time.time())
    _, worst = await with_ticker(work)
    return float(worst)


def measure(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        n = node(state)
        t0 = time.perf_counter()
        fill(n, count)
        filled = time.perf_counter() - t0
        stall = asyncio.run(write_with_ticker(n))
        s = n.snapshots
        fresh = node(state)
        t0 = time.perf_counter()
        load_stall = asyncio.run(load_with_ticker(fresh))
        load = time.perf_counter() - t0
        assert len(fresh.sessions) == count, len(fresh.sessions)
        return {"sessions": count, "bindings": len(n.persistence), "fill_seconds": round(filled, 2),
                "write_seconds": round(s.last_write_duration, 3),
                "write_longest_step_ms": round(s.last_write_longest_step * 1e3, 2),
                "loop_worst_stall_ms": round(stall * 1e3, 2),
                "file_bytes": s.last_write_bytes,
                "load_seconds": round(load, 2),
                "load_loop_worst_stall_ms": round(load_stall * 1e3, 2)}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)))
