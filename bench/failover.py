"""Client-visible failover time of an lbd pair (issue: < 0.5 s at 100 ms adverts; at 30 ms
adverts a stream gap < 250 ms and the first new connection < 150 ms).

A client in c1 asks the VIP again and again, each request with a 50 ms timeout, while c2
reads a numbered stream through the VIP; the master is SIGKILLed. Two figures: the time from
the kill to the start of the first request that then succeeds through the new master, and
the largest gap between two lines of the stream (every line must arrive, in order).
CLOCK_MONOTONIC is shared by all namespaces of the machine, so the client's timestamps and
the kill's compare directly. Each round builds the pair from conf/node-a.toml and
conf/node-b.toml as shipped (100 ms adverts), or with their advert interval replaced.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab.harness import ENV, LabEnv, pair_env, shipped_node_config
from lab.topology import VIP, wait_until

PROBE_TIMEOUT = 0.05
STREAM_SECONDS = 5


@dataclass(frozen=True, slots=True)
class Failover:
    first_request: float  # seconds from the kill to the first good new request's start
    stream_gap: float  # the largest gap between two lines of the stream across the kill


def vrrp_states(env: LabEnv, idx: int) -> set[str]:
    got = env.lbds[idx].ctl("vrrp", check=False) or {}
    return {v["state"] for v in got.values()}


def node_config(name: str, tmp: Path, advert: str | None) -> str:
    text = shipped_node_config(name, tmp)
    if advert is not None:
        text = re.sub(r'advert_interval = "[^"]*"', f'advert_interval = "{advert}"', text)
    return text


def one_round(advert: str | None = None) -> Failover:
    with pair_env("lbd-failover-") as env:
        lab = env.lab
        a = env.lbd(node_config("node-a", env.tmp, advert), "lba")
        env.lbd(node_config("node-b", env.tmp, advert), "lbb")
        wait_until(lambda: vrrp_states(env, 0) == {"MASTER"}
                   and vrrp_states(env, 1) == {"BACKUP"}, timeout=15, what="the election")
        # Warm the client's ARP entry and the servers' checks.
        env.client("c1", "get", f"http://{VIP}/", "--count", "3")
        wait_until(lambda: all(s["up"] for s in env.lbds[0].ctl("servers")), timeout=15,
                   what="the servers to be up")
        kill_at = time.monotonic() + 1.0
        stream = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("c2"), sys.executable, "-m", "lab.client",
             "stream", f"http://{VIP}/stream/{STREAM_SECONDS}", "--timeout", "5"],
            stdout=subprocess.PIPE, text=True, env={**ENV, "PATH": "/usr/sbin:/usr/bin"})
        probe = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("c1"), sys.executable, "-m", "lab.client",
             "probe", f"http://{VIP}/", "--timeout", str(PROBE_TIMEOUT), "--duration",
             "4"],
            stdout=subprocess.PIPE, text=True, env={**ENV, "PATH": "/usr/sbin:/usr/bin"})
        while time.monotonic() < kill_at:
            time.sleep(0.005)
        killed = time.monotonic()
        a.stop(signal.SIGKILL)
        out, _ = probe.communicate(timeout=30)
        attempts = json.loads(out.strip().splitlines()[-1])["attempts"]
        after = [t for t, ok in attempts if ok and t > killed]
        if not after:
            summary = [(round(t - killed, 3), ok) for t, ok in attempts[-8:]]
            raise RuntimeError(f"no request succeeded within 3 s of the kill: {summary}")
        out, _ = stream.communicate(timeout=30)
        got = json.loads(out.strip().splitlines()[-1])
        if got["error"] or not got["in_order"]:
            raise RuntimeError(f"the stream across the kill broke: {got}")
        return Failover(float(after[0] - killed), float(got["max_gap"]))
