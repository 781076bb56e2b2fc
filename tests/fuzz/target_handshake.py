"""Fuzz target: byte streams into one side of the sync ``Handshake``.

Input: a mode byte, then :func:`tests.fuzz.wire.split` records, fed in order as the chunks of
what the peer sent. Mode bit 0 picks the side: 0 a responder (the peer is an initiator: its
CHALLENGE, then CONFIRM), 1 an initiator (the peer answers a RESPONSE). Both sides use fixed
nonces, so the seeds (a genuine peer's bytes, whole, chunked, with frames behind them) reach
the end of the handshake and mutations start from there.

Invariants: ``feed`` never raises; the result is ``None``, a :class:`HandshakeError` or
:class:`Keys`, and it is :class:`Keys` only when the input starts with the genuine peer's
bytes (then the keys are the genuine ones and everything after those bytes is the leftover);
an initiator sends a prefix of what it sends in the genuine conversation, a responder at most
one RESPONSE (the genuine one only to the genuine CHALLENGE), and nothing after a refusal;
the same bytes in one piece give the same result, leftover and (unless refused) output; a
responder that accepted a CHALLENGE refuses the same bytes again with ``NONCE_REUSED`` when
it shares its nonce log (a replayed connection).
"""

from __future__ import annotations

from hypothesis import strategies as st

from ha.sync_codec import Encoder, Heartbeat, Hello
from ha.sync_handshake import (
    CHALLENGE_SIZE,
    NONCE_SIZE,
    RESPONSE_SIZE,
    Handshake,
    HandshakeError,
    Keys,
    NonceLog,
)
from tests.fuzz import wire
from tests.fuzz.targets import Target

KEY = b"fuzz-handshake-key-0123456789"
N_I, N_R = bytes(range(NONCE_SIZE)), bytes(range(100, 100 + NONCE_SIZE))


def _genuine() -> tuple[bytes, bytes, bytes, Keys, Keys]:
    """CHALLENGE, RESPONSE, CONFIRM of the fixed-nonce conversation, and both sides' keys."""
    i = Handshake(KEY, N_I, initiator=True)
    r = Handshake(KEY, N_R, initiator=False)
    challenge = i.data_to_send()
    r.feed(challenge)
    response = r.data_to_send()
    i.feed(response)
    confirm = i.data_to_send()
    r.feed(confirm)
    assert isinstance(i.result, Keys) and isinstance(r.result, Keys)
    return challenge, response, confirm, i.result, r.result


CHALLENGE, RESPONSE, CONFIRM, KEYS_I, KEYS_R = _genuine()
RESPONSE_HEAD = RESPONSE[: 5 + NONCE_SIZE]  # magic, protocol, the responder's nonce


def _run(initiator: bool, chunks: list[bytes], seen: NonceLog) -> tuple[Handshake, bytes]:
    hs = Handshake(KEY, N_I if initiator else N_R, initiator=initiator, seen=seen)
    sent = hs.data_to_send()
    for chunk in chunks:
        hs.feed(chunk)
        out = hs.data_to_send()
        assert not (out and isinstance(hs.result, HandshakeError)), "sent after a refusal"
        sent += out
    return hs, sent


def check(data: bytes) -> None:
    if not data:
        return
    initiator = bool(data[0] & 1)
    chunks = wire.split(data[1:])
    whole = b"".join(chunks)
    hs, sent = _run(initiator, chunks, NonceLog())
    genuine_in = RESPONSE if initiator else CHALLENGE + CONFIRM
    genuine_out = CHALLENGE + CONFIRM if initiator else RESPONSE
    assert hs.result is None or isinstance(hs.result, Keys | HandshakeError)
    if initiator:  # CHALLENGE, and CONFIRM only to the genuine RESPONSE
        assert genuine_out.startswith(sent), "sent something the genuine side would not"
    elif sent:  # a RESPONSE to whatever nonce the CHALLENGE carried
        assert len(sent) == RESPONSE_SIZE and sent[: len(RESPONSE_HEAD)] == RESPONSE_HEAD
        assert (sent == RESPONSE) == (whole[: len(CHALLENGE)] == CHALLENGE)
    if isinstance(hs.result, Keys):
        assert whole.startswith(genuine_in), "keys without the genuine peer's bytes"
        assert hs.result == (KEYS_I if initiator else KEYS_R)
        assert hs.leftover == whole[len(genuine_in) :]
        assert sent == genuine_out
    else:
        assert hs.leftover == b""

    one, sent_one = _run(initiator, [whole], NonceLog())
    assert (one.result, one.leftover) == (hs.result, hs.leftover), \
        "the handshake depends on how the bytes were split"
    if not isinstance(hs.result, HandshakeError):  # a refusal drops what was not sent yet
        assert sent_one == sent, "the output depends on how the bytes were split"

    if not initiator and len(sent) > 0:  # the CHALLENGE was accepted: replay it
        seen = NonceLog()
        _run(False, [whole], seen)
        again, sent_again = _run(False, [whole], seen)
        assert again.result is HandshakeError.NONCE_REUSED and sent_again == b""
        assert len(whole) >= CHALLENGE_SIZE


# --- seeds and generation ----------------------------------------------------------------------

def _frames() -> tuple[bytes, bytes]:
    """Frames each side would send first after the handshake."""
    return (Encoder(KEYS_I.send).frame([Hello("lb-a", 1), Heartbeat(7)]),
            Encoder(KEYS_R.send).frame([Heartbeat(8)]))


def seeds() -> list[bytes]:
    from_i, from_r = _frames()
    peer_of_responder = CHALLENGE + CONFIRM
    return [
        b"\x00" + wire.join([CHALLENGE, CONFIRM]),
        b"\x00" + wire.join([peer_of_responder + from_i]),
        b"\x00" + wire.join([peer_of_responder[k : k + 5]
                             for k in range(0, len(peer_of_responder), 5)]),
        b"\x00" + wire.join([CHALLENGE[:-1]]),
        b"\x00" + wire.join([b"GET / HTTP/1.1\r\n\r\n"]),
        b"\x00" + wire.join([b"LBDS\x01\x10\x00\x00" + bytes(12)]),
        b"\x01" + wire.join([RESPONSE]),
        b"\x01" + wire.join([RESPONSE + from_r]),
        b"\x01" + wire.join([RESPONSE[:9], RESPONSE[9:]]),
    ]


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


def inputs() -> st.SearchStrategy[bytes]:
    from_i, from_r = _frames()
    streams = st.sampled_from([
        (0, CHALLENGE + CONFIRM), (0, CHALLENGE + CONFIRM + from_i), (0, CHALLENGE),
        (1, RESPONSE), (1, RESPONSE + from_r),
    ])
    genuine = st.builds(lambda s, cuts: bytes([s[0]]) + wire.join(_cut(s[1], cuts)),
                        streams, st.lists(st.integers(0, 200), max_size=5))
    raw = st.builds(lambda mode, chunks: bytes([mode]) + wire.join(chunks),
                    st.integers(0, 255), st.lists(st.binary(max_size=120), max_size=4))
    return wire.mutated(genuine | raw | st.sampled_from(seeds()), max_edits=3)


TARGET = Target("handshake", check, seeds, inputs, max_len=1024,
                tokens=lambda: [b"LBDH", b"LBDS", b"\x02"])
