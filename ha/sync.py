"""State sync transport: the TCP connections that carry :mod:`ha.replication`'s records.

Two TCP connections per pair, one per direction: each node connects from its sync address to
the peer's ``[sync] listen`` and *sends* on that connection; what it *receives* arrives on the
connection the peer opened.

Every connection starts with the handshake of :mod:`ha.sync_handshake` (the connecting side is
the initiator), bounded by :data:`HANDSHAKE_TIMEOUT`: both sides prove they know the shared key
over fresh random nonces and derive this connection's own keys, with which every frame of
:mod:`ha.sync_codec` is then authenticated. A failed handshake or a frame that fails any check
ends that connection, is counted in :attr:`SyncService.errors` under its reason and logged
once. The inbound side keeps one :class:`~ha.sync_handshake.NonceLog` for all connections, so
a replayed challenge is refused outright.

What goes back on a connection: heartbeat acks, :class:`~ha.sync_codec.Applied` (the sequence
of the last frame applied, once per read of the stream: the sender's
:class:`~ha.sync_window.AckWindow` learns the peer's position, hence the unacknowledged count
and the age of the oldest unacknowledged change) and :class:`~ha.sync_codec.SnapshotRequest`
(:meth:`SyncService.resync`: send me your tables again). Nothing is resent after a reconnect:
a fresh connection always starts with a snapshot of the sender's instances, which supersedes
whatever the old one left unacknowledged.

Both nodes send at once (active-active): each streams the sessions and bindings of the VRRP
instances it masters and installs the peer's copies of the others. What is sent and what is
installed is decided by the pure :class:`~ha.replication.Replicator`; this module only moves
its records: on connecting it sends a snapshot of the owned tables, then what the replicator
queues, flushed once per loop iteration; what arrives is fed to it in order.

Back-pressure: a peer that does not keep up may leave at most ``[sync] max_backlog`` bytes
unapplied (:class:`~ha.sync_window.Backlog`, beyond a snapshot in flight); past that the
outbound connection is aborted — its unsent bytes freed, never delivered — and counted as
``backlog``. On the receiving side a new connection from the peer replaces any older one,
of which nothing more is applied: the new connection's snapshot supersedes it.

Gated takeover: a node that starts while a peer is reachable holds its VRRP priority down
until the peer's snapshot has arrived (:attr:`SyncService.gate_open`), so a restarted node
preempts only once it knows every session of the instances it is about to take.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ha.replication import Replicator
from ha.sync_codec import (
    MAX_BODY,
    Applied,
    DecodeError,
    Decoder,
    Encoder,
    Heartbeat,
    HeartbeatAck,
    Hello,
    OperatorStateRecord,
    Record,
    SnapshotBegin,
    SnapshotEnd,
    SnapshotRequest,
)
from ha.sync_handshake import NONCE_SIZE, Handshake, HandshakeError, Keys, NonceLog, describe
from ha.sync_peer import PeerConfig
from ha.sync_window import AckWindow, Backlog
from lb.config import SyncConfig

log = logging.getLogger("lbd.sync")

RECONNECT = 0.5  # seconds between connection attempts
RECONNECT_MAX = 8.0  # after refused handshakes the delay doubles up to this (a wrong key)
HEARTBEAT = 0.5  # seconds between heartbeats on a connection we send on
GATE_TIMEOUT = 5.0  # seconds a starting node waits for the peer's snapshot at most
HANDSHAKE_TIMEOUT = 2.0  # seconds a connection may take for its whole handshake
FREEZE_STEP = 50_000
"""Records of a peer's snapshot applied between two ``gc.freeze()`` (see _inbound_session)."""

HandshakeOutcome = Keys | HandshakeError | str
"""What :meth:`SyncService._handshake` ends with: the keys, why the peer was refused, or
``"handshake_timeout"`` / ``"handshake_closed"`` (the peer was too slow, or hung up)."""


class SyncService:
    """The transport around a :class:`Replicator`: outbound stream, inbound stream, gate."""

    def __init__(self, cfg: SyncConfig, key: bytes, node: str, replicator: Replicator, *,
                 config_digest: bytes = bytes(16),
                 masters_any: Callable[[], bool] = lambda: False,
                 on_snapshot: Callable[[], None] = lambda: None,
                 operator_state: Callable[[], bytes] = lambda: b"",
                 on_operator_state: Callable[[bytes], None] = lambda data: None,
                 clock: Callable[[], float] = time.monotonic,
                 nonce: Callable[[int], bytes] = os.urandom) -> None:
        self.cfg = cfg
        self.key = key
        self.node = node
        self.nonce = nonce
        self._nonces = NonceLog()  # client nonces seen by every inbound connection
        self._window = AckWindow()  # what the peer has not applied on our outbound connection
        self._backlog = Backlog(cfg.max_backlog)  # what a peer that does not read may cost
        self._peer_config = PeerConfig(config_digest)
        self.rep = replicator
        self.masters_any = masters_any
        self.on_snapshot = on_snapshot  # a complete snapshot from the peer was applied
        # Operator state (lb.opstate, encoded): ours to send, the peer's to judge and apply.
        self.operator_state = operator_state
        self.on_operator_state = on_operator_state
        self.clock = clock
        self.boot_id = int(time.time() * 1000) & 0xFFFFFFFF
        self._writer: asyncio.StreamWriter | None = None
        self._encoder: Encoder | None = None
        self._flush_scheduled = False
        self._snapshot_task: asyncio.Task[None] | None = None  # a snapshot being sent
        self._snapshot_again = False  # asked for another while one was being sent
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._inbound: dict[asyncio.StreamWriter, Encoder] = {}  # after the handshake
        self._started = clock()  # the gate's timeout runs from here
        self.peer_node = ""
        # counters and gauges
        self.records_sent = 0
        self.snapshots_sent = 0
        self.snapshot_requests_sent = 0
        self.snapshot_requests_received = 0
        self.errors: dict[str, int] = {}
        self.connects = 0
        # Seconds before the next outbound attempt: RECONNECT, doubled by every refused (not
        # timed-out) handshake up to RECONNECT_MAX, back to RECONNECT once one succeeds.
        self.retry_delay = RECONNECT
        self._stopping = False
        # Refusal reasons already logged since the last good handshake: a peer with the wrong
        # key is logged once per reason, not every attempt (every one is still counted).
        self._refusals_logged: set[str] = set()
        self.lag = 0.0
        self.last_received = 0.0
        self.bytes_sent = 0  # frames written on the outbound connection
        self.bytes_received = 0  # bytes read on the inbound connection after its handshake
        self._inbound_since = 0.0  # when the current inbound connection's handshake ended
        self._snapshot_began = 0.0  # when the peer's last SnapshotBegin arrived
        # The last snapshot applied from the peer: sessions, bindings, seconds from its begin
        # record's arrival and from the inbound connection's handshake to its end being
        # applied (None: none yet).
        self.last_snapshot: dict[str, float] | None = None

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve_inbound, self.cfg.listen.host,
                                                  self.cfg.listen.port)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._connect_loop()))

    async def stop(self) -> None:
        self._stopping = True  # the loops end even if a cancellation was swallowed
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drop_outbound("stopping", flush=True)
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

    @property
    def peer_config_match(self) -> bool | None:
        """Does the peer's last Hello carry our virtual servers and pools? None: no Hello."""
        return self._peer_config.match

    @property
    def unacked(self) -> int:
        """Records sent on the outbound connection that the peer has not applied yet."""
        return self._window.unacked

    @property
    def oldest_unacked_seconds(self) -> float:
        """Age of the oldest record the peer has not applied yet (0: none)."""
        return self._window.oldest_unacked_age(self.clock())

    def set_config_digest(self, digest: bytes) -> None:
        """This node's virtual servers or pools changed (reload): tell the peer."""
        if digest == self._peer_config.own:
            return
        if self._peer_config.reconfigured(digest):
            self._log_mismatch()
        self._send([self._hello()])

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.outbound_connected and self.inbound_connected,
            "outbound": self.outbound_connected, "inbound": self.inbound_connected,
            "peer": str(self.cfg.peer), "peer_node": self.peer_node,
            "peer_config_match": self.peer_config_match,
            "lag_seconds": round(self.lag, 6),
            "unacked": self.unacked,
            "oldest_unacked_seconds": round(self.oldest_unacked_seconds, 6),
            "connects": self.connects, "retry_delay": self.retry_delay,
            "records_sent": self.records_sent, "snapshots_sent": self.snapshots_sent,
            "snapshot_requests_sent": self.snapshot_requests_sent,
            "snapshot_requests_received": self.snapshot_requests_received,
            "errors": dict(self.errors), "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received, "last_snapshot": self.last_snapshot,
            "ack_delay": self._delay_summary(), **self.rep.status(),
        }

    # ---- outbound ---------------------------------------------------------------------------
    def kick(self) -> None:
        """The replicator queued records: flush them once this loop iteration is done."""
        if not self._flush_scheduled and (self.rep.pending or self.rep.snapshot_wanted):
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.rep.snapshot_wanted:
            self.rep.snapshot_wanted = False
            self.send_snapshot()
        queued_at = self.rep.pending_since
        records = self.rep.take()
        if records:
            self._send(records, queued_at=queued_at)

    def _send(self, records: list[Record], *, snapshot: bool = False,
              queued_at: float | None = None) -> None:
        """Frame and write ``records``; ``queued_at``: they are changes, the first queued
        then (their delay to the peer's acknowledgement is counted)."""
        writer, encoder = self._writer, self._encoder
        if writer is None or encoder is None:
            return
        data = encoder.frame(records)
        writer.write(data)
        self.records_sent += len(records)
        self.bytes_sent += len(data)
        counted = sum(1 for r in records if not isinstance(r, Heartbeat))
        self._window.sent(encoder.sequence, counted, self.clock(), len(data), queued_at)
        if snapshot:
            self._backlog.snapshot_written(len(data))
        if self._backlog.over(self._window.unacked_bytes):
            self._count(self.errors, "backlog")
            log.warning("sync: %s does not keep up: over %d bytes not applied, connection "
                        "dropped (the next one starts with a snapshot)", self.cfg.peer,
                        self._backlog.limit)
            self._drop_outbound("peer too slow: backlog over limit")

    def send_snapshot(self) -> None:
        """Send the owned tables in full (on connect, and when the peer asks), in the
        background: chunk by chunk, waiting for the socket to drain after each, so that a
        million sessions neither hold the event loop (VRRP shares it) nor pile up past
        MAX_BACKLOG. Records of changes meanwhile go out between the chunks; the peer
        counts them as carried by the snapshot. A request during a snapshot sends another
        one after it."""
        writer = self._writer
        if writer is None:
            return
        if self._snapshot_task is not None and not self._snapshot_task.done():
            self._snapshot_again = True
            return
        self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot(writer))

    async def _snapshot(self, writer: asyncio.StreamWriter) -> None:
        again = True
        while again:
            self._snapshot_again = False
            self._flush()
            end: Record | None = None
            for chunk in self.rep.snapshot():
                if self._writer is not writer:
                    return  # the connection is gone: the next one sends its own
                self._send(chunk, snapshot=True)
                if self._writer is not writer:  # dropped: over the backlog beyond the snapshot
                    return
                end = chunk[-1]
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    return
                # drain() returns at once, without yielding, while the transport is not
                # paused, and the kernel's socket buffers take megabytes first: without
                # this, the first ~400k sessions of a 10⁶ snapshot went out in one 1.4 s
                # turn of the loop, and the backup saw the master's adverts stop.
                await asyncio.sleep(0)
            self.snapshots_sent += 1
            if isinstance(end, SnapshotEnd):
                log.info("sync: sent a snapshot of %d sessions and %d bindings",
                         end.sessions, end.bindings)
            again = self._snapshot_again

    def send_operator_state(self) -> None:
        """Send this node's operator state (on connect, and after every operator change);
        the peer keeps whichever of the two was changed last."""
        data = self.operator_state()
        if not data or self._writer is None:
            return
        if len(data) > MAX_BODY:
            self._count(self.errors, "operator_state_too_large")
            log.error("sync: operator state of %d bytes does not fit one frame (%d): not sent",
                      len(data), MAX_BODY)
            return
        self._flush()
        self._send([OperatorStateRecord(data)])

    def resync(self) -> None:
        """This node lost an instance (preempted, or a healed split brain): its copy may
        differ from the new owner's table. Ask the peer for a fresh snapshot, which replaces
        our copies, on the connection it sends on (which stays up). With no such connection
        there is nothing to ask: the peer's next connection starts with a snapshot anyway."""
        for writer, acks in self._inbound.items():
            writer.write(acks.frame([SnapshotRequest()]))
            self.snapshot_requests_sent += 1
            log.info("sync: asked the peer for a snapshot")

    def _hello(self) -> Hello:
        return Hello(self.node, self.boot_id, self._peer_config.own)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         hs: Handshake) -> HandshakeOutcome:
        """Run ``hs`` over the connection, bounded by :data:`HANDSHAKE_TIMEOUT`."""
        async def run() -> HandshakeOutcome:
            while True:
                if out := hs.data_to_send():
                    writer.write(out)
                if hs.result is not None:
                    return hs.result
                data = await reader.read(4096)
                if not data:
                    return "handshake_closed"
                hs.feed(data)
        try:
            return await asyncio.wait_for(run(), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            return "handshake_timeout"

    def _refused(self, outcome: HandshakeError | str, hs: Handshake, who: str) -> None:
        """Count every failed handshake; log each reason once until a handshake succeeds
        (a misconfigured peer retries for as long as it runs)."""
        reason = outcome.value if isinstance(outcome, HandshakeError) else outcome
        self._count(self.errors, reason)
        first = reason not in self._refusals_logged
        self._refusals_logged.add(reason)
        if isinstance(outcome, HandshakeError):
            why, level = describe(outcome, hs.peer_protocol), logging.ERROR
        else:
            why = ("closed during the handshake" if outcome == "handshake_closed"
                   else f"no handshake within {HANDSHAKE_TIMEOUT:g} s")
            level = logging.INFO
        if first:
            log.log(level, "sync: %s: %s (repeats are counted in lbctl sync, not logged, "
                    "until a handshake succeeds)", who, why)
        else:
            log.debug("sync: %s: %s", who, why)

    def _handshake_done(self) -> None:
        """A handshake succeeded: the next refusal is news again, retries are quick again."""
        self._refusals_logged.clear()
        self.retry_delay = RECONNECT

    async def _connect_loop(self) -> None:
        peer = self.cfg.peer
        while not self._stopping:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    peer.host, peer.port, local_addr=(self.cfg.listen.host, 0)), 2)
            except (OSError, TimeoutError):
                await asyncio.sleep(self.retry_delay)
                continue
            try:
                await self._outbound(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                self._count(self.errors, "connection")
                log.warning("sync: connection to %s lost: %s", peer, exc)
            self._drop_outbound("closed")
            writer.close()
            await asyncio.sleep(self.retry_delay)

    async def _outbound(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        """One outbound connection: handshake, Hello and snapshot, then the stream."""
        hs = Handshake(self.key, self.nonce(NONCE_SIZE), initiator=True)
        keys = await self._handshake(reader, writer, hs)
        if not isinstance(keys, Keys):
            self._refused(keys, hs, f"connection to {self.cfg.peer}")
            if isinstance(keys, HandshakeError):  # refused: a wrong key will not heal soon;
                # a peer that was slow or closed (frozen, restarting) is retried at once
                self.retry_delay = min(self.retry_delay * 2, RECONNECT_MAX)
            return
        self._handshake_done()
        self._writer, self._encoder = writer, Encoder(keys.send)
        self._window.clear()
        self.rep.connected = True
        self.connects += 1
        log.warning("sync: connected to %s", self.cfg.peer)
        self._send([self._hello()])
        self.send_snapshot()
        self.send_operator_state()
        decoder = Decoder(keys.receive)
        decoder.feed(hs.leftover)
        await self._outbound_session(reader, decoder)

    async def _outbound_session(self, reader: asyncio.StreamReader, decoder: Decoder) -> None:
        """What comes back on the connection we send on: heartbeat acks (lag = round trip,
        which includes whatever records were queued before the heartbeat), Applied (the
        peer's position) and snapshot requests."""
        hb = asyncio.get_running_loop().create_task(self._heartbeats())
        try:
            while self._writer is not None:
                while (ev := decoder.next_event()) is not None:
                    if isinstance(ev, DecodeError):
                        self._count(self.errors, ev.reason.value)
                        log.error("sync: refused a frame from %s: %s", self.cfg.peer,
                                  ev.reason.value)
                        return
                    if isinstance(ev, HeartbeatAck):
                        self.lag = max(0.0, self.clock() - ev.sent_at_ms / 1000)
                    elif isinstance(ev, Applied):
                        if not self._window.applied(ev.sequence, self.clock()):
                            self._count(self.errors, "applied_ahead")
                            log.error("sync: %s acknowledged frame %d, never sent: refused",
                                      self.cfg.peer, ev.sequence)
                            return
                    elif isinstance(ev, SnapshotRequest):
                        self.snapshot_requests_received += 1
                        log.info("sync: the peer asked for a snapshot")
                        self.send_snapshot()
                    if self._writer is None:  # dropped (backlog) while answering
                        return
                data = await self._read(reader, "outbound")
                if not data:
                    return
                decoder.feed(data)
        finally:
            hb.cancel()

    async def _read(self, reader: asyncio.StreamReader, side: str) -> bytes:
        """The next bytes of a connection; b"" at its end or when the peer has been silent for
        ``peer_timeout`` (a dead peer behind a link TCP has not given up on yet: without
        this the connection, and the copies it keeps alive, would wait for minutes)."""
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the read's result
            # when the read completes as the task is cancelled, swallowing the cancellation
            # (a stop then never ended: the connect loop went on).
            async with asyncio.timeout(self.cfg.peer_timeout):
                return await reader.read(1 << 16)
        except TimeoutError:
            self._count(self.errors, "peer_silent")
            log.warning("sync: nothing from %s on the %s connection for %g s: dropped",
                        self.peer_node or self.cfg.peer, side, self.cfg.peer_timeout)
            return b""

    async def _heartbeats(self) -> None:
        while self._writer is not None:
            self._flush()
            self._send([Heartbeat(int(self.clock() * 1000))])
            await asyncio.sleep(HEARTBEAT)

    def _drop_outbound(self, why: str, *, flush: bool = False) -> None:
        """End the outbound connection at once: abort, not close, so that what waits unsent
        (up to the backlog bound) is freed now and never reaches the peer — the next
        connection's snapshot supersedes it, and a late stale record must not follow that
        snapshot (a close would flush the buffer first, whenever the peer reads again).
        ``flush``: a graceful stop, whose last records the peer should still get."""
        self.rep.connected = False
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            self._snapshot_task = None
        if self._writer is not None:
            if flush:
                self._writer.close()
            else:
                self._writer.transport.abort()
            self._writer = self._encoder = None
            self.rep.pending.clear()
            self._window.clear()
            self._backlog.clear()
            log.info("sync: outbound connection closed (%s)", why)

    # ---- inbound ----------------------------------------------------------------------------
    async def _serve_inbound(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        try:
            hs = Handshake(self.key, self.nonce(NONCE_SIZE), initiator=False, seen=self._nonces)
            keys = await self._handshake(reader, writer, hs)
            if isinstance(keys, Keys):
                self._handshake_done()
                await self._inbound_session(reader, writer, keys, hs.leftover)
            else:
                peername = writer.get_extra_info("peername")
                self._refused(keys, hs, f"connection from {peername[0] if peername else '?'}")
        except (OSError, ConnectionError):
            self._count(self.errors, "connection")
        finally:
            writer.close()

    async def _inbound_session(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, keys: Keys, data: bytes) -> None:
        """The peer's stream: apply its records in order; after each read, tell it the last
        frame applied."""
        decoder, acks = Decoder(keys.receive), Encoder(keys.send)
        # The peer sends on one connection at a time: a new one means the old is dead on its
        # side (a partition, a frozen peer cut off for its backlog). What the old one still
        # holds is older than the new connection's snapshot: abort it, apply none of it.
        for old in list(self._inbound):
            self._inbound.pop(old)
            old.transport.abort()
            log.info("sync: a new connection from the peer replaces an older one")
        self._inbound[writer] = acks
        self._inbound_since = self.clock()
        self.rep.holding = True
        hello = False
        acked = 0
        freeze_at = self.rep.records_received + FREEZE_STEP
        try:
            while writer in self._inbound:
                if data:
                    self.last_received = self.clock()
                    self.bytes_received += len(data)
                    decoder.feed(data)
                while writer in self._inbound and (ev := decoder.next_event()) is not None:
                    if isinstance(ev, DecodeError):
                        self._count(self.errors, ev.reason.value)
                        log.error("sync: refused a frame from the peer: %s", ev.reason.value)
                        return
                    if isinstance(ev, Heartbeat):
                        writer.write(acks.frame([HeartbeatAck(ev.sent_at_ms)]))
                    elif isinstance(ev, Hello):
                        self._peer_hello(ev, first=not hello)
                        hello = True
                    elif isinstance(ev, OperatorStateRecord):
                        self.on_operator_state(ev.state)
                    else:
                        self._apply(ev)
                if self.rep.in_snapshot and self.rep.records_received >= freeze_at:
                    # A snapshot of 10⁶ sessions builds 10⁶ long-lived objects here; each
                    # full collection would rescan all of them (0.1-0.5 s with the GIL held,
                    # more under load: a backup then missed adverts and took over). Moved
                    # to the permanent generation in steps, they are freed by reference
                    # counting as usual but never rescanned (as after the load at start).
                    gc.freeze()
                    freeze_at = self.rep.records_received + FREEZE_STEP
                if writer in self._inbound and decoder.sequence > acked:
                    acked = decoder.sequence
                    writer.write(acks.frame([Applied(acked)]))
                data = await self._read(reader, "inbound")
                if not data:
                    break
        finally:
            if self._inbound.get(writer) is acks:
                self._inbound.pop(writer)
            self.rep.holding = bool(self._inbound)

    def _peer_hello(self, ev: Hello, *, first: bool) -> None:
        self.peer_node = ev.node
        if first:
            log.info("sync: peer %s (boot %d) connected", ev.node, ev.boot_id)
        if self._peer_config.hello(ev.config_digest):
            self._log_mismatch()

    def _log_mismatch(self) -> None:
        log.warning("sync: peer %s has other virtual servers or pools than this node (config "
                    "digest %s, ours %s): allowed, records for what only one side has are "
                    "skipped", self.peer_node or self.cfg.peer,
                    (self._peer_config.peer or b"").hex(), self._peer_config.own.hex())

    def _apply(self, ev: Record) -> None:
        done = self.rep.snapshot_done
        self.rep.apply(ev, self.clock())
        if isinstance(ev, SnapshotBegin):
            self._snapshot_began = self.clock()
        elif isinstance(ev, SnapshotEnd):
            now = self.clock()
            self.last_snapshot = {"sessions": ev.sessions, "bindings": ev.bindings,
                                  "seconds": round(now - self._snapshot_began, 4),
                                  "since_connect": round(now - self._inbound_since, 4)}
            log.warning("sync: snapshot from the peer applied: %d sessions, %d bindings in "
                        "%.2f s", ev.sessions, ev.bindings, now - self._snapshot_began)
            if not done:
                self.on_snapshot()

    def _delay_summary(self) -> dict[str, Any]:
        d = self._window.delays
        if not d.count:
            return {"records": 0}
        return {"records": d.count, "mean": round(d.sum / d.count, 6),
                "p50": round(d.quantile(0.5), 6), "p99": round(d.quantile(0.99), 6)}

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
        yield GaugeMetricFamily("lbd_sync_unacked_records",
                                "Records sent to the peer and not yet applied by it",
                                value=self.unacked)
        yield GaugeMetricFamily("lbd_sync_oldest_unacked_seconds",
                                "Age of the oldest record the peer has not applied yet",
                                value=self.oldest_unacked_seconds)
        match = GaugeMetricFamily("lbd_sync_peer_config_match",
                                  "1 when the peer's virtual servers and pools are ours, 0 when "
                                  "not (absent before the peer's first hello)")
        if self.peer_config_match is not None:
            match.add_metric([], 1 if self.peer_config_match else 0)
        yield match
        requests = CounterMetricFamily("lbd_sync_snapshot_requests",
                                       "Snapshot requests, sent to the peer and received",
                                       labels=["direction"])
        requests.add_metric(["sent"], self.snapshot_requests_sent)
        requests.add_metric(["received"], self.snapshot_requests_received)
        yield requests
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
        wire = CounterMetricFamily("lbd_sync_bytes", "Sync stream bytes: written on the "
                                   "outbound connection (sent), read on the inbound one "
                                   "(received), handshakes left out", labels=["direction"])
        wire.add_metric(["sent"], self.bytes_sent)
        wire.add_metric(["received"], self.bytes_received)
        yield wire
        d = self._window.delays
        delay = HistogramMetricFamily(
            "lbd_sync_ack_delay_seconds", "Per change record sent to the peer: from when it "
            "was queued to the arrival of the peer's acknowledgement that it was applied (an "
            "upper bound of creation to installation on the peer); snapshots left out")
        delay.add_metric([], d.exposition(), d.sum)
        yield delay
        last = GaugeMetricFamily("lbd_sync_last_snapshot_seconds",
                                 "Time the last snapshot from the peer took, from its first "
                                 "record's arrival to its last one applied (absent before the "
                                 "first)")
        if self.last_snapshot is not None:
            last.add_metric([], self.last_snapshot["seconds"])
        yield last
        skipped = CounterMetricFamily("lbd_sync_records_skipped",
                                      "Received sync records not applied, by reason",
                                      labels=["reason"])
        for reason, n in sorted(self.rep.skipped.items()):
            skipped.add_metric([reason], n)
        yield skipped
        yield CounterMetricFamily("lbd_sync_replies_reported",
                                  "Replies of the peer's sessions reported to it (FIN, RST, "
                                  "refresh)", value=self.rep.replies_reported)
        yield CounterMetricFamily("lbd_sync_opened_unowned",
                                  "Sessions scheduled here for a virtual server the peer "
                                  "masters (in a handback's instant), sent to the peer",
                                  value=self.rep.opened_unowned)

