"""Tests of lb.listing and of streamed control answers: large views are built in chunks,
and the event loop runs between them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lb.addr import ip_to_int
from lb.config import parse_config
from lb.control import ControlServer, Stream
from lb.forwarder import ServiceCounts
from lb.listing import Filter, chunks, render_session, session_filter
from lb.packet import PROTO_TCP
from lb.services import Service, build_services
from lb.sessions import SessionTable, SessionTimeouts

VIP = "198.51.100.10"


def table(n: int) -> tuple[SessionTable[Service], Service]:
    ss = build_services(parse_config({
        "node": {"name": "t"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": {"web": {"address": VIP, "port": 80, "pool": "web"}},
        "pools": {"web": {"servers": [{"address": "198.18.0.11", "port": 8080},
                                      {"address": "198.18.0.12", "port": 8080}]}},
    }, "test_listing"))
    (web,) = ss.services
    t: SessionTable[Service] = SessionTable(SessionTimeouts(), n + 10, observer=ServiceCounts(),
                                            max_half_open=n)  # SYNs only: none evicted
    servers = ss.pools["web"].servers
    base = ip_to_int("198.51.100.100")
    for i in range(n):
        s = t.create(PROTO_TCP, base + i // 1000, 1024 + i % 1000, web.vaddr, 80,
                     servers[i % 2], web, 0x02, 100.0)
        assert s is not None
    return t, web


def test_a_large_listing_is_built_in_chunks_with_the_loop_running_between() -> None:
    t, _ = table(5000)
    keep = session_filter(Filter())
    ticks: list[int] = []
    sizes: list[int] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(len(sizes))  # how many chunks were out when the loop ran us
            await asyncio.sleep(0)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0)
        async for chunk in chunks(t, keep, lambda s: render_session(s, t.deadline(s), 100.0),
                                  emit=400):
            sizes.append(len(chunk))
        stop.set()
        await task

    asyncio.run(main())
    assert sum(sizes) == 5000 and max(sizes) == 400 and len(sizes) == 13
    # the ticker ran after every chunk: no two chunks were built in one go
    assert set(range(1, 13)) <= set(ticks)


def test_a_filter_that_matches_little_still_yields_every_scan_chunk() -> None:
    t, _ = table(5000)
    keep = session_filter(Filter(client=ip_to_int("198.51.100.104")))
    sizes: list[int] = []

    async def main() -> None:
        async for chunk in chunks(t, keep, lambda s: {"c": s.cport}, emit=500, scan=1000):
            sizes.append(len(chunk))

    asyncio.run(main())
    # a chunk (empty or not) at least every 1000 entries looked at, or every 500 shown
    assert sizes == [0, 0, 0, 0, 500, 500]


def test_filters_limit_and_sessions_removed_meanwhile() -> None:
    t, _ = table(3000)
    server = ("198.18.0.12", 8080)
    keep = session_filter(Filter(virtual="web", server=(ip_to_int(server[0]), server[1])))

    async def main() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        gen = chunks(t, keep, lambda s: render_session(s, t.deadline(s), 130.0), emit=100)
        first = await gen.__anext__()
        out += first
        # the table changes between chunks: removed sessions are skipped, nothing breaks
        for s in list(t)[1000:]:
            t.remove(s, "reset", 131.0)
        async for chunk in gen:
            out += chunk
        return out

    rows = asyncio.run(main())
    assert len(rows) == 500  # half of the first 1000 go to .12
    assert {r["server"] for r in rows} == {"198.18.0.12:8080"}
    assert rows[0]["expires_in"] == 30.0  # SYN timeout 60 s, seen at 100, now 130
    assert rows[0]["virtual_server"] == "web" and rows[0]["state"] == "SYN_RECV"

    async def limited() -> list[Any]:
        return await Stream(chunks(t, session_filter(Filter()), lambda s: {}, 7)).collect()

    assert len(asyncio.run(limited())) == 7


@pytest.mark.parametrize("opts", [{"server": "x"}, {"client": "300.1.1.1"},
                                  {"state": "NOPE"}])
def test_bad_filters(opts: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Filter.parse(opts)


def test_a_streamed_answer_is_one_json_document(tmp_path: Any) -> None:
    async def gen() -> Any:
        for i in range(3):
            yield [{"i": i * 2}, {"i": i * 2 + 1}]
        yield []

    async def main() -> bytes:
        path = str(tmp_path / "c.sock")
        server = ControlServer(path, {"big": lambda args: Stream(gen())})
        await server.start()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"command": "big"}\n')
        data = await reader.read()
        writer.close()
        await server.stop()
        return data

    answer = json.loads(asyncio.run(main()))
    assert answer == {"ok": True, "result": [{"i": i} for i in range(6)]}
