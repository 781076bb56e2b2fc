"""The sync transport wired to itself on 127.0.0.1: two :class:`SyncService` on loopback
ports, real handshakes, real frames. What the namespace tests cover end to end (tables, VRRP)
is left to them; here: the handshake is on every connection, acknowledgements reach the
sender, either side asks for a snapshot without a reconnect, the config digest is compared,
and bad peers are refused by reason."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from ha.replication import Replicator
from ha.sync import SyncService
from ha.sync_codec import Encoder, Hello, SnapshotBegin, SnapshotEnd
from ha.sync_handshake import NONCE_SIZE, Handshake, Keys
from lb.config import Endpoint, SyncConfig, parse_config
from lb.persistence import PersistenceTable
from lb.services import Service, ServiceSet, build_services
from lb.sessions import SessionTable, SessionTimeouts

T = TypeVar("T")
LOCAL = "127.0.0.1"
KEY = b"a shared secret for the unit pair"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port: int = s.getsockname()[1]
        return port


def _services() -> ServiceSet:
    cfg = parse_config({
        "node": {"name": "t"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": {"web": {"address": "198.51.100.10", "port": 80, "pool": "web"}},
        "pools": {"web": {"servers": [{"address": "198.18.0.11", "port": 8080}]}},
    }, "t.toml")
    return build_services(cfg)


def service(name: str, listen: int, peer: int, key: bytes = KEY,
            digest: bytes = bytes(16), peer_timeout: float = 5.0) -> SyncService:
    services = _services()
    sessions: SessionTable[Service] = SessionTable(SessionTimeouts(), 100)
    persistence: PersistenceTable[Service] = PersistenceTable()
    rep = Replicator(sessions, persistence, lambda: services, time.monotonic)
    cfg = SyncConfig(listen=Endpoint(LOCAL, listen), peer=Endpoint(LOCAL, peer),
                     key_file="/nonexistent", peer_timeout=peer_timeout)
    svc = SyncService(cfg, key, name, rep, config_digest=digest)
    rep.wake = svc.kick
    return svc


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 20))


async def pair(**b_kwargs: Any) -> tuple[SyncService, SyncService]:
    pa, pb = free_port(), free_port()
    a, b = service("a", pa, pb), service("b", pb, pa, **b_kwargs)
    await a.start()
    await b.start()
    return a, b


async def stop(*services: SyncService) -> None:
    for s in services:
        await s.stop()


def test_a_pair_connects_through_the_handshake_and_the_peer_acknowledges() -> None:
    async def main() -> None:
        a, b = await pair()
        try:
            await until(lambda: a.status()["connected"] and b.status()["connected"],
                        "both directions")
            await until(lambda: a.rep.snapshot_done and b.rep.snapshot_done, "snapshots")
            # Hello and the (empty) snapshot were applied and acknowledged by each side.
            await until(lambda: a.unacked == 0 and b.unacked == 0, "acknowledgements")
            st = a.status()
            assert st["peer_node"] == "b" and st["peer_config_match"] is True
            assert st["oldest_unacked_seconds"] == 0 and not st["errors"]
        finally:
            await stop(a, b)
    run(main)


def test_a_snapshot_request_gets_a_snapshot_on_the_same_connection() -> None:
    async def main() -> None:
        a, b = await pair()
        try:
            await until(lambda: a.rep.snapshot_done and b.rep.snapshot_done, "snapshots")
            connects, received = b.connects, a.rep.snapshots_received
            a.resync()  # a asks b
            await until(lambda: a.rep.snapshots_received > received, "b's new snapshot")
            assert b.snapshot_requests_received == 1 and a.snapshot_requests_sent == 1
            assert b.connects == connects and b.outbound_connected  # no reconnect
        finally:
            await stop(a, b)
    run(main)


def test_another_config_digest_is_shown_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        a, b = await pair(digest=b"\x01" * 16)
        try:
            await until(lambda: a.peer_config_match is False
                        and b.peer_config_match is False, "each to see the other's digest")
            samples = {m.name: m.samples for m in a.metrics()}
            assert samples["lbd_sync_peer_config_match"][0].value == 0
            b.set_config_digest(bytes(16))  # b reloads into a's services: a hears it
            await until(lambda: a.peer_config_match is True, "a to see b's new digest")
            assert b.peer_config_match is True  # b compares a's last digest to its new one
        finally:
            await stop(a, b)
    with caplog.at_level(logging.WARNING, "lbd.sync"):
        run(main)
    mismatches = [r for r in caplog.records if "other virtual servers" in r.getMessage()]
    assert len(mismatches) == 2  # once on each node, not per connection


def test_the_config_match_gauge_is_absent_before_any_hello() -> None:
    svc = service("a", free_port(), free_port())
    samples = {m.name: m.samples for m in svc.metrics()}
    assert samples["lbd_sync_peer_config_match"] == []
    assert svc.status()["peer_config_match"] is None


def test_a_peer_with_another_key_is_refused_by_proof() -> None:
    async def main() -> None:
        a, b = await pair(key=b"not the shared secret, another one")
        try:
            await until(lambda: a.errors.get("handshake_proof", 0) >= 1
                        and b.errors.get("handshake_proof", 0) >= 1, "both to refuse")
            assert not a.inbound_connected and not a.outbound_connected
            assert a.rep.records_received == 0 and b.rep.records_received == 0
        finally:
            await stop(a, b)
    run(main)


def test_a_wrong_key_is_logged_once_per_reason_and_retried_ever_more_slowly(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        a, b = await pair(key=b"not the shared secret, another one")
        try:
            # a's outbound attempts: 0.5 s, then 1 s, then 2 s apart; b refuses each of them
            await until(lambda: b.errors.get("handshake_proof", 0) >= 4, "four refusals",
                        timeout=15)
            assert a.retry_delay > 1.0 and b.retry_delay > 1.0
        finally:
            await stop(a, b)
    with caplog.at_level(logging.DEBUG, "lbd.sync"):
        run(main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    debug = [r for r in caplog.records
             if r.levelno == logging.DEBUG and "proof" in r.getMessage()]
    # one line per node and direction (outbound to, inbound from), the rest at debug level
    assert len(errors) <= 4 and debug, [r.getMessage() for r in errors]


async def _talk(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET / HTTP/1.0\r\n\r\n", "handshake_magic"),
    (b"\x00" + random.Random(1).randbytes(64), "handshake_magic"),
    # a protocol-1 peer starts with a frame, "LBDS" | version 1, and no handshake
    (b"LBDS\x01\x10\x00\x00" + bytes(40), "handshake_version"),
    (b"LBDH\x07" + bytes(NONCE_SIZE), "handshake_version"),
], ids=["http", "random", "protocol-1-frame", "protocol-7-challenge"])
def test_strangers_are_refused_by_reason(data: bytes, reason: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        port = free_port()
        a = service("a", port, free_port())
        await a.start()
        try:
            assert await _talk(port, data) == b""  # closed, nothing sent back
            assert a.errors == {reason: 1}
            assert not a.inbound_connected and a.rep.records_received == 0
        finally:
            await a.stop()
    with caplog.at_level(logging.ERROR, "lbd.sync"):
        run(main)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    if reason == "handshake_version":
        assert "peer speaks sync protocol" in lines[0] and ", this node 2: refused" in lines[0]


def test_a_replayed_connection_is_refused_and_installs_nothing() -> None:
    """Record everything a real initiator sent on one connection, replay it on a new one."""
    async def main() -> None:
        port = free_port()
        a = service("a", port, free_port())
        await a.start()
        try:
            reader, writer = await asyncio.open_connection(LOCAL, port)
            hs = Handshake(KEY, os.urandom(NONCE_SIZE), initiator=True)
            sent = hs.data_to_send()
            writer.write(sent)
            while hs.result is None:
                hs.feed(await reader.read(4096))
            assert isinstance(hs.result, Keys)
            confirm = hs.data_to_send()
            frames = Encoder(hs.result.send).frame([Hello("x", 1)])
            writer.write(confirm + frames)
            recorded = sent + confirm + frames
            await until(lambda: a.peer_node == "x", "the genuine Hello")
            writer.close()
            received = a.rep.records_received
            assert await _talk(port, recorded) == b""  # replayed whole: same CHALLENGE
            assert a.errors.get("handshake_nonce_reused") == 1
            assert a.rep.records_received == received
        finally:
            await a.stop()
    run(main)


def test_operator_state_goes_to_the_peer_on_connect_and_on_every_change() -> None:
    async def main() -> None:
        a, b = await pair()
        got: list[bytes] = []
        state = [b"first"]
        a.operator_state = lambda: state[0]
        b.on_operator_state = got.append
        try:
            await until(lambda: a.status()["connected"] and b.status()["connected"], "connected")
            await until(lambda: got == [b"first"], "the state sent after the snapshot")
            state[0] = b"second"
            a.send_operator_state()
            await until(lambda: got == [b"first", b"second"], "the changed state")
            a.operator_state = lambda: b""  # nothing to say: nothing sent
            a.send_operator_state()
            await until(lambda: a.unacked == 0, "acknowledgements")
            assert got == [b"first", b"second"]
        finally:
            await stop(a, b)
    run(main)


async def _genuine(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Keys]:
    """A connection that passes the handshake (the peer's next connection)."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    hs = Handshake(KEY, os.urandom(NONCE_SIZE), initiator=True)
    writer.write(hs.data_to_send())
    while hs.result is None:
        hs.feed(await reader.read(4096))
    assert isinstance(hs.result, Keys)
    writer.write(hs.data_to_send())
    return reader, writer, hs.result


def test_a_new_connection_from_the_peer_replaces_the_older_one() -> None:
    """The peer sends on one connection at a time: once a new one passes its handshake, the
    old one (dead on the peer's side after a partition or a backlog cut) is aborted and
    nothing more of it is applied."""
    async def main() -> None:
        port = free_port()
        a = service("a", port, free_port())
        await a.start()
        try:
            _, old, old_keys = await _genuine(port)
            old_enc = Encoder(old_keys.send)
            old.write(old_enc.frame([Hello("x", 1)]))
            await until(lambda: a.peer_node == "x", "the first connection's Hello")
            _, new, new_keys = await _genuine(port)
            new.write(Encoder(new_keys.send).frame([Hello("y", 2)]))
            await until(lambda: a.peer_node == "y", "the second connection's Hello")
            received = a.rep.records_received
            old.write(old_enc.frame([SnapshotBegin(), SnapshotEnd(0, 0)]))  # stale
            await asyncio.sleep(0.2)  # give a wrong implementation the time to apply it
            assert a.rep.records_received == received and a.inbound_connected
            assert not a.errors
            new.close()
            old.close()
        finally:
            await a.stop()
    run(main)


def test_a_silent_peer_is_dropped_on_both_connections_after_peer_timeout() -> None:
    """A peer that passed its handshakes and then says nothing (power lost, link cut, TCP not
    given up yet): both of a's connections to it end after ``peer_timeout``, and the copies
    it kept alive are no longer held."""
    async def main() -> None:
        a_port, fake_port = free_port(), free_port()
        silent: list[asyncio.StreamWriter] = []

        async def answer_then_hush(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
            hs = Handshake(KEY, os.urandom(NONCE_SIZE), initiator=False)
            while hs.result is None:
                if out := hs.data_to_send():
                    writer.write(out)
                hs.feed(await reader.read(4096))
            writer.write(hs.data_to_send())
            silent.append(writer)  # and never another byte
        fake = await asyncio.start_server(answer_then_hush, LOCAL, fake_port)
        a = service("a", a_port, fake_port, peer_timeout=1.0)
        await a.start()
        try:
            _, inbound, keys = await _genuine(a_port)
            inbound.write(Encoder(keys.send).frame([Hello("x", 1)]))
            await until(lambda: a.outbound_connected and a.inbound_connected and a.rep.holding,
                        "both connections up")
            await until(lambda: a.errors.get("peer_silent", 0) >= 2, "both to time out")
            assert not a.inbound_connected and not a.rep.holding
            inbound.close()
        finally:
            await a.stop()
            fake.close()
            for w in silent:
                w.close()
    run(main)


def test_a_snapshot_lets_the_loop_run_between_its_chunks(monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """drain() does not yield while the transport is not paused: the sender yields itself,
    or a 10⁶-session snapshot holds the loop (and VRRP's adverts) for seconds."""
    monkeypatch.setattr("ha.replication.SNAPSHOT_CHUNK", 10)

    async def main() -> None:
        a, b = await pair()
        (svc,) = a.rep.services().services
        server = svc.pool.servers[0]
        for port in range(1024, 1124):
            a.rep.sessions.install(6, 0xC6336464, port, svc.vaddr, svc.vport, server, svc,
                                   2, time.monotonic(), time.monotonic())
        turns = 0
        stop_ticking = False

        async def tick() -> None:
            nonlocal turns
            while not stop_ticking:
                turns += 1
                await asyncio.sleep(0)

        seen: list[int] = []
        send = a._send

        def watched(records: list[Any], **kwargs: Any) -> None:
            if kwargs.get("snapshot"):
                seen.append(turns)
            send(records, **kwargs)

        monkeypatch.setattr(a, "_send", watched)
        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            await until(lambda: b.rep.snapshot_done and len(b.rep.sessions) == 100,
                        "b to apply a's snapshot")
            assert len(seen) == 11  # 100 sessions + begin + end, 10 records a chunk
            assert all(y > x for x, y in itertools.pairwise(seen)), seen
        finally:
            stop_ticking = True
            await ticker
            await stop(a, b)
    run(main)


def test_changes_count_their_delay_and_both_ends_count_the_same_bytes() -> None:
    async def main() -> None:
        a, b = await pair()
        try:
            await until(lambda: a.rep.snapshot_done and b.rep.snapshot_done, "snapshots")
            (svc,) = a.rep.services().services
            now = time.monotonic()
            a.rep.sessions.observer = a.rep
            a.rep.sessions.install(6, 0xC6336464, 40000, svc.vaddr, svc.vport,
                                   svc.pool.servers[0], svc, 2, now, now)
            await until(lambda: len(b.rep.sessions) == 1 and a.unacked == 0, "the change")
            delay = a.status()["ack_delay"]
            assert delay["records"] == 1 and 0 <= delay["p99"] < 5.0
            assert b.status()["last_snapshot"]["sessions"] == 0
            await until(lambda: a.bytes_sent == b.bytes_received > 0, "the bytes to agree")
        finally:
            await stop(a, b)
    run(main)


def test_a_node_stops_after_its_peer_stopped_first() -> None:
    """The peer's stop closes the connections; this node's stop then cancels a read that has
    just completed. The cancellation must not be lost (Python 3.11's wait_for swallowed it and
    the connect loop went on for ever, so a graceful stop hung)."""
    async def main() -> None:
        a, b = await pair()
        await until(lambda: a.outbound_connected and b.outbound_connected
                    and a.inbound_connected and b.inbound_connected, "both connections up")
        await a.stop()
        stopping = asyncio.ensure_future(b.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)  # a hang detector, no figure
        assert stopping in done, "b's stop hangs: its connect loop lost the cancellation"
    run(main)
