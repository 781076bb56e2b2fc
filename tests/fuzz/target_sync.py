"""Fuzz target: byte streams through the sync ``Decoder``.

Input: a mode byte, then :func:`tests.fuzz.wire.split` records.

- Mode even: the records are chunks of a raw stream, fed in order (seeds are real
  :class:`Encoder` output, so mutations start from valid, MAC'd frames).
- Mode odd: each record ``type u8 | seq_skew u8 | body`` becomes a frame that this target
  builds and signs with the real key: the fuzzer reaches the body checks behind the MAC.
  ``seq_skew`` 0 gives the right sequence number, anything else a wrong one.

Invariants: ``feed`` never raises; the events are records followed by at most one
:class:`DecodeError`, last; nothing comes after it, whatever is fed next; the counters agree
with the events; the same bytes fed in one piece decode to the same events; every decoded
record survives an :class:`Encoder` round trip.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from hypothesis import strategies as st

from ha.sync_codec import (
    MAGIC,
    VERSION,
    Applied,
    BindingGone,
    BindingRecord,
    DecodeError,
    Decoder,
    Encoder,
    Event,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Record,
    ReplySeen,
    SessionGone,
    SessionRecord,
    SnapshotBegin,
    SnapshotEnd,
    SnapshotRequest,
)
from tests.fuzz import wire
from tests.fuzz.targets import Target

KEY = b"fuzz-sync-key-0123456789abcdef"
_HEADER = struct.Struct("!4sBBHIQ")
TYPES = (1, 2, 3, 4, 5, 16, 17, 18, 19, 20, 21, 22, 23)


def signed_frame(ftype: int, seq: int, body: bytes, key: bytes = KEY) -> bytes:
    """A frame with a valid MAC over whatever header fields and body it is given."""
    header = _HEADER.pack(MAGIC, VERSION, ftype, 0, len(body), seq & 0xFFFFFFFFFFFFFFFF)
    return header + body + hmac.new(key, header + body, hashlib.sha256).digest()


def _chunks(data: bytes) -> list[bytes]:
    mode, records = data[0], wire.split(data[1:])
    if not mode & 1:
        return records
    out = []
    for seq, r in enumerate(records, start=1):
        ftype = r[0] if r else 1
        skew = r[1] if len(r) > 1 else 0
        out.append(signed_frame(ftype, seq + skew, r[2:]))
    return out


def _decode(chunks: list[bytes]) -> tuple[Decoder, list[Event]]:
    dec = Decoder(KEY)
    events: list[Event] = []
    for chunk in chunks:
        dec.feed(chunk)
        events.extend(dec.events())
    return dec, events


def check(data: bytes) -> None:
    if not data:
        return
    chunks = _chunks(data)
    dec, events = _decode(chunks)
    errors = [i for i, e in enumerate(events) if isinstance(e, DecodeError)]
    assert errors in ([], [len(events) - 1]), f"errors at {errors} of {len(events)} events"
    records: list[Record] = [e for e in events if not isinstance(e, DecodeError)]
    assert dec.records == len(records), "records counter disagrees with the events"
    assert dec.sequence == dec.frames, "accepted frames are not numbered 1, 2, ..."
    counts = dec.error_counts
    if errors:
        assert dec.error == events[-1] and sum(counts.values()) == 1, "error not counted once"
        assert dec.error.sequence == dec.sequence
        dec.feed(signed_frame(19, dec.sequence + 1, bytes(8)))
        assert dec.events() == [], "events after the stream was refused"
    else:
        assert dec.error is None and not any(counts.values())

    _, whole = _decode([b"".join(chunks)])
    assert whole == events, "decoding depends on how the bytes were split"

    if records:
        again, replay = _decode([Encoder(KEY).frame(records)])
        assert replay == records and again.error is None, "records do not survive re-encoding"


# --- seeds and generation ----------------------------------------------------------------------

SAMPLE_RECORDS: list[Record] = [
    Hello("lb-a", 0x1234),
    Hello("lb-b", 0x5678, bytes(range(16))),
    SnapshotBegin(),
    SessionRecord(6, 0xC6336443, 40000, 0xC633640A, 80, 0xC612000B, 8080, 2, 1.5),
    SessionRecord(17, 0xC6336443, 40001, 0xC633640A, 53, 0xC612000C, 5353, 0, 0.0),
    BindingRecord(6, 0xC633640A, 80, 0xC6336400, 0xC612000B, 8080, 600.0, 3.25),
    SnapshotEnd(2, 1),
    SessionGone(6, 0xC6336443, 40000, 0xC633640A, 80),
    BindingGone(6, 0xC633640A, 80, 0xC6336400),
    Heartbeat(123456),
    HeartbeatAck(123456),
    ReplySeen(6, 0xC6336443, 40000, 0xC633640A, 80, 0x11),
    Applied(9),
    SnapshotRequest(),
]


def seeds() -> list[bytes]:
    stream = Encoder(KEY).frame(SAMPLE_RECORDS)
    frame_one = Encoder(KEY).frame(SAMPLE_RECORDS[:1])
    out = [b"\x00" + wire.join([stream]), b"\x00" + wire.join([frame_one, stream[:7]])]
    out.append(b"\x00" + wire.join([stream[i : i + 13] for i in range(0, len(stream), 13)]))
    for rec in SAMPLE_RECORDS:
        frame = Encoder(KEY).frame([rec])
        out.append(b"\x01" + wire.join([bytes([frame[5], 0]) + frame[20:-32]]))
    return out


_u32 = st.integers(0, 0xFFFFFFFF)
_u16 = st.integers(0, 0xFFFF)
_secs = st.floats(0, 5e6, allow_nan=False)
_record: st.SearchStrategy[Record] = st.one_of(
    st.builds(SessionRecord, st.sampled_from([6, 17]), _u32, _u16, _u32, _u16, _u32, _u16,
              st.integers(0, 7), _secs),
    st.builds(SessionGone, st.sampled_from([6, 17]), _u32, _u16, _u32, _u16),
    st.builds(BindingRecord, st.sampled_from([6, 17]), _u32, _u16, _u32, _u32, _u16, _secs,
              _secs),
    st.builds(BindingGone, st.sampled_from([6, 17]), _u32, _u16, _u32),
    st.builds(Hello, st.text(min_size=1, max_size=20), st.integers(0, 2**64 - 1),
              st.binary(min_size=16, max_size=16)),
    st.builds(ReplySeen, st.sampled_from([6, 17]), _u32, _u16, _u32, _u16, st.integers(0, 255)),
    st.builds(Applied, st.integers(0, 2**64 - 1)),
    st.just(SnapshotRequest()),
    st.just(SnapshotBegin()),
    st.builds(SnapshotEnd, _u32, _u32),
    st.builds(Heartbeat, st.integers(0, 2**64 - 1)),
    st.builds(HeartbeatAck, st.integers(0, 2**64 - 1)),
)


def _streamed(records: list[Record], cuts: list[int]) -> bytes:
    stream = Encoder(KEY).frame(records)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return b"\x00" + wire.join([stream[a:b] for a, b in
                                zip([0, *points], [*points, len(stream)], strict=True)])


_signed = st.builds(lambda ftype, skew, body: bytes([ftype, skew]) + body,
                    st.sampled_from(TYPES) | st.integers(0, 255),
                    st.just(0) | st.integers(0, 255), st.binary(max_size=80))


def inputs() -> st.SearchStrategy[bytes]:
    raw = st.builds(_streamed, st.lists(_record, min_size=1, max_size=6),
                    st.lists(st.integers(0, 4096), max_size=4))
    signed = st.lists(_signed, min_size=1, max_size=4).map(lambda rs: b"\x01" + wire.join(rs))
    return wire.mutated(raw | signed | st.sampled_from(seeds()), max_edits=3)


TARGET = Target("sync", check, seeds, inputs, max_len=8192)
