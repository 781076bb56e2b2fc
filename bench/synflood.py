"""Real clients through a spoofed SYN flood (issue 11 item 1): their success rate and lbd's CPU.

A standalone lbd from conf/single.toml as shipped (10⁶ sessions, the default half-open cap
and per-source limits) in the lab; c2 sends a spoofed SYN flood at the VIP
(:mod:`lab.synflood`, forged sources 198.51.100.110-250) at a given rate, 0 meaning as fast
as one raw socket can; two seconds in, c1 runs a paced GET loop (50 connections/s, 3 s
timeout each, for 5 s). Figures per round: the share of c1's GETs that succeeded, lbd's CPU
(user + system over the flood, in cores), the flood's rate as sent, and the packets the kernel
dropped at the TUN before lbd read them (the TUN's TX drops).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lab.harness import ENV, LabEnv, cpu_seconds, shipped_node_config
from lab.topology import VIP, Lab, build, wait_until

FLOOD_SECONDS = 9
LOAD_RATE = 50
LOAD_SECONDS = 5


@dataclass(frozen=True, slots=True)
class FloodRound:
    legit_ok: float  # share of the real client's GETs that succeeded, 0..1
    lbd_cpu: float  # cores, over the flood
    flood_rate: float  # SYN/s sent
    tun_dropped: int  # packets the kernel dropped at the TUN during the round


def _tun_dropped(lab: Lab) -> int:
    out = lab.sh("lba", "ip -s -j link show lbtun0")
    stats = json.loads(out)[0]["stats64"]
    return int(stats["tx"]["dropped"])


def _spawn(lab: Lab, host: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", lab.ns(host), sys.executable, "-m", *args],
                            stdout=subprocess.PIPE, text=True,
                            env={**ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def _last_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    out, _ = proc.communicate(timeout=timeout)
    got: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return got


def one_round(rate: int, syn_proxy: bool | str = False) -> FloodRound:
    """One round; ``syn_proxy``: with ``[dataplane] syn_proxy = true`` or ``"auto"``
    (lb.synproxy; the real clients start 2 s into the flood, after "auto" engaged)."""
    lab = Lab()
    try:
        build(lab)
        with tempfile.TemporaryDirectory(prefix="lbd-synflood-") as tmp:
            env = LabEnv(lab, Path(tmp))
            env.start_servers()
            text = shipped_node_config("single", env.tmp)
            if syn_proxy:
                value = '"auto"' if syn_proxy == "auto" else "true"
                text = text.replace("[dataplane]\n", f"[dataplane]\nsyn_proxy = {value}\n", 1)
            lbd = env.lbd(text)
            wait_until(lambda: all(s["up"] for s in lbd.ctl("servers")), timeout=15,
                       what="the servers to be up")
            env.client("c1", "get", f"http://{VIP}/", "--count", "3")  # ARP, warm paths
            assert lbd.proc is not None
            pid = lbd.proc.pid
            dropped0, cpu0, t0 = _tun_dropped(lab), cpu_seconds(pid), time.monotonic()
            flood = _spawn(lab, "c2", "lab.synflood", VIP, "--port", "80", "--rate",
                           str(rate), "--duration", str(FLOOD_SECONDS))
            wait_until(lambda: time.monotonic() - t0 >= 2 or flood.poll() is not None,
                       timeout=5, what="the flood to run for 2 s")
            load = _spawn(lab, "c1", "lab.client", "load", f"http://{VIP}/", "--rate",
                          str(LOAD_RATE), "--duration", str(LOAD_SECONDS), "--timeout", "3")
            got = _last_json(load, timeout=LOAD_SECONDS + 30)
            sent = _last_json(flood, timeout=FLOOD_SECONDS + 30)
            cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            dropped = _tun_dropped(lab) - dropped0
            attempts = int(str(got["attempts"])) or 1
            return FloodRound(int(str(got["ok"])) / attempts, cpu, float(str(sent["rate"])),
                              dropped)
    finally:
        lab.close()
