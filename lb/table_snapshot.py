"""Table snapshot codec, pure: the session table and persistence bindings to bytes and back.

A node writes its tables to local disk every few seconds (the I/O is the node's: temp file,
fsync, rename), so that a restart of both boxes of a pair — a blackout — does not forget the
flows the clients' TCP stacks are still retransmitting. This module only turns table entries
into bytes and bytes back into entries; it reads no clock and no file: the writer passes its
monotonic ``now`` (to turn ``last_seen`` into an idle age) and its wall-clock time of writing,
the reader passes its wall-clock ``now`` (the age of the file is the time the node was down).

File format, version 1 (network byte order)::

    header    40 bytes  magic "LBDT" | version u16 = 1 | flags u16 = 0
                        | service digest 16 bytes (``Config.service_digest()`` of the writer)
                        | written_at f64 (wall-clock seconds since the epoch)
                        | bindings u32 | sessions u32
    bindings  26 bytes each: proto u8 | vaddr u32 | vport u16 | client_net u32 | raddr u32
                        | rport u16 | timeout_ms u32 | idle_ms u32 | flags u8 (1: in use)
    sessions  28 bytes each: proto u8 | caddr u32 | vaddr u32 | cport u16 | vport u16
                        | raddr u32 | rport u16 | state u8 | idle_ms u32
                        | binding u32 (index into the bindings, 0xFFFFFFFF: none)
    checksum  32 bytes  BLAKE2b-256 of everything before it

The first 13 bytes of a session record are the table's forward key (:func:`lb.sessions
.flow_key`) in big-endian order, so the writer packs the key as it is. Idle ages are the same
clamped milliseconds as the sync stream's (:mod:`ha.sync_codec`).

Rules of this module:

- :func:`decode` never raises on the file's bytes: it returns a :class:`Restored` or one
  :class:`LoadError` whose reason says why the whole file is refused — never half a table.
  Checks run in this order: length (truncated), magic, version, checksum, service digest
  (another config's file), then every record's values.
- Entries whose timeout passed while the node was down are left out and counted. A session's
  idle age at load is its age at writing plus the file's age; it survives when that is less
  than the timeout of its TCP state. A binding survives when its own timeout has not passed,
  or when a surviving session uses it (a binding in use does not expire).
- The file's age is never negative: a wall clock that went back counts as no downtime.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from lb.persistence import Binding, PersistenceTable
from lb.servers import RealServer
from lb.services import Service, ServiceSet, service_key
from lb.sessions import IPPROTO_TCP, Session, SessionTable, SessionTimeouts, TcpState

__all__ = [
    "BINDING_SIZE",
    "CHECKSUM_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "NO_BINDING",
    "SESSION_SIZE",
    "VERSION",
    "Installed",
    "LoadError",
    "LoadErrorReason",
    "Restored",
    "SavedBinding",
    "SavedSession",
    "SnapshotWriter",
    "decode",
    "encode",
    "install",
]

MAGIC: Final = b"LBDT"
VERSION: Final = 1
NO_BINDING: Final = 0xFFFFFFFF
"""A session's binding index when it holds no binding."""

_HEADER: Final = struct.Struct("!4sHH16sdII")  # magic version flags digest written_at nb ns
_BINDING: Final = struct.Struct("!BIHIIHIIB")
_SESSION_OUT: Final = struct.Struct("!13sIHBII")  # forward key bytes, raddr rport state ...
_SESSION_IN: Final = struct.Struct("!BIIHHIHBII")  # ... the same bytes, field by field
_CHECKSUM_SIZE: Final = 32

HEADER_SIZE: Final = _HEADER.size
BINDING_SIZE: Final = _BINDING.size
SESSION_SIZE: Final = _SESSION_IN.size
CHECKSUM_SIZE: Final = _CHECKSUM_SIZE

_U32: Final = 0xFFFFFFFF
_IN_USE: Final = 1
_MAX_STATE: Final = max(TcpState)
assert _SESSION_OUT.size == _SESSION_IN.size


def _checksum() -> Any:
    return hashlib.blake2b(digest_size=_CHECKSUM_SIZE, person=b"lbd-tables")


def _ms(seconds: float) -> int:
    """Float seconds to u32 milliseconds, clamped (NaN counts as 0)."""
    if math.isnan(seconds):
        return 0
    if seconds >= _U32 / 1000:
        return _U32
    return max(0, round(seconds * 1000))


# --- writing ------------------------------------------------------------------------------


class _ServiceLike(Protocol):
    proto: int
    vaddr: int
    vport: int


class SnapshotWriter:
    """Builds one snapshot in steps, so that a caller can spread the work of a large table
    over several turns of its event loop: :meth:`add_bindings` with chunks of the bindings,
    then :meth:`add_sessions` with chunks of the sessions, then :meth:`finish` (which hashes
    and may run in a thread: the writer is not touched by anything else by then).

    ``now`` is the writer's monotonic clock (the tables' time); ``written_at`` its wall clock.
    Removed entries (``in_table`` False: the table changed between chunks) are left out.
    """

    def __init__(self, digest: bytes, written_at: float, now: float) -> None:
        if len(digest) != 16:
            raise ValueError("service digest must be 16 bytes")
        self.digest = digest
        self.written_at = written_at
        self.now = now
        self._index: dict[Binding[Any], int] = {}
        self._parts: list[bytes] = []
        self._sessions_started = False
        self.bindings = 0
        self.sessions = 0

    def add_bindings(self, bindings: Iterable[Binding[Any]]) -> None:
        """A chunk of bindings; every binding before any session (sessions refer to them by
        index; a binding added twice is written once)."""
        if self._sessions_started:
            raise ValueError("bindings are added before the sessions")
        now, index, out = self.now, self._index, []
        pack = _BINDING.pack
        for b in bindings:
            if not b.in_table or b in index:
                continue
            svc: _ServiceLike = b.service
            srv = b.server
            if b.refs > 0:
                idle, flags = 0.0, _IN_USE
            else:
                idle, flags = now - max(b.idle_since, b.last_used), 0
            out.append(pack(svc.proto, svc.vaddr, svc.vport, b.client_net, srv.addr, srv.port,
                            _ms(b.timeout), _ms(idle), flags))
            index[b] = len(index)
        self.bindings = len(index)
        self._parts.append(b"".join(out))

    def add_sessions(self, sessions: Iterable[Session]) -> None:
        """A chunk of sessions (call as often as needed, after :meth:`add_bindings`)."""
        self._sessions_started = True
        now, get, out = self.now, self._index.get, []
        pack = _SESSION_OUT.pack
        for s in sessions:
            if not s.in_table:
                continue
            srv = s.server
            idle = int((now - s.last_seen) * 1000)
            out.append(pack(s.fkey.to_bytes(13, "big"), srv.addr, srv.port, s.state,
                            _U32 if idle > _U32 else max(idle, 0),
                            get(s.binding, NO_BINDING)))  # type: ignore[arg-type]
        self.sessions += len(out)
        self._parts.append(b"".join(out))

    def add_rows(self, bindings: Iterable[tuple[int, ...]],
                 sessions: Iterable[tuple[int, ...]]) -> None:
        """Entries given as the file's own fields, in the order of the format above (a
        binding's nine, a session's ten, its binding as an index into ``bindings``): for
        tools that make a table without building one (``lab.fill``). Not mixed with
        :meth:`add_bindings` / :meth:`add_sessions`, and called once per snapshot."""
        if self._parts or self._sessions_started:
            raise ValueError("rows are added once, and not mixed with table entries")
        packed_b = b"".join(itertools.starmap(_BINDING.pack, bindings))
        packed_s = b"".join(itertools.starmap(_SESSION_IN.pack, sessions))
        self.bindings += len(packed_b) // BINDING_SIZE
        self.sessions += len(packed_s) // SESSION_SIZE
        self._parts += (packed_b, packed_s)

    def finish(self) -> list[bytes]:
        """The file's bytes, as parts to write in order (header, records, checksum)."""
        header = _HEADER.pack(MAGIC, VERSION, 0, self.digest, self.written_at, self.bindings,
                              self.sessions)
        h = _checksum()
        h.update(header)
        for part in self._parts:
            h.update(part)
        return [header, *self._parts, h.digest()]


def encode(digest: bytes, written_at: float, now: float, bindings: Iterable[Binding[Any]],
           sessions: Iterable[Session]) -> bytes:
    """The whole snapshot in one call (tests, small tables)."""
    w = SnapshotWriter(digest, written_at, now)
    w.add_bindings(bindings)
    w.add_sessions(sessions)
    return b"".join(w.finish())


# --- reading ------------------------------------------------------------------------------


class LoadErrorReason(enum.Enum):
    """Why a snapshot file is refused whole. The value is a stable label for metrics."""

    TRUNCATED = "truncated"
    """Shorter (or longer) than its header's counts say."""
    MAGIC = "magic"
    """Does not start with ``LBDT``: not a table snapshot."""
    VERSION = "version"
    """Written by another version of the format."""
    CHECKSUM = "checksum"
    """The BLAKE2b checksum does not match: the bytes were altered."""
    CONFIG = "config"
    """Written with other virtual servers or pools (another service digest)."""
    VALUE = "value"
    """A record's field is out of range (TCP state, binding index, reserved flags)."""


@dataclass(frozen=True, slots=True)
class LoadError:
    """The file is refused; ``detail`` says what was found, for the log line."""

    reason: LoadErrorReason
    detail: str


class SavedBinding(NamedTuple):
    """A persistence binding as restored: ``client_net`` on (proto, vaddr, vport) goes to
    ``raddr:rport``. ``idle`` counts the downtime; ``remaining`` is ``timeout - idle`` (<= 0
    for a binding kept only because a restored session uses it)."""

    proto: int
    vaddr: int
    vport: int
    client_net: int
    raddr: int
    rport: int
    timeout: float
    idle: float
    remaining: float
    in_use: bool


class SavedSession(NamedTuple):
    """A session as restored. ``idle`` counts the downtime; ``remaining`` is what is left of
    its state's timeout. ``binding`` indexes :attr:`Restored.bindings`, or is None.
    (Named tuples, not dataclasses: a start may build 10⁶ of them.)"""

    proto: int
    caddr: int
    cport: int
    vaddr: int
    vport: int
    raddr: int
    rport: int
    state: int
    idle: float
    remaining: float
    binding: int | None


@dataclass(frozen=True, slots=True)
class Restored:
    """A file that decoded: what survives, and what was left out because it expired."""

    written_at: float
    age: float
    """Seconds between writing and loading (the downtime), never negative."""
    bindings: list[SavedBinding]
    sessions: list[SavedSession]
    expired_bindings: int
    expired_sessions: int


def decode(data: bytes, digest: bytes, now: float,
           timeouts: SessionTimeouts) -> Restored | LoadError:
    """The snapshot in ``data``, checked against this node's service ``digest``, with idle
    ages advanced to the wall-clock ``now`` and expired entries left out; or why not."""
    n = len(data)
    if n < HEADER_SIZE + _CHECKSUM_SIZE:
        if data[: len(MAGIC)] != MAGIC[: min(n, len(MAGIC))]:
            return LoadError(LoadErrorReason.MAGIC, "not a table snapshot")
        return LoadError(LoadErrorReason.TRUNCATED, f"{n} bytes, shorter than a header")
    magic, version, flags, file_digest, written_at, nb, ns = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return LoadError(LoadErrorReason.MAGIC, "not a table snapshot")
    if version != VERSION:
        return LoadError(LoadErrorReason.VERSION,
                         f"format version {version}, this lbd reads {VERSION}")
    want = HEADER_SIZE + nb * BINDING_SIZE + ns * SESSION_SIZE + _CHECKSUM_SIZE
    if n != want:
        return LoadError(LoadErrorReason.TRUNCATED,
                         f"{n} bytes where {nb} bindings and {ns} sessions take {want}")
    view = memoryview(data)
    h = _checksum()
    h.update(view[: n - _CHECKSUM_SIZE])
    if h.digest() != data[n - _CHECKSUM_SIZE :]:
        return LoadError(LoadErrorReason.CHECKSUM, "checksum mismatch")
    if flags != 0 or not math.isfinite(written_at):
        return LoadError(LoadErrorReason.VALUE, "reserved header fields are set")
    if file_digest != digest:
        return LoadError(LoadErrorReason.CONFIG,
                         "written with other virtual servers or pools (service digest "
                         f"{file_digest.hex()}, this config's is {digest.hex()})")
    age = max(0.0, now - written_at)
    end_b = HEADER_SIZE + nb * BINDING_SIZE
    raw_b = list(_BINDING.iter_unpack(view[HEADER_SIZE:end_b]))
    for rec in raw_b:
        if rec[8] & ~_IN_USE:
            return LoadError(LoadErrorReason.VALUE, "a binding's reserved flags are set")
    sessions, expired_s, used = _sessions(view[end_b : n - _CHECKSUM_SIZE], nb, age, timeouts)
    if isinstance(sessions, LoadError):
        return sessions
    bindings: list[SavedBinding] = []
    new_index: list[int | None] = []
    for i, (p, va, vp, cn, ra, rp, to_ms, idle_ms, fl) in enumerate(raw_b):
        timeout, idle = to_ms / 1000, idle_ms / 1000 + age
        if idle >= timeout and i not in used:
            new_index.append(None)
            continue
        new_index.append(len(bindings))
        bindings.append(SavedBinding(p, va, vp, cn, ra, rp, timeout, idle, timeout - idle,
                                     bool(fl & _IN_USE)))
    if len(bindings) != nb:  # renumber the sessions' references to the bindings kept
        sessions = [s if s.binding is None else _rebind(s, new_index[s.binding])
                    for s in sessions]
    return Restored(written_at, age, bindings, sessions, nb - len(bindings), expired_s)


def _rebind(s: SavedSession, index: int | None) -> SavedSession:
    return s._replace(binding=index)


def _sessions(body: memoryview, nb: int, age: float, timeouts: SessionTimeouts
              ) -> tuple[list[SavedSession] | LoadError, int, set[int]]:
    """The session records that survive, how many expired, which bindings they use."""
    timeout_of: Sequence[float] = tuple(timeouts.timeout(st) for st in TcpState)
    out: list[SavedSession] = []
    used: set[int] = set()
    expired = 0
    for p, ca, va, cp, vp, ra, rp, st, idle_ms, bi in _SESSION_IN.iter_unpack(body):
        if st > _MAX_STATE or (st == 0) == (p == IPPROTO_TCP):
            return LoadError(LoadErrorReason.VALUE, f"session state {st} for protocol {p}"), 0, used
        if bi != NO_BINDING and bi >= nb:
            return LoadError(LoadErrorReason.VALUE, f"binding index {bi} of {nb}"), 0, used
        idle = idle_ms / 1000 + age
        remaining = timeout_of[st] - idle
        if remaining <= 0:
            expired += 1
            continue
        if bi == NO_BINDING:
            out.append(SavedSession(p, ca, cp, va, vp, ra, rp, st, idle, remaining, None))
        else:
            used.add(bi)
            out.append(SavedSession(p, ca, cp, va, vp, ra, rp, st, idle, remaining, bi))
    return out, expired, used


# --- installing ---------------------------------------------------------------------------


@dataclass(slots=True)
class Installed:
    """What :func:`install` put in the tables, and what it could not, by reason."""

    sessions: list[Session]
    bindings: list[Binding[Service]]
    skipped: dict[str, int]


def install(restored: Restored, sessions: SessionTable[Service],
            persistence: PersistenceTable[Service], services: ServiceSet,
            now: float) -> Installed:
    """Put the restored entries in the tables as a peer's snapshot would (same server, the
    idle age it had, the tables' monotonic ``now``): bindings first, then the sessions that
    hold them. An entry whose virtual server or real server is gone (an operator removed it
    at run time) or that the table refuses (full, reverse key taken) is skipped and counted.
    Who owns what is not decided here: the node marks the entries provisional for the
    replication (:meth:`ha.replication.Replicator.restored`)."""
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    by_key = services.by_key
    objs: list[Binding[Service] | None] = []
    got_b: list[Binding[Service]] = []
    for rb in restored.bindings:
        svc = by_key.get(service_key(rb.proto, rb.vaddr, rb.vport))
        server = svc.pool.find(rb.raddr, rb.rport) if svc is not None else None
        b = None
        if svc is None:
            skip("unknown_service")
        elif server is None:
            skip("unknown_server")
        else:
            b = persistence.install(svc, rb.client_net, server, rb.timeout, now - rb.idle, now)
            if b is None:
                skip("table_refused")
            else:
                got_b.append(b)
        objs.append(b)
    got_s: list[Session] = []
    # (proto, vaddr, vport, raddr, rport) -> (service, server) or why not: a table has a few
    # services and servers, and 10⁶ sessions.
    where: dict[tuple[int, int, int, int, int], tuple[Service, RealServer] | str] = {}
    add = got_s.append
    table_install = sessions.install
    for p, ca, cp, va, vp, ra, rp, st, idle, _remaining, bi in restored.sessions:
        key = (p, va, vp, ra, rp)
        found = where.get(key)
        if found is None:
            svc = by_key.get(service_key(p, va, vp))
            server = svc.pool.find(ra, rp) if svc is not None else None
            if svc is None:
                found = "unknown_service"
            elif server is None:
                found = "unknown_server"
            else:
                found = (svc, server)
            where[key] = found
        if isinstance(found, str):
            skip(found)
            continue
        svc, server = found
        s = table_install(p, ca, cp, va, vp, server, svc, st, now - idle, now,
                          objs[bi] if bi is not None else None)
        if s is None:
            skip("table_refused")
        else:
            add(s)
    return Installed(got_s, got_b, skipped)
