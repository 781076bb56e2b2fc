"""Small helpers shared by namespace tests."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from lab.harness import ENV, Holder, Samples, metric
from tests.netns.harness import LabEnv

__all__ = ["Holder", "Samples", "cut_vrrp", "drops", "holds", "metric", "result", "scrape",
           "spawn_lab"]


def spawn_lab(env: LabEnv, host: str, module: str, *args: str) -> subprocess.Popen[str]:
    """``python -m MODULE ARGS`` of this tree (lab.client, lab.synflood …) in ``host``,
    running in the background; :func:`result` waits for its JSON answer."""
    return subprocess.Popen(["ip", "netns", "exec", env.lab.ns(host), sys.executable, "-m",
                             module, *args], stdout=subprocess.PIPE, text=True,
                            env={**ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def result(proc: subprocess.Popen[str], timeout: float = 60) -> Any:
    """The last JSON line a :func:`spawn_lab` process printed (it must end in ``timeout``)."""
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def scrape(env: LabEnv, host: str = "lba", port: int = 9641) -> Samples:
    """Scrape lbd's /metrics from inside ``host``: {(sample name, sorted labels): value}."""
    return env.scrape(host, port)


def drops(samples: Samples) -> dict[str, float]:
    return {dict(lbl)["reason"]: v for (n, lbl), v in samples.items() if n == "lbd_drops_total"}


def cut_vrrp(env: LabEnv, cut: bool) -> None:
    """Cut (or heal) VRRP between the nodes while every link keeps its carrier: the bridges
    stop flooding multicast (224.0.0.18) to the LBs' ports; ARP and unicast still flow."""
    for bridge in ("front", "back"):
        for host in ("lba", "lbb"):
            env.lab.sh("sw", f"bridge link set dev {bridge[:4]}-{host} "
                             f"mcast_flood {'off' if cut else 'on'}")


def holds(env: LabEnv, host: str, address: str, ifname: str) -> bool:
    """Does lbd on ``host`` hold ``address``: routed into its TUN, proxy ARP on ``ifname``?"""
    route = env.lab.sh(host, f"ip -4 route show {address}/32")
    proxy = env.lab.sh(host, f"ip neigh show proxy dev {ifname}")
    return "lbtun0" in route and address in proxy.split()
