"""Network benchmarks in the lab topology: the same traffic through lbd, the kernel and HAProxy.

Each system gets a fresh lab (lab.topology), so that nothing one of them installed can help or
hinder the next::

    kernel   lba routes (ip_forward=1); c1 reaches 198.18.0.0/24 via 198.51.100.2 and talks
             to s1 directly. The ceiling: the same hops, no load balancer.
    haproxy  HAProxy ``mode tcp`` in lba, bound to the VIP (a plain address on lba's eth0).
    lbd      lbd in lba with a config of its own (VIP:5201 tcp+udp → s1:5201, VIP:80 → rr over
             s1..s3:8080).

Servers are real programs: ``iperf3 -s`` in s1, nginx (one worker, answers ``sN``) in s1..s3.
Clients run in c1: iperf3 for throughput and 64-byte UDP, wrk with ``Connection: close``
for new connections per second. Every client run is bounded by its duration plus a margin.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import configs
from lab.topology import GATEWAY, LB_FRONT, SERVERS, VIP, Lab, LabError, build, wait_until

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"PYTHONPATH": str(REPO)}

IPERF_PORT = 5201
HTTP_VPORT = 80
HTTP_RPORT = 8080
UDP_PAYLOAD = 64
WEB_SERVERS = ("s1", "s2", "s3")

#: Tuning that every namespace gets, whichever system is measured: wrk opens tens of
#: thousands of short connections, HAProxy as many again towards the servers.
TCP_SYSCTLS = {
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.ip_local_port_range": "1024 65000",
}

#: Which tools each benchmark needs on each system (the lab itself needs ``ip``).
NEEDS: dict[str, dict[str, tuple[str, ...]]] = {
    "throughput": {"kernel": ("iperf3",), "haproxy": ("iperf3", "haproxy"),
                   "lbd": ("iperf3", "lbd"), "lbd-pure": ("iperf3", "lbd"),
                   "lbd-2w": ("iperf3", "lbd"), "lbd-offload": ("iperf3", "lbd")},
    "pps": {"kernel": ("iperf3",), "lbd": ("iperf3", "lbd"), "lbd-pure": ("iperf3", "lbd"),
            "lbd-2w": ("iperf3", "lbd"), "lbd-offload": ("iperf3", "lbd")},
    "cps": {"haproxy": ("wrk", "nginx", "haproxy"), "lbd": ("wrk", "nginx", "lbd"),
            "lbd-pure": ("wrk", "nginx", "lbd"), "lbd-2w": ("wrk", "nginx", "lbd"),
            "lbd-offload": ("wrk", "nginx", "lbd")},
}


class BenchError(RuntimeError):
    """A measurement could not be made; the message says why."""


def which(tool: str) -> str | None:
    """Where ``tool`` is; lbd is the one in this venv."""
    if tool == "lbd":
        path = BIN / "lbd"
        return str(path) if path.exists() else None
    return shutil.which(tool)


def missing_tools(tools: Iterable[str]) -> list[str]:
    return sorted({t for t in tools if which(t) is None})


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


def _iperf(lab: Lab, args: str, duration: float) -> dict[str, object]:
    """Run an iperf3 client in c1; retry while the server is still busy with the last test."""
    cmd = f"iperf3 -J --connect-timeout 3000 {args} -t {duration:g}"
    deadline = time.monotonic() + 15
    while True:
        out = lab.sh("c1", cmd, check=False, timeout=duration + 30)
        try:
            doc: dict[str, object] = json.loads(out)
        except json.JSONDecodeError as exc:
            raise BenchError(f"iperf3 printed no JSON: {out[-300:]!r}") from exc
        error = doc.get("error")
        if not error:
            return doc
        if "busy" in str(error) and time.monotonic() < deadline:
            time.sleep(0.2)  # the server is tearing down the previous test: retry
            continue
        raise BenchError(f"iperf3 {args}: {error}")


def _end(doc: dict[str, object], part: str) -> dict[str, float]:
    end = doc.get("end")
    if not isinstance(end, dict) or not isinstance(end.get(part), dict):
        raise BenchError(f"iperf3 JSON has no end.{part}")
    result: dict[str, float] = end[part]
    return result


def tcp_throughput(lab: Lab, host: str, streams: int, duration: float) -> float:
    """Gbit/s received by the server, over ``streams`` parallel TCP streams."""
    doc = _iperf(lab, f"-c {host} -p {IPERF_PORT} -P {streams}", duration)
    return float(_end(doc, "sum_received")["bits_per_second"]) / 1e9


def udp_pps(lab: Lab, host: str, duration: float) -> tuple[float, float]:
    """64-byte UDP datagrams per second received by the server, and the sender's rate."""
    doc = _iperf(lab, f"-c {host} -p {IPERF_PORT} -u -l {UDP_PAYLOAD} -b 0", duration)
    rx = _end(doc, "sum_received")
    tx = _end(doc, "sum_sent")
    received = float(rx["bytes"]) / UDP_PAYLOAD / float(rx["seconds"])
    sent = float(tx["packets"]) / float(tx["seconds"])
    return received, sent


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TOTAL = re.compile(r"(\d+) requests in")


def new_connections(lab: Lab, url: str, duration: float, conns: int) -> tuple[float, str]:
    """wrk with ``Connection: close``: every request is a new TCP connection. Returns the
    completed requests per second and a note on errors ("" when there were none)."""
    cmd = (f"wrk -t 1 -c {conns} -d {max(1, round(duration))}s --timeout 2s "
           f"-H 'Connection: close' {url}")
    proc = subprocess.run(["ip", "netns", "exec", lab.ns("c1"), "sh", "-c", cmd],
                          capture_output=True, text=True, timeout=duration + 30, check=False)
    out = proc.stdout
    rps = _RPS.search(out)
    if proc.returncode != 0 or rps is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {(proc.stderr or out)[-300:]!r}")
    problems = []
    total = _TOTAL.search(out)
    if (m := _SOCKERR.search(out)) is not None:
        problems.append("socket errors connect {} read {} write {} timeout {}".format(
            *m.groups()))
    if (m := _NON2XX.search(out)) is not None:
        problems.append(f"{m.group(1)} non-2xx answers")
    if total is not None and int(total.group(1)) == 0:
        raise BenchError("wrk completed no request")
    return float(rps.group(1)), "; ".join(problems)


# --------------------------------------------------------------------------------------------
# Servers and the systems under test
# --------------------------------------------------------------------------------------------


def _listening(lab: Lab, host: str, proto: str, port: int) -> bool:
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    return f":{port} " in lab.sh(host, f"ss {flag}")


def start_iperf_server(lab: Lab, tmp: Path) -> None:
    lab.spawn("s1", ["iperf3", "-s", "-p", str(IPERF_PORT)], log=str(tmp / "iperf3-s1.log"))
    wait_until(lambda: _listening(lab, "s1", "tcp", IPERF_PORT), timeout=10,
               what="iperf3 -s in s1")


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {port} backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


def start_nginx(lab: Lab, tmp: Path, names: Sequence[str] = WEB_SERVERS) -> None:
    for name in names:
        d = tmp / f"nginx-{name}"
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, port=HTTP_RPORT, name=name))
        lab.spawn(name, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                  log=str(d / "stdout.log"))
    for name in names:
        wait_until(lambda n=name: _listening(lab, n, "tcp", HTTP_RPORT),  # type: ignore[misc]
                   timeout=10, what=f"nginx in {name}")


HAPROXY_CONF = """\
global
    maxconn 8000
    log stdout format raw local0 err

defaults
    mode tcp
    timeout connect 3s
    timeout client 30s
    timeout server 30s

frontend iperf
    bind {vip}:{iperf}
    default_backend iperf

backend iperf
    server s1 {s1}:{iperf}

frontend web
    bind {vip}:{http}
    default_backend web

backend web
    balance roundrobin
{web}
"""


def start_haproxy(lab: Lab, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    web = "\n".join(f"    server {n} {SERVERS[n]}:{HTTP_RPORT}" for n in WEB_SERVERS)
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(vip=VIP, iperf=IPERF_PORT, http=HTTP_VPORT,
                                        s1=SERVERS["s1"], web=web))
    lab.sh("lba", f"ip addr add {VIP}/32 dev eth0")
    log = tmp / "haproxy.log"
    proc = lab.spawn("lba", ["haproxy", "-db", "-f", str(conf)], log=str(log))

    wait_until(lambda: proc.poll() is not None or _listening(lab, "lba", "tcp", HTTP_VPORT),
               timeout=10, what="haproxy to listen on the VIP")
    if proc.poll() is not None:
        raise BenchError(f"haproxy exited {proc.returncode}:\n{_tail(log, 3)}")
    return proc, log


LBD_CONF = """\
[node]
name = "bench"
control_socket = "{socket}"
state_dir = "{state}"

[dataplane]
client_interface = "eth0"
server_interface = "eth1"

[metrics]
listen = ""

[virtual_servers.iperf]
address = "{vip}"
port = {iperf}
protocol = "tcp"
pool = "iperf"
scheduler = "rr"

[virtual_servers.iperf_udp]
address = "{vip}"
port = {iperf}
protocol = "udp"
pool = "iperf"
scheduler = "rr"

[virtual_servers.web]
address = "{vip}"
port = {http}
protocol = "tcp"
pool = "web"
scheduler = "rr"
# wrk drives thousands of new connections a second from ONE client address: beyond the
# per-source defaults (1000 new a second), so the bench turns the limits off (docs/config.md).
max_conns_per_source = 0
max_conn_rate_per_source = 0

[pools.iperf]
servers = [ {{ address = "{s1}", port = {iperf} }} ]

[pools.web]
servers = [
{web}
]
"""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _lbd_conf(tmp: Path, *, offload: bool = False) -> Path:
    """lbd's bench config (``offload``: with ``[dataplane] offload = "conntrack"``)."""
    conf = tmp / "lbd.toml"
    web = "\n".join(f'  {{ address = "{SERVERS[n]}", port = {HTTP_RPORT} }},'
                    for n in WEB_SERVERS)
    text = LBD_CONF.format(socket=tmp / "lbd.sock", state=tmp / "state", vip=VIP,
                           iperf=IPERF_PORT,
                           http=HTTP_VPORT, s1=SERVERS["s1"], web=web)
    if offload:
        text = configs.with_dataplane(text, 'offload = "conntrack"')
    conf.write_text(text)
    return conf


def start_workers(lab: Lab, tmp: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the multi-worker prototype (bench/workers.py, not lbd) in lba with lbd's bench
    config; the systems' reachability check says when it forwards."""
    log = tmp / "workers.log"
    proc = lab.spawn("lba", [sys.executable, "-m", "bench.workers", "--config",
                             str(_lbd_conf(tmp)), "--workers", str(workers)],
                     log=str(log), env=ENV)
    try:
        wait_until(lambda: proc.poll() is not None or "workers on" in _tail(log), timeout=20,
                   what="the workers to start")
    except TimeoutError as exc:
        raise BenchError(f"{exc}\n{_tail(log, 5)}") from exc
    if proc.poll() is not None:
        raise BenchError(f"bench.workers exited {proc.returncode}:\n{_tail(log, 5)}")
    return proc, log


def start_lbd(lab: Lab, tmp: Path, *, pure: bool = False,
              offload: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    """Start lbd in lba (``pure``: with LBD_NATIVE=pure, else with whatever build the
    environment gives it: lb/native.py; ``offload``: with the kernel fast path); return its
    process and log. Raises BenchError when it does not come up."""
    sock = tmp / "lbd.sock"
    conf = _lbd_conf(tmp, offload=offload)
    log = tmp / "lbd.log"
    env = {**ENV, "LBD_NATIVE": "pure"} if pure else ENV
    proc = lab.spawn("lba", [str(BIN / "lbd"), "--config", str(conf)], log=str(log), env=env)

    def answering() -> bool:
        if proc.poll() is not None:
            return True
        status = subprocess.run([str(BIN / "lbctl"), "--socket", str(sock), "--json", "status"],
                                capture_output=True, timeout=10, check=False)
        return status.returncode == 0

    try:
        wait_until(answering, timeout=20, what="lbd to answer on its control socket")
    except TimeoutError as exc:
        raise BenchError(f"{exc}\n{_tail(log, 5)}") from exc
    if proc.poll() is not None:
        raise BenchError(f"lbd exited {proc.returncode}:\n{_tail(log, 5)}")
    return proc, log


def _reachable(lab: Lab, host: str, port: int, timeout: float = 10) -> None:
    """Wait until a TCP connection from c1 to host:port succeeds (the path is set up)."""
    probe = (f"{sys.executable} -c \"import socket; "
             f"socket.create_connection(('{host}', {port}), timeout=1).close()\"")

    try:
        wait_until(lambda: _probe_rc(lab, probe) == 0, timeout=timeout, interval=0.2,
                   what=f"{host}:{port} to accept connections from c1")
    except TimeoutError as exc:
        raise BenchError(str(exc)) from exc


def _probe_rc(lab: Lab, cmd: str) -> int:
    proc = subprocess.run(["ip", "netns", "exec", lab.ns("c1"), "sh", "-c", cmd],
                          capture_output=True, timeout=5, check=False)
    return proc.returncode


# --------------------------------------------------------------------------------------------
# Systems under test, each in a lab of its own, measured in interleaved rounds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run: benchmark names ("throughput", "pps", "cps"), seconds per client run,
    rounds (each system measured once per round, systems interleaved), wrk's concurrent
    connections and iperf3's parallel streams for the second TCP figure."""

    benches: tuple[str, ...]
    duration: float
    rounds: int = 1
    conns: int = 32
    streams: int = 4


def figure_keys(bench: str, plan: Plan) -> list[str]:
    if bench == "throughput":
        return ["tcp_1"] + ([f"tcp_{plan.streams}"] if plan.streams > 1 else [])
    if bench == "pps":
        return ["udp_pps"]
    if bench == "cps":
        return ["cps"]
    raise ValueError(bench)


@dataclass(frozen=True, slots=True)
class Target:
    """Where c1 sends traffic for one system, and the load balancer's process if any."""

    iperf_host: str
    http_host: str
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}/"

    def died(self) -> str:
        """A line on the load balancer's death, to append to an error ("" while it runs)."""
        if self.proc is None or self.proc.poll() is None:
            return ""
        tail = _tail(self.log, 5) if self.log else ""
        return f"\n(the load balancer exited {self.proc.returncode}:)\n{tail}"


@dataclass(slots=True)
class System:
    """One system under test, set up in its own lab and ready to be measured."""

    name: str
    lab: Lab
    target: Target
    benches: tuple[str, ...]


class Systems:
    """The systems of a run, all set up before the first measurement; a context manager that
    tears every lab down (processes killed, namespaces deleted), also on error or Ctrl-C."""

    def __init__(self) -> None:
        self.ready: list[System] = []
        self._labs: list[Lab] = []

    def __enter__(self) -> Systems:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with _signals_held():
            while self._labs:
                self._labs.pop().close()

    def start(self, system: str, plan: Plan, tmp: Path) -> dict[str, str]:
        """Set ``system`` up for the plan's benchmarks that apply to it; returns figure key →
        error for the figures it cannot provide (a tool missing, a failed set-up)."""
        errors: dict[str, str] = {}
        benches = [b for b in plan.benches if system in NEEDS[b]]
        for bench in benches:
            missing = missing_tools(NEEDS[bench][system])
            if missing:
                for key in figure_keys(bench, plan):
                    errors[key] = f"not installed: {', '.join(missing)}"
        benches = [b for b in benches if not missing_tools(NEEDS[b][system])]
        if not benches:
            return errors
        tmp.mkdir(parents=True, exist_ok=True)
        lab = Lab()
        self._labs.append(lab)
        try:
            build(lab, clients=("c1",), servers=WEB_SERVERS)
            for host in ("c1", "lba", *WEB_SERVERS):
                for key, value in TCP_SYSCTLS.items():
                    lab.sh(host, f"sysctl -q -w '{key}={value}'")
            if {"throughput", "pps"} & set(benches):
                start_iperf_server(lab, tmp)
            if "cps" in benches:
                start_nginx(lab, tmp)
            target = _setup(system, lab, tmp)
            for bench in benches:  # every path works before anything is measured
                if bench in ("throughput", "pps"):
                    _reachable(lab, target.iperf_host, IPERF_PORT)
                else:
                    _reachable(lab, target.http_host, target.http_port)
        except (BenchError, LabError, TimeoutError, subprocess.TimeoutExpired) as exc:
            for bench in benches:
                for key in figure_keys(bench, plan):
                    errors[key] = f"set-up failed: {exc}"
            self._labs.remove(lab)
            with _signals_held():
                lab.close()
            return errors
        self.ready.append(System(system, lab, target, tuple(benches)))
        return errors


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while tearing down, so that a second one cannot leave
    namespaces behind; the interrupt that started the teardown is already on its way."""
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = [signal.signal(sig, signal.SIG_IGN) for sig in held]
    try:
        yield
    finally:
        for sig, handler in zip(held, old, strict=True):
            signal.signal(sig, handler)


def _setup(system: str, lab: Lab, tmp: Path) -> Target:
    if system == "kernel":
        lab.sysctl("lba", "net.ipv4.ip_forward", "1")
        lab.sh("c1", f"ip route add {GATEWAY.rsplit('.', 1)[0]}.0/24 via {LB_FRONT['lba']}")
        return Target(SERVERS["s1"], SERVERS["s1"], HTTP_RPORT)
    if system == "haproxy":
        proc, log = start_haproxy(lab, tmp)
    elif system in ("lbd", "lbd-pure", "lbd-offload"):
        proc, log = start_lbd(lab, tmp, pure=system == "lbd-pure",
                              offload=system == "lbd-offload")
    elif system == "lbd-2w":
        proc, log = start_workers(lab, tmp, 2)
    else:
        raise ValueError(system)
    return Target(VIP, VIP, HTTP_VPORT, proc, log)


def measure(system: System, bench: str, plan: Plan) -> tuple[dict[str, float], list[str]]:
    """One client run (two for throughput) of ``bench`` against ``system``: figure key →
    value, and notes. Raises BenchError (with the load balancer's last words if it died)."""
    lab, target = system.lab, system.target
    try:
        if bench == "throughput":
            values = {"tcp_1": tcp_throughput(lab, target.iperf_host, 1, plan.duration)}
            if plan.streams > 1:
                values[f"tcp_{plan.streams}"] = tcp_throughput(
                    lab, target.iperf_host, plan.streams, plan.duration)
            return values, []
        if bench == "pps":
            received, sent = udp_pps(lab, target.iperf_host, plan.duration)
            return {"udp_pps": received}, [f"sender offered {sent:,.0f}/s"]
        if bench == "cps":
            cps, problems = new_connections(lab, target.url, plan.duration, plan.conns)
            return {"cps": cps}, [problems] if problems else []
    except (LabError, TimeoutError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{exc}{target.died()}") from exc
    except BenchError as exc:
        raise BenchError(f"{exc}{target.died()}") from exc
    raise ValueError(bench)
