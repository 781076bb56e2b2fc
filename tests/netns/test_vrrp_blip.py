"""Issue 10 item 7: a node that was paused does not claim master when it resumes.

A SIGSTOPped backup (a VM freeze) resumes with its Master_Down_Timer long overdue and the
live master's adverts queued in its socket. It must read them before its timer acts: it
never becomes MASTER. Transitions are counted (``lbctl vrrp``), not timed.
"""

from __future__ import annotations

import signal
import time

import pytest

from lab import configs
from lab.topology import VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import metric, scrape

pytestmark = pytest.mark.topology(pair=True)


def states(lbd: Lbd) -> dict[str, str]:
    return {name: v["state"] for name, v in lbd.ctl("vrrp").items()}


def transitions(lbd: Lbd) -> dict[str, int]:
    return {name: v["transitions"] for name, v in lbd.ctl("vrrp").items()}


def test_a_thawed_backup_reads_queued_adverts_and_stays_backup(env: LabEnv) -> None:
    a = env.lbd(configs.pair("lba", priority=200, advert="30ms"), "lba")
    wait_until(lambda: states(a) == {"front": "MASTER", "back": "MASTER"}, timeout=10,
               what="lba to be master")
    b = env.lbd(configs.pair("lbb", priority=100, advert="30ms"), "lbb")
    wait_until(lambda: states(b) == {"front": "BACKUP", "back": "BACKUP"}, timeout=10,
               what="lbb to be backup")
    before_a, before_b = transitions(a), transitions(b)
    for _ in range(3):
        b.kill(signal.SIGSTOP)
        # The pause itself is what is tested: 3 s is 30 Master_Down_Intervals at 30 ms.
        time.sleep(3)
        b.kill(signal.SIGCONT)
        # lbb answers again only once its loop has run past the overdue timers.
        wait_until(lambda: states(b) == {"front": "BACKUP", "back": "BACKUP"}, timeout=10,
                   what="lbb to answer after SIGCONT")
    assert transitions(b) == before_b, b.log_text()
    assert transitions(a) == before_a
    assert "-> MASTER" not in b.log_text().split("BACKUP (start)")[-1]


def neighbour(env: LabEnv, host: str = "c1") -> str:
    parts = env.lab.sh(host, f"ip neigh show {VIP}").split()
    return parts[parts.index("lladdr") + 1] if "lladdr" in parts else ""


@pytest.mark.topology(pair=True, clients=("c1", "x"))
def test_master_reannounces_after_a_rival_master_steps_down(env: LabEnv) -> None:
    """keepalived #166: a node claims master for a moment (lower priority) and sends
    GARPs; the client follows it. The real master never lost master, and once the rival is
    quiet it announces the VIP again: the client comes back to it without waiting for its
    neighbour entry to go stale (20 s and more)."""
    env.start_servers()
    # No second round of GARPs 5 s after the takeover: it would mend the client by chance.
    a = env.lbd(configs.pair("lba", priority=200, advert="30ms",
                             extra_instance='garp_master_delay = "0s"'), "lba")
    wait_until(lambda: states(a) == {"front": "MASTER", "back": "MASTER"}, timeout=10,
               what="lba to be master")
    lba_mac = env.lab.sh("lba", "cat /sys/class/net/eth0/address").strip()
    assert env.client("c1", "get", f"http://{VIP}/")["answers"][0] in {"s1", "s2", "s3"}
    assert neighbour(env) == lba_mac
    before = transitions(a)
    out = env.python("x", "tests.netns.rival", "--address", VIP, "--priority", "50")
    assert out["garps"] > 0
    wait_until(lambda: neighbour(env) == lba_mac, timeout=5,
               what="the client's neighbour entry for the VIP to point at lba again")
    wait_until(lambda: metric(scrape(env, "lba"), "lbd_vrrp_reannouncements_total",
                              instance="front") >= 1, timeout=5,
               what="lba to count a re-announcement")
    assert transitions(a) == before, "lba never left MASTER"
    assert "claimed master and stepped down" in a.log_text()
    assert env.client("c1", "get", f"http://{VIP}/")["answers"][0] in {"s1", "s2", "s3"}
