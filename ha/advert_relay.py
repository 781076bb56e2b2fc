"""A master's adverts keep their cadence when lbd's interpreter cannot run for a moment.

The VRRP thread (``ha.vrrp_thread``) sends each advert, but it needs the GIL to do so, and
the thread holding the GIL may be a cyclic collection or the data plane preempted on a busy
box: the 60 s saturation bench saw the master's timer run 28-70 ms late, once in ~2000
adverts, at a 30 ms interval (issue 10 item 2 wants every gap under 1.5 intervals). A
thread cannot fix that; a process can. The **relay** is a small child process, with no
GIL in common with lbd, that holds a duplicate of each VRRP socket. After each advert a
master sends, the runner tells the relay (one datagram on a socketpair); if the next one
is not there :data:`FILL_AFTER` intervals later, the relay sends a copy of the last one
itself — at most :data:`MAX_FILLS` in a row, after which it falls silent, so that a master
that is really stuck (not paused for a few tens of ms) still loses its role to the backup,
only ``MAX_FILLS`` intervals later than without the relay. A master leaving MASTER, a
priority-0 advert (shutdown) or a closed socket stops the copies at once; the relay dies
with lbd (``PR_SET_PDEATHSIG`` and the socketpair's end-of-file), so a SIGKILLed master
falls silent as before. A relay that dies or was never started changes nothing else: the
runner sends its own adverts either way.

Pure part: :class:`FillIn`, the schedule of copies, fed ``now``. Shell: :class:`AdvertRelay`
(lbd's side) and :func:`main` (the child: ``python -m ha.advert_relay FD``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Final

__all__ = ["FILL_AFTER", "MAX_FILLS", "AdvertRelay", "FillIn", "RelayLink", "main"]

FILL_AFTER: Final = 1.25
"""A copy is sent this many intervals after the last advert (the runner's or a copy)."""
MAX_FILLS: Final = 3
"""Copies in a row, at most, before the relay waits for the runner again."""

log = logging.getLogger("lbd.vrrp")

# --- the pure part --------------------------------------------------------------------------

Key = tuple[int, int, int]  # (socket id, vrid, destination)


@dataclass(slots=True)
class _Advert:
    payload: bytes
    src: int
    interval: float
    due: float
    fills: int = 0


class FillIn:
    """Which adverts to copy when: :meth:`sent` after each advert the runner sent, then
    :meth:`take_due` hands back the copies due at ``now``."""

    def __init__(self, fill_after: float = FILL_AFTER, max_fills: int = MAX_FILLS) -> None:
        self.fill_after = fill_after
        self.max_fills = max_fills
        self._adverts: dict[Key, _Advert] = {}

    def __len__(self) -> int:
        return len(self._adverts)

    def sent(self, key: Key, payload: bytes, src: int, interval: float, now: float) -> None:
        """The runner sent ``payload`` to ``key``'s destination at ``now``."""
        self._adverts[key] = _Advert(payload, src, interval, now + self.fill_after * interval)

    def stop(self, sock: int, vrid: int | None = None) -> None:
        """No more copies for this socket (and virtual router, if given)."""
        for key in [k for k in self._adverts if k[0] == sock and vrid in (None, k[1])]:
            del self._adverts[key]

    def due(self) -> float | None:
        """When the next copy is due, if any."""
        return min((a.due for a in self._adverts.values()), default=None)

    def take_due(self, now: float) -> list[tuple[Key, bytes, int]]:
        """The copies to send now: (key, payload, source address). An advert copied
        ``max_fills`` times in a row is forgotten until the runner sends it again."""
        out: list[tuple[Key, bytes, int]] = []
        for key, adv in list(self._adverts.items()):
            if adv.due > now:
                continue
            out.append((key, adv.payload, adv.src))
            adv.fills += 1
            if adv.fills >= self.max_fills:
                del self._adverts[key]
            else:
                adv.due = now + self.fill_after * adv.interval
        return out


# --- messages on the socketpair (SOCK_SEQPACKET: one message per datagram) -------------------
# lbd → relay: b"S" + sock id (u32), with the socket's fd attached: a socket to copy through
#              b"A" + sock id, vrid (u8), ifindex (u32), interval (f64), src, dst (u32) + payload
#              b"X" + sock id, vrid (u8; 0 = every vrid of the socket): stop copying
#              b"C" + sock id: the socket is closed
# relay → lbd: b"F" + sock id, vrid: one copy sent

_ADVERT = struct.Struct("!IBIdII")
_STOP = struct.Struct("!IB")
_ID = struct.Struct("!I")


# --- lbd's side -----------------------------------------------------------------------------

class AdvertRelay:
    """The child process and lbd's end of its socketpair. Every method is non-blocking and
    never raises: a relay that is gone is logged once and ignored (``alive`` False).

    Used from the VRRP thread only; ``copies`` counts the copies the relay reported, by
    (socket id, vrid), read by the runner's metrics.
    """

    def __init__(self) -> None:
        self.alive = False
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._next_id = 1
        self.copies: dict[tuple[int, int], int] = {}
        self.errors = 0

    def start(self) -> bool:
        """Start the child; False (logged) when it cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ha.advert_relay", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                env={**os.environ, "LBD_NATIVE": "pure"})
        except OSError as exc:
            log.warning("VRRP advert relay not started (%s): adverts depend on lbd's own "
                        "thread alone", exc)
            ours.close()
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.alive = True
        return True

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def attach(self, sock: socket.socket, ifindex: int) -> RelayLink | None:
        """Hand the relay a duplicate of the VRRP socket ``sock`` (of interface
        ``ifindex``); the link a runner reports its adverts on, None without a relay."""
        if not self.alive:
            return None
        sid = self._next_id
        self._next_id += 1
        if not self._send(b"S" + _ID.pack(sid), sock.fileno()):
            return None
        return RelayLink(self, sid, ifindex)

    def read_reports(self) -> None:
        """Count the copies the relay reports (the VRRP loop calls this when readable)."""
        if self._sock is None:
            return
        for _ in range(256):
            try:
                msg = self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg = b""
            if not msg:
                self._gone("exited")
                return
            if msg[:1] == b"F" and len(msg) == 1 + _STOP.size:
                sid, vrid = _STOP.unpack_from(msg, 1)
                self.copies[(sid, vrid)] = self.copies.get((sid, vrid), 0) + 1

    def close(self) -> None:
        self.alive = False
        if self._sock is not None:
            self._sock.close()  # the child sees end-of-file and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(2)
            self._proc = None

    def _send(self, msg: bytes, fd: int | None = None) -> bool:
        if not self.alive or self._sock is None:
            return False
        try:
            if fd is None:
                self._sock.send(msg)
            else:
                socket.send_fds(self._sock, [msg], [fd])
            return True
        except (BlockingIOError, InterruptedError):
            self.errors += 1  # a full queue: this message is lost, the next one counts
            return False
        except OSError as exc:
            self._gone(str(exc))
            return False

    def _gone(self, why: str) -> None:
        if self.alive:
            log.warning("VRRP advert relay gone (%s): adverts depend on lbd's own thread "
                        "alone", why)
        self.alive = False
        self.errors += 1


class RelayLink:
    """One socket's link to the relay, what a :class:`ha.vrrp_io.VrrpRunner` calls."""

    def __init__(self, relay: AdvertRelay, sid: int, ifindex: int) -> None:
        self.relay = relay
        self.sid = sid
        self.ifindex = ifindex

    def sent(self, vrid: int, interval: float, src: int, dst: int, payload: bytes) -> None:
        """The runner sent this advert (priority > 0) just now."""
        self.relay._send(b"A" + _ADVERT.pack(self.sid, vrid, self.ifindex, interval, src, dst)
                         + payload)

    def stop(self, vrid: int = 0) -> None:
        """No more copies for ``vrid`` (0: every virtual router of the socket)."""
        self.relay._send(b"X" + _STOP.pack(self.sid, vrid))

    def close(self) -> None:
        self.relay._send(b"C" + _ID.pack(self.sid))

    @property
    def copies(self) -> dict[int, int]:
        """Copies the relay sent, by vrid."""
        return {vrid: n for (sid, vrid), n in list(self.relay.copies.items())
                if sid == self.sid}


# --- the child ------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_IP_PKTINFO = 8
_PKTINFO = struct.Struct("I4s4s")


def main(argv: list[str] | None = None) -> int:
    """The relay process: ``python -m ha.advert_relay FD``."""
    args = sys.argv[1:] if argv is None else argv
    ctl = socket.socket(fileno=int(args[0]))
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # lbd died before the prctl
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on lbd's terminal is lbd's
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    socks: dict[int, socket.socket] = {}
    ifindex: dict[Key, int] = {}
    fill = FillIn()
    while True:
        due = fill.due()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        readable, _, _ = select.select([ctl], [], [], timeout)
        if readable:
            msg, fds, _, _ = socket.recv_fds(ctl, 65536, 4)
            if not msg:
                return 0  # lbd closed its end, or died
            _handle(msg, fds, socks, ifindex, fill, time.monotonic())
        for key, payload, src in fill.take_due(time.monotonic()):
            sock = socks.get(key[0])
            if sock is None:
                continue
            info = _PKTINFO.pack(ifindex.get(key, 0), src.to_bytes(4, "big"), bytes(4))
            with contextlib.suppress(OSError):
                sock.sendmsg([payload], [(socket.IPPROTO_IP, _IP_PKTINFO, info)], 0,
                               (socket.inet_ntoa(key[2].to_bytes(4, "big")), 0))
                ctl.send(b"F" + _STOP.pack(key[0], key[1]), socket.MSG_DONTWAIT)


def _handle(msg: bytes, fds: list[int], socks: dict[int, socket.socket],
            ifindex: dict[Key, int], fill: FillIn, now: float) -> None:
    kind, body = msg[:1], msg[1:]
    if kind == b"S" and len(body) == _ID.size and fds:
        (sid,) = _ID.unpack(body)
        socks[sid] = socket.socket(fileno=fds.pop(0))
    elif kind == b"A" and len(body) > _ADVERT.size:
        sid, vrid, idx, interval, src, dst = _ADVERT.unpack_from(body)
        key = (sid, vrid, dst)
        ifindex[key] = idx
        fill.sent(key, body[_ADVERT.size:], src, interval, now)
    elif kind == b"X" and len(body) == _STOP.size:
        sid, vrid = _STOP.unpack(body)
        fill.stop(sid, vrid or None)
    elif kind == b"C" and len(body) == _ID.size:
        (sid,) = _ID.unpack(body)
        fill.stop(sid)
        sock = socks.pop(sid, None)
        if sock is not None:
            sock.close()
    for fd in fds:  # anything unexpected attached
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
