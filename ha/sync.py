"""State sync: the master streams its sessions and persistence bindings to the peer.

Two TCP connections per pair, one per direction: each node connects from its sync address to
the peer's ``[sync] listen`` and *sends* on that connection; what it *receives* arrives on the
connection the peer opened. Every frame is authenticated with the shared key
(:mod:`ha.sync_codec`); a frame that fails any check ends that connection.

Who is authoritative: only a node that is master (or standalone) sends. On connecting it sends
a snapshot of both tables, then every mutation the tables report (the tables' observers: a
session added, its TCP state changed, removed; a binding added, re-pointed, removed) —
never per-packet refreshes. A backup applies what it receives with ``install``; it does not
expire synced entries itself while its master is connected (the master's removals are the
truth, and a backup sees no packets to keep them fresh); on becoming master it marks every
session as just seen and expires normally from then on.

Gated takeover: a node that starts while a peer is reachable holds its VRRP priority down
until the peer's snapshot has arrived, so a restarted master preempts only once it knows every
session (see :attr:`SyncService.gate_open`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ha.sync_codec import (
    BindingGone,
    BindingRecord,
    DecodeError,
    Decoder,
    Encoder,
    Heartbeat,
    HeartbeatAck,
    Hello,
    SessionGone,
    SessionRecord,
    SnapshotBegin,
    SnapshotEnd,
)
from lb.config import SyncConfig
from lb.persistence import Binding, PersistenceTable
from lb.services import Service, ServiceSet, service_key
from lb.sessions import Session, SessionTable

log = logging.getLogger("lbd.sync")

Record = Any
RECONNECT = 0.5  # seconds between connection attempts
HEARTBEAT = 0.5  # seconds between heartbeats on a connection we send on
GATE_TIMEOUT = 5.0  # seconds a starting node waits for the peer's snapshot at most
MAX_BACKLOG = 8 << 20  # bytes buffered towards a slow peer before we drop and resnapshot
SNAPSHOT_CHUNK = 2000  # records per write while streaming a snapshot


class SyncService:
    """Observer of both tables (outbound) and applier of the peer's stream (inbound)."""

    def __init__(self, cfg: SyncConfig, key: bytes, node: str,
                 sessions: SessionTable[Service], persistence: PersistenceTable[Service],
                 services: Callable[[], ServiceSet], is_master: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.key = key
        self.node = node
        self.sessions = sessions
        self.persistence = persistence
        self.services = services
        self.is_master = is_master
        self.clock = clock
        self.boot_id = int(time.time() * 1000) & 0xFFFFFFFF
        self._writer: asyncio.StreamWriter | None = None
        self._encoder: Encoder | None = None
        self._pending: list[Record] = []
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._inbound: set[asyncio.StreamWriter] = set()
        self._started = clock()  # the gate's timeout runs from here
        self.peer_snapshot_done = False
        self.peer_node = ""
        # counters and gauges
        self.records_sent = 0
        self.records_received = 0
        self.snapshots_sent = 0
        self.snapshots_received = 0
        self.apply_skipped: dict[str, int] = {}
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
        return (self.peer_snapshot_done or self.is_master()
                or self.clock() - self._started >= GATE_TIMEOUT)

    @property
    def holding(self) -> bool:
        """A backup whose master streams to it: expiry is the master's job."""
        return self.inbound_connected and not self.is_master()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.outbound_connected and self.inbound_connected,
            "outbound": self.outbound_connected, "inbound": self.inbound_connected,
            "peer": str(self.cfg.peer), "peer_node": self.peer_node,
            "sending": self._sending(), "peer_snapshot_done": self.peer_snapshot_done,
            "lag_seconds": round(self.lag, 6), "records_sent": self.records_sent,
            "records_received": self.records_received,
            "snapshots_received": self.snapshots_received, "errors": dict(self.errors),
            "skipped": dict(self.apply_skipped),
        }

    # ---- outbound: table observers ------------------------------------------------------------
    def _sending(self) -> bool:
        return self._writer is not None and self.is_master()

    def session_added(self, s: Session[Service]) -> None:
        if self._sending():
            self._queue(self._session_record(s))

    session_changed = session_added

    def session_removed(self, s: Session[Service], reason: str) -> None:
        if self._sending():
            self._queue(SessionGone(s.proto, s.caddr, s.cport, s.vaddr, s.vport))

    def binding_added(self, b: Binding[Service]) -> None:
        if self._sending():
            self._queue(self._binding_record(b))

    binding_changed = binding_added

    def binding_removed(self, b: Binding[Service], reason: str) -> None:
        if self._sending():
            svc = b.service
            self._queue(BindingGone(svc.proto, svc.vaddr, svc.vport, b.client_net))

    def _session_record(self, s: Session[Service]) -> SessionRecord:
        return SessionRecord(s.proto, s.caddr, s.cport, s.vaddr, s.vport, s.raddr, s.rport,
                             s.state, max(0.0, self.clock() - s.last_seen))

    def _binding_record(self, b: Binding[Service]) -> BindingRecord:
        svc = b.service
        idle = 0.0 if b.refs else max(0.0, self.clock() - max(b.idle_since, b.last_used))
        return BindingRecord(svc.proto, svc.vaddr, svc.vport, b.client_net, b.server.addr,
                             b.server.port, b.timeout, idle)

    def _queue(self, record: Record) -> None:
        self._pending.append(record)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        records, self._pending = self._pending, []
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
        """Send both tables in full (on connect, and when this node becomes master)."""
        if self._writer is None:
            return
        self._flush()
        self._send([SnapshotBegin()])
        batch: list[Record] = []
        n_b = n_s = 0
        for b in self.persistence:
            batch.append(self._binding_record(b))
            n_b += 1
            if len(batch) >= SNAPSHOT_CHUNK:
                self._send(batch)
                batch = []
        for s in self.sessions:
            batch.append(self._session_record(s))
            n_s += 1
            if len(batch) >= SNAPSHOT_CHUNK:
                self._send(batch)
                batch = []
        batch.append(SnapshotEnd(n_s, n_b))
        self._send(batch)
        self.snapshots_sent += 1
        log.info("sync: sent a snapshot of %d sessions and %d bindings", n_s, n_b)

    def became_master(self) -> None:
        """This node took over: sessions are fresh from now, and the peer gets our tables."""
        now = self.clock()
        for s in self.sessions:
            s.last_seen = max(s.last_seen, now)
        self.send_snapshot()

    def became_backup(self) -> None:
        """This node lost master (preempted, or a healed split brain): its table may differ
        from the new master's. Closing the connection the master sends on makes it reconnect
        and send a fresh snapshot, which replaces ours."""
        for w in list(self._inbound):
            w.close()

    # ---- outbound: connection -----------------------------------------------------------------
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
            self.connects += 1
            log.warning("sync: connected to %s", peer)
            self._send([Hello(self.node, self.boot_id)])
            if self.is_master():
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
        if self._writer is not None:
            self._writer.close()
            self._writer = self._encoder = None
            self._pending.clear()
            log.info("sync: outbound connection closed (%s)", why)

    # ---- inbound: apply the peer's stream -------------------------------------------------------
    async def _serve_inbound(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        decoder, acks = Decoder(self.key), Encoder(self.key)
        self._inbound.add(writer)
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
                    else:
                        self.apply(ev)
        except (OSError, ConnectionError):
            self._count(self.errors, "connection")
        finally:
            self._inbound.discard(writer)
            writer.close()

    def apply(self, ev: Record) -> None:
        """Apply one record from the peer (pure table work; public for tests)."""
        if self.is_master():
            self._count(self.apply_skipped, "master")  # split brain: our table wins
            return
        now = self.clock()
        self.records_received += 1
        if isinstance(ev, SessionRecord):
            found = self._service_and_server(ev.proto, ev.vaddr, ev.vport, ev.raddr, ev.rport)
            if found is None:
                return
            svc, server = found
            binding = None
            if svc.persistence:
                binding = self.persistence.lookup(svc, ev.caddr & svc.persistence_mask, now)
            if self.sessions.install(ev.proto, ev.caddr, ev.cport, ev.vaddr, ev.vport, server,
                                     svc, ev.state, now - ev.idle, now, binding) is None:
                self._count(self.apply_skipped, "table_refused")
        elif isinstance(ev, SessionGone):
            s = self.sessions.lookup((ev.proto << 96) | (ev.caddr << 64) | (ev.vaddr << 32)
                                     | (ev.cport << 16) | ev.vport)
            if s is not None:
                self.sessions.remove(s, "peer", now)
        elif isinstance(ev, BindingRecord):
            found = self._service_and_server(ev.proto, ev.vaddr, ev.vport, ev.raddr, ev.rport)
            if found is not None:
                self.persistence.install(found[0], ev.client_net, found[1], ev.timeout,
                                         now - ev.idle, now)
        elif isinstance(ev, BindingGone):
            gone = self.services().by_key.get(service_key(ev.proto, ev.vaddr, ev.vport))
            if gone is not None:
                b = self.persistence.lookup(gone, ev.client_net, now)
                if b is not None:
                    self.persistence.unbind(b, "peer")
        elif isinstance(ev, SnapshotBegin):
            self.peer_snapshot_done = False
            for s in list(self.sessions):
                self.sessions.remove(s, "resync", now)
            for b in list(self.persistence):
                self.persistence.unbind(b, "resync")
        elif isinstance(ev, SnapshotEnd):
            self.peer_snapshot_done = True
            self.snapshots_received += 1
            log.warning("sync: snapshot from the peer applied: %d sessions, %d bindings",
                        ev.sessions, ev.bindings)
        elif isinstance(ev, Hello):
            self.peer_node = ev.node
            log.info("sync: peer %s (boot %d) connected", ev.node, ev.boot_id)

    def _service_and_server(self, proto: int, vaddr: int, vport: int, raddr: int,
                            rport: int) -> tuple[Service, Any] | None:
        svc = self.services().by_key.get(service_key(proto, vaddr, vport))
        if svc is None:
            self._count(self.apply_skipped, "unknown_service")
            return None
        server = svc.pool.find(raddr, rport)
        if server is None:
            self._count(self.apply_skipped, "unknown_server")
            return None
        return svc, server

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
        sent.add_metric(["received"], self.records_received)
        yield sent
        err = CounterMetricFamily("lbd_sync_errors", "Sync frames refused or connections lost",
                                  labels=["reason"])
        for reason, n in sorted(self.errors.items()):
            err.add_metric([reason], n)
        yield err
        yield CounterMetricFamily("lbd_sync_snapshots_received", "Snapshots applied",
                                  value=self.snapshots_received)
