"""Health probes against tiny real servers on 127.0.0.1, and the monitor with fake probes.

Servers listen on ephemeral ports. Nothing waits by sleeping: tests await results, or poll a
condition against a deadline. Assertions are on reasons, never on durations.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from lb.addr import ip_to_int
from lb.health import (
    HealthCheckSpec,
    HealthMonitor,
    PoolChecks,
    ProbeFn,
    ProbeResult,
    Transition,
    make_probe,
    reason_kind,
)
from lb.health.probes import (
    icmp_checksum,
    probe_http,
    probe_https,
    probe_icmp,
    probe_script,
    probe_tcp,
    probe_udp,
)
from lb.servers import RealServer

T = TypeVar("T")
LOCAL = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Spec:
    """Stands in for lb.config.HealthCheckConfig."""

    type: str = "tcp"
    interval: float = 1.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 2
    port: int | None = None
    source: str | None = None
    path: str | None = "/"
    expect_status: tuple[int, ...] | None = (200,)
    expect_body: str | None = None
    host: str | None = None
    verify: bool = False
    payload: str = ""
    expect: str | None = None
    command: str | tuple[str, ...] | None = None


def _satisfies_protocol(spec: Spec) -> HealthCheckSpec:
    return spec  # mypy checks that Spec is a HealthCheckSpec


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Wait for a condition, failing after a generous deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def tcp_server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """Serve ``handler`` on an ephemeral port; on exit close the server and its connections."""
    writers: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, LOCAL, 0, ssl=ssl_context)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def canned(response: bytes, requests: list[bytes] | None = None) -> Handler:
    """A handler that reads the request head, answers ``response`` and closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if requests is not None:
                requests.append(head)
            writer.write(response)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handler


def unused_port(kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, int]:
    """A bound, not listening socket: its port refuses TCP connections while we hold it."""
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((LOCAL, 0))
    port: int = sock.getsockname()[1]
    return sock, port


# --------------------------------------------------------------------------- helpers


def test_spec_dataclass_is_a_health_check_spec() -> None:
    assert _satisfies_protocol(Spec()).type == "tcp"


@pytest.mark.parametrize(
    ("reason", "kind"),
    [("bad response: 'SSH-2.0'", "bad response"), ("status 503", "status 503"), ("ok", "ok")],
)
def test_reason_kind(reason: str, kind: str) -> None:
    assert reason_kind(reason) == kind


def test_icmp_checksum_known_vector() -> None:
    # RFC 1071 example words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2, checksum 0x220d.
    assert icmp_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    packet = bytes.fromhex("0800000012340001") + b"abc"
    summed = icmp_checksum(packet)
    with_sum = packet[:2] + summed.to_bytes(2, "big") + packet[4:]
    assert icmp_checksum(with_sum) == 0


def test_make_probe_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown health check type"):
        make_probe(Spec(type="smtp"))


# --------------------------------------------------------------------------- tcp


def test_tcp_up() -> None:
    async def main() -> ProbeResult:
        async with tcp_server(canned(b"")) as port:
            return await probe_tcp(Spec(), LOCAL, port)

    result = run(main())
    assert result == ProbeResult(True, "ok", result.duration)
    assert result.duration >= 0


def test_tcp_refused() -> None:
    sock, port = unused_port()
    with sock:
        result = run(probe_tcp(Spec(), LOCAL, port))
    assert (result.ok, result.reason) == (False, "connection refused")


def test_tcp_binds_source() -> None:
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])
        writer.close()

    async def main() -> ProbeResult:
        async with tcp_server(handler) as port:
            result = await probe_tcp(Spec(source="127.0.0.2"), LOCAL, port)
            await until(lambda: bool(seen), "the connection")
            return result

    assert run(main()).ok
    assert seen == ["127.0.0.2"]


def test_tcp_unusable_source_is_a_failure_not_an_exception() -> None:
    result = run(probe_tcp(Spec(source="192.0.2.1"), LOCAL, 9))
    assert not result.ok
    assert result.reason == "source address not available"


# --------------------------------------------------------------------------- http

OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world"
)


def http_probe(response: bytes, spec: Spec, requests: list[bytes] | None = None) -> ProbeResult:
    async def main() -> ProbeResult:
        async with tcp_server(canned(response, requests)) as port:
            return await probe_http(spec, LOCAL, port)

    return run(main())


def test_http_200_ok_and_request_shape() -> None:
    requests: list[bytes] = []
    result = http_probe(OK_RESPONSE, Spec(type="http", path="/healthz"), requests)
    assert (result.ok, result.reason) == (True, "ok")
    lines = requests[0].decode().split("\r\n")
    assert lines[0] == "GET /healthz HTTP/1.0"
    assert "Host: 127.0.0.1" in lines
    assert "Connection: close" in lines


def test_http_host_header_from_spec() -> None:
    requests: list[bytes] = []
    assert http_probe(OK_RESPONSE, Spec(type="http", host="www.example.test"), requests).ok
    assert "Host: www.example.test" in requests[0].decode().split("\r\n")


def test_http_503() -> None:
    result = http_probe(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", Spec(type="http"))
    assert (result.ok, result.reason) == (False, "status 503")


def test_http_expect_status_list() -> None:
    spec = Spec(type="http", expect_status=(200, 204))
    assert http_probe(b"HTTP/1.1 204 No Content\r\n\r\n", spec).ok
    assert http_probe(b"HTTP/1.1 302 Found\r\n\r\n", spec).reason == "status 302"


def test_http_empty_expect_status_accepts_2xx_3xx() -> None:
    spec = Spec(type="http", expect_status=())
    assert http_probe(b"HTTP/1.0 301 Moved\r\n\r\n", spec).ok
    assert http_probe(b"HTTP/1.0 404 Not Found\r\n\r\n", spec).reason == "status 404"


def test_http_unset_expect_status_and_path() -> None:
    requests: list[bytes] = []
    assert http_probe(OK_RESPONSE, Spec(type="http", expect_status=None, path=None), requests).ok
    assert requests[0].startswith(b"GET / HTTP/1.0\r\n")


def test_http_expect_body_present() -> None:
    assert http_probe(OK_RESPONSE, Spec(type="http", expect_body="world")).ok


def test_http_expect_body_absent() -> None:
    result = http_probe(OK_RESPONSE, Spec(type="http", expect_body="xyz"))
    assert (result.ok, result.reason) == (False, "body lacks 'xyz'")


def test_http_body_until_eof_without_content_length() -> None:
    response = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 10000 + b"ALIVE"
    assert http_probe(response, Spec(type="http", expect_body="ALIVE")).ok


def test_http_body_with_content_length_on_a_connection_kept_open() -> None:
    """A server that ignores Connection: close must not turn a good reply into a timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK_RESPONSE)
        await writer.drain()
        await reader.read()  # keep the connection until the client goes

    async def main() -> ProbeResult:
        async with tcp_server(handler) as port:
            return await probe_http(Spec(type="http", expect_body="hello", timeout=5), LOCAL, port)

    assert run(main()).reason == "ok"


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01\x02\x03\n", b"HTTP/1.1 abc OK\r\n\r\n"],
)
def test_http_garbage_is_bad_response(garbage: bytes) -> None:
    result = http_probe(garbage, Spec(type="http"))
    assert not result.ok
    assert result.reason.startswith("bad response: ")


def test_http_close_without_reply_is_bad_response() -> None:
    result = http_probe(b"", Spec(type="http"))
    assert (result.ok, result.reason) == (False, "bad response: connection closed without a reply")


def test_http_refused() -> None:
    sock, port = unused_port()
    with sock:
        result = run(probe_http(Spec(type="http"), LOCAL, port))
    assert result.reason == "connection refused"


def test_http_server_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the probe gives up and closes

    async def main() -> ProbeResult:
        async with tcp_server(silent) as port:
            return await probe_http(Spec(type="http", timeout=0.2), LOCAL, port)

    result = run(main())
    assert (result.ok, result.reason) == (False, "timeout after 200ms")


# --------------------------------------------------------------------------- https


def _self_signed_cert() -> Path | None:
    """A self-signed localhost cert+key made with the openssl CLI (scripts/setup.sh installs
    it), else the one Python's own test suite ships (test/certdata), if present."""
    if shutil.which("openssl"):
        out = Path(tempfile.mkdtemp(prefix="lbd-test-cert-")) / "keycert.pem"
        key, crt = out.with_name("key.pem"), out.with_name("crt.pem")
        proc = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(crt)],
            capture_output=True, check=False, timeout=60)
        if proc.returncode == 0:
            out.write_bytes(key.read_bytes() + crt.read_bytes())
            return out
    spec = importlib.util.find_spec("test")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for candidate in (Path(base) / "certdata" / "keycert.pem", Path(base) / "keycert.pem"):
            if candidate.is_file():
                return candidate
    return None


CERT = _self_signed_cert()
needs_cert = pytest.mark.skipif(
    CERT is None,
    reason="no self-signed certificate: no openssl CLI and no stdlib test certs here",
)


def https_probe(spec: Spec, response: bytes = OK_RESPONSE) -> ProbeResult:
    assert CERT is not None
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(CERT)

    async def main() -> ProbeResult:
        async with tcp_server(canned(response), server_ctx) as port:
            return await probe_https(spec, LOCAL, port)

    return run(main())


@needs_cert
def test_https_ok_without_verification() -> None:
    result = https_probe(Spec(type="https", expect_body="world"))
    assert (result.ok, result.reason) == (True, "ok")


@needs_cert
def test_https_status_checked_over_tls() -> None:
    result = https_probe(Spec(type="https"), b"HTTP/1.1 503 Busy\r\n\r\n")
    assert result.reason == "status 503"


@needs_cert
def test_https_verify_rejects_self_signed() -> None:
    result = https_probe(Spec(type="https", verify=True, host="localhost"))
    assert not result.ok
    assert result.reason.startswith("certificate verify failed: ")


def test_https_against_plain_server_fails_handshake() -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")  # plain text to a ClientHello
        await writer.drain()
        await reader.read()

    async def main() -> ProbeResult:
        async with tcp_server(plain) as port:
            return await make_probe(Spec(type="https", timeout=5))(LOCAL, port)

    result = run(main())
    assert not result.ok
    assert result.reason.startswith("tls handshake failed: "), result.reason


# --------------------------------------------------------------------------- udp


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.prefix + data, addr)


def udp_probe(spec: Spec) -> ProbeResult:
    async def main() -> ProbeResult:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Echo(b"pong "), local_addr=(LOCAL, 0)
        )
        try:
            port: int = transport.get_extra_info("sockname")[1]
            return await probe_udp(spec, LOCAL, port)
        finally:
            transport.close()

    return run(main())


def test_udp_echo_ok() -> None:
    assert udp_probe(Spec(type="udp", payload="ping", expect="pong ping")).reason == "ok"


def test_udp_any_reply_when_nothing_expected() -> None:
    assert udp_probe(Spec(type="udp", payload="ping")).ok


def test_udp_reply_lacks_expected() -> None:
    result = udp_probe(Spec(type="udp", payload="ping", expect="PONG"))
    assert (result.ok, result.reason) == (False, "reply lacks 'PONG'")


def test_udp_no_reply() -> None:
    sock, port = unused_port(socket.SOCK_DGRAM)  # bound and silent
    with sock:
        result = run(probe_udp(Spec(type="udp", payload="ping", timeout=0.2), LOCAL, port))
    assert (result.ok, result.reason) == (False, "no reply")


def test_udp_port_unreachable() -> None:
    sock, port = unused_port(socket.SOCK_DGRAM)
    sock.close()  # nobody listens there now: the kernel answers ICMP port unreachable
    result = run(probe_udp(Spec(type="udp", payload="ping", timeout=5), LOCAL, port))
    assert (result.ok, result.reason) == (False, "port unreachable")


# --------------------------------------------------------------------------- icmp


def _icmp_allowed() -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
        except OSError:
            continue
        return True
    return False


@pytest.mark.skipif(
    not _icmp_allowed(),
    reason="ICMP needs root/CAP_NET_RAW or a ping_group_range that includes our group",
)
def test_icmp_echo_to_loopback() -> None:
    result = run(probe_icmp(Spec(type="icmp", timeout=2), LOCAL, 0))
    assert (result.ok, result.reason) == (True, "ok")
    result = run(make_probe(Spec(type="icmp", timeout=2, source=LOCAL))(LOCAL, 80))
    assert result.ok


@pytest.mark.skipif(
    not _icmp_allowed(),
    reason="ICMP needs root/CAP_NET_RAW or a ping_group_range that includes our group",
)
def test_icmp_concurrent_probes_match_their_own_replies() -> None:
    async def main() -> list[ProbeResult]:
        spec = Spec(type="icmp", timeout=2)
        return await asyncio.gather(*(probe_icmp(spec, LOCAL) for _ in range(8)))

    assert all(r.ok for r in run(main()))


_NETNS_ICMP = """
import asyncio, socket, sys
from lb.health.probes import probe_icmp

class Spec:
    type = "icmp"; interval = 1.0; rise = 1; fall = 1; port = None; source = None
    path = None; expect_status = None; expect_body = None; host = None; verify = None
    payload = None; expect = None; command = None
    def __init__(self, timeout): self.timeout = timeout

# The unprivileged ping socket is what this namespace's ping_group_range allows.
socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
for addr, timeout in (("127.0.0.1", 2.0), ("198.18.0.2", 0.2), ("198.51.100.1", 0.2)):
    print(asyncio.run(probe_icmp(Spec(timeout), addr)).reason)
"""


@pytest.mark.netns
@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="needs root, unshare and ip to build a private network namespace",
)
def test_icmp_unprivileged_ping_socket_in_a_private_namespace() -> None:
    """The ping-socket path (ping_group_range opened in a namespace of our own)."""
    setup = (
        "ip link set lo up"
        " && echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range"
        " && ip link add name hc0 type veth peer name hc1"
        " && ip addr add 198.18.0.1/24 dev hc0 && ip link set hc0 up && ip link set hc1 up"
        ' && exec "$0" -c "$1"'
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, sys.executable, _NETNS_ICMP],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(repo)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["ok", "no reply", "network unreachable"]


# --------------------------------------------------------------------------- script


def _alive(pid: int) -> bool:
    """Does ``pid`` still run? (A zombie waiting for its reaper counts as gone.)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def script_probe(command: str, timeout: float = 5.0, pool: str = "web") -> ProbeResult:
    spec = Spec(type="script", command=command, timeout=timeout)
    return run(make_probe(spec, pool)("198.18.0.11", 8080))


def test_script_exit_0() -> None:
    assert script_probe("true").reason == "ok"


def test_script_argv_is_not_split_again() -> None:
    spec = Spec(type="script", command=("sh", "-c", 'test "$0" = "a b"', "a b"), timeout=5)
    assert run(probe_script(spec, LOCAL, 80)).reason == "ok"


def test_script_exit_1() -> None:
    result = script_probe("sh -c 'exit 1'")
    assert (result.ok, result.reason) == (False, "exit 1")


def test_script_sees_server_in_environment() -> None:
    check = (
        'test "$LBD_SERVER_ADDRESS" = 198.18.0.11 -a "$LBD_SERVER_PORT" = 8080 -a "$LBD_POOL" = web'
    )
    assert script_probe(f"sh -c '{check}'").ok
    assert script_probe(f"sh -c '{check}'", pool="other").reason == "exit 1"


def test_script_missing_program() -> None:
    result = script_probe("/nonexistent/lbd-check --flag")
    assert not result.ok
    assert result.reason.startswith("cannot run /nonexistent/lbd-check: ")


def test_script_no_command() -> None:
    assert script_probe("").reason == "no command configured"


def test_script_killed_at_timeout_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The script starts a child in its group, writes both pids, then waits forever.
    command = f"sh -c 'sleep 1000 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; wait'"
    # A loaded machine may kill the script before it wrote its pids: then allow it longer.
    for timeout in (1.0, 4.0, 16.0):
        spec = Spec(type="script", command=command, timeout=timeout)
        result = run(probe_script(spec, LOCAL, 80))
        assert (result.ok, result.reason) == (False, "killed at timeout")
        if pids.is_file():
            break
    else:
        pytest.fail("the script never wrote its pid file")
    parent, child = (int(p) for p in pids.read_text().split())
    assert not _alive(parent)  # killed and reaped by the probe

    async def gone() -> None:  # the orphaned child is reaped by init: wait for that
        await until(lambda: not _alive(child), "the script's child to die")

    run(gone())


def test_script_killed_when_the_probe_is_cancelled(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    command = f"sh -c 'echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; exec sleep 1000'"

    async def main() -> None:
        task = asyncio.create_task(probe_script(Spec(type="script", command=command), LOCAL, 1))
        await until(pidfile.is_file, "the pid file")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert not _alive(int(pidfile.read_text()))


# --------------------------------------------------------------------------- monitor


def server(pool: str, addr: str, port: int = 80, weight: int = 10, up: bool = True) -> RealServer:
    return RealServer(pool=pool, addr=ip_to_int(addr), port=port, weight=weight, up=up)


class FakeProbes:
    """A probe factory whose probes answer from per-address scripts ("+" ok, "-" fail, "h"
    hang until released); after its script a server repeats its last answer."""

    def __init__(self, scripts: dict[str, str]) -> None:
        self.scripts = scripts
        self.calls: dict[str, int] = dict.fromkeys(scripts, 0)
        self.ports: dict[str, int] = {}
        self.hanging: dict[str, int] = dict.fromkeys(scripts, 0)
        self.release = asyncio.Event()
        self.pools: list[str] = []

    def factory(self, spec: HealthCheckSpec, pool: str) -> ProbeFn:
        self.pools.append(pool)

        async def probe(addr: str, port: int) -> ProbeResult:
            script = self.scripts[addr]
            step = script[min(self.calls[addr], len(script) - 1)]
            self.calls[addr] += 1
            self.ports[addr] = port
            if step == "h":
                self.hanging[addr] += 1
                try:
                    await self.release.wait()
                finally:
                    self.hanging[addr] -= 1
            if step == "!":
                raise RuntimeError("probe bug")
            ok = step == "+"
            return ProbeResult(ok, "ok" if ok else "connection refused", 0.001)

        return probe


FAST = Spec(interval=0.002, timeout=30.0, rise=2, fall=3)


@dataclass
class Recorder:
    """Stands for the daemon: records each transition and applies it to the server, as the
    runtime-state owner (lb.runtime) does; ``apply=False`` only records."""

    transitions: list[tuple[str, bool, str]]
    apply: bool = True

    def __call__(self, srv: RealServer, transition: Transition) -> None:
        self.transitions.append((srv.key, transition.up, transition.reason))
        if self.apply:
            srv.up = transition.up


def no_other_tasks() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


def test_monitor_fall_then_rise_once_each() -> None:
    a = server("web", "198.18.0.11")
    probes = FakeProbes({"198.18.0.11": "+--+---+-++"})
    rec = Recorder([])

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(FAST, [a])}, rec, probe_factory=probes.factory
        )
        monitor.start()
        await until(lambda: probes.calls["198.18.0.11"] >= 20, "20 probes")
        await monitor.stop()
        assert no_other_tasks()
        assert monitor.checks_total[("web", a.key, "fail")] == 6
        assert monitor.checks_total[("web", a.key, "ok")] >= 14
        assert monitor.failures_total == {("web", a.key, "connection refused"): 6}
        last = monitor.last_result(a)
        assert last is not None
        assert (last.ok, last.reason) == (True, "ok")

    run(main())
    assert rec.transitions == [
        ("198.18.0.11:80", False, "connection refused"),
        ("198.18.0.11:80", True, "ok"),
    ]
    assert a.up
    assert probes.pools == ["web"]


def test_monitor_initial_down_server_must_rise() -> None:
    a = server("web", "198.18.0.11", up=False)
    probes = FakeProbes({"198.18.0.11": "+"})
    rec = Recorder([])

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(FAST, [a])}, rec, probe_factory=probes.factory
        )
        monitor.start()
        await until(lambda: a.up, "the server to rise")
        assert probes.calls["198.18.0.11"] >= 2
        await until(lambda: probes.calls["198.18.0.11"] >= 10, "more probes")
        await monitor.stop()

    run(main())
    assert rec.transitions == [("198.18.0.11:80", True, "ok")]


def test_monitor_hanging_probe_does_not_delay_another_server() -> None:
    hung = server("web", "198.18.0.11")
    other = server("web", "198.18.0.12")
    probes = FakeProbes({"198.18.0.11": "h", "198.18.0.12": "---"})
    rec = Recorder([])

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(FAST, [hung, other])}, rec, probe_factory=probes.factory
        )
        monitor.start()
        await until(lambda: not other.up, "the other server to fall")
        assert probes.hanging["198.18.0.11"] == 1  # still stuck in its first probe
        await monitor.stop()
        assert no_other_tasks()
        assert probes.hanging["198.18.0.11"] == 0  # the hung probe was cancelled

    run(main())
    assert rec.transitions == [("198.18.0.12:80", False, "connection refused")]
    assert hung.up


def test_monitor_guard_times_out_a_probe_that_ignores_its_timeout() -> None:
    a = server("web", "198.18.0.11")
    probes = FakeProbes({"198.18.0.11": "h"})
    rec = Recorder([])
    spec = replace(FAST, timeout=0.001, fall=1)

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(spec, [a])}, rec, probe_factory=probes.factory
        )
        monitor.start()
        await until(lambda: not a.up, "the guard to fail the hung probe")
        await monitor.stop()

    run(main())
    assert rec.transitions == [("198.18.0.11:80", False, "timeout after 1ms")]


def test_monitor_probe_exception_is_a_failed_check() -> None:
    a = server("web", "198.18.0.11")
    probes = FakeProbes({"198.18.0.11": "!"})
    rec = Recorder([])

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(replace(FAST, fall=1), [a])},
            rec,
            probe_factory=probes.factory,
        )
        monitor.start()
        await until(lambda: not a.up, "the failure")
        await monitor.stop()

    run(main())
    assert rec.transitions == [("198.18.0.11:80", False, "probe error: RuntimeError: probe bug")]


def test_monitor_probes_the_spec_port_and_reports_results() -> None:
    a = server("web", "198.18.0.11", port=8080)
    probes = FakeProbes({"198.18.0.11": "+"})
    seen: list[tuple[str, bool]] = []

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(replace(FAST, port=9000), [a])},
            Recorder([]),
            probe_factory=probes.factory,
            on_result=lambda srv, res: seen.append((srv.key, res.ok)),
        )
        monitor.start()
        await until(lambda: len(seen) >= 3, "three results")
        await monitor.stop()

    run(main())
    assert probes.ports == {"198.18.0.11": 9000}
    assert seen[:3] == [("198.18.0.11:8080", True)] * 3


def test_monitor_unchecked_pool_servers_stay_up() -> None:
    a = server("dns", "198.18.0.21", up=False)
    b = server("dns", "198.18.0.22")
    rec = Recorder([])

    async def main() -> None:
        monitor = HealthMonitor({"dns": PoolChecks(None, [a, b])}, rec)
        monitor.start()
        assert list(monitor.checked()) == []
        await monitor.stop()

    run(main())
    assert a.up and b.up
    assert rec.transitions == [("198.18.0.21:80", True, "no health check")]


def test_monitor_writes_nothing_on_the_server() -> None:
    """Health is the runtime owner's to apply: the monitor only reports transitions."""
    a = server("web", "198.18.0.11", weight=10)
    probes = FakeProbes({"198.18.0.11": "-"})
    rec = Recorder([], apply=False)

    async def main() -> None:
        monitor = HealthMonitor(
            {"web": PoolChecks(replace(FAST, fall=1), [a])}, rec, probe_factory=probes.factory
        )
        monitor.start()
        await until(lambda: probes.calls["198.18.0.11"] >= 5, "5 probes")
        await monitor.stop()
        assert no_other_tasks()

    run(main())
    assert rec.transitions == [("198.18.0.11:80", False, "connection refused")]
    assert (a.up, a.weight, a.effective_weight) == (True, 10, 10)


def test_monitor_with_real_tcp_probe_falls_on_refused_port() -> None:
    sock, port = unused_port()
    a = RealServer(pool="web", addr=ip_to_int(LOCAL), port=port, weight=1)
    rec = Recorder([])

    async def main() -> None:
        spec = Spec(interval=0.01, timeout=1.0, rise=1, fall=2)
        monitor = HealthMonitor({"web": PoolChecks(spec, [a])}, rec)
        monitor.start()
        await until(lambda: not a.up, "the fall")
        await monitor.stop()

    with sock:
        run(main())
    assert rec.transitions == [(f"127.0.0.1:{port}", False, "connection refused")]
