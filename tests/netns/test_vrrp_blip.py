"""Issue 10 item 7: a node that was paused does not claim master when it resumes.

A SIGSTOPped backup (a VM freeze) resumes with its Master_Down_Timer long overdue and the
live master's adverts queued in its socket. It must read them before its timer acts: it
never becomes MASTER. Transitions are counted (``lbctl vrrp``), not timed.
"""

from __future__ import annotations

import signal
import time

import pytest

from lab.topology import wait_until
from tests.netns import configs
from tests.netns.harness import LabEnv, Lbd

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
