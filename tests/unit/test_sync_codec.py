"""Sync stream codec: round trips, batching, chunked feeding, every refusal, hostile bytes."""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha.sync_codec import (
    FRAME_OVERHEAD,
    HEADER_SIZE,
    MAX_BODY,
    SESSION_RECORD_SIZE,
    VERSION,
    Applied,
    BindingGone,
    BindingRecord,
    DecodeError,
    DecodeErrorReason,
    Decoder,
    Encoder,
    Event,
    Heartbeat,
    HeartbeatAck,
    Hello,
    OperatorStateRecord,
    Record,
    SessionGone,
    SessionRecord,
    SnapshotBegin,
    SnapshotEnd,
    SnapshotRequest,
    load_key,
    max_batch,
)

KEY = b"0123456789abcdef-sync-key"
OTHER_KEY = b"fedcba9876543210-sync-key"
R = DecodeErrorReason

SESSION = SessionRecord(6, 0xC6336401, 40000, 0xC633640A, 80, 0xC612000B, 8080, 2, 1.5)
UDP_SESSION = SessionRecord(17, 0xC6336402, 5353, 0xC633640A, 53, 0xC612000C, 53, 0, 0.0)
SESSION_GONE = SessionGone(6, 0xC6336401, 40000, 0xC633640A, 80)
BINDING = BindingRecord(6, 0xC633640A, 80, 0xC6336400, 0xC612000B, 8080, 600.0, 12.345)
BINDING_GONE = BindingGone(6, 0xC633640A, 80, 0xC6336400)
ONE_OF_EACH: list[Record] = [
    Hello("lb-a", 0xDEADBEEF_01020304),
    Hello("lb-b", 7, bytes(range(16))),
    SnapshotBegin(),
    SESSION,
    UDP_SESSION,
    SESSION_GONE,
    BINDING,
    BINDING_GONE,
    SnapshotEnd(2, 1),
    Heartbeat(123_456_789_012),
    HeartbeatAck(123_456_789_012),
    Applied(1),
    Applied(2**64 - 1),
    SnapshotRequest(),
    OperatorStateRecord(b'{"format":1}'),
]


def _decode(data: bytes, key: bytes = KEY) -> list[Event]:
    dec = Decoder(key)
    dec.feed(data)
    return dec.events()


def _raw_frame(ftype: int, seq: int, body: bytes, *, key: bytes = KEY, version: int = VERSION,
               flags: int = 0, magic: bytes = b"LBDS", length: int | None = None) -> bytes:
    """A frame built by hand, with a valid MAC, to reach the checks after the MAC."""
    size = len(body) if length is None else length
    header = struct.pack("!4sBBHIQ", magic, version, ftype, flags, size, seq)
    return header + body + hmac.new(key, header + body, hashlib.sha256).digest()


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("record", ONE_OF_EACH, ids=lambda r: type(r).__name__)
def test_every_record_type_round_trips(record: Record) -> None:
    assert _decode(Encoder(KEY).frame([record])) == [record]


def test_a_mixed_stream_round_trips_in_order() -> None:
    enc = Encoder(KEY)
    data = enc.frame(ONE_OF_EACH)
    dec = Decoder(KEY)
    dec.feed(data)
    assert dec.events() == ONE_OF_EACH
    assert dec.error is None
    # SESSION and UDP_SESSION share a frame; every other record has its own.
    assert dec.frames == enc.sequence == len(ONE_OF_EACH) - 1
    assert dec.sequence == len(ONE_OF_EACH) - 1
    assert dec.records == len(ONE_OF_EACH)


def test_frames_across_calls_continue_the_sequence() -> None:
    enc, dec = Encoder(KEY), Decoder(KEY)
    for record in ONE_OF_EACH:
        dec.feed(enc.frame([record]))
    assert dec.events() == ONE_OF_EACH
    assert enc.sequence == dec.sequence == len(ONE_OF_EACH)


def test_no_records_make_no_bytes() -> None:
    enc = Encoder(KEY)
    assert enc.frame([]) == b""
    assert enc.sequence == 0


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        (1.2345, 1.234),  # rounded to the millisecond
        (0.0004, 0.0),
        (-3.0, 0.0),  # a clock step backwards never wraps around
        (math.nan, 0.0),
        (math.inf, 0xFFFFFFFF / 1000),
        (1e12, 0xFFFFFFFF / 1000),  # clamped to u32 milliseconds (~49.7 days)
    ],
)
def test_durations_travel_as_clamped_milliseconds(sent: float, received: float) -> None:
    session = SessionRecord(6, 1, 2, 3, 4, 5, 6, 2, sent)
    binding = BindingRecord(6, 1, 2, 3, 4, 5, sent, sent)
    out = _decode(Encoder(KEY).frame([session, binding]))
    assert out == [
        SessionRecord(6, 1, 2, 3, 4, 5, 6, 2, received),
        BindingRecord(6, 1, 2, 3, 4, 5, received, received),
    ]


def test_hello_carries_a_non_ascii_node_name() -> None:
    hello = Hello("lb-é" * 52, 0)  # 5 UTF-8 bytes a time: 260 bytes do not fit
    with pytest.raises(ValueError, match="node name"):
        Encoder(KEY).frame([hello])
    hello = Hello("lb-é" * 51, 2**64 - 1)  # 255 bytes
    assert _decode(Encoder(KEY).frame([hello])) == [hello]


# --- batching ------------------------------------------------------------------------------


def test_size_of_a_session_on_the_wire() -> None:
    assert HEADER_SIZE == 20
    assert FRAME_OVERHEAD == 52
    assert SESSION_RECORD_SIZE == 24
    assert max_batch(SessionRecord) == (MAX_BODY - 2) // 24 == 2730
    full = Encoder(KEY).frame([SESSION] * 2730)
    assert len(full) == FRAME_OVERHEAD + 2 + 2730 * 24  # 65574 bytes: ~24.02 per session
    assert len(Encoder(KEY).frame([SESSION])) == FRAME_OVERHEAD + 2 + 24  # 78 alone


@pytest.mark.parametrize("record", [SESSION, SESSION_GONE, BINDING, BINDING_GONE],
                         ids=lambda r: type(r).__name__)
def test_a_batch_over_the_bound_splits_into_full_frames(record: Record) -> None:
    limit = max_batch(type(record))
    records = [record] * (2 * limit + 1)
    enc = Encoder(KEY)
    data = enc.frame(records)
    assert enc.sequence == 3
    dec = Decoder(KEY)
    dec.feed(data)
    assert dec.events() == records
    assert dec.frames == 3
    # every frame's body stays within the bound
    pos, bodies = 0, []
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos + 8)
        assert length <= MAX_BODY
        bodies.append(length)
        pos += FRAME_OVERHEAD + length
    assert pos == len(data)
    assert bodies[0] == bodies[1] > bodies[2]


def test_only_consecutive_records_of_one_type_share_a_frame() -> None:
    records: list[Record] = [SESSION, SESSION, SESSION_GONE, SESSION, Heartbeat(1), Heartbeat(2),
                             BINDING, BINDING, BINDING_GONE]
    enc = Encoder(KEY)
    dec = Decoder(KEY)
    dec.feed(enc.frame(records))
    assert dec.events() == records
    assert enc.sequence == 7  # SS | G | S | H | H | BB | BG


# --- chunked feeding -----------------------------------------------------------------------


def test_one_byte_at_a_time() -> None:
    data = Encoder(KEY).frame(ONE_OF_EACH)
    dec = Decoder(KEY)
    out: list[Event] = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        while (event := dec.next_event()) is not None:
            out.append(event)
    assert out == ONE_OF_EACH
    assert dec.next_event() is None


def test_a_truncated_frame_waits_for_the_rest() -> None:
    data = Encoder(KEY).frame([SESSION])
    dec = Decoder(KEY)
    dec.feed(data[:-1])
    assert dec.events() == []
    assert dec.error is None
    dec.feed(data[-1:])
    assert dec.events() == [SESSION]


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_random_splits_decode_the_same(cuts: list[int]) -> None:
    data = Encoder(KEY).frame(ONE_OF_EACH)
    points = sorted({min(c, len(data)) for c in cuts})
    dec = Decoder(KEY)
    prev = 0
    for p in [*points, len(data)]:
        dec.feed(data[prev:p])
        prev = p
    assert dec.events() == ONE_OF_EACH


# --- refusals ------------------------------------------------------------------------------


def _refusal(data: bytes, key: bytes = KEY) -> tuple[list[Event], Decoder]:
    dec = Decoder(key)
    dec.feed(data)
    return dec.events(), dec


def test_tampered_body_fails_the_mac() -> None:
    data = bytearray(Encoder(KEY).frame([SESSION]))
    data[HEADER_SIZE + 5] ^= 0x01
    events, dec = _refusal(bytes(data))
    assert events == [DecodeError(R.MAC, 0)]
    assert dec.error_counts[R.MAC] == 1


def test_tampered_mac_fails_the_mac() -> None:
    data = bytearray(Encoder(KEY).frame([SESSION]))
    data[-1] ^= 0x80
    assert _refusal(bytes(data))[0] == [DecodeError(R.MAC, 0)]


def test_wrong_key_fails_the_mac() -> None:
    assert _refusal(Encoder(OTHER_KEY).frame([SESSION]))[0] == [DecodeError(R.MAC, 0)]


def test_replayed_frame_fails_the_sequence() -> None:
    enc = Encoder(KEY)
    first = enc.frame([SESSION])
    events, _ = _refusal(first + first)
    assert events == [SESSION, DecodeError(R.SEQUENCE, 1)]


def test_reordered_or_lost_frame_fails_the_sequence() -> None:
    enc = Encoder(KEY)
    a, b, c = enc.frame([Heartbeat(1)]), enc.frame([Heartbeat(2)]), enc.frame([Heartbeat(3)])
    assert _refusal(a + c + b)[0] == [Heartbeat(1), DecodeError(R.SEQUENCE, 1)]
    assert _refusal(b)[0] == [DecodeError(R.SEQUENCE, 0)]  # a stream starts at 1


# Frames with a valid MAC that break a rule the MAC cannot vouch for.
HEARTBEAT_BODY = struct.pack("!Q", 7)
SESSION_BODY = struct.pack("!H", 1) + struct.pack("!BIHIHIHBI", 6, 1, 2, 3, 4, 5, 6, 2, 0)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_raw_frame(19, 1, HEARTBEAT_BODY, magic=b"LBDX"), R.MAGIC),
        (b"GET / HTTP/1.1\r\n\r\n", R.MAGIC),
        (_raw_frame(19, 1, HEARTBEAT_BODY, version=VERSION + 1), R.VERSION),
        (_raw_frame(99, 1, HEARTBEAT_BODY), R.TYPE),
        (_raw_frame(0, 1, HEARTBEAT_BODY), R.TYPE),
        (_raw_frame(19, 1, HEARTBEAT_BODY, flags=1), R.FLAGS),
        (_raw_frame(19, 1, b"", length=MAX_BODY + 1)[:HEADER_SIZE], R.TOO_LONG),
        (_raw_frame(19, 1, HEARTBEAT_BODY + b"\0"), R.LENGTH),
        (_raw_frame(19, 1, b""), R.LENGTH),
        (_raw_frame(17, 1, b"\0"), R.LENGTH),  # snapshot begin has no body
        (_raw_frame(22, 1, b"\0"), R.LENGTH),  # nor has a snapshot request
        (_raw_frame(21, 1, b"\0" * 7), R.LENGTH),  # applied: a u64 sequence
        (_raw_frame(18, 1, b"\0" * 7), R.LENGTH),
        (_raw_frame(16, 1, struct.pack("!Q16s", 1, b"")), R.LENGTH),  # hello without a name
        (_raw_frame(16, 1, struct.pack("!Q16s", 1, b"") + b"\xff\xfe"), R.VALUE),  # not UTF-8
        (_raw_frame(1, 1, b""), R.LENGTH),  # no count
        (_raw_frame(1, 1, struct.pack("!H", 0)), R.LENGTH),  # empty batch
        (_raw_frame(1, 1, SESSION_BODY + b"\0"), R.LENGTH),  # one byte too many
        (_raw_frame(1, 1, SESSION_BODY[:-1]), R.LENGTH),  # one byte too few
        (_raw_frame(1, 1, struct.pack("!H", 2) + SESSION_BODY[2:]), R.LENGTH),  # count too high
        (_raw_frame(2, 1, SESSION_BODY), R.LENGTH),  # session body in a session-gone frame
        (_raw_frame(1, 1, SESSION_BODY[:-5] + b"\x08" + SESSION_BODY[-4:]), R.VALUE),  # state 8
    ],
    ids=lambda v: v.value if isinstance(v, DecodeErrorReason) else "",
)
def test_each_violation_is_one_error(frame: bytes, reason: DecodeErrorReason) -> None:
    events, dec = _refusal(frame)
    assert events == [DecodeError(reason, 0)]
    assert dec.error == DecodeError(reason, 0)
    assert dec.error_counts == {r: int(r is reason) for r in DecodeErrorReason}
    assert dec.frames == dec.records == 0


def test_the_hand_built_frame_is_valid_when_nothing_is_wrong() -> None:
    assert _decode(_raw_frame(1, 1, SESSION_BODY)) == [SessionRecord(6, 1, 2, 3, 4, 5, 6, 2, 0.0)]


def test_an_oversized_length_is_refused_before_its_body_arrives() -> None:
    dec = Decoder(KEY)
    dec.feed(struct.pack("!4sBBHIQ", b"LBDS", VERSION, 1, 0, 0xFFFFFFFF, 1))
    assert dec.events() == [DecodeError(R.TOO_LONG, 0)]


def test_bad_magic_is_refused_on_its_first_byte() -> None:
    dec = Decoder(KEY)
    dec.feed(b"LB")
    assert dec.events() == []
    dec.feed(b"X")
    assert dec.events() == [DecodeError(R.MAGIC, 0)]


def test_nothing_is_decoded_after_the_first_error() -> None:
    enc = Encoder(KEY)
    good = enc.frame([SESSION])
    bad = bytearray(enc.frame([BINDING]))
    bad[HEADER_SIZE + 3] ^= 0xFF
    after = enc.frame([SESSION_GONE])
    dec = Decoder(KEY)
    dec.feed(good + bytes(bad) + after)
    assert dec.events() == [SESSION, DecodeError(R.MAC, 1)]
    dec.feed(after)
    dec.feed(Encoder(KEY).frame([SESSION]))
    assert dec.events() == []
    assert dec.next_event() is None
    assert dec.error == DecodeError(R.MAC, 1)
    assert sum(dec.error_counts.values()) == 1
    assert (dec.frames, dec.records, dec.sequence) == (1, 1, 1)


def test_a_refused_batch_yields_none_of_its_records() -> None:
    bodies = SESSION_BODY[2:] + SESSION_BODY[2:-5] + b"\x09" + SESSION_BODY[-4:]
    events = _decode(_raw_frame(1, 1, struct.pack("!H", 2) + bodies))
    assert events == [DecodeError(R.VALUE, 0)]


# --- encoder and key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        SessionRecord(6, 1, 2, 3, 4, 5, 6, 8, 0.0),  # state 8
        SessionRecord(6, 1, 70000, 3, 4, 5, 6, 2, 0.0),  # port
        SessionRecord(6, 2**32, 2, 3, 4, 5, 6, 2, 0.0),  # address
        BindingGone(256, 1, 2, 3),  # proto
        Hello("", 1),
        Hello("lb-a", -1),
        Hello("lb-a", 1, b"short digest"),
        SnapshotEnd(-1, 0),
        Heartbeat(2**64),
        Applied(-1),
        OperatorStateRecord(b""),
        OperatorStateRecord(bytes(65537)),
    ],
)
def test_the_encoder_refuses_out_of_range_fields_and_keeps_its_sequence(record: Record) -> None:
    enc = Encoder(KEY)
    enc.frame([Heartbeat(1)])
    with pytest.raises(ValueError):
        enc.frame([SESSION, record])
    assert enc.sequence == 1
    dec = Decoder(KEY)
    dec.feed(Encoder(KEY).frame([Heartbeat(1)]) + enc.frame([SESSION]))
    assert dec.events() == [Heartbeat(1), SESSION]


def test_load_key_strips_whitespace() -> None:
    assert load_key(b"  0123456789abcdef\n") == b"0123456789abcdef"


@pytest.mark.parametrize("text", [b"", b"\n", b"  0123456789abcde \n"])
def test_load_key_refuses_a_short_key(text: bytes) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        load_key(text)


# --- properties ----------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
ms = st.integers(0, 0xFFFFFFFF).map(lambda n: n / 1000)

records_st: st.SearchStrategy[Record] = st.one_of(
    st.builds(SessionRecord, u8, u32, u16, u32, u16, u32, u16, st.integers(0, 7), ms),
    st.builds(SessionGone, u8, u32, u16, u32, u16),
    st.builds(BindingRecord, u8, u32, u16, u32, u32, u16, ms, ms),
    st.builds(BindingGone, u8, u32, u16, u32),
    st.builds(Hello, st.text(min_size=1, max_size=60), u64, st.binary(min_size=16,
                                                                      max_size=16)),
    st.just(SnapshotBegin()),
    st.builds(SnapshotEnd, u32, u32),
    st.builds(Heartbeat, u64),
    st.builds(HeartbeatAck, u64),
    st.builds(Applied, u64),
    st.just(SnapshotRequest()),
    st.binary(min_size=1, max_size=64).map(OperatorStateRecord),
)


@given(st.lists(st.lists(records_st, max_size=12), max_size=5))
def test_any_records_round_trip(batches: list[list[Record]]) -> None:
    enc, dec = Encoder(KEY), Decoder(KEY)
    for batch in batches:
        dec.feed(enc.frame(batch))
    assert dec.events() == [r for batch in batches for r in batch]
    assert dec.sequence == enc.sequence


def _check_events(events: list[Event], dec: Decoder) -> None:
    errors = [i for i, e in enumerate(events) if isinstance(e, DecodeError)]
    assert len(errors) <= 1
    if errors:
        assert errors[0] == len(events) - 1
        assert dec.error is events[-1]
        assert sum(dec.error_counts.values()) == 1
    else:
        assert dec.error is None


@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_random_bytes_never_raise(data: bytes, chunks: list[int]) -> None:
    dec = Decoder(KEY)
    pos = 0
    for size in [*chunks, len(data)]:
        dec.feed(data[pos : pos + size])
        pos += size
    _check_events(dec.events(), dec)


VALID = Encoder(KEY).frame(ONE_OF_EACH)


@settings(max_examples=300)
@given(
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), max_size=4),
    cut=st.integers(0, len(VALID)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, len(VALID)), st.binary(min_size=1))),
    chunk=st.integers(1, 97),
)
def test_mutated_streams_never_raise_and_keep_a_valid_prefix(
    flips: list[tuple[int, int]], cut: int, insert: tuple[int, bytes] | None, chunk: int
) -> None:
    data = bytearray(VALID)
    for at, mask in flips:
        data[at] ^= mask
    if insert is not None:
        data[insert[0] : insert[0]] = insert[1]
    data = data[:cut]
    dec = Decoder(KEY)
    for pos in range(0, len(data), chunk):
        dec.feed(bytes(data[pos : pos + chunk]))
    events = dec.events()
    _check_events(events, dec)
    records = [e for e in events if not isinstance(e, DecodeError)]
    assert records == ONE_OF_EACH[: len(records)]  # never a forged or shifted record


def test_the_largest_operator_state_round_trips() -> None:
    big = OperatorStateRecord(bytes(range(256)) * 256)  # MAX_BODY: the largest that fits
    assert _decode(Encoder(KEY).frame([big])) == [big]
