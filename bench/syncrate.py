"""Sessions per second synced: the CPU cost of the sync pipeline, in-process.

A master-side table's sessions become SessionRecords, are framed and authenticated
(:class:`ha.sync_codec.Encoder`), checked and decoded (:class:`~ha.sync_codec.Decoder`) and
installed into a backup's table (:meth:`lb.sessions.SessionTable.install`) — everything the two
nodes do per session except the TCP hop. On a LAN the hop is not the limit (a 1 Gbit/s link
carries ~5 M session records/s at 24 bytes each), so this is the figure that bounds how fast a
backup can follow a master.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ha.sync_codec import Decoder, Encoder, SessionRecord
from lb.servers import RealServer
from lb.sessions import IPPROTO_TCP, SessionTable, SessionTimeouts, TcpState

VIP_INT = (198 << 24) | (51 << 16) | (100 << 8) | 10
CLIENT_BASE = (198 << 24) | (51 << 16) | (100 << 8)
KEY = b"bench key of more than sixteen bytes"


@dataclass(frozen=True, slots=True)
class SyncRate:
    sessions: int
    per_second: float
    wire_bytes_per_session: float


def measure(count: int = 200_000) -> SyncRate:
    servers = [RealServer("web", (198 << 24) | (18 << 16) | (11 + i), 8080, 1, index=i)
               for i in range(3)]
    by_addr = {(s.addr, s.port): s for s in servers}
    service = object()
    records = [SessionRecord(IPPROTO_TCP, CLIENT_BASE + 100 + i // 60000, 1024 + i % 60000,
                             VIP_INT, 80, servers[i % 3].addr, 8080,
                             int(TcpState.ESTABLISHED), 0.5) for i in range(count)]
    backup: SessionTable[object] = SessionTable(SessionTimeouts(), max_sessions=count + 1)
    encoder, decoder = Encoder(KEY), Decoder(KEY)
    now = 1000.0
    started = time.perf_counter()
    wire = encoder.frame(records)
    decoder.feed(wire)
    installed = 0
    while (ev := decoder.next_event()) is not None:
        if not isinstance(ev, SessionRecord):
            raise RuntimeError(f"unexpected event {ev!r}")
        server = by_addr[(ev.raddr, ev.rport)]
        if backup.install(ev.proto, ev.caddr, ev.cport, ev.vaddr, ev.vport, server, service,
                          ev.state, now - ev.idle, now) is not None:
            installed += 1
    seconds = time.perf_counter() - started
    if installed != count:
        raise RuntimeError(f"installed {installed} of {count} sessions")
    return SyncRate(count, count / seconds, len(wire) / count)
