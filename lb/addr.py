"""IPv4 addresses as the integers the hot path uses, and back to text at the edges."""

from __future__ import annotations

import socket
import struct

_PACK = struct.Struct("!I")


def ip_to_int(text: str) -> int:
    """Dotted quad to a 32-bit integer; raises ValueError on anything else."""
    try:
        packed = socket.inet_aton(text)
    except OSError as exc:
        raise ValueError(f"not an IPv4 address: {text!r}") from exc
    if text.count(".") != 3:
        raise ValueError(f"not an IPv4 address: {text!r}")
    value: int = _PACK.unpack(packed)[0]
    return value


def int_to_ip(value: int) -> str:
    return socket.inet_ntoa(_PACK.pack(value))


def endpoint(addr: int, port: int) -> str:
    """The contract's "ADDR:PORT" form."""
    return f"{int_to_ip(addr)}:{port}"
