"""Issue 10 item 5: lbd takes over a box whose own process served the VIP a moment ago.

A local HTTP server on the VIP in the LB's namespace answers a client from fixed source
ports and closes first, so the LB's kernel keeps a TIME_WAIT socket for each 4-tuple. The
server stops and its address goes (an operator replacing a local proxy by lbd); lbd starts.
The client connects again from the same ports: early demux would attach each SYN to its
TIME_WAIT socket and ``ip_forward()`` would drop it before the TUN. Every connection must
reach a real server.
"""

from __future__ import annotations

import sys

from lab import configs
from lab.topology import VIP, wait_until
from tests.netns.harness import ENV, LabEnv

PORTS = 20


def test_time_wait_sockets_on_a_vip_do_not_blind_lbd(env: LabEnv) -> None:
    env.start_servers()
    env.lab.sh("lba", f"ip addr add {VIP}/32 dev lo")
    local = env.lab.spawn("lba", [sys.executable, "-m", "http.server", "--bind", VIP, "80",
                                  "--directory", str(env.tmp)], env=ENV)
    wait_until(lambda: f"{VIP}:80 " in env.lab.sh("lba", "ss -ltnH"), timeout=10,
               what="the local server to listen on the VIP")
    first = env.python("c1", "tests.netns.portclient", VIP, "80", "--count", str(PORTS))
    assert not any(a.startswith("error") for a in first["answers"]), first
    env.lab.stop(local)
    env.lab.sh("lba", f"ip addr del {VIP}/32 dev lo")
    tw = env.lab.sh("lba", f"ss -tanH state time-wait src {VIP}")
    assert len(tw.splitlines()) == PORTS, tw  # the trap is set

    lbd = env.lbd(configs.single(), "lba")
    again = env.python("c1", "tests.netns.portclient", VIP, "80", "--count", str(PORTS))
    assert all(a in {"s1", "s2", "s3"} for a in again["answers"]), again["answers"]
    assert "tcp_early_demux = 0" in lbd.log_text()
    lbd.stop()
    # Restored at stop.
    assert env.lab.sh("lba", "cat /proc/sys/net/ipv4/tcp_early_demux").strip() == "1"
