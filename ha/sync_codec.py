"""State-sync stream codec, pure: records in, bytes out; bytes in, records out (sans-I/O).

The two nodes of a pair stream session and persistence state to each other over one TCP
connection per direction of interest. This module only turns records into frames and frames
back into records; the TCP transport feeds it and reads it, and owns sockets, timers and clocks.

Wire format (network byte order)::

    header  20 bytes  magic "LBDS" | version u8 = 2 | type u8 | flags u16 = 0
                      | body length u32 (<= MAX_BODY) | sequence u64
    body    length bytes
    mac     32 bytes  HMAC-SHA256(key, header + body)

``key`` is the connection's own key for that direction, derived by the handshake
(:mod:`ha.sync_handshake`) from the shared key and both sides' fresh nonces, so a frame recorded
on one connection is refused on every other even though sequences restart at 1.

Rules of this module:

- The sequence number counts frames per direction: the first frame is 1, each next one is the
  previous plus one. A receiver accepts nothing else, so a replayed, dropped or reordered frame
  is refused even though its MAC is valid.
- Session, session-gone, binding and binding-gone records are batched: the body is a count u16
  (at least 1) and that many fixed-size records of the frame's type. Every other record type
  travels alone in its frame.
- Durations (``idle``, ``timeout``) are float seconds in the records and unsigned 32-bit
  milliseconds on the wire, clamped to ``0 .. 2**32 - 1`` ms (about 49.7 days); a decoded
  duration is therefore the sent one rounded to the millisecond.
- :class:`Decoder` never raises on received bytes. The first violation becomes one
  :class:`DecodeError` event and the decoder refuses everything after it: a corrupted TCP stream
  cannot be resynchronised, the transport must drop the connection. A truncated frame just waits
  for more bytes. Checks run in wire order: magic, version, type, flags and length as soon as the
  header is complete (so an oversized length is refused before anything is buffered for it),
  then the MAC, then the sequence number, then the body.
- :class:`Encoder` raises :class:`ValueError` on out-of-range fields, which is our own bug; it
  then emits nothing and does not advance its sequence number.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

MAGIC = b"LBDS"
VERSION = 2
MAX_BODY = 65536
"""Largest body accepted or produced, in bytes."""
MIN_KEY = 16
"""Shortest shared key accepted, in bytes."""
MAX_NODE_NAME = 255
"""Longest node name a :class:`Hello` carries, in UTF-8 bytes."""
MAX_TCP_STATE = 7
"""Highest ``lb.sessions.TcpState`` value (LAST_ACK)."""

_HEADER = struct.Struct("!4sBBHIQ")  # magic, version, type, flags, body length, sequence
_MAC_SIZE = hashlib.sha256().digest_size
_COUNT = struct.Struct("!H")
_MAX_COUNT = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

HEADER_SIZE = _HEADER.size
FRAME_OVERHEAD = HEADER_SIZE + _MAC_SIZE
"""Bytes every frame adds around its body (header and MAC)."""


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A live session, as the sender's session table holds it. Addresses are IPv4 ints."""

    proto: int
    caddr: int
    cport: int
    vaddr: int
    vport: int
    raddr: int
    rport: int
    state: int
    """``lb.sessions.TcpState`` value, 0..7; 0 (NONE) for every non-TCP session."""
    idle: float
    """Seconds since the session last saw a packet."""


@dataclass(frozen=True, slots=True)
class SessionGone:
    """A session was removed; its forward key (client -> virtual server)."""

    proto: int
    caddr: int
    cport: int
    vaddr: int
    vport: int


@dataclass(frozen=True, slots=True)
class ReplySeen:
    """Sent to a session's owner by the node that forwards its replies (the servers'
    gateway holder): the server's side of the flow is alive, and ``flags`` are the TCP flags
    of a reply that moves the state (FIN, RST), or 0 for a plain refresh."""

    proto: int
    caddr: int
    cport: int
    vaddr: int
    vport: int
    flags: int


@dataclass(frozen=True, slots=True)
class BindingRecord:
    """A client-IP persistence binding: ``client_net`` on virtual server (proto, vaddr, vport)
    goes to real server ``raddr:rport``."""

    proto: int
    vaddr: int
    vport: int
    client_net: int
    raddr: int
    rport: int
    timeout: float
    """Persistence timeout, seconds."""
    idle: float
    """Seconds since the binding was last used."""


@dataclass(frozen=True, slots=True)
class BindingGone:
    """A persistence binding was removed."""

    proto: int
    vaddr: int
    vport: int
    client_net: int


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a connection: who the sender is, which boot of it, and a digest of its
    virtual servers and pools (``Config.service_digest``: a mismatch is shown, not refused)."""

    node: str
    boot_id: int
    config_digest: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    """A full dump of the sender's tables follows."""


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    """End of the full dump, with the number of records it held."""

    sessions: int
    bindings: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness probe; the receiver echoes ``sent_at_ms`` in a :class:`HeartbeatAck`."""

    sent_at_ms: int
    """The sender's monotonic clock, milliseconds."""


@dataclass(frozen=True, slots=True)
class Applied:
    """Sent back by the receiver: every frame up to ``sequence`` of this connection has been
    applied (batched: one per read of the stream)."""

    sequence: int


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Sent back by the receiver: send me a full snapshot of your instances."""


@dataclass(frozen=True, slots=True)
class OperatorStateRecord:
    """The sender's operator state (drain, disable, weights, servers added or removed), as
    :meth:`lb.opstate.OperatorState.to_bytes` encodes its shared part: opaque here, 1 to
    :data:`MAX_BODY` bytes. Sent after the snapshot and after every operator change."""

    state: bytes


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    """Echo of a :class:`Heartbeat`: the sender of the heartbeat learns the round-trip lag."""

    sent_at_ms: int


Record: TypeAlias = (
    SessionRecord
    | SessionGone
    | ReplySeen
    | BindingRecord
    | BindingGone
    | Hello
    | SnapshotBegin
    | SnapshotEnd
    | Heartbeat
    | HeartbeatAck
    | Applied
    | SnapshotRequest
    | OperatorStateRecord
)


class DecodeErrorReason(enum.Enum):
    """Why the stream was refused. The value is a stable label for metrics and logs."""

    MAGIC = "magic"
    """The frame does not start with ``LBDS``."""
    VERSION = "version"
    """Version is not :data:`VERSION`."""
    TYPE = "type"
    """Unknown frame type."""
    FLAGS = "flags"
    """Reserved flags are not zero."""
    TOO_LONG = "too_long"
    """Body length over :data:`MAX_BODY`."""
    MAC = "mac"
    """HMAC-SHA256 does not match: wrong key or altered bytes."""
    SEQUENCE = "sequence"
    """Sequence number is not the previous one plus one: replay, loss or reorder."""
    LENGTH = "length"
    """Body length does not fit the frame type or the record count."""
    VALUE = "value"
    """A field is out of range (TCP state, node name not UTF-8)."""


@dataclass(frozen=True, slots=True)
class DecodeError:
    """The stream is broken at this point; nothing after it is decoded."""

    reason: DecodeErrorReason
    sequence: int
    """Sequence number of the last frame accepted before the error (0: none)."""


Event: TypeAlias = Record | DecodeError


# --- record layouts -----------------------------------------------------------------------


class _T(enum.IntEnum):
    SESSION = 1
    SESSION_GONE = 2
    BINDING = 3
    BINDING_GONE = 4
    REPLY_SEEN = 5
    HELLO = 16
    SNAPSHOT_BEGIN = 17
    SNAPSHOT_END = 18
    HEARTBEAT = 19
    HEARTBEAT_ACK = 20
    APPLIED = 21
    SNAPSHOT_REQUEST = 22
    OPERATOR_STATE = 23


_SESSION = struct.Struct("!BIHIHIHBI")  # proto caddr cport vaddr vport raddr rport state idle_ms
_SESSION_GONE = struct.Struct("!BIHIH")  # proto caddr cport vaddr vport
_BINDING = struct.Struct("!BIHIIHII")  # proto vaddr vport client_net raddr rport timeout idle
_BINDING_GONE = struct.Struct("!BIHI")  # proto vaddr vport client_net
_REPLY_SEEN = struct.Struct("!BIHIHB")  # proto caddr cport vaddr vport tcp_flags
_HELLO = struct.Struct("!Q16s")  # boot_id, config digest, then the node name in UTF-8
_SNAPSHOT_END = struct.Struct("!II")
_HEARTBEAT = struct.Struct("!Q")

_BATCHED: dict[type[Record], tuple[_T, struct.Struct]] = {
    SessionRecord: (_T.SESSION, _SESSION),
    SessionGone: (_T.SESSION_GONE, _SESSION_GONE),
    BindingRecord: (_T.BINDING, _BINDING),
    BindingGone: (_T.BINDING_GONE, _BINDING_GONE),
    ReplySeen: (_T.REPLY_SEEN, _REPLY_SEEN),
}
_BATCH_STRUCT: dict[int, struct.Struct] = {int(t): s for t, s in _BATCHED.values()}

SESSION_RECORD_SIZE = _SESSION.size
"""Bytes of one :class:`SessionRecord` inside a batch."""


def max_batch(record_type: type[Record]) -> int:
    """How many records of a batched type fit in one frame."""
    size = _BATCHED[record_type][1].size
    return min(_MAX_COUNT, (MAX_BODY - _COUNT.size) // size)


def _ms(seconds: float) -> int:
    """Float seconds to u32 milliseconds, clamped (NaN counts as 0)."""
    if math.isnan(seconds):
        return 0
    if seconds >= _U32 / 1000:
        return _U32
    return max(0, round(seconds * 1000))


def _pack_record(rec: Record) -> bytes:
    match rec:
        case SessionRecord():
            if not 0 <= rec.state <= MAX_TCP_STATE:
                raise ValueError(f"TCP state {rec.state} out of range 0..{MAX_TCP_STATE}")
            return _SESSION.pack(
                rec.proto, rec.caddr, rec.cport, rec.vaddr, rec.vport,
                rec.raddr, rec.rport, rec.state, _ms(rec.idle),
            )
        case SessionGone():
            return _SESSION_GONE.pack(rec.proto, rec.caddr, rec.cport, rec.vaddr, rec.vport)
        case BindingRecord():
            return _BINDING.pack(
                rec.proto, rec.vaddr, rec.vport, rec.client_net,
                rec.raddr, rec.rport, _ms(rec.timeout), _ms(rec.idle),
            )
        case BindingGone():
            return _BINDING_GONE.pack(rec.proto, rec.vaddr, rec.vport, rec.client_net)
        case ReplySeen():
            return _REPLY_SEEN.pack(rec.proto, rec.caddr, rec.cport, rec.vaddr, rec.vport,
                                    rec.flags)
        case Hello():
            name = rec.node.encode()
            if not 1 <= len(name) <= MAX_NODE_NAME:
                raise ValueError(f"node name must be 1..{MAX_NODE_NAME} UTF-8 bytes")
            if len(rec.config_digest) != 16:
                raise ValueError("config digest must be 16 bytes")
            return _HELLO.pack(rec.boot_id, rec.config_digest) + name
        case SnapshotBegin():
            return b""
        case SnapshotEnd():
            return _SNAPSHOT_END.pack(rec.sessions, rec.bindings)
        case Heartbeat() | HeartbeatAck():
            return _HEARTBEAT.pack(rec.sent_at_ms)
        case Applied():
            return _HEARTBEAT.pack(rec.sequence)
        case SnapshotRequest():
            return b""
        case OperatorStateRecord():
            if not 1 <= len(rec.state) <= MAX_BODY:
                raise ValueError(f"operator state must be 1..{MAX_BODY} bytes")
            return rec.state
    raise TypeError(f"not a sync record: {rec!r}")  # pragma: no cover - typed callers


_SINGLE_TYPE: dict[type[Record], _T] = {
    Hello: _T.HELLO,
    SnapshotBegin: _T.SNAPSHOT_BEGIN,
    SnapshotEnd: _T.SNAPSHOT_END,
    Heartbeat: _T.HEARTBEAT,
    HeartbeatAck: _T.HEARTBEAT_ACK,
    Applied: _T.APPLIED,
    SnapshotRequest: _T.SNAPSHOT_REQUEST,
    OperatorStateRecord: _T.OPERATOR_STATE,
}


def _unpack_single(ftype: int, body: bytes) -> Record | DecodeErrorReason:
    """Body of a one-record frame to its record, or why it is refused."""
    n = len(body)
    if ftype == _T.HELLO:
        if not _HELLO.size + 1 <= n <= _HELLO.size + MAX_NODE_NAME:
            return DecodeErrorReason.LENGTH
        try:
            node = body[_HELLO.size :].decode()
        except UnicodeDecodeError:
            return DecodeErrorReason.VALUE
        boot_id, digest = _HELLO.unpack_from(body)
        return Hello(node, boot_id, digest)
    if ftype == _T.SNAPSHOT_BEGIN:
        return SnapshotBegin() if n == 0 else DecodeErrorReason.LENGTH
    if ftype == _T.SNAPSHOT_REQUEST:
        return SnapshotRequest() if n == 0 else DecodeErrorReason.LENGTH
    if ftype == _T.OPERATOR_STATE:
        return OperatorStateRecord(bytes(body)) if n else DecodeErrorReason.LENGTH
    if ftype == _T.SNAPSHOT_END:
        if n != _SNAPSHOT_END.size:
            return DecodeErrorReason.LENGTH
        return SnapshotEnd(*_SNAPSHOT_END.unpack(body))
    if n != _HEARTBEAT.size:
        return DecodeErrorReason.LENGTH
    (ms,) = _HEARTBEAT.unpack(body)
    if ftype == _T.APPLIED:
        return Applied(ms)
    return Heartbeat(ms) if ftype == _T.HEARTBEAT else HeartbeatAck(ms)


def _unpack_batch(ftype: int, body: bytes) -> list[Record] | DecodeErrorReason:
    """Body of a batched frame to its records, or why it is refused."""
    layout = _BATCH_STRUCT[ftype]
    if len(body) < _COUNT.size:
        return DecodeErrorReason.LENGTH
    (count,) = _COUNT.unpack_from(body)
    if count == 0 or len(body) != _COUNT.size + count * layout.size:
        return DecodeErrorReason.LENGTH
    fields = layout.iter_unpack(memoryview(body)[_COUNT.size :])
    if ftype == _T.SESSION:
        out: list[Record] = []
        for p, ca, cp, va, vp, ra, rp, st, idle in fields:
            if st > MAX_TCP_STATE:
                return DecodeErrorReason.VALUE
            out.append(SessionRecord(p, ca, cp, va, vp, ra, rp, st, idle / 1000))
        return out
    if ftype == _T.SESSION_GONE:
        return [SessionGone(*f) for f in fields]
    if ftype == _T.BINDING:
        return [
            BindingRecord(p, va, vp, cn, ra, rp, to / 1000, idle / 1000)
            for p, va, vp, cn, ra, rp, to, idle in fields
        ]
    if ftype == _T.REPLY_SEEN:
        return [ReplySeen(*f) for f in fields]
    return [BindingGone(*f) for f in fields]


# --- key ----------------------------------------------------------------------------------


def load_key(text: bytes) -> bytes:
    """The shared key from the key file's contents, surrounding whitespace stripped.

    Raises :class:`ValueError` if fewer than :data:`MIN_KEY` bytes remain.
    """
    key = text.strip()
    if len(key) < MIN_KEY:
        raise ValueError(f"sync key is {len(key)} bytes; at least {MIN_KEY} are required")
    return key


# --- encoder ------------------------------------------------------------------------------


class Encoder:
    """Frames records for one direction of the stream; keeps the sequence number."""

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._seq = 0

    @property
    def sequence(self) -> int:
        """Sequence number of the last frame produced (0: none yet)."""
        return self._seq

    def frame(self, records: Sequence[Record]) -> bytes:
        """Frame ``records`` in order: each run of consecutive batched records of one type goes
        into as few frames as :data:`MAX_BODY` allows; every other record gets its own frame.
        Returns the frames concatenated (``b""`` for no records)."""
        out: list[bytes] = []
        seq = self._seq
        i, n = 0, len(records)
        try:
            while i < n:
                rtype = type(records[i])
                batched = _BATCHED.get(rtype)
                if batched is None:
                    seq += 1
                    body = _pack_record(records[i])
                    out.append(self._frame(_SINGLE_TYPE[rtype], seq, body))
                    i += 1
                    continue
                ftype, _layout = batched
                limit = max_batch(rtype)
                j = i
                while j < n and j - i < limit and type(records[j]) is rtype:
                    j += 1
                seq += 1
                parts = [_COUNT.pack(j - i)]
                parts.extend(_pack_record(records[k]) for k in range(i, j))
                out.append(self._frame(ftype, seq, b"".join(parts)))
                i = j
        except struct.error as exc:
            raise ValueError(f"sync record field out of range: {exc}") from exc
        self._seq = seq
        return b"".join(out)

    def _frame(self, ftype: _T, seq: int, body: bytes) -> bytes:
        if seq > _U64:
            raise ValueError("sync sequence number exhausted")
        header = _HEADER.pack(MAGIC, VERSION, ftype, 0, len(body), seq)
        mac = self._mac.copy()
        mac.update(header)
        mac.update(body)
        return header + body + mac.digest()


# --- decoder ------------------------------------------------------------------------------


class Decoder:
    """Incremental decoder for one direction of the stream: :meth:`feed` bytes as they arrive,
    pull events with :meth:`next_event` or :meth:`events`."""

    _KNOWN_TYPES: ClassVar[frozenset[int]] = frozenset(int(t) for t in _T)

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._buf = bytearray()
        self._events: deque[Event] = deque()
        self._seq = 0
        self._error: DecodeError | None = None
        self._error_counts = dict.fromkeys(DecodeErrorReason, 0)
        self.frames = 0
        """Frames accepted."""
        self.records = 0
        """Records decoded."""

    @property
    def error(self) -> DecodeError | None:
        """The error that stopped the stream, if any."""
        return self._error

    @property
    def sequence(self) -> int:
        """Sequence number of the last frame accepted (0: none yet)."""
        return self._seq

    @property
    def error_counts(self) -> dict[DecodeErrorReason, int]:
        """Errors seen, per reason (a copy; at most one error per decoder)."""
        return dict(self._error_counts)

    def feed(self, data: bytes) -> None:
        """Take bytes received from the stream. Ignored once the stream is refused."""
        if self._error is not None:
            return
        self._buf += data
        self._parse()

    def next_event(self) -> Event | None:
        """The next decoded record or error, or ``None`` if more bytes are needed."""
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """All events decoded so far, in order."""
        out = list(self._events)
        self._events.clear()
        return out

    def _fail(self, reason: DecodeErrorReason) -> None:
        self._error = DecodeError(reason, self._seq)
        self._error_counts[reason] += 1
        self._events.append(self._error)
        self._buf.clear()

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while True:
            avail = len(buf) - pos
            head = bytes(buf[pos : pos + min(avail, len(MAGIC))])
            if head != MAGIC[: len(head)]:
                self._fail(DecodeErrorReason.MAGIC)
                return
            if avail < HEADER_SIZE:
                break
            _magic, version, ftype, flags, length, seq = _HEADER.unpack_from(buf, pos)
            if version != VERSION:
                self._fail(DecodeErrorReason.VERSION)
                return
            if ftype not in self._KNOWN_TYPES:
                self._fail(DecodeErrorReason.TYPE)
                return
            if flags != 0:
                self._fail(DecodeErrorReason.FLAGS)
                return
            if length > MAX_BODY:
                self._fail(DecodeErrorReason.TOO_LONG)
                return
            end = pos + HEADER_SIZE + length
            if len(buf) < end + _MAC_SIZE:
                break
            body = bytes(buf[pos + HEADER_SIZE : end])
            mac = self._mac.copy()
            mac.update(bytes(buf[pos : pos + HEADER_SIZE]))
            mac.update(body)
            if not hmac.compare_digest(mac.digest(), bytes(buf[end : end + _MAC_SIZE])):
                self._fail(DecodeErrorReason.MAC)
                return
            if seq != self._seq + 1:
                self._fail(DecodeErrorReason.SEQUENCE)
                return
            decoded: Record | list[Record] | DecodeErrorReason
            if ftype in _BATCH_STRUCT:
                decoded = _unpack_batch(ftype, body)
            else:
                decoded = _unpack_single(ftype, body)
            if isinstance(decoded, DecodeErrorReason):
                self._fail(decoded)
                return
            self._seq = seq
            self.frames += 1
            if isinstance(decoded, list):
                self._events.extend(decoded)
                self.records += len(decoded)
            else:
                self._events.append(decoded)
                self.records += 1
            pos = end + _MAC_SIZE
        del buf[:pos]
