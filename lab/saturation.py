"""A saturated master: the load of issue 10 item 2 through an lbd pair, and the timing of the
master's adverts as the backup sees them (the namespace test and the bench share it).

The pair is lab/configs.py's ``pair()`` (instances "front" and "back" in one group) with
per-source limits off (wrk opens thousands of connections a second from one address) and two
more virtual servers: VIP:5201/tcp → s1 (iperf3 streams) and VIP:5202 tcp+udp → s2 (an
iperf3 64-byte UDP flood). The load, all through the master for ``seconds``: iperf3 with
``streams`` streams from c1, wrk (2 threads, 32 connections, ``Connection: close``) from c2
against nginx in s1..s3 (the lab's Python server where nginx is missing), and optionally the
UDP flood from c1 and a spoofed junk flood (``lab.synflood --kind junk``: 64-byte UDP
datagrams from random sources to a VIP port without a virtual server, which lbd reads and
drops). tshark in lbb records the arrival of each of lba's front adverts.

Every process is bounded by its own duration; :func:`run` waits for them with a deadline.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lab import configs
from lab.harness import ENV, LabEnv, Lbd, Samples, cpu_seconds, metric
from lab.topology import LB_FRONT, VIP, wait_until

IPERF_PORT = 5201
UDP_PORT = 5202  # iperf3 --udp, 64-byte datagrams, as fast as c1 can send
JUNK_PORT = 9  # no virtual server: lbd reads every datagram and drops it
INSTANCES = ("front", "back")
CURL = shutil.which("curl")
TSHARK = shutil.which("tshark")
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def master_down(advert: float) -> float:
    """lbb's Master_Down_Interval (priority 100) with lba's ``advert`` seconds."""
    return 3 * advert + (256 - 100) * advert / 256


def sample(env: LabEnv, host: str) -> Samples:
    """lbd's metrics in ``host``: with curl if there is one (a Python client per sample would
    take CPU from the load it is meant to watch), else with ``env.scrape``."""
    if CURL is None:
        return env.scrape(host)
    text = env.lab.sh(host, f"{CURL} -sS --max-time 5 http://127.0.0.1:9641/metrics")
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def vrrp_view(samples: Samples) -> dict[str, tuple[float, str]]:
    """{instance: (transitions, the state whose lbd_vrrp_state is 1)}."""
    out = {}
    for inst in INSTANCES:
        current = [st for st in ("INIT", "BACKUP", "MASTER", "FAULT")
                   if metric(samples, "lbd_vrrp_state", instance=inst, state=st) == 1.0]
        out[inst] = (metric(samples, "lbd_vrrp_transitions_total", instance=inst),
                     ",".join(current))
    return out


def states(lbd: Lbd) -> dict[str, str]:
    return {name: v["state"] for name, v in lbd.ctl("vrrp").items()}


def wait_states(lbd: Lbd, state: str, timeout: float = 10) -> None:
    wait_until(lambda: states(lbd) == dict.fromkeys(INSTANCES, state), timeout=timeout,
               what=f"{lbd.host} to be {state} for both instances")


def start_nginx(env: LabEnv, name: str, port: int = 8080) -> None:
    """nginx in server ``name`` answering every GET with its name, like lab.realserver but
    cheap enough per connection that the LB, not the servers, is what the load saturates."""
    root = env.tmp / f"nginx-{name}"
    root.mkdir()
    conf = root / "nginx.conf"
    temps = "\n".join(f"    {t}_temp_path {root}/{t};"
                      for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temps}
    server {{
        listen {port} reuseport backlog=1024;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
""")
    env.lab.spawn(name, [NGINX or "nginx", "-c", str(conf), "-p", str(root), "-e",
                         str(root / "error.log")], log=str(root / "stdout.log"))
    wait_until(lambda: f":{port} " in env.lab.sh(name, "ss -ltnH"), timeout=10,
               what=f"nginx to listen in {name}")


def start_servers(env: LabEnv, udp: bool) -> None:
    """HTTP :8080 in s1..s3 (nginx where installed), iperf3 servers for the load."""
    for name in ("s1", "s2", "s3"):
        if NGINX is not None:
            start_nginx(env, name)
        else:
            env.start_server(name)
    _iperf_server(env, "s1", IPERF_PORT)
    if udp:
        _iperf_server(env, "s2", UDP_PORT)


def _iperf_server(env: LabEnv, host: str, port: int) -> None:
    env.lab.spawn(host, ["iperf3", "--server", "--port", str(port), "--one-off"])
    wait_until(lambda: f":{port} " in env.lab.sh(host, "ss -ltnH"), timeout=10,
               what=f"iperf3 to listen in {host}")


def node_config(node: str, *, priority: int, advert: str, udp: bool) -> str:
    extra = configs.iperf_service(IPERF_PORT)
    if udp:
        extra += configs.udp_flood_service(UDP_PORT)
    return configs.pair(node, priority=priority, advert=advert,
                        web_extra=configs.UNLIMITED_SOURCES) + extra


def start_pair(env: LabEnv, advert: str, udp: bool) -> tuple[Lbd, Lbd]:
    """lba MASTER and lbb BACKUP of both instances, lbb following lba's front adverts."""
    a = env.lbd(node_config("lba", priority=200, advert=advert, udp=udp), "lba")
    wait_states(a, "MASTER")
    b = env.lbd(node_config("lbb", priority=100, advert=advert, udp=udp), "lbb")
    wait_states(b, "BACKUP")
    wait_until(lambda: b.ctl("vrrp")["front"]["master"] == LB_FRONT["lba"], timeout=5,
               what="lbb to learn lba as the front master")
    return a, b


@dataclass
class _Load:
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def spawn(self, env: LabEnv, name: str, host: str, cmd: list[str]) -> None:
        self.logs[name] = env.tmp / f"load-{name}.out"
        self.procs[name] = env.lab.spawn(host, cmd, log=str(self.logs[name]), env=ENV)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs.values())

    def output(self, name: str) -> str:
        return self.logs[name].read_text()


def _start_load(env: LabEnv, seconds: int, streams: int, udp: bool, junk: bool) -> _Load:
    load = _Load()
    load.spawn(env, "iperf3", "c1", [
        "iperf3", "--client", VIP, "--port", str(IPERF_PORT), "--time", str(seconds),
        "--parallel", str(streams), "--connect-timeout", "3000", "--json"])
    load.spawn(env, "wrk", "c2", [
        "wrk", "--threads", "2", "--connections", "32", "--duration", f"{seconds}s",
        "--timeout", "2s", "--header", "Connection: close", f"http://{VIP}/"])
    if udp:
        load.spawn(env, "udp", "c1", [
            "iperf3", "--client", VIP, "--port", str(UDP_PORT), "--udp", "--length", "64",
            "--bitrate", "0", "--time", str(seconds), "--connect-timeout", "3000", "--json"])
    if junk:
        load.spawn(env, "junk", "x", [
            sys.executable, "-m", "lab.synflood", VIP, "--kind", "junk", "--port",
            str(JUNK_PORT), "--duration", str(seconds), "--count", "50000000"])
    return load


def _start_capture(env: LabEnv, seconds: int) -> tuple[subprocess.Popen[bytes], Path] | None:
    """tshark in lbb: the arrival time of each of lba's front adverts, for the whole run."""
    if TSHARK is None:
        return None
    log = env.tmp / "adverts.txt"
    proc = env.lab.spawn("lbb", [
        TSHARK, "-n", "-l", "-i", "eth0", "-a", f"duration:{seconds + 5}",
        "-f", f"ip proto 112 and src host {LB_FRONT['lba']}",
        "-T", "fields", "-e", "frame.time_epoch"], log=str(log))
    wait_until(lambda: "Capturing on" in log.read_text(), timeout=10,
               what="tshark to capture in lbb")
    return proc, log


def advert_gaps(text: str) -> list[float]:
    """The gaps between consecutive advert arrival times (tshark's epoch lines)."""
    times = sorted(float(line) for line in text.split() if re.fullmatch(r"\d+\.\d+", line))
    return [b - a for a, b in itertools.pairwise(times)]


@dataclass(frozen=True, slots=True)
class Saturation:
    """What one loaded run measured."""

    advert: float  # the advert interval, s
    seconds: float  # how long the load ran
    gaps: tuple[float, ...]  # between lba's front adverts as lbb received them (tshark)
    transitions: dict[str, float]  # VRRP transitions during the load, per "host/instance"
    final: dict[str, str]  # the state of each "host/instance" afterwards
    samples: int  # states sampled during the load (0 without a watcher)
    figures: dict[str, float]  # iperf3, wrk, UDP, CPU and advert counts, for the report

    @property
    def worst_gap(self) -> float | None:
        return max(self.gaps) if self.gaps else None

    def gaps_over(self, factor: float) -> int:
        return sum(1 for g in self.gaps if g > factor * self.advert)


def run(env: LabEnv, a: Lbd, b: Lbd, *, advert: str, seconds: int, streams: int, udp: bool,
        junk: bool = False, watch: Callable[[], None] | None = None,
        poll: float = 0.2) -> Saturation:
    """Load the master lba for ``seconds``; ``watch()`` is called every ``poll`` seconds while
    the load runs (a test asserts the states there; the bench passes none and so costs the
    load nothing). Raises RuntimeError when a load process failed."""
    before = {h: env.scrape(h) for h in ("lba", "lbb")}
    assert a.proc is not None
    cpu0, t0 = cpu_seconds(a.proc.pid), time.monotonic()
    capture = _start_capture(env, seconds)
    load = _start_load(env, seconds, streams, udp, junk)
    samples = 0
    deadline = time.monotonic() + seconds + 20
    while load.running():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the load did not finish within {seconds + 20} s")
        if watch is not None:
            watch()
            samples += 1
        time.sleep(poll)  # polling interval: leave the CPU to the load between samples
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(a.proc.pid) - cpu0) / elapsed
    gaps: list[float] = []
    if capture is not None:
        env.lab.stop(capture[0])  # now, rather than at the end of its -a duration
        gaps = advert_gaps(capture[1].read_text())
    for name, proc in load.procs.items():
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: {load.output(name)[-2000:]}")
    after = {h: env.scrape(h) for h in ("lba", "lbb")}
    transitions, final = {}, {}
    for host in ("lba", "lbb"):
        old, new = vrrp_view(before[host]), vrrp_view(after[host])
        for inst in INSTANCES:
            transitions[f"{host}/{inst}"] = new[inst][0] - old[inst][0]
            final[f"{host}/{inst}"] = new[inst][1]
    iperf = json.loads(load.output("iperf3"))
    if "sum_received" not in iperf.get("end", {}):
        raise RuntimeError(f"iperf3 measured nothing: {iperf.get('error', 'no end.sum_received')}")
    gbits = iperf["end"]["sum_received"]["bits_per_second"] / 1e9
    found = re.search(r"Requests/sec:\s+([\d.]+)", load.output("wrk"))
    if not found:
        raise RuntimeError(f"wrk printed no rate: {load.output('wrk')[-2000:]}")
    figures: dict[str, float] = {"iperf3_gbit_s": round(gbits, 3),
                                 "wrk_req_s": float(found.group(1)),
                                 "lba_lbd_cpu": round(cpu, 2), "iperf3_streams": streams}
    if udp:
        udp_sum = json.loads(load.output("udp"))["end"]["sum"]
        figures["udp_64b_pkt_s_sent"] = round(udp_sum["packets"] / udp_sum["seconds"])
    if junk:
        figures["junk_pkt_s_sent"] = json.loads(load.output("junk").splitlines()[-1])["rate"]
    heard = [metric(s, "lbd_vrrp_adverts_received_total", instance="front")
             for s in (before["lbb"], after["lbb"])]
    sent = [metric(s, "lbd_vrrp_adverts_sent_total", instance="front")
            for s in (before["lba"], after["lba"])]
    drops = [metric(s, "lbd_drops_total", reason="no_service")
             for s in (before["lba"], after["lba"])]
    figures["lba_drops_no_service"] = drops[1] - drops[0]
    # lba's front timer (eth0): how late it ran, i.e. how late its adverts left lbd
    late = "lbd_vrrp_timer_lateness_seconds"
    over = [metric(s, f"{late}_count", interface="eth0")
            - metric(s, f"{late}_bucket", interface="eth0", le="0.015")
            for s in (before["lba"], after["lba"])]
    figures["lba_timer_runs_over_15ms_late"] = over[1] - over[0]
    for g in "012":  # collections that held the GIL over 10 ms, by generation
        gc_over = [metric(s, "lbd_gc_pause_seconds_count", generation=g)
                   - metric(s, "lbd_gc_pause_seconds_bucket", generation=g, le="0.01")
                   for s in (before["lba"], after["lba"])]
        figures[f"lba_gc{g}_pauses_over_10ms"] = gc_over[1] - gc_over[0]
    figures["lba_timer_late_max_ms"] = round(
        1000 * metric(after["lba"], "lbd_vrrp_timer_lateness_max_seconds", interface="eth0"), 1)
    relayed = [metric(s, "lbd_vrrp_adverts_relayed_total", instance="front")
               for s in (before["lba"], after["lba"])]
    figures["front_copies_sent_by_lba_relay"] = relayed[1] - relayed[0]
    figures["front_adverts_sent_by_lba"] = sent[1] - sent[0]
    figures["front_adverts_heard_by_lbb"] = heard[1] - heard[0]
    return Saturation(float(advert.removesuffix("ms")) / 1000, elapsed, tuple(gaps),
                      transitions, final, samples, figures)
