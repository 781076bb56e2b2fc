"""``[dataplane] offload = "conntrack"``: lbd schedules each new flow, then the kernel's
conntrack NAT forwards the rest of it (lb.offload; issue 10's connection-rate lever).

What a user notices: every request is answered exactly as without it, while lbd reads only
the first packet of each flow (a SYN, a UDP flow's first datagram), its sessions still
follow the flows (ESTABLISHED once the handshake completes, gone once the kernel ends the
flow), and the scene holds: a client mid-session when the master dies goes on through the
backup, which forwards the flow from its synced session.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from lab import configs
from lab.harness import shipped_node_config
from lab.topology import SERVERS, VIP, VIP_B, wait_until
from tests.netns.harness import ENV, LabEnv, Lbd
from tests.netns.helpers import Holder, metric, scrape
from tests.netns.test_active_active import OWN
from tests.netns.test_active_active import wait_states as wait_aa_states
from tests.netns.test_sync import start_synced_pair
from tests.netns.test_vrrp import wait_states

URL = f"http://{VIP}/"
NAME_OF = {f"{addr}:8080": name for name, addr in SERVERS.items()}
SHORT = """tcp_established_timeout = "2s"
tcp_fin_timeout = "1s"
tcp_time_wait_timeout = "1s"
tcp_close_timeout = "1s"
"""


OFFLOAD = 'offload = "conntrack"'


def offloaded(text: str) -> str:
    return configs.with_dataplane(text, OFFLOAD)


def forwarded(env: LabEnv, host: str = "lba") -> tuple[float, float]:
    samples = scrape(env, host)
    return (metric(samples, "lbd_packets_forwarded_total", direction="in"),
            metric(samples, "lbd_packets_forwarded_total", direction="out"))


def wait_established(lbd: Lbd, count: int) -> None:
    """Until the kernel has told lbd that ``count`` offloaded handshakes completed."""
    wait_until(lambda: lbd.ctl("status")["offload"]["established"] == count, timeout=5,
               what=f"{count} offloaded connections ESTABLISHED in lbd's table")


def test_the_kernel_forwards_every_packet_after_the_first(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(offloaded(configs.single(sessions=SHORT)))
    assert "ct event set" in env.lab.sh("lba", "nft list table ip lbd_offload")
    count = 30
    got: Any = env.client("c1", "get", URL, "--count", str(count), "--timeout", "2")
    assert Counter(got["answers"]) == {"s1": 10, "s2": 10, "s3": 10}  # rr, as without it
    status = lbd.ctl("status")["offload"]
    assert status["mode"] == "conntrack"
    assert status["offloaded"] == count and status["failed"] == 0
    # lbd read one packet per connection, its SYN; the kernel forwarded all the others,
    # the servers' SYN-ACKs first among them.
    packets_in, packets_out = forwarded(env)
    assert packets_in == count and packets_out == 0
    # Each session followed its flow: ESTABLISHED when the kernel saw the handshake, then
    # removed once the kernel ended the flow (TIME_WAIT of 1 s): told by the kernel's
    # DESTROY event, or found gone when lbd asked at the session's deadline.
    wait_until(lambda: lbd.ctl("status")["offload"]["closed"] == count, timeout=10,
               what="the kernel to end every flow")
    status = lbd.ctl("status")["offload"]
    assert status["established"] == count and status["flows"] == 0
    assert lbd.ctl("status")["sessions"] == 0

    udp: Any = env.client("c1", "udp", VIP, "53", "--count", "3", "--timeout", "2")
    assert all("reply" in a for a in udp["answers"]), udp
    assert lbd.ctl("status")["offload"]["offloaded"] == count + 3
    assert forwarded(env) == (count + 3, 0)


def test_a_session_lbd_ends_is_ended_in_the_kernel_too(env: LabEnv) -> None:
    """``lbctl kill-sessions`` (like a server's reset or eviction) removes the session; its
    entry leaves the kernel with it, so the flow's next packet reaches lbd, which answers
    it with a RST as it would have without the fast path."""
    env.start_servers()
    lbd = env.lbd(offloaded(configs.single()))
    holder = Holder(env, "c1", 1)
    try:
        wait_established(lbd, 1)
        assert forwarded(env) == (1, 0)  # lbd read the SYN only
        (server,) = {s["server"] for s in lbd.ctl("sessions") if s["virtual"].endswith(":80")}
        lbd.ctl("kill-sessions", "web", server)
        assert lbd.ctl("status")["offload"]["flows"] == 0
        assert holder.send() == ["reset"]
    finally:
        holder.close()


@pytest.mark.topology(pair=True)
def test_the_scene_with_the_fast_path(env: LabEnv) -> None:
    """The master's kernel forwards the client's connection; the master dies; the backup
    takes the addresses and forwards the same connection from its synced session to the
    same server, and the client's next connections are still pinned there."""
    a, b = start_synced_pair(env, dataplane=(OFFLOAD,))
    holder = Holder(env, "c1", 1)
    try:
        wait_established(a, 1)
        (session,) = [s for s in a.ctl("sessions") if s["virtual"].endswith(":80")]

        def on_b() -> list[dict[str, Any]]:
            return [s for s in b.ctl("sessions") if s["client"] == session["client"]
                    and s["state"] == "ESTABLISHED"]
        wait_until(on_b, timeout=5, what="the ESTABLISHED session to reach the backup")
        assert forwarded(env, "lba") == (1, 0)  # the master's kernel carried the rest
        a.stop(signal.SIGKILL)
        wait_states(b, "MASTER", timeout=5)
        assert holder.send() == ["data"]  # the same connection, now through lbb's lbd
        assert forwarded(env, "lbb")[0] > 0
        got: Any = env.client("c1", "get", URL, "--count", "3", "--timeout", "2")
        assert Counter(got["answers"]) == {NAME_OF[session["server"]]: 3}
    finally:
        holder.close()



def marked_entries(env: LabEnv) -> int:
    """Conntrack entries in lba carrying lbd's ct mark bit."""
    code = ("from pyroute2 import NFCTSocket; from lb.offload import CT_MARK; "
            "print(len(list(NFCTSocket().dump(mark=CT_MARK, mark_mask=CT_MARK))))")
    out = subprocess.run(["ip", "netns", "exec", env.lab.ns("lba"), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30, check=True, env=ENV).stdout
    return int(out)


def test_a_killed_lbds_kernel_state_is_removed_by_the_next_start(env: LabEnv) -> None:
    """After a SIGKILL the kernel would go on translating the killed lbd's flows; the next
    lbd, with the fast path off, removes its table and its entries."""
    env.start_servers()
    lbd = env.lbd(offloaded(configs.single()))
    holder = Holder(env, "c1", 2)
    try:
        wait_established(lbd, 2)
        assert marked_entries(env) == 2
        lbd.stop(signal.SIGKILL)
        env.lbd(configs.single())
        assert marked_entries(env) == 0
        assert env.lab.sh("lba", "nft list tables").find("lbd_offload") < 0
        assert "fwmark" not in env.lab.sh("lba", "ip rule")
    finally:
        holder.close()


def test_a_retransmitted_syn_leaves_the_flow_in_the_kernel(env: LabEnv) -> None:
    """The servers drop their first SYN-ACK, so the client's SYN is retransmitted; SYNs are
    untracked, so that one reaches lbd too. It is the same flow: it stays in the kernel,
    which carries the handshake and the rest (a flow lbd took back would show as
    ``returned`` and stay half-open in lbd's table)."""
    env.start_servers()
    for name in SERVERS:
        env.lab.sh(name, "nft add table ip lossy")
        env.lab.sh(name, "nft add chain ip lossy out { type filter hook output priority 0 ; }")
        env.lab.sh(name, "nft add rule ip lossy out tcp flags & (syn | ack) == syn | ack "
                         "numgen inc mod 1000000 == 0 drop")
    lbd = env.lbd(offloaded(configs.single()))
    got: Any = env.client("c1", "get", URL, "--count", "1", "--timeout", "5")
    assert got["answers"] == ["s1"]
    status = lbd.ctl("status")["offload"]
    assert status["offloaded"] == 1 and status["returned"] == 0
    assert status["established"] == 1
    assert forwarded(env) == (2, 0)  # the SYN twice, nothing else


@pytest.mark.topology(pair=True)
def test_active_active_with_the_fast_path(env: LabEnv) -> None:
    """conf/aa-node-*.toml with the fast path on. Node a masters VIP A and the servers'
    gateway: it hands VIP A's flows to its kernel. Node b masters VIP B, whose replies come
    back through node a: an entry on b would see one direction only, so b makes none and
    forwards VIP B's flows itself, a their replies from its synced copy. Every request to
    either VIP is answered."""
    env.start_servers()
    a = env.lbd(offloaded(shipped_node_config("aa-node-a", env.tmp)), "lba")
    b = env.lbd(offloaded(shipped_node_config("aa-node-b", env.tmp)), "lbb")
    for lbd in (a, b):
        wait_aa_states(lbd, OWN[lbd.host])
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["connected"],  # type: ignore[misc]
                   timeout=10, what=f"{lbd.host}'s sync connections")
    for url in (URL, f"http://{VIP_B}/"):
        got: Any = env.client("c1", "get", url, "--count", "6", "--timeout", "3")
        assert len(got["answers"]) == 6 and set(got["answers"]) <= set(SERVERS), got
    a_off, b_off = a.ctl("status")["offload"], b.ctl("status")["offload"]
    assert a_off["offloaded"] == 6 and a_off["failed"] == 0 and a_off["returned"] == 0
    assert b_off["offloaded"] == 0
    assert forwarded(env, "lbb")[0] > 6  # b carried VIP B's flows itself
