"""The table snapshot on disk (I/O shell around :mod:`lb.table_snapshot`).

:class:`SnapshotStore` writes ``<state_dir>/tables.snap`` every ``[sessions]
snapshot_interval`` and once at a graceful stop, and loads it at start. Never on the packet
path, and never one long stall of the event loop: a write copies the tables' references
(one C-level ``list()`` each), encodes :data:`CHUNK` entries per turn of the loop and hands
the finished parts to a thread, which hashes them (hashlib releases the GIL) and writes them
atomically — temporary file, fsync, rename over the old file, fsync of the directory — so a
crash leaves the previous snapshot or the new one, never a mix. Entries that change while a
write is under way are saved as they are when their chunk is reached.

Loading reads, decodes and installs the file in one go, before the data plane and VRRP
start; the node runs it in a thread (nothing else touches the tables yet) so that the loop
keeps pinging systemd's watchdog through the seconds 10⁶ sessions take. A file that does
not decode is refused whole with one WARNING naming the reason, moved aside as
``tables.snap.refused`` for the operator, counted, and the tables start empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lb.atomicfile import write_atomically
from lb.persistence import PersistenceTable
from lb.services import Service, ServiceSet
from lb.sessions import Session, SessionTable
from lb.table_snapshot import Installed, LoadError, SnapshotWriter, decode, install

__all__ = ["CHUNK", "FILE_NAME", "LoadReport", "SnapshotStore", "write_atomically"]

log = logging.getLogger("lbd")

FILE_NAME = "tables.snap"
CHUNK = 2000
"""Entries encoded per turn of the event loop (about 5 ms on the 2-core lab box)."""
_FREE_STEP = 10_000
FREEZE_AT = 100_000
"""Restored entries from which the heap is frozen after the load (``gc.freeze``)."""


@dataclass(slots=True)
class LoadReport:
    """What the load at start did: ``result`` is ``loaded``, ``absent``, ``disabled``,
    ``unreadable`` or a :class:`~lb.table_snapshot.LoadErrorReason` value."""

    result: str = "disabled"
    detail: str = ""
    sessions: int = 0
    bindings: int = 0
    expired_sessions: int = 0
    expired_bindings: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    age: float = 0.0
    seconds: float = 0.0
    """How long reading, decoding and installing took."""


class SnapshotStore:
    """Writes and loads one node's table snapshot; see the module docstring."""

    def __init__(self, state_dir: str, digest: bytes, interval: float,
                 sessions: SessionTable[Service], persistence: PersistenceTable[Service]
                 ) -> None:
        self.directory = Path(state_dir)
        self.path = self.directory / FILE_NAME
        self.digest = digest
        self.interval = interval
        self.sessions = sessions
        self.persistence = persistence
        self.report = LoadReport()
        self._task: asyncio.Task[None] | None = None
        self._file_lock = threading.Lock()  # one writer of the temp file at a time
        # counters and gauges, read at scrape time
        self.writes_total = 0
        self.write_failures_total = 0
        self.last_write_duration = 0.0  # seconds from the copy of the tables to the rename
        self.last_write_longest_step = 0.0  # the longest the loop waited for one chunk
        self.last_write_time = 0.0  # wall clock of the last good write
        self.last_write_bytes = 0
        self.last_write_sessions = 0
        self.last_write_bindings = 0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    # ---- load -------------------------------------------------------------------------------
    def load(self, services: ServiceSet, now: float, wall: float) -> Installed | None:
        """Read, decode and install the file (before the data plane and VRRP start); logs one
        line. None when nothing was installed."""
        if not self.enabled:
            self.report = LoadReport("disabled")
            return None
        started = time.perf_counter()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self.report = LoadReport("absent")
            log.info("no table snapshot at %s: starting with empty tables", self.path)
            return None
        except OSError as exc:
            self.report = LoadReport("unreadable", str(exc.strerror or exc))
            log.warning("table snapshot %s not loaded (cannot read: %s): starting with empty "
                        "tables", self.path, exc.strerror or exc)
            return None
        # 10⁶ entries are built here at once: the cyclic GC would rescan them over and over
        # (a third of the load's time) and there is nothing for it to find. Once a large
        # table is built, the heap goes to the permanent generation (freed by reference
        # counting as usual, never rescanned), or the first collection afterwards would hold
        # the GIL for ~0.7 s at 10⁶ sessions.
        gc.disable()
        done = None
        try:
            done = self._decode_and_install(data, services, now, wall)
        finally:
            if done is not None and len(done.sessions) + len(done.bindings) >= FREEZE_AT:
                gc.freeze()
            gc.enable()
        self.report.seconds = round(time.perf_counter() - started, 3)
        return done

    def _decode_and_install(self, data: bytes, services: ServiceSet, now: float,
                            wall: float) -> Installed | None:
        got = decode(data, self.digest, wall, self.sessions.timeouts)
        if isinstance(got, LoadError):
            self.report = LoadReport(got.reason.value, got.detail)
            aside = self.path.with_name(FILE_NAME + ".refused")
            with contextlib.suppress(OSError):
                self.path.replace(aside)
            log.warning("table snapshot %s refused (%s: %s; moved aside to %s): starting with "
                        "empty tables", self.path, got.reason.value, got.detail, aside.name)
            return None
        done = install(got, self.sessions, self.persistence, services, now)
        for decoded in (got.sessions, got.bindings):  # freed in steps, not in one C call:
            while decoded:  # the loop waits for the GIL while a million tuples go at once
                del decoded[-_FREE_STEP:]
        self.report = LoadReport("loaded", "", len(done.sessions), len(done.bindings),
                                 got.expired_sessions, got.expired_bindings, done.skipped,
                                 got.age)
        skipped = "".join(f", {n} {why}" for why, n in sorted(done.skipped.items()))
        log.info("loaded %d sessions, %d bindings from %s (written %.1fs ago); %d expired "
                 "skipped%s", len(done.sessions), len(done.bindings), self.path, got.age,
                 got.expired_sessions + got.expired_bindings, skipped)
        return done

    # ---- write ------------------------------------------------------------------------------
    def start(self) -> None:
        """Write every ``interval`` from now on (nothing when disabled)."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._every_interval())

    async def stop(self) -> None:
        """Stop the periodic writes, then write once more (a graceful stop)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.enabled:
            await self.write()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.write()
            except Exception:  # a bug here must not end the snapshots for good
                self.write_failures_total += 1
                log.exception("table snapshot not written to %s", self.path)

    async def write(self) -> bool:
        """One snapshot of the tables, spread over turns of the loop; False if it failed
        (logged, counted; the previous file stays)."""
        started = time.monotonic()
        writer = SnapshotWriter(self.digest, time.time(), started)
        longest = 0.0
        for chunk in _chunks(list(self.persistence), CHUNK):
            t0 = time.monotonic()
            writer.add_bindings(chunk)
            longest = max(longest, time.monotonic() - t0)
            await asyncio.sleep(0)
        t0 = time.monotonic()
        items: list[Session] = list(self.sessions)
        copy = time.monotonic() - t0
        for chunk in _chunks(items, CHUNK):
            t0 = time.monotonic()
            writer.add_sessions(chunk)
            longest = max(longest, time.monotonic() - t0)
            await asyncio.sleep(0)
        del items
        try:
            size = await asyncio.to_thread(self._finish_and_write, writer)
        except OSError as exc:
            self.write_failures_total += 1
            log.error("table snapshot not written to %s: %s", self.path, exc.strerror or exc)
            return False
        self.writes_total += 1
        self.last_write_duration = time.monotonic() - started
        self.last_write_longest_step = max(longest, copy)
        self.last_write_time = writer.written_at
        self.last_write_bytes = size
        self.last_write_sessions = writer.sessions
        self.last_write_bindings = writer.bindings
        return True

    def _finish_and_write(self, writer: SnapshotWriter) -> int:
        with self._file_lock:
            return write_atomically(self.directory, FILE_NAME, writer.finish())

    # ---- what an operator sees --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        r = self.report
        out: dict[str, Any] = {
            "file": str(self.path), "interval": self.interval,
            "load": {"result": r.result, "detail": r.detail, "sessions": r.sessions,
                     "bindings": r.bindings, "expired_sessions": r.expired_sessions,
                     "expired_bindings": r.expired_bindings, "skipped": dict(r.skipped),
                     "age": round(r.age, 3), "seconds": r.seconds},
            "writes": self.writes_total, "write_failures": self.write_failures_total,
        }
        if self.writes_total:
            out["last_write"] = {
                "ago": round(time.time() - self.last_write_time, 3),
                "sessions": self.last_write_sessions, "bindings": self.last_write_bindings,
                "bytes": self.last_write_bytes,
                "duration": round(self.last_write_duration, 4),
                "longest_step": round(self.last_write_longest_step, 4)}
        return out

    def metrics(self) -> Iterator[Metric]:
        r = self.report
        loads = CounterMetricFamily("lbd_table_snapshot_loads",
                                    "Table snapshot loads at start, by result (loaded, absent, "
                                    "disabled, unreadable, or why the file was refused)",
                                    labels=["result"])
        loads.add_metric([r.result], 1)
        yield loads
        entries = GaugeMetricFamily("lbd_table_snapshot_loaded_entries",
                                    "Entries of the snapshot loaded at start, by table and "
                                    "outcome", labels=["table", "outcome"])
        for table, installed, expired in (("sessions", r.sessions, r.expired_sessions),
                                          ("bindings", r.bindings, r.expired_bindings)):
            entries.add_metric([table, "installed"], installed)
            entries.add_metric([table, "expired"], expired)
        entries.add_metric(["all", "skipped"], sum(r.skipped.values()))
        yield entries
        yield CounterMetricFamily("lbd_table_snapshot_writes", "Table snapshots written",
                                  value=self.writes_total)
        yield CounterMetricFamily("lbd_table_snapshot_write_failures",
                                  "Table snapshots that could not be written",
                                  value=self.write_failures_total)
        yield GaugeMetricFamily("lbd_table_snapshot_last_write_duration_seconds",
                                "Duration of the last table snapshot write, from the copy of "
                                "the tables to the rename", value=self.last_write_duration)
        yield GaugeMetricFamily("lbd_table_snapshot_last_write_longest_step_seconds",
                                "Longest the event loop waited for one step of the last "
                                "table snapshot write", value=self.last_write_longest_step)
        yield GaugeMetricFamily("lbd_table_snapshot_last_write_timestamp_seconds",
                                "When the last table snapshot was written (0: none yet)",
                                value=self.last_write_time)
        yield GaugeMetricFamily("lbd_table_snapshot_last_write_bytes",
                                "Size of the last table snapshot", value=self.last_write_bytes)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
