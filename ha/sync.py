"""State sync transport: the TCP connections that carry :mod:`ha.replication`'s records.

Two TCP connections per pair, one per direction: each node connects from its sync address to
the peer's ``[sync] listen`` and *sends* on that connection; what it *receives* arrives on the
connection the peer opened. Every frame is authenticated with the shared key
(:mod:`ha.sync_codec`); a frame that fails any check ends that connection.

Both nodes send at once (active-active): each streams the sessions and bindings of the VRRP
instances it masters and installs the peer's copies of the others. What is sent and what is
installed is decided by the pure :class:`~ha.replication.Replicator`; this module only moves
its records: on connecting it sends a snapshot of the owned tables, then what the replicator
queues, flushed once per loop iteration; what arrives is fed to it in order.

Gated takeover: a node that starts while a peer is reachable holds its VRRP priority down
until the peer's snapshot has arrived (:attr:`SyncService.gate_open`), so a restarted node
preempts only once it knows every session of the instances it is about to take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ha.replication import Replicator
from ha.sync_codec import (
    DecodeError,
    Decoder,
    Encoder,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Record,
    SnapshotEnd,
)
from lb.config import SyncConfig

log = logging.getLogger("lbd.sync")

RECONNECT = 0.5  # seconds between connection attempts
HEARTBEAT = 0.5  # seconds between heartbeats on a connection we send on
GATE_TIMEOUT = 5.0  # seconds a starting node waits for the peer's snapshot at most
MAX_BACKLOG = 8 << 20  # bytes buffered towards a slow peer before we drop and resnapshot


class SyncService:
    """The transport around a :class:`Replicator`: outbound stream, inbound stream, gate."""

    def __init__(self, cfg: SyncConfig, key: bytes, node: str, replicator: Replicator, *,
                 masters_any: Callable[[], bool] = lambda: False,
                 on_snapshot: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.key = key
        self.node = node
        self.rep = replicator
        self.masters_any = masters_any
        self.on_snapshot = on_snapshot  # a complete snapshot from the peer was applied
        self.clock = clock
        self.boot_id = int(time.time() * 1000) & 0xFFFFFFFF
        self._writer: asyncio.StreamWriter | None = None
        self._encoder: Encoder | None = None
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._inbound: set[asyncio.StreamWriter] = set()
        self._started = clock()  # the gate's timeout runs from here
        self.peer_node = ""
        # counters and gauges
        self.records_sent = 0
        self.snapshots_sent = 0
        self.errors: dict[str, int] = {}
        self.connects = 0
        self.lag = 0.0
        self.last_received = 0.0

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve_inbound, self.cfg.listen.host,
                                                  self.cfg.listen.port)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._connect_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop_outbound("stopping")
        for w in list(self._inbound):
            w.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # ---- status -----------------------------------------------------------------------------
    @property
    def outbound_connected(self) -> bool:
        return self._writer is not None

    @property
    def inbound_connected(self) -> bool:
        return bool(self._inbound)

    @property
    def gate_open(self) -> bool:
        """May this node's VRRP instances use their configured priority (preempt)?"""
        return (self.rep.snapshot_done or self.masters_any()
                or self.clock() - self._started >= GATE_TIMEOUT)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.outbound_connected and self.inbound_connected,
            "outbound": self.outbound_connected, "inbound": self.inbound_connected,
            "peer": str(self.cfg.peer), "peer_node": self.peer_node,
            "lag_seconds": round(self.lag, 6),
            "records_sent": self.records_sent, "snapshots_sent": self.snapshots_sent,
            "errors": dict(self.errors), **self.rep.status(),
        }

    # ---- outbound ---------------------------------------------------------------------------
    def kick(self) -> None:
        """The replicator queued records: flush them once this loop iteration is done."""
        if not self._flush_scheduled and self.rep.pending:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        records = self.rep.take()
        if records:
            self._send(records)

    def _send(self, records: list[Record]) -> None:
        writer, encoder = self._writer, self._encoder
        if writer is None or encoder is None:
            return
        writer.write(encoder.frame(records))
        self.records_sent += len(records)
        transport = writer.transport
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            self._count(self.errors, "backlog")
            self._drop_outbound("peer too slow: backlog over limit")

    def send_snapshot(self) -> None:
        """Send the owned tables in full (on connect)."""
        if self._writer is None:
            return
        self._flush()
        end: Record | None = None
        for chunk in self.rep.snapshot():
            self._send(chunk)
            end = chunk[-1]
        self.snapshots_sent += 1
        if isinstance(end, SnapshotEnd):
            log.info("sync: sent a snapshot of %d sessions and %d bindings", end.sessions,
                     end.bindings)

    def resync(self) -> None:
        """This node lost an instance (preempted, or a healed split brain): its copy may
        differ from the new owner's table. Closing the connection the peer sends on makes it
        reconnect and send a fresh snapshot, which replaces our copies."""
        for w in list(self._inbound):
            w.close()

    async def _connect_loop(self) -> None:
        peer = self.cfg.peer
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    peer.host, peer.port, local_addr=(self.cfg.listen.host, 0)), 2)
            except (OSError, TimeoutError):
                await asyncio.sleep(RECONNECT)
                continue
            self._writer, self._encoder = writer, Encoder(self.key)
            self.rep.connected = True
            self.connects += 1
            log.warning("sync: connected to %s", peer)
            self._send([Hello(self.node, self.boot_id)])
            self.send_snapshot()
            try:
                await self._outbound_session(reader)
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                self._count(self.errors, "connection")
                log.warning("sync: connection to %s lost: %s", peer, exc)
            self._drop_outbound("closed")
            await asyncio.sleep(RECONNECT)

    async def _outbound_session(self, reader: asyncio.StreamReader) -> None:
        """Heartbeats out; their acks come back on the same connection (lag = round trip,
        which includes whatever records were queued before the heartbeat)."""
        decoder = Decoder(self.key)
        hb = asyncio.get_running_loop().create_task(self._heartbeats())
        try:
            while self._writer is not None:
                data = await reader.read(1 << 16)
                if not data:
                    return
                decoder.feed(data)
                while (ev := decoder.next_event()) is not None:
                    if isinstance(ev, DecodeError):
                        self._count(self.errors, ev.reason.value)
                        log.error("sync: refused a frame from %s: %s", self.cfg.peer,
                                  ev.reason.value)
                        return
                    if isinstance(ev, HeartbeatAck):
                        self.lag = max(0.0, self.clock() - ev.sent_at_ms / 1000)
        finally:
            hb.cancel()

    async def _heartbeats(self) -> None:
        while self._writer is not None:
            self._flush()
            self._send([Heartbeat(int(self.clock() * 1000))])
            await asyncio.sleep(HEARTBEAT)

    def _drop_outbound(self, why: str) -> None:
        self.rep.connected = False
        if self._writer is not None:
            self._writer.close()
            self._writer = self._encoder = None
            self.rep.pending.clear()
            log.info("sync: outbound connection closed (%s)", why)

    # ---- inbound ----------------------------------------------------------------------------
    async def _serve_inbound(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        decoder, acks = Decoder(self.key), Encoder(self.key)
        self._inbound.add(writer)
        self.rep.holding = True
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                self.last_received = self.clock()
                decoder.feed(data)
                while (ev := decoder.next_event()) is not None:
                    if isinstance(ev, DecodeError):
                        self._count(self.errors, ev.reason.value)
                        log.error("sync: refused a frame from the peer: %s", ev.reason.value)
                        return
                    if isinstance(ev, Heartbeat):
                        writer.write(acks.frame([HeartbeatAck(ev.sent_at_ms)]))
                    elif isinstance(ev, Hello):
                        self.peer_node = ev.node
                        log.info("sync: peer %s (boot %d) connected", ev.node, ev.boot_id)
                    else:
                        self._apply(ev)
        except (OSError, ConnectionError):
            self._count(self.errors, "connection")
        finally:
            self._inbound.discard(writer)
            self.rep.holding = bool(self._inbound)
            writer.close()

    def _apply(self, ev: Record) -> None:
        done = self.rep.snapshot_done
        self.rep.apply(ev, self.clock())
        if isinstance(ev, SnapshotEnd):
            log.warning("sync: snapshot from the peer applied: %d sessions, %d bindings",
                        ev.sessions, ev.bindings)
            if not done:
                self.on_snapshot()

    @staticmethod
    def _count(counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1

    # ---- metrics ----------------------------------------------------------------------------
    def metrics(self) -> Iterator[Metric]:
        conn = GaugeMetricFamily("lbd_sync_connected", "1 when the sync connection is up",
                                 labels=["direction"])
        conn.add_metric(["outbound"], 1 if self.outbound_connected else 0)
        conn.add_metric(["inbound"], 1 if self.inbound_connected else 0)
        yield conn
        yield GaugeMetricFamily("lbd_sync_lag_seconds",
                                "Round trip of the last heartbeat behind queued records",
                                value=self.lag)
        sent = CounterMetricFamily("lbd_sync_records", "Sync records", labels=["direction"])
        sent.add_metric(["sent"], self.records_sent)
        sent.add_metric(["received"], self.rep.records_received)
        yield sent
        err = CounterMetricFamily("lbd_sync_errors", "Sync frames refused or connections lost",
                                  labels=["reason"])
        for reason, n in sorted(self.errors.items()):
            err.add_metric([reason], n)
        yield err
        yield CounterMetricFamily("lbd_sync_snapshots_received", "Snapshots applied",
                                  value=self.rep.snapshots_received)
        skipped = CounterMetricFamily("lbd_sync_records_skipped",
                                      "Received sync records not applied, by reason",
                                      labels=["reason"])
        for reason, n in sorted(self.rep.skipped.items()):
            skipped.add_metric([reason], n)
        yield skipped
        yield CounterMetricFamily("lbd_sync_replies_reported",
                                  "Replies of the peer's sessions reported to it (FIN, RST, "
                                  "refresh)", value=self.rep.replies_reported)
