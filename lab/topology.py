"""Build and tear down the lab network: clients, one or two LBs, real servers.

Address plan (DESIGN.md §5): clients and VIPs in 198.51.100.0/24, real servers and the
servers' gateway in 198.18.0.0/24, the sync link in 198.19.0.0/24.

::

    c1 .100 ─┐                      ┌─ eth1 ─┐            ┌─ s1 198.18.0.11
    c2 .101 ─┼─ [front] ─ eth0  lba │        ├─ [back] ───┼─ s2 198.18.0.12
    (x  .102)┘           ─ eth0  lbb└─ eth1 ─┘            └─ s3 198.18.0.13
                           eth2 ── [sync] ── eth2

All bridges live in one namespace ("sw"), every host in its own. Each veth is created inside
a namespace with its peer moved straight into another, so the root namespace never holds one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

VIP = "198.51.100.10"
VIP_B = "198.51.100.11"  # the second VIP of an active-active pair
CLIENTS = {"c1": "198.51.100.100", "c2": "198.51.100.101", "x": "198.51.100.102"}
LB_FRONT = {"lba": "198.51.100.2", "lbb": "198.51.100.3"}
LB_BACK = {"lba": "198.18.0.2", "lbb": "198.18.0.3"}
LB_SYNC = {"lba": "198.19.0.2", "lbb": "198.19.0.3"}
GATEWAY = "198.18.0.1"
SERVERS = {"s1": "198.18.0.11", "s2": "198.18.0.12", "s3": "198.18.0.13"}

T = TypeVar("T")


class LabError(RuntimeError):
    pass


def run(cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 30) -> str:
    """Run a command, return its stdout; raise LabError with stderr on failure."""
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def wait_until(
    predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise  # the predicate knows the wait is hopeless (e.g. the process died)
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


@dataclass
class Lab:
    """A set of namespaces with a common random prefix; a context manager that cleans up."""

    prefix: str = field(default_factory=lambda: f"lbd{secrets.token_hex(3)}")
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # ---- naming ---------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    # ---- building -------------------------------------------------------------------------
    def add_ns(self, host: str) -> str:
        name = self.ns(host)
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.sh(host, "ip link set lo up")
        for key in ("all", "default"):
            self.sysctl(host, f"net.ipv6.conf.{key}.disable_ipv6", "1", check=False)
        return name

    def sysctl(self, host: str, key: str, value: str, *, check: bool = True) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.sh(host, f"sh -c 'echo {value} > {path}'", check=check)

    def sh(self, host: str, cmd: str, *, check: bool = True, timeout: float = 30) -> str:
        return run(["ip", "netns", "exec", self.ns(host), *shlex.split(cmd)], check=check,
                   timeout=timeout)

    def bridge(self, name: str) -> None:
        self.sh("sw", f"ip link add {name} type bridge")
        # No STP or learning delays: ports forward at once.
        self.sh("sw", f"ip link set {name} type bridge forward_delay 0 stp_state 0")
        self.sh("sw", f"ip link set {name} up")

    def plug(self, host: str, ifname: str, bridge: str, addrs: Sequence[str]) -> None:
        """A veth from ``bridge`` (in sw) to ``host``, named ``ifname`` there."""
        port = f"{bridge[:4]}-{host}"[:15]
        self.sh("sw", f"ip link add {port} type veth peer name {ifname} netns {self.ns(host)}")
        self.sh("sw", f"ip link set {port} master {bridge} up")
        for addr in addrs:
            self.sh(host, f"ip addr add {addr} dev {ifname}")
        self.sh(host, f"ip link set {ifname} up")

    def link_state(self, host: str, bridge: str, up: bool) -> None:
        """Cut or heal a host's link to a bridge at the bridge port (the host keeps carrier)."""
        port = f"{bridge[:4]}-{host}"[:15]
        self.sh("sw", f"ip link set {port} {'up' if up else 'down'}")

    # ---- processes ------------------------------------------------------------------------
    def spawn(self, host: str, cmd: Sequence[str], *, log: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *cmd],
            stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        if log:
            out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 10) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    # ---- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, signal.SIGKILL, timeout=5)
        for name in reversed(self.namespaces):
            # Anything still running inside (children that changed session) dies first.
            pids = run(["ip", "netns", "pids", name], check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(lab: Lab, *, pair: bool = False, standalone_gateway: bool = True,
          clients: Sequence[str] = ("c1", "c2"), servers: Sequence[str] = ("s1", "s2", "s3"),
          offload_off: Sequence[tuple[str, str]] = ()) -> Lab:
    """Create the topology. ``standalone_gateway`` puts the servers' gateway address on lba
    (a node without VRRP holds it as a plain interface address)."""
    lab.add_ns("sw")
    # br_netfilter, when loaded, would pass bridged IP frames through iptables and drop
    # malformed ones silently; the malformed-packet tests need them to arrive.
    lab.sysctl("sw", "net.bridge.bridge-nf-call-iptables", "0", check=False)
    for br in ("front", "back", "sync"):
        lab.bridge(br)
    for c in clients:
        lab.add_ns(c)
        lab.plug(c, "eth0", "front", [f"{CLIENTS[c]}/24"])
    lbs = ("lba", "lbb") if pair else ("lba",)
    for lb in lbs:
        lab.add_ns(lb)
        lab.plug(lb, "eth0", "front", [f"{LB_FRONT[lb]}/24"])
        back = [f"{LB_BACK[lb]}/24"]
        if lb == "lba" and not pair and standalone_gateway:
            back.append(f"{GATEWAY}/24")
        lab.plug(lb, "eth1", "back", back)
        lab.plug(lb, "eth2", "sync", [f"{LB_SYNC[lb]}/24"])
    for s in servers:
        lab.add_ns(s)
        lab.plug(s, "eth0", "back", [f"{SERVERS[s]}/24"])
        lab.sh(s, f"ip route add default via {GATEWAY}")
    for host, ifname in offload_off:
        lab.sh(host, f"ethtool -K {ifname} tx off", check=False)
    return lab


@contextlib.contextmanager
def lab_network(**kwargs: object) -> Iterator[Lab]:
    lab = Lab()
    try:
        build(lab, **kwargs)  # type: ignore[arg-type]
        yield lab
    finally:
        lab.close()
