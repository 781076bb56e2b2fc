"""Sync handshake, back to back (no sockets): keys that match, every refusal, replays of a
recorded conversation, chunked input, and frames of one connection worthless on another."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ha.sync_codec import DecodeError, DecodeErrorReason, Decoder, Encoder, Heartbeat, Hello
from ha.sync_handshake import (
    CHALLENGE_SIZE,
    CONFIRM_SIZE,
    MAGIC,
    NONCE_SIZE,
    PROTOCOL,
    RESPONSE_SIZE,
    Handshake,
    HandshakeError,
    Keys,
    NonceLog,
    describe,
)

KEY = b"the shared secret of the pair"
OTHER_KEY = b"a key of some other pair, or a guess"
E = HandshakeError
N_I, N_R = b"i" * NONCE_SIZE, b"r" * NONCE_SIZE


def initiator(key: bytes = KEY, nonce: bytes = N_I, protocol: int = PROTOCOL) -> Handshake:
    return Handshake(key, nonce, initiator=True, protocol=protocol)


def responder(key: bytes = KEY, nonce: bytes = N_R, seen: NonceLog | None = None,
              protocol: int = PROTOCOL) -> Handshake:
    return Handshake(key, nonce, initiator=False, seen=seen, protocol=protocol)


def converse(i: Handshake, r: Handshake, step: int = 0) -> tuple[bytes, bytes]:
    """Run the two back to back (``step`` > 0: in pieces of that many bytes) until neither has
    anything to send. Returns everything each one sent."""
    sent_i, sent_r = b"", b""
    while True:
        out_i, out_r = i.data_to_send(), r.data_to_send()
        if not out_i and not out_r:
            return sent_i, sent_r
        sent_i, sent_r = sent_i + out_i, sent_r + out_r
        for data, dst in ((out_i, r), (out_r, i)):
            for k in range(0, len(data), step or max(1, len(data))):
                dst.feed(data[k : k + (step or len(data))])


def keys(hs: Handshake) -> Keys:
    assert isinstance(hs.result, Keys), hs.result
    return hs.result


# --- a good handshake ----------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 7, 33], ids=lambda s: f"step{s}")
def test_both_sides_derive_the_same_two_keys(step: int) -> None:
    i, r = initiator(), responder()
    sent_i, sent_r = converse(i, r, step)
    assert len(sent_i) == CHALLENGE_SIZE + CONFIRM_SIZE and len(sent_r) == RESPONSE_SIZE
    ki, kr = keys(i), keys(r)
    assert ki.send == kr.receive and ki.receive == kr.send
    assert ki.send != ki.receive  # one key per direction
    assert KEY not in (ki.send, ki.receive)
    assert i.peer_protocol == r.peer_protocol == PROTOCOL
    assert i.leftover == r.leftover == b""


@given(st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
       st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE),
       st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE))
def test_any_nonces_give_matching_keys_and_another_nonce_other_keys(
        nonce_i: bytes, nonce_r: bytes, other: bytes) -> None:
    i, r = initiator(nonce=nonce_i), responder(nonce=nonce_r)
    converse(i, r)
    assert keys(i).send == keys(r).receive and keys(i).receive == keys(r).send
    for a, b in ((other, nonce_r), (nonce_i, other)):
        if (a, b) == (nonce_i, nonce_r):
            continue
        i2, r2 = initiator(nonce=a), responder(nonce=b)
        converse(i2, r2)
        assert {keys(i2).send, keys(i2).receive}.isdisjoint({keys(i).send, keys(i).receive})


def test_the_wire_starts_with_magic_and_protocol() -> None:
    i = initiator()
    challenge = i.data_to_send()
    assert challenge == MAGIC + bytes([PROTOCOL]) + N_I
    r = responder()
    r.feed(challenge)
    assert r.data_to_send()[: len(MAGIC) + 1] == MAGIC + bytes([PROTOCOL])


# --- refusals ------------------------------------------------------------------------------


def test_another_key_is_refused_by_the_initiator_which_checks_first() -> None:
    i, r = initiator(), responder(key=OTHER_KEY)
    converse(i, r)
    assert i.result is E.PROOF
    assert r.result is None  # the initiator sent no CONFIRM: the responder just waits


def test_a_wrong_confirm_is_refused_by_the_responder() -> None:
    r = responder()
    r.feed(initiator().data_to_send())
    r.data_to_send()
    r.feed(os.urandom(CONFIRM_SIZE))
    assert r.result is E.PROOF
    assert r.data_to_send() == b""


@pytest.mark.parametrize(("data", "why"), [
    (b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n", E.MAGIC),
    (b"\x00", E.MAGIC),
    (b"LBDX", E.MAGIC),
    (b"L\x00", E.MAGIC),
    (bytes(range(256)) * 2, E.MAGIC),
    (MAGIC + bytes([PROTOCOL + 1]) + N_I, E.VERSION),
    (MAGIC + b"\x01", E.VERSION),
    (b"LBDS\x01\x10\x00\x00" + bytes(12), E.VERSION),  # a protocol-1 peer's first frame
    (b"LBDS" + bytes([PROTOCOL]), E.MAGIC),  # a frame of ours with no handshake before it
], ids=["http", "zero", "magic", "prefix", "binary", "protocol+1", "protocol1",
        "protocol1-frame", "frame-no-handshake"])
@pytest.mark.parametrize("role", ["responder", "initiator"])
def test_strangers_are_refused_by_reason(data: bytes, why: HandshakeError, role: str) -> None:
    hs = responder() if role == "responder" else initiator()
    hs.data_to_send()
    hs.feed(data)
    assert hs.result is why
    assert hs.data_to_send() == b""  # nothing more is sent to a refused peer
    hs.feed(MAGIC + bytes([PROTOCOL]))  # ... and nothing after the refusal counts
    assert hs.result is why and hs.leftover == b""


def test_a_refusal_comes_as_soon_as_its_bytes_are_in() -> None:
    r = responder()
    r.feed(b"G")
    assert r.result is E.MAGIC
    r = responder()
    r.feed(MAGIC)
    assert r.result is None
    r.feed(bytes([PROTOCOL + 1]))
    assert r.result is E.VERSION and r.peer_protocol == PROTOCOL + 1


def test_an_initiator_of_another_protocol_is_refused() -> None:
    i, r = initiator(protocol=PROTOCOL + 1), responder()
    converse(i, r)
    assert r.result is E.VERSION and r.peer_protocol == PROTOCOL + 1
    assert i.result is None  # the responder answered nothing; the transport's timeout ends it


def test_a_responder_of_another_protocol_is_refused() -> None:
    i, r = initiator(), responder(protocol=PROTOCOL + 1)
    i.data_to_send()
    r.feed(MAGIC + bytes([PROTOCOL + 1]) + N_I)  # it would speak its own protocol back
    i.feed(r.data_to_send())
    assert i.result is E.VERSION and i.peer_protocol == PROTOCOL + 1


def test_the_version_log_line_names_both_protocols() -> None:
    assert describe(E.VERSION, 1) == f"peer speaks sync protocol 1, this node {PROTOCOL}: refused"
    for why in E:
        assert describe(why, None).endswith("refused")


# --- replays -------------------------------------------------------------------------------


def _recorded() -> tuple[bytes, bytes, bytes, Keys]:
    """A genuine conversation: the CHALLENGE, RESPONSE and CONFIRM, and the initiator's keys."""
    i, r = initiator(), responder()
    challenge = i.data_to_send()
    r.feed(challenge)
    response = r.data_to_send()
    i.feed(response)
    confirm = i.data_to_send()
    r.feed(confirm)
    assert isinstance(r.result, Keys)
    return challenge, response, confirm, keys(i)


def test_a_replayed_challenge_is_refused_by_a_responder_that_saw_its_nonce() -> None:
    seen = NonceLog()
    challenge, *_ = _recorded()
    first = responder(seen=seen, nonce=os.urandom(NONCE_SIZE))
    first.feed(challenge)
    assert len(first.data_to_send()) == RESPONSE_SIZE
    again = responder(seen=seen, nonce=os.urandom(NONCE_SIZE))
    again.feed(challenge)
    assert again.result is E.NONCE_REUSED
    assert again.data_to_send() == b""  # not even a RESPONSE


def test_a_recorded_confirm_fails_against_a_fresh_responder_nonce() -> None:
    """A responder that forgot the nonce (another node, or the log rolled over) still refuses
    a replayed conversation: its own nonce is new, so the old CONFIRM proves nothing."""
    challenge, _response, confirm, _keys = _recorded()
    r = responder(nonce=os.urandom(NONCE_SIZE))
    r.feed(challenge + confirm)
    assert r.result is E.PROOF


def test_a_recorded_response_fails_against_a_fresh_initiator_nonce() -> None:
    _challenge, response, _confirm, _keys = _recorded()
    i = initiator(nonce=os.urandom(NONCE_SIZE))
    i.data_to_send()
    i.feed(response)
    assert i.result is E.PROOF
    assert i.data_to_send() == b""  # no CONFIRM for a responder that proved nothing


def test_frames_of_one_connection_fail_the_mac_on_another() -> None:
    *_, old = _recorded()
    i, r = initiator(nonce=os.urandom(NONCE_SIZE)), responder(nonce=os.urandom(NONCE_SIZE))
    converse(i, r)
    recorded = Encoder(old.send).frame([Hello("lb-a", 1), Heartbeat(5)])
    dec = Decoder(keys(r).receive)
    dec.feed(recorded)
    assert dec.events() == [DecodeError(DecodeErrorReason.MAC, 0)]
    # ... while the same records framed with this connection's key go through
    dec = Decoder(keys(r).receive)
    dec.feed(Encoder(keys(i).send).frame([Hello("lb-a", 1)]))
    assert dec.events() == [Hello("lb-a", 1)]


def test_a_frame_sent_one_way_fails_the_mac_the_other_way() -> None:
    i, r = initiator(), responder()
    converse(i, r)
    dec = Decoder(keys(i).receive)  # what the initiator expects from the responder
    dec.feed(Encoder(keys(i).send).frame([Heartbeat(1)]))  # a reflected frame of its own
    assert dec.events() == [DecodeError(DecodeErrorReason.MAC, 0)]


def test_the_nonce_log_forgets_only_the_oldest() -> None:
    log = NonceLog(size=2)
    assert log.add(b"a") and log.add(b"b") and not log.add(b"a")
    assert log.add(b"c")  # "a" falls out
    assert log.add(b"a") and not log.add(b"c")


# --- chunking and leftovers ----------------------------------------------------------------


def test_a_truncated_handshake_just_waits() -> None:
    i = initiator()
    challenge = i.data_to_send()
    r = responder()
    r.feed(challenge[:-1])
    assert r.result is None and r.data_to_send() == b""
    r.feed(challenge[-1:])
    response = r.data_to_send()
    assert len(response) == RESPONSE_SIZE
    i.feed(response[:-1])
    assert i.result is None and i.data_to_send() == b""
    i.feed(response[-1:])
    confirm = i.data_to_send()
    r.feed(confirm[:-1])
    assert r.result is None
    r.feed(confirm[-1:])
    assert keys(r).receive == keys(i).send


def test_bytes_after_the_handshake_are_left_over() -> None:
    i, r = initiator(), responder()
    r.feed(i.data_to_send())
    response = r.data_to_send()
    i.feed(response + b"early frame")
    confirm = i.data_to_send()
    assert i.leftover == b"early frame" and len(confirm) == CONFIRM_SIZE
    r.feed(confirm + b"first frames")
    assert r.leftover == b"first frames"
    r.feed(b", then more")  # fed after the handshake: kept for the decoder as well
    assert r.leftover == b"first frames, then more"


def test_the_first_frames_in_the_confirms_segment_decode_with_the_new_keys() -> None:
    i, r = initiator(), responder()
    r.feed(i.data_to_send())
    i.feed(r.data_to_send())
    frames = Encoder(keys(i).send).frame([Hello("lb-a", 9)])
    r.feed(i.data_to_send() + frames)
    dec = Decoder(keys(r).receive)
    dec.feed(r.leftover)
    assert dec.events() == [Hello("lb-a", 9)]


def test_a_nonce_of_the_wrong_size_is_our_bug() -> None:
    with pytest.raises(ValueError, match="nonce"):
        Handshake(KEY, b"short", initiator=True)


# --- hostile bytes -------------------------------------------------------------------------


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=10),
       st.booleans())
def test_random_bytes_never_raise_and_never_give_keys(data: bytes, cuts: list[int],
                                                      as_initiator: bool) -> None:
    hs = initiator() if as_initiator else responder()
    hs.data_to_send()
    pos = 0
    for n in [*cuts, len(data)]:
        hs.feed(data[pos : pos + n])
        pos += n
    assert not isinstance(hs.result, Keys)


@given(st.integers(0, CHALLENGE_SIZE + CONFIRM_SIZE - 1), st.integers(0, 255))
def test_one_flipped_byte_of_a_genuine_conversation_is_refused(index: int, xor: int) -> None:
    challenge, _response, confirm, _ = _recorded()
    data = bytearray(challenge + confirm)
    data[index] ^= xor or 1
    r = responder()
    r.feed(bytes(data))
    assert r.result in (E.MAGIC, E.VERSION, E.PROOF)
