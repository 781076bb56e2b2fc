"""The active-active pair: each node masters its own VIP, and either takes over the other's.

Built from conf/aa-node-a.toml and conf/aa-node-b.toml as shipped: node A masters VIP A and
the servers' gateway, node B masters VIP B; the three real servers are shared and keep one
default gateway, so the replies of VIP B's sessions come back through node A. Clients c1 and
c2 each hold a persistent binding on both VIPs, a long stream and a new-connection load run
through both VIPs, and a node dies (SIGKILL of lbd, or the whole box losing its links) or is
stopped (SIGTERM): the survivor masters every instance, every stream completes with every
line in order, no request of the load fails, and every persistent client stays on its
server. A restarted node takes its VIP back only once it has the peer's table.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from lab.harness import shipped_node_config
from lab.topology import CLIENTS, GATEWAY, SERVERS, VIP, VIP_B, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import holds, metric, result, scrape, spawn_lab

pytestmark = pytest.mark.topology(pair=True)

URL = {"a": f"http://{VIP}/", "b": f"http://{VIP_B}/"}
OWN = {"lba": {"front-a": "MASTER", "front-b": "BACKUP", "back": "MASTER"},
       "lbb": {"front-a": "BACKUP", "front-b": "MASTER", "back": "BACKUP"}}
ALL_MASTER = {"front-a": "MASTER", "front-b": "MASTER", "back": "MASTER"}
STREAM_SECONDS = 6
NAME_OF = {f"{addr}:8080": name for name, addr in SERVERS.items()}


def states(lbd: Lbd) -> dict[str, str]:
    return {name: v["state"] for name, v in lbd.ctl("vrrp").items()}


def wait_states(lbd: Lbd, want: dict[str, str], timeout: float = 10) -> None:
    wait_until(lambda: states(lbd) == want, timeout=timeout, what=f"{lbd.host} to be {want}")


def start_aa(env: LabEnv) -> tuple[Lbd, Lbd]:
    env.start_servers()
    a = env.lbd(shipped_node_config("aa-node-a", env.tmp), "lba")
    b = env.lbd(shipped_node_config("aa-node-b", env.tmp), "lbb")
    for lbd in (a, b):
        wait_states(lbd, OWN[lbd.host], timeout=15)
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["connected"],  # type: ignore[misc]
                   timeout=10, what=f"{lbd.host}'s sync connections")
        wait_until(lambda lbd=lbd: all(s["up"] for s in lbd.ctl("servers")),  # type: ignore[misc]
                   timeout=15, what=f"{lbd.host}'s servers to be up")
    return a, b


def pinned(env: LabEnv, client: str, vip: str, count: int = 4) -> str:
    """The one server ``client`` reaches on VIP ``vip`` ("a" or "b"), over ``count`` GETs
    (one of which may time out: see ``traffic``)."""
    got: Any = env.client(client, "get", URL[vip], "--count", str(count), "--timeout", "3")
    answers = got["answers"]
    assert len(set(answers)) == 1 and answers[0] in SERVERS, got
    return str(answers[0])


def spawn_client(env: LabEnv, host: str, *args: str) -> subprocess.Popen[str]:
    return spawn_lab(env, host, "lab.client", *args)


def streaming(lbd: Lbd, count: int) -> bool:
    """Has ``lbd`` a copy or an own session of ``count`` established client streams?"""
    est = [s for s in lbd.ctl("sessions") if s["state"] == "ESTABLISHED"]
    return len(est) >= count


@contextmanager
def traffic(env: LabEnv, survivor: Lbd) -> Iterator[dict[str, Any]]:
    """Streams (c1 → VIP A, c2 → VIP B) and a new-connection load on both VIPs, running
    while the block runs; checked when it ends: every line in order, no request failed.

    Each client talks to one VIP only while its stream is open: c1 and c2 are pinned to the
    same server on both VIPs, and a client port used for both VIPs at once would give two
    flows one server-side 5-tuple, which no NAT can tell apart (dropped as flow_conflict)."""
    streams = {vip: spawn_client(env, client, "stream", f"{URL[vip]}stream/{STREAM_SECONDS}",
                                 "--timeout", "5")
               for vip, client in (("a", "c1"), ("b", "c2"))}
    wait_until(lambda: streaming(survivor, 2), timeout=5,
               what="both streams' sessions to reach the survivor")
    # A connection opened in the instant of the failover may need one SYN retransmission
    # (1 s): the load's timeout leaves room for it, and any reset or refusal fails the test.
    loads = {vip: spawn_client(env, client, "load", URL[vip], "--duration",
                               str(STREAM_SECONDS - 2), "--timeout", "5")
             for vip, client in (("a", "c1"), ("b", "c2"))}
    got: dict[str, Any] = {}
    yield got
    for vip, proc in streams.items():
        got[f"stream {vip}"] = r = result(proc)
        assert r["error"] == "" and r["in_order"] and r["lines"] > STREAM_SECONDS * 20, r
    for vip, proc in loads.items():
        got[f"load {vip}"] = r = result(proc)
        assert r["failed"] == {} and r["ok"] > 0, (vip, r)
        print(f"load {vip}: {r['ok']} ok")


def nothing_installed(env: LabEnv, host: str) -> None:
    assert env.lab.sh(host, "ip -4 route show table all proto 241").strip() == ""
    assert env.lab.sh(host, "ip neigh show proxy").strip() == ""
    assert "4711" not in env.lab.sh(host, "ip -4 rule show")
    assert "lbtun0" not in env.lab.sh(host, "ip link show")


def test_both_vips_serve_from_both_nodes_at_once(env: LabEnv) -> None:
    a, b = start_aa(env)
    for client in ("c1", "c2"):
        for vip in ("a", "b"):
            got: Any = env.client(client, "get", URL[vip], "--count", "10", "--timeout", "3")
            assert len(set(got["answers"])) == 1 and got["answers"][0] in SERVERS, got
    created = {lbd.host: {vs: metric(scrape(env, lbd.host), "lbd_sessions_created_total",
                                     virtual_server=vs) for vs in ("web-a", "web-b")}
               for lbd in (a, b)}
    assert created == {"lba": {"web-a": 20, "web-b": 0}, "lbb": {"web-a": 0, "web-b": 20}}
    # VIP B's replies came back through lba (the gateway), which told lbb of their FINs.
    assert metric(scrape(env, "lba"), "lbd_sync_replies_reported_total") > 0
    assert holds(env, "lba", GATEWAY, "eth1") and not holds(env, "lbb", GATEWAY, "eth1")
    assert holds(env, "lba", VIP, "eth0") and holds(env, "lbb", VIP_B, "eth0")


@pytest.mark.parametrize("how", ["kill lba", "kill lbb", "lba's box dies"])
def test_either_nodes_death_is_invisible_to_every_client(env: LabEnv, how: str) -> None:
    a, b = start_aa(env)
    victim, survivor = (a, b) if "lba" in how else (b, a)
    pins = {(c, vip): pinned(env, c, vip) for c in ("c1", "c2") for vip in ("a", "b")}
    with traffic(env, survivor):
        if how.startswith("kill"):
            victim.stop(signal.SIGKILL)
        else:
            for bridge in ("front", "back", "sync"):
                env.lab.link_state(victim.host, bridge, False)
        wait_states(survivor, ALL_MASTER, timeout=5)
    assert {k: pinned(env, *k) for k in pins} == pins


def test_a_restarted_node_takes_its_vip_back_only_with_the_table(env: LabEnv) -> None:
    a, b = start_aa(env)
    a.stop(signal.SIGKILL)
    wait_states(b, ALL_MASTER, timeout=5)
    pins = {(c, vip): pinned(env, c, vip) for c in ("c1", "c2") for vip in ("a", "b")}
    before = len(a.log_text())  # the log is appended to: look at this start's lines only
    with traffic(env, b):  # opened through lbb alone; lba comes back in the middle
        a.start()
        wait_states(a, OWN["lba"], timeout=15)
        wait_states(b, OWN["lbb"], timeout=5)
    log = a.log_text()[before:]
    assert log.index("snapshot from the peer applied") < log.index("front-a: BACKUP -> MASTER")
    assert {k: pinned(env, *k) for k in pins} == pins


@pytest.mark.parametrize("host", ["lba", "lbb"])
def test_a_graceful_stop_hands_over_and_leaves_nothing(env: LabEnv, host: str) -> None:
    a, b = start_aa(env)
    victim, survivor = (a, b) if host == "lba" else (b, a)
    pins = {(c, vip): pinned(env, c, vip) for c in ("c1", "c2") for vip in ("a", "b")}
    with traffic(env, survivor):
        victim.kill(signal.SIGTERM)
        wait_states(survivor, ALL_MASTER, timeout=5)
        assert victim.wait() == 0
    nothing_installed(env, host)
    assert {k: pinned(env, *k) for k in pins} == pins


def test_a_killed_daemon_forwards_nothing_and_answers_no_arp(env: LabEnv) -> None:
    """lbd SIGKILLed on the gateway holder, with no peer to take over: the servers still send
    their replies to its MAC, and its kernel must neither route them on untranslated nor
    answer ARP for the gateway or the VIP (both lived in lbd's TUN device)."""
    a, b = start_aa(env)
    b.kill(signal.SIGTERM)
    assert b.wait() == 0
    wait_states(a, ALL_MASTER, timeout=5)
    s1, c1 = SERVERS["s1"], CLIENTS["c1"]
    env.lab.sh("s1", f"ping -c 1 -W 2 {GATEWAY}")  # the servers know lba's MAC ...
    assert "lladdr" in env.lab.sh("s1", f"ip neigh show {GATEWAY}")
    a.stop(signal.SIGKILL)
    capture = subprocess.Popen(
        ["ip", "netns", "exec", env.lab.ns("c1"), "tshark", "-i", "eth0", "-a", "duration:8",
         "-f", f"src host {s1} or (arp and ether src {mac(env, 'lba')})", "-T", "fields",
         "-e", "frame.protocols"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    notes = capture.stderr
    assert notes is not None
    # Send nothing before tshark says it captures: a late capture would see nothing anyway.
    # (Each readline returns by tshark's own duration at the latest.)
    wait_until(lambda: "Capturing on" in notes.readline(), timeout=10,
               what="the capture to start")
    # ... and send to a client through it: before the fix these left lba untranslated.
    send = (f"{sys.executable} -c \"import socket,time\n"
            f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for i in range(20): s.sendto(b'leak',('{c1}',9999)); time.sleep(0.05)\"")
    env.lab.sh("s1", send)
    # A client asking for the VIP, a server asking for its gateway: nobody answers.
    env.lab.sh("c1", f"ip neigh flush dev eth0 to {VIP}", check=False)
    env.lab.sh("s1", f"ip neigh flush dev eth0 to {GATEWAY}", check=False)
    env.lab.sh("c1", f"ping -c 2 -W 1 {VIP}", check=False)
    env.lab.sh("s1", f"ping -c 2 -W 1 {GATEWAY}", check=False)
    seen, _ = capture.communicate(timeout=30)
    assert seen.strip() == "", f"lba leaked after its lbd died:\n{seen}"
    assert "lladdr" not in env.lab.sh("s1", f"ip neigh show {GATEWAY}")
    assert "lladdr" not in env.lab.sh("c1", f"ip neigh show {VIP}")


def mac(env: LabEnv, host: str) -> str:
    return env.lab.sh(host, "cat /sys/class/net/eth0/address").strip()
