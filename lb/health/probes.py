"""Health probes: one asyncio coroutine per check type.

Each probe is ``async def probe_X(spec, addr, port) -> ProbeResult``. A probe is bounded by
``spec.timeout`` and never raises (cancellation excepted): every failure becomes a failed
:class:`ProbeResult` whose ``reason`` an operator understands at a glance — ``"connection
refused"``, ``"timeout after 500ms"``, ``"status 503"``, ``"body lacks 'xyz'"``, ``"bad
response: ..."``, ``"no reply"``, ``"reply lacks 'pong'"``, ``"port unreachable"``, ``"exit 1"``,
``"killed at timeout"``, ``"host unreachable"``. A success says ``"ok"``.

``spec.port`` (probe another port than the server's) is the caller's business: a probe checks
exactly the ``addr``/``port`` it is given. ``spec.source`` binds the probe socket to that
local IPv4 address before connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import shlex
import signal
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "BODY_LIMIT",
    "HealthCheckSpec",
    "ProbeFn",
    "ProbeResult",
    "client_ssl_context",
    "icmp_checksum",
    "make_probe",
    "probe_http",
    "probe_https",
    "probe_icmp",
    "probe_script",
    "probe_tcp",
    "probe_udp",
    "reason_kind",
]

BODY_LIMIT = 64 * 1024  # bytes of an HTTP body searched for expect_body
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})(?: [^\r\n]*)?\r?\n\Z")


class HealthCheckSpec(Protocol):
    """What a probe reads from a pool's health-check config (``lb.config.HealthCheckConfig``)."""

    @property
    def type(self) -> str: ...  # tcp | http | https | udp | icmp | script
    @property
    def interval(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def rise(self) -> int: ...
    @property
    def fall(self) -> int: ...
    @property
    def port(self) -> int | None: ...
    @property
    def source(self) -> str | None: ...
    @property
    def path(self) -> str | None: ...  # None: "/"
    @property
    def expect_status(self) -> tuple[int, ...] | None: ...  # None or empty: any 2xx/3xx
    @property
    def expect_body(self) -> str | None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def verify(self) -> bool | None: ...  # None: False
    @property
    def payload(self) -> str | None: ...  # None: empty datagram
    @property
    def expect(self) -> str | None: ...
    @property
    def command(self) -> str | Sequence[str] | None: ...  # a str is split with shlex


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of one probe: ``ok``, a human reason and how long the probe took (seconds)."""

    ok: bool
    reason: str
    duration: float


ProbeFn = Callable[[str, int], Awaitable[ProbeResult]]
"""A probe bound to its spec: ``await probe(addr, port)``."""


def reason_kind(reason: str) -> str:
    """A bounded label for a reason: the part before any ``": detail"``.

    ``"bad response: 'xyz'"`` → ``"bad response"``; ``"status 503"`` stays as it is. Use it
    where reasons become metric labels.
    """
    return reason.split(":", 1)[0]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


def _os_reason(exc: OSError, *, refused: str = "connection refused") -> str:
    if isinstance(exc, ConnectionRefusedError):
        return refused
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"tls handshake failed: {exc.reason or exc}"
    by_errno = {
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.EADDRNOTAVAIL: "source address not available",
        errno.ECONNREFUSED: refused,
        errno.EPERM: "operation not permitted",
        errno.EACCES: "permission denied",
    }
    if exc.errno in by_errno:
        return by_errno[exc.errno]
    return f"error: {exc.strerror or exc}"


async def _bounded(
    work: Coroutine[Any, Any, str | None],
    timeout: float,
    *,
    timeout_reason: str | None = None,
    refused: str = "connection refused",
) -> ProbeResult:
    """Run ``work`` within ``timeout``; it returns ``None`` on success or a failure reason."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reason = await work
    except TimeoutError:
        reason = timeout_reason or f"timeout after {_ms(timeout)}"
    except OSError as exc:
        reason = _os_reason(exc, refused=refused)
    except Exception as exc:  # a probe never raises: everything else is a failure too
        reason = f"error: {type(exc).__name__}: {exc}"
    duration = time.monotonic() - started
    return ProbeResult(ok=reason is None, reason=reason or "ok", duration=duration)


def _source_addr(spec: HealthCheckSpec) -> tuple[str, int] | None:
    return (spec.source, 0) if spec.source else None


# --------------------------------------------------------------------------- tcp


async def probe_tcp(spec: HealthCheckSpec, addr: str, port: int) -> ProbeResult:
    """Connect, then close at once."""

    async def work() -> str | None:
        _reader, writer = await asyncio.open_connection(addr, port, local_addr=_source_addr(spec))
        writer.transport.abort()
        return None

    return await _bounded(work(), spec.timeout)


# --------------------------------------------------------------------------- http / https


def client_ssl_context(verify: bool) -> ssl.SSLContext:
    """TLS context for https checks: verification off unless ``verify``."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _status_ok(status: int, expected: tuple[int, ...] | None) -> bool:
    if expected:
        return status in expected
    return 200 <= status < 400  # nothing configured: any success or redirect


async def _read_body(reader: asyncio.StreamReader) -> bytes:
    """Skip the headers, then read the body up to BODY_LIMIT bytes (Content-Length or EOF)."""
    length: int | None = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value.strip())
    want = BODY_LIMIT if length is None else min(length, BODY_LIMIT)
    body = bytearray()
    while len(body) < want:
        chunk = await reader.read(want - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def _http(
    spec: HealthCheckSpec, addr: str, port: int, context: ssl.SSLContext | None
) -> ProbeResult:
    host = spec.host or addr

    async def work() -> str | None:
        reader, writer = await asyncio.open_connection(
            addr,
            port,
            ssl=context,
            server_hostname=host if context is not None else None,
            local_addr=_source_addr(spec),
        )
        try:
            path = spec.path or "/"
            request = (
                f"GET {path} HTTP/1.0\r\nHost: {host}\r\n"
                "User-Agent: lbd-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("latin-1", "replace"))
            await writer.drain()
            try:
                line = await reader.readline()
            except ValueError:  # longer than the stream limit: no status line there
                return "bad response: status line too long"
            if not line:
                return "bad response: connection closed without a reply"
            match = _STATUS_LINE.match(line)
            if match is None:
                text = line[:60].decode("latin-1").rstrip("\r\n")
                return f"bad response: {text!r}"
            status = int(match.group(1))
            if not _status_ok(status, spec.expect_status):
                return f"status {status}"
            if spec.expect_body:
                try:
                    body = await _read_body(reader)
                except ValueError:
                    return "bad response: header line too long"
                if spec.expect_body.encode() not in body:
                    return f"body lacks {spec.expect_body!r}"
            return None
        finally:
            writer.transport.abort()

    return await _bounded(work(), spec.timeout)


async def probe_http(spec: HealthCheckSpec, addr: str, port: int) -> ProbeResult:
    """``GET spec.path`` (HTTP/1.0 style, ``Connection: close``); check status and body."""
    return await _http(spec, addr, port, None)


async def probe_https(
    spec: HealthCheckSpec, addr: str, port: int, *, context: ssl.SSLContext | None = None
) -> ProbeResult:
    """As :func:`probe_http` over TLS; ``context`` defaults to ``client_ssl_context(verify)``."""
    return await _http(spec, addr, port, context or client_ssl_context(bool(spec.verify)))


# --------------------------------------------------------------------------- udp


class _UdpReply(asyncio.DatagramProtocol):
    def __init__(self, waiter: asyncio.Future[bytes]) -> None:
        self._waiter = waiter

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if not self._waiter.done():
            self._waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self._waiter.done():
            self._waiter.set_exception(exc)


async def probe_udp(spec: HealthCheckSpec, addr: str, port: int) -> ProbeResult:
    """Send ``spec.payload``; the first reply must contain ``spec.expect`` (any reply if None).

    An ICMP port unreachable fails at once with ``"port unreachable"``; silence until the
    timeout is ``"no reply"``.
    """

    async def work() -> str | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpReply(waiter),
            remote_addr=(addr, port),
            local_addr=_source_addr(spec),
            family=socket.AF_INET,
        )
        try:
            transport.sendto((spec.payload or "").encode())
            data = await waiter
        finally:
            transport.abort()
        if spec.expect is not None and spec.expect.encode() not in data:
            return f"reply lacks {spec.expect!r}"
        return None

    return await _bounded(
        work(), spec.timeout, timeout_reason="no reply", refused="port unreachable"
    )


# --------------------------------------------------------------------------- icmp

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
_ICMP_HDR = struct.Struct("!BBHHH")  # type, code, checksum, id, seq
_UNREACH = {0: "network unreachable", 1: "host unreachable", 3: "port unreachable"}
_IP_RECVERR: int = getattr(socket, "IP_RECVERR", 11)  # Linux value; Python < 3.14 lacks it
_icmp_seq = itertools.count(1)


def icmp_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = _ICMP_HDR.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    checksum = icmp_checksum(header + payload)
    return _ICMP_HDR.pack(ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


def _open_icmp_socket() -> tuple[socket.socket, bool]:
    """An unprivileged ping socket if allowed, else a raw one; returns (sock, is_raw)."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False
    except OSError:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True


def _icmp_verdict(
    packet: bytes, *, raw: bool, target: bytes, ident: int, seq: int, token: bytes
) -> tuple[bool, str | None]:
    """``(ours, reason)``: is ``packet`` the answer to our echo request to ``target`` (packed
    IPv4), and if so its failure reason (``None`` for the echo reply itself).

    A raw socket sees every ICMP packet with its IP header: the reply must come from the target,
    and an error (from any router) must quote our request to the target. A ping socket is
    connected and gets only its own replies, without IP header.
    """
    if raw:
        if len(packet) < 20 or (packet[0] >> 4) != 4:
            return False, None
        source = packet[12:16]
        packet = packet[(packet[0] & 0x0F) * 4 :]
    else:
        source = target
    if len(packet) < _ICMP_HDR.size:
        return False, None
    kind, code, _csum, pid, pseq = _ICMP_HDR.unpack_from(packet)
    if kind == ICMP_ECHO_REPLY:
        ours = source == target and pseq == seq and pid == ident and packet[8:] == token
        return ours, None
    if kind in (ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED) and len(packet) >= 8 + 20 + 8:
        quoted = packet[8:]
        if quoted[16:20] != target:
            return False, None
        inner = quoted[(quoted[0] & 0x0F) * 4 :]
        if len(inner) < _ICMP_HDR.size:
            return False, None
        ikind, _icode, _icsum, iid, iseq = _ICMP_HDR.unpack_from(inner)
        if ikind != ICMP_ECHO_REQUEST or iseq != seq or iid != ident:
            return False, None
        if kind == ICMP_TIME_EXCEEDED:
            return True, "ttl exceeded"
        return True, _UNREACH.get(code, f"destination unreachable (code {code})")
    return False, None


async def probe_icmp(spec: HealthCheckSpec, addr: str, port: int = 0) -> ProbeResult:
    """One ICMP echo request; the matching echo reply (source, id, seq, payload) means up.

    Uses an unprivileged ping socket when ``net.ipv4.ping_group_range`` allows it, otherwise a
    raw socket (root / CAP_NET_RAW). ``port`` is ignored. Silence is ``"no reply"``; an ICMP
    error about our request gives its meaning (``"host unreachable"``, ``"ttl exceeded"``).
    """

    async def work() -> str | None:
        loop = asyncio.get_running_loop()
        target = socket.inet_aton(addr)
        sock, raw = _open_icmp_socket()
        try:
            sock.setblocking(False)
            if spec.source:
                sock.bind((spec.source, 0))
            seq = next(_icmp_seq) & 0xFFFF
            token = os.urandom(16)
            ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "big")) & 0xFFFF
            request = _echo_request(ident, seq, token)
            if raw:
                # Not connected: errors from routers on the way come from other addresses.
                # A plain sendto, not loop.sock_sendto: uvloop (the daemon's loop) raises
                # NotImplementedError for it. One small datagram does not block a raw
                # socket; if the kernel ever says EAGAIN, the probe fails with that error.
                sock.sendto(request, (addr, 0))
                expected_id = ident
            else:
                # Report ICMP errors (host unreachable ...) as socket errors, not only the
                # "hard" ones.
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                sock.connect((addr, 0))
                await loop.sock_sendall(sock, request)
                # A ping socket rewrites the id to its local "port".
                expected_id = int(sock.getsockname()[1])
            while True:
                packet = await loop.sock_recv(sock, 4096)
                ours, reason = _icmp_verdict(
                    packet, raw=raw, target=target, ident=expected_id, seq=seq, token=token
                )
                if ours:
                    return reason
        finally:
            sock.close()

    return await _bounded(work(), spec.timeout, timeout_reason="no reply")


# --------------------------------------------------------------------------- script


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def probe_script(
    spec: HealthCheckSpec, addr: str, port: int, *, pool: str = ""
) -> ProbeResult:
    """Run ``spec.command`` (an argv, or a str split like a shell would but run without one);
    exit 0 means up.

    The environment adds ``LBD_SERVER_ADDRESS``, ``LBD_SERVER_PORT`` and ``LBD_POOL``. The
    script runs in its own session; at the timeout its whole process group is killed and
    reaped (``"killed at timeout"``).
    """
    started = time.monotonic()

    def result(reason: str | None) -> ProbeResult:
        return ProbeResult(reason is None, reason or "ok", time.monotonic() - started)

    command = spec.command
    if command is None or isinstance(command, str):
        try:
            argv = shlex.split(command or "")
        except ValueError as exc:
            return result(f"bad command: {exc}")
    else:
        argv = list(command)
    if not argv:
        return result("no command configured")
    env = dict(os.environ)
    env.update(LBD_SERVER_ADDRESS=addr, LBD_SERVER_PORT=str(port), LBD_POOL=pool)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        return result(f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        try:
            async with asyncio.timeout(spec.timeout):
                code = await proc.wait()
        except TimeoutError:
            _kill_group(proc)
            # Reap; bounded in case the process is stuck in the kernel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(1.0, spec.timeout)):
                    await proc.wait()
            return result("killed at timeout")
    finally:
        if proc.returncode is None:  # cancelled while running: leave nothing behind
            _kill_group(proc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await proc.wait()
    if code == 0:
        return result(None)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return result(f"killed by {name}")
    return result(f"exit {code}")


# --------------------------------------------------------------------------- factory


def make_probe(spec: HealthCheckSpec, pool: str = "") -> ProbeFn:
    """The probe for ``spec.type``, bound to ``spec`` (``pool`` is passed to scripts)."""
    kind = spec.type
    if kind == "tcp":
        return lambda addr, port: probe_tcp(spec, addr, port)
    if kind == "http":
        return lambda addr, port: probe_http(spec, addr, port)
    if kind == "https":
        context = client_ssl_context(bool(spec.verify))
        return lambda addr, port: probe_https(spec, addr, port, context=context)
    if kind == "udp":
        return lambda addr, port: probe_udp(spec, addr, port)
    if kind == "icmp":
        return lambda addr, port: probe_icmp(spec, addr, port)
    if kind == "script":
        return lambda addr, port: probe_script(spec, addr, port, pool=pool)
    raise ValueError(f"unknown health check type {kind!r}")
