"""Client-visible failover time of an lbd pair (issue: < 0.5 s at 100 ms adverts).

A client in c1 asks the VIP again and again, each request with a 50 ms timeout; the master is
SIGKILLed; the figure is the time from the kill to the start of the first request that then
succeeds through the new master. CLOCK_MONOTONIC is shared by all namespaces of the machine,
so the client's timestamps and the kill's compare directly. Each round builds the pair from
conf/node-a.toml and conf/node-b.toml as shipped (100 ms adverts).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from lab.harness import ENV, LabEnv, pair_env, shipped_node_config
from lab.topology import VIP, wait_until

PROBE_TIMEOUT = 0.05


def vrrp_states(env: LabEnv, idx: int) -> set[str]:
    got = env.lbds[idx].ctl("vrrp", check=False) or {}
    return {v["state"] for v in got.values()}


def one_round() -> float:
    with pair_env("lbd-failover-") as env:
        lab = env.lab
        a = env.lbd(shipped_node_config("node-a", env.tmp), "lba")
        env.lbd(shipped_node_config("node-b", env.tmp), "lbb")
        wait_until(lambda: vrrp_states(env, 0) == {"MASTER"}
                   and vrrp_states(env, 1) == {"BACKUP"}, timeout=15, what="the election")
        # Warm the client's ARP entry and the servers' checks.
        env.client("c1", "get", f"http://{VIP}/", "--count", "3")
        wait_until(lambda: all(s["up"] for s in env.lbds[0].ctl("servers")), timeout=15,
                   what="the servers to be up")
        kill_at = time.monotonic() + 1.0
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
        return float(after[0] - killed)
