"""Sync connection handshake, pure: a challenge-response that proves both ends know the shared
key and derives this connection's own keys (sans-I/O: bytes in, bytes out, one result).

Every sync connection starts with it, before any frame of :mod:`ha.sync_codec`::

    initiator -> responder   CHALLENGE  "LBDH" | protocol u8 | nonce_i (16 random bytes)
    responder -> initiator   RESPONSE   "LBDH" | protocol u8 | nonce_r (16 random bytes)
                                        | HMAC(key, "lbd responder" | nonce_i | nonce_r)
    initiator -> responder   CONFIRM    HMAC(key, "lbd initiator" | nonce_i | nonce_r)

Each side checks the other's proof before it trusts anything. Then both derive two keys,
``HMAC(key, "lbd i->r" | nonce_i | nonce_r)`` for the frames the initiator sends and
``HMAC(key, "lbd r->i" | …)`` for the other direction, and frame everything with them: the
sequence numbers of :mod:`ha.sync_codec` start at 1 on every connection, and with these keys a
frame recorded on one connection fails its MAC on any other. A replayed CHALLENGE gets a fresh
``nonce_r``, so the recorded CONFIRM no longer matches; the responder also refuses a client
nonce it has seen recently (:class:`NonceLog`). A replayed RESPONSE cannot match the
initiator's fresh ``nonce_i``.

A peer of protocol 1 sent sync frames (``"LBDS" | version u8 …``) without any handshake; the
responder recognises that magic and refuses it as :attr:`HandshakeError.VERSION` with the
frame's version as :attr:`Handshake.peer_protocol`, so its log line names both versions.

Rules: nothing here raises on received bytes. The first violation is the :attr:`result`
(a :class:`HandshakeError`) and the connection must be closed; a short read just waits.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from ha.sync_codec import MAGIC as FRAME_MAGIC

MAGIC: Final = b"LBDH"
PROTOCOL: Final = 2
"""Version of the sync protocol (handshake + frames); a peer that speaks another is refused."""
NONCE_SIZE: Final = 16
_PROOF = hashlib.sha256().digest_size
_CHALLENGE = struct.Struct(f"!4sB{NONCE_SIZE}s")
_RESPONSE = struct.Struct(f"!4sB{NONCE_SIZE}s{_PROOF}s")
CHALLENGE_SIZE: Final = _CHALLENGE.size
RESPONSE_SIZE: Final = _RESPONSE.size
CONFIRM_SIZE: Final = _PROOF


class HandshakeError(enum.Enum):
    """Why a handshake was refused; the value is a stable label for metrics and logs."""

    MAGIC = "handshake_magic"
    """Not an lbd sync peer (a plain TCP client, random bytes)."""
    VERSION = "handshake_version"
    """The peer speaks another protocol version."""
    PROOF = "handshake_proof"
    """The peer's proof is wrong: another key, or a replayed conversation."""
    NONCE_REUSED = "handshake_nonce_reused"
    """A client nonce seen recently: a replayed challenge."""


@dataclass(frozen=True, slots=True)
class Keys:
    """This connection's keys, from the point of view of one side."""

    send: bytes
    receive: bytes


class NonceLog:
    """The client nonces a responder has seen lately (bounded: the oldest are forgotten)."""

    def __init__(self, size: int = 4096) -> None:
        self._order: deque[bytes] = deque()
        self._seen: set[bytes] = set()
        self._size = size

    def add(self, nonce: bytes) -> bool:
        """Remember ``nonce``; False when it was already there."""
        if nonce in self._seen:
            return False
        self._seen.add(nonce)
        self._order.append(nonce)
        if len(self._order) > self._size:
            self._seen.discard(self._order.popleft())
        return True


def _mac(key: bytes, label: bytes, nonce_i: bytes, nonce_r: bytes) -> bytes:
    return hmac.new(key, label + nonce_i + nonce_r, hashlib.sha256).digest()


class Handshake:
    """One side of the handshake. Feed received bytes with :meth:`feed`, send what
    :meth:`data_to_send` returns; :attr:`result` becomes :class:`Keys` or a
    :class:`HandshakeError`. Bytes received after the handshake are in :attr:`leftover`
    (the first frames, if the peer sent them in the same segment)."""

    def __init__(self, key: bytes, nonce: bytes, *, initiator: bool,
                 seen: NonceLog | None = None, protocol: int = PROTOCOL) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._key = key
        self._nonce = nonce
        self._initiator = initiator
        self._seen = seen if seen is not None else NonceLog()
        self._protocol = protocol
        self._buf = bytearray()
        self._out = bytearray()
        self._peer_nonce = b""
        self.result: Keys | HandshakeError | None = None
        self.peer_protocol: int | None = None
        self.leftover = b""
        if initiator:
            self._out += _CHALLENGE.pack(MAGIC, protocol, nonce)

    @property
    def done(self) -> bool:
        return self.result is not None

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def feed(self, data: bytes) -> None:
        if self.result is not None:
            if isinstance(self.result, Keys):
                self.leftover += data
            return
        self._buf += data
        if self._initiator:
            self._initiator_step()
        else:
            self._responder_step()

    # ---- the two roles ----------------------------------------------------------------------
    def _initiator_step(self) -> None:
        if not self._header_ok():
            return
        if len(self._buf) < RESPONSE_SIZE:
            return
        _m, _v, nonce_r, proof = _RESPONSE.unpack_from(self._buf)
        nonce_i = self._nonce
        if not hmac.compare_digest(proof, _mac(self._key, b"lbd responder", nonce_i, nonce_r)):
            self._fail(HandshakeError.PROOF)
            return
        self._out += _mac(self._key, b"lbd initiator", nonce_i, nonce_r)
        self._finish(RESPONSE_SIZE, nonce_i, nonce_r)

    def _responder_step(self) -> None:
        if not self._peer_nonce:
            if not self._header_ok():
                return
            if len(self._buf) < CHALLENGE_SIZE:
                return
            nonce_i = _CHALLENGE.unpack_from(self._buf)[2]
            if not self._seen.add(nonce_i):
                self._fail(HandshakeError.NONCE_REUSED)
                return
            self._peer_nonce = nonce_i
            del self._buf[:CHALLENGE_SIZE]
            proof = _mac(self._key, b"lbd responder", nonce_i, self._nonce)
            self._out += _RESPONSE.pack(MAGIC, self._protocol, self._nonce, proof)
        if len(self._buf) < CONFIRM_SIZE:
            return
        want = _mac(self._key, b"lbd initiator", self._peer_nonce, self._nonce)
        if not hmac.compare_digest(bytes(self._buf[:CONFIRM_SIZE]), want):
            self._fail(HandshakeError.PROOF)
            return
        self._finish(CONFIRM_SIZE, self._peer_nonce, self._nonce)

    # ---- helpers ----------------------------------------------------------------------------
    def _header_ok(self) -> bool:
        """Magic and protocol, checked as soon as their bytes are in."""
        n = len(MAGIC)
        head = bytes(self._buf[:n])
        if head == MAGIC[: len(head)]:
            framed = False
        elif head == FRAME_MAGIC[: len(head)]:
            framed = True  # a sync frame with no handshake before it: protocol 1
        else:
            self._fail(HandshakeError.MAGIC)
            return False
        if len(self._buf) > n:
            self.peer_protocol = self._buf[n]
            if self.peer_protocol != self._protocol:
                self._fail(HandshakeError.VERSION)
                return False
            if framed:
                self._fail(HandshakeError.MAGIC)
                return False
        return True

    def _finish(self, used: int, nonce_i: bytes, nonce_r: bytes) -> None:
        i2r = _mac(self._key, b"lbd i->r", nonce_i, nonce_r)
        r2i = _mac(self._key, b"lbd r->i", nonce_i, nonce_r)
        self.result = Keys(i2r, r2i) if self._initiator else Keys(r2i, i2r)
        self.leftover = bytes(self._buf[used:])
        self._buf.clear()

    def _fail(self, why: HandshakeError) -> None:
        self.result = why
        self._buf.clear()
        self._out.clear()


def describe(error: HandshakeError, peer_protocol: int | None,
             protocol: int = PROTOCOL) -> str:
    """One log line's worth on why a handshake was refused."""
    if error is HandshakeError.VERSION:
        return f"peer speaks sync protocol {peer_protocol}, this node {protocol}: refused"
    if error is HandshakeError.PROOF:
        return "handshake proof does not match (another key, or a replayed connection): refused"
    if error is HandshakeError.NONCE_REUSED:
        return "handshake challenge with a nonce seen before (a replayed connection): refused"
    return "not an lbd sync handshake (a plain TCP client or random bytes): refused"
