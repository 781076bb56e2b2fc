"""sd_notify(3) without libsystemd: tell the service manager what lbd is doing.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET``: a path, or an abstract socket written with a leading ``@``. Without that
variable every call is a no-op, so lbd run by hand or under a test behaves the same.

Sending never blocks and never raises: a full or vanished socket costs one log line (the
first time) and the message, not the daemon. The watchdog interval comes from
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set, must be this process).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "encode", "watchdog_period"]

log = logging.getLogger("lbd.systemd")


def encode(fields: Mapping[str, str | int]) -> bytes:
    """``KEY=VALUE`` lines; a newline inside a value would start a bogus field, so it is
    turned into ``"; "``."""
    return "".join(f"{k}={str(v).replace(chr(10), '; ')}\n" for k, v in fields.items()).encode()


def _address(notify_socket: str) -> str:
    return "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is set for ``pid``.

    A third of ``WATCHDOG_USEC``: sd_watchdog_enabled(3) asks for at most half, and a third
    leaves a loop that runs a little late inside it.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 1e6 / 3


class Notifier:
    """Sends notifications to ``address`` (``$NOTIFY_SOCKET``); does nothing if it is None."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self._warned = False
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message; True if it left."""
        if self.address is None or not fields:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(encode(fields), _address(self.address))
        except OSError as exc:
            self.failed += 1
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
