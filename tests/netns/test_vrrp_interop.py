"""VRRPv3 interop with a real peer: Debian's keepalived in lbb's place, lbd on lba.

keepalived runs only its VRRP subsystem, in the foreground, with its config, pid files,
notify script and state file in the test's tmp dir. Its one instance mirrors lbd's "front"
instance: eth0, VRID 51, the same address list (198.51.100.10), version 3. keepalived
holds the VIP as an interface address on lbb's eth0 while it is master, and its notify
script writes each state it enters to a file, so the test reads keepalived's own view.

The last test decodes lbd's adverts with tshark's VRRP dissector: an independent opinion on
the version, the fields and the RFC 5798 checksum.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab import configs
from lab.topology import GATEWAY, LB_FRONT, VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import metric, scrape

pytestmark = pytest.mark.topology(pair=True, clients=("c1",))
KEEPALIVED = shutil.which("keepalived")
TSHARK = shutil.which("tshark")
need_keepalived = pytest.mark.skipif(KEEPALIVED is None,
                                     reason="keepalived is not installed (apt install keepalived)")


@dataclass
class Keepalived:
    """keepalived (VRRP only, foreground) in lbb with one instance like lbd's "front"."""

    env: LabEnv
    priority: int
    advert_int: str
    """keepalived's advert_int in seconds; VRRPv3 allows fractions ("0.1")."""
    host: str = "lbb"
    proc: subprocess.Popen[bytes] | None = None
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = self.env.tmp / "keepalived"
        self.dir.mkdir(exist_ok=True)

    @property
    def state_file(self) -> Path:
        return self.dir / "state"

    @property
    def log(self) -> Path:
        return self.dir / "keepalived.log"

    def write_config(self) -> Path:
        notify = self.dir / "notify.sh"
        # keepalived calls: notify INSTANCE|GROUP NAME STATE PRIORITY
        notify.write_text(f'#!/bin/sh\necho "$3" > {self.state_file}.new\n'
                          f"mv {self.state_file}.new {self.state_file}\n")
        notify.chmod(0o700)
        conf = self.dir / "keepalived.conf"
        conf.write_text(f"""
global_defs {{
    router_id lbd-interop
    vrrp_version 3
    script_user root
    enable_script_security
}}

vrrp_instance front {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {self.priority}
    advert_int {self.advert_int}
    virtual_ipaddress {{
        {VIP}
    }}
    notify {notify}
}}
""")
        return conf

    def start(self) -> Keepalived:
        assert KEEPALIVED is not None
        conf = self.write_config()
        argv = [KEEPALIVED, "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
                "--vrrp", "--use-file", str(conf), "--pid", str(self.dir / "keepalived.pid"),
                "--vrrp_pid", str(self.dir / "vrrp.pid")]
        self.proc = self.env.lab.spawn(self.host, argv, log=str(self.log))
        wait_until(self._started, timeout=10, what="keepalived to enter its first state")
        return self

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"keepalived exited {self.proc.returncode}:\n{self.log_text()}")
        return self.state() in {"BACKUP", "MASTER"}

    def state(self) -> str:
        """The last state keepalived's notify script recorded ("" before the first)."""
        try:
            return self.state_file.read_text().strip()
        except FileNotFoundError:
            return ""

    def holds_vip(self) -> bool:
        return f"inet {VIP}/32" in self.env.lab.sh(self.host, "ip -4 addr show dev eth0")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        assert self.proc is not None
        return self.env.lab.stop(self.proc, sig, timeout=10)

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""


def front(lbd: Lbd) -> dict[str, object]:
    status: dict[str, object] = lbd.ctl("vrrp")["front"]
    return status


def vrrp_drops(env: LabEnv, host: str = "lba") -> dict[tuple[str, str], float]:
    """Every non-zero lbd_vrrp_adverts_dropped_total sample: {(scope, reason): n}."""
    out = {}
    for (name, labels), value in scrape(env, host).items():
        if name == "lbd_vrrp_adverts_dropped_total" and value:
            d = dict(labels)
            out[(d["scope"], d["reason"])] = value
    return out


def hold_for(seconds: float, check: Callable[[], None]) -> None:
    """Assert ``check()`` keeps holding for ``seconds`` (a bounded polling loop)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(0.05)


@need_keepalived
def test_lbd_defers_to_higher_priority_keepalived_and_takes_over_on_its_priority_0(
        env: LabEnv) -> None:
    """keepalived 200 vs lbd 100, 1 s adverts: lbd stays BACKUP behind keepalived; when
    keepalived stops (SIGTERM: it sends priority 0) lbd takes over after its skew time
    (~0.6 s), well before its master-down interval (~3.6 s), and forwards."""
    env.start_servers()
    # The servers' gateway: the front-only config has no "back" instance to hold it.
    env.lab.sh("lba", f"ip addr add {GATEWAY}/24 dev eth1")
    k = Keepalived(env, priority=200, advert_int="1").start()
    wait_until(lambda: k.state() == "MASTER" and k.holds_vip(), timeout=10,
               what="keepalived to become master and hold the VIP")

    a = env.lbd(configs.pair_front_only("lba", priority=100, advert="1s"), "lba")
    wait_until(lambda: front(a)["master"] == LB_FRONT["lbb"], timeout=10,
               what="lbd to accept keepalived's adverts (master = lbb)")

    def lbd_defers() -> None:
        assert front(a)["state"] == "BACKUP"
        assert k.state() == "MASTER"
        assert k.holds_vip()

    hold_for(4.5, lbd_defers)  # longer than lbd's master-down interval (3 * 1 + 0.61 s)
    assert front(a)["transitions"] == 1  # INIT -> BACKUP, nothing since
    samples = scrape(env, "lba")
    assert metric(samples, "lbd_vrrp_adverts_received_total", instance="front") >= 3
    assert vrrp_drops(env) == {}, "lbd dropped some of keepalived's adverts"

    assert k.stop(signal.SIGTERM) == 0, k.log_text()
    wait_until(lambda: front(a)["state"] == "MASTER", timeout=10,
               what="lbd to take over from the stopped keepalived")
    # keepalived's priority 0 was understood: lbd took over after skew time (master_left),
    # not after a whole master-down interval of silence (master_down).
    assert "front: BACKUP -> MASTER (master_left)" in a.log_text(), k.log_text()
    assert not k.holds_vip()
    answers = env.client("c1", "get", f"http://{VIP}/", "--count", "3",
                         "--timeout", "2")["answers"]
    assert len(answers) == 3 and set(answers) <= {"s1", "s2", "s3"}, answers


@need_keepalived
def test_keepalived_defers_to_higher_priority_lbd_and_takes_over_on_its_priority_0(
        env: LabEnv) -> None:
    """keepalived 100 (sub-second VRRPv3 adverts, 0.1 s) vs lbd 200 (100 ms): keepalived,
    master first, yields to lbd as soon as lbd preempts, stays BACKUP without the VIP, and
    takes over when lbd stops cleanly (lbd's priority-0 advert)."""
    k = Keepalived(env, priority=100, advert_int="0.1").start()
    wait_until(lambda: k.state() == "MASTER" and k.holds_vip(), timeout=10,
               what="keepalived to become master and hold the VIP")

    a = env.lbd(configs.pair_front_only("lba", priority=200, advert="100ms"), "lba")
    wait_until(lambda: front(a)["state"] == "MASTER", timeout=10,
               what="lbd to preempt keepalived")
    wait_until(lambda: k.state() == "BACKUP" and not k.holds_vip(), timeout=5,
               what="keepalived to yield: BACKUP, VIP released")

    def keepalived_defers() -> None:
        assert front(a)["state"] == "MASTER"
        assert k.state() == "BACKUP"
        assert not k.holds_vip()

    hold_for(1.5, keepalived_defers)  # ~4 of keepalived's master-down intervals (0.36 s)
    # lbd heard keepalived (a lower-priority master) before preempting, and dropped nothing.
    samples = scrape(env, "lba")
    assert metric(samples, "lbd_vrrp_adverts_received_total", instance="front") >= 1
    assert vrrp_drops(env) == {}, "lbd dropped some of keepalived's adverts"
    assert front(a)["transitions"] == 2  # INIT -> BACKUP -> MASTER

    a.kill(signal.SIGTERM)
    wait_until(lambda: k.state() == "MASTER" and k.holds_vip(), timeout=5,
               what="keepalived to take over from the stopped lbd")
    assert a.wait() == 0  # exits by itself; stop() would signal it again
    # keepalived's own account (its 2.2 wording) of both of lbd's adverts that mattered.
    log = k.log_text()
    assert f"Master received advert from {LB_FRONT['lba']} with higher priority 200" in log, log
    assert "Backup received priority 0 advertisement" in log, log


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (apt install tshark)")
def test_tshark_decodes_lbd_adverts_as_vrrpv3_with_a_good_checksum(env: LabEnv) -> None:
    a = env.lbd(configs.pair_front_only("lba", priority=200, advert="100ms"), "lba")
    wait_until(lambda: front(a)["state"] == "MASTER", timeout=10, what="lbd to be master")
    # -c 3 stops after three adverts (0.3 s at 100 ms); -a bounds the capture anyway.
    # The preference makes the checksum check the RFC 5798 one (with the pseudo-header),
    # which is tshark's default; keepalived's v2-style form would be reported bad.
    out = env.lab.sh("lba", "tshark -n -i eth0 -c 3 -a duration:10 -f 'ip proto 112' -V "
                            "-o vrrp.v3_checksum_as_in_v2:FALSE", timeout=30)
    packets = [p for p in re.split(r"\n(?=Frame \d+:)", out) if p.startswith("Frame ")]
    assert len(packets) == 3, out
    for p in packets:
        assert f"Src: {LB_FRONT['lba']}, Dst: 224.0.0.18" in p, p
        assert "Time to Live: 255" in p, p
        # Class Selector 6 (network control), as keepalived marks its adverts.
        assert "Differentiated Services Field: 0xc0 (DSCP: CS6" in p, p
        assert "VRRP protocol version: 3" in p, p
        assert "VRRP packet type: Advertisement (1)" in p, p
        assert "Virtual Rtr ID: 51" in p, p
        assert "Priority: 200" in p, p
        assert "Adver Int: 10" in p, p  # centiseconds
        assert f"IP Address: {VIP}" in p, p
        assert re.search(r"Checksum: 0x[0-9a-f]{4} \[correct\]", p), p
        assert "[Checksum Status: Good]" in p, p
