"""VRRP pair in namespaces: election, takeover on SIGKILL and SIGTERM, preemption, split
brain and its healing. Two real lbd processes on shared bridges."""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from lab import configs
from lab.topology import VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import cut_vrrp, holds

pytestmark = pytest.mark.topology(pair=True)
URL = f"http://{VIP}/"


def states(lbd: Lbd) -> dict[str, str]:
    return {name: v["state"] for name, v in lbd.ctl("vrrp").items()}


def wait_states(lbd: Lbd, state: str, timeout: float = 10) -> None:
    wait_until(lambda: states(lbd) == {"front": state, "back": state}, timeout=timeout,
               what=f"{lbd.host} to be {state} for both instances")


def mac(env: LabEnv, host: str, ifname: str = "eth0") -> str:
    out = env.lab.sh(host, f"cat /sys/class/net/{ifname}/address")
    return out.strip()


def client_neighbour(env: LabEnv, host: str = "c1") -> str:
    out = env.lab.sh(host, f"ip neigh show {VIP}")
    parts = out.split()
    return parts[parts.index("lladdr") + 1] if "lladdr" in parts else ""


def start_pair(env: LabEnv, *, preempt: bool = True, advert: str = "100ms") -> tuple[Lbd, Lbd]:
    env.start_servers()
    a = env.lbd(configs.pair("lba", priority=200, preempt=preempt, advert=advert), "lba")
    wait_states(a, "MASTER")
    b = env.lbd(configs.pair("lbb", priority=100, preempt=preempt, advert=advert), "lbb")
    wait_states(b, "BACKUP")
    return a, b


def get_ok(env: LabEnv, count: int = 3, host: str = "c1") -> Counter[str]:
    answers = env.client(host, "get", URL, "--count", str(count), "--timeout", "2")["answers"]
    return Counter(answers)


def test_higher_priority_is_master_for_both_instances(env: LabEnv) -> None:
    a, b = start_pair(env)
    assert states(a) == {"front": "MASTER", "back": "MASTER"}
    assert states(b) == {"front": "BACKUP", "back": "BACKUP"}
    assert a.ctl("status")["vrrp"] == {"front": {"state": "MASTER"},
                                       "back": {"state": "MASTER"}}
    assert b.ctl("vrrp")["front"]["vrid"] == 51 and b.ctl("vrrp")["front"]["priority"] == 100
    assert sum(get_ok(env).values()) == 3 and set(get_ok(env)) <= {"s1", "s2", "s3"}
    assert client_neighbour(env) == mac(env, "lba")
    # The master holds the servers' gateway (routed into its TUN, answered by proxy ARP on
    # eth1); the backup does not.
    assert holds(env, "lba", "198.18.0.1", "eth1")
    assert not holds(env, "lbb", "198.18.0.1", "eth1")


def test_a_reload_changes_adverts_and_priority_in_place(env: LabEnv) -> None:
    """Advert interval, priority and preempt reload without a restart: a change that does
    not alter who should be master moves nothing; a priority above the master's preempts, as
    at any priority change; a VRID change is refused and the old config kept."""
    a, b = start_pair(env)
    moves = {lbd.host: {n: v["transitions"] for n, v in lbd.ctl("vrrp").items()}
             for lbd in (a, b)}
    a.config.write_text(a.config.read_text().replace('advert_interval = "100ms"',
                                                     'advert_interval = "50ms"'))
    assert a.ctl("reload")["reloaded"]
    wait_until(lambda: all(v["master_advert_interval"] == 0.05 for v in b.ctl("vrrp").values()),
               timeout=5, what="the backup to learn the master's new advert interval")
    assert {lbd.host: {n: v["transitions"] for n, v in lbd.ctl("vrrp").items()}
            for lbd in (a, b)} == moves  # nobody moved
    assert states(a) == {"front": "MASTER", "back": "MASTER"}
    assert "reloaded in place" in a.log_text()
    b.config.write_text(b.config.read_text().replace("priority = 100", "priority = 250"))
    assert b.ctl("reload")["reloaded"]
    wait_states(b, "MASTER", timeout=5)
    wait_states(a, "BACKUP", timeout=5)
    assert b.ctl("vrrp")["front"]["base_priority"] == 250
    text = b.config.read_text()
    b.config.write_text(text.replace("vrid = 51", "vrid = 61"))
    assert b.ctl("reload", check=False) is None
    assert "vrrp.instances.front.vrid: changes need a restart" in b.log_text()
    assert b.ctl("vrrp")["front"]["vrid"] == 51 and states(b)["front"] == "MASTER"
    assert sum(get_ok(env).values()) == 3


def test_sigkill_master_backup_takes_over(env: LabEnv) -> None:
    a, b = start_pair(env)
    assert set(get_ok(env)) <= {"s1", "s2", "s3"}
    a.stop(signal.SIGKILL)
    wait_states(b, "MASTER", timeout=5)
    wait_until(lambda: client_neighbour(env) == mac(env, "lbb"), timeout=5,
               what="the client's neighbour entry for the VIP to point at lbb")
    assert sum(get_ok(env).values()) == 3
    assert all(name in {"s1", "s2", "s3"} for name in get_ok(env))


def test_restart_preempts_back(env: LabEnv) -> None:
    a, b = start_pair(env)
    assert set(get_ok(env)) <= {"s1", "s2", "s3"}  # the client now has a neighbour entry
    a.stop(signal.SIGKILL)
    wait_states(b, "MASTER", timeout=5)
    a.start()  # the same config again; a restart cleans up after the killed one
    wait_states(a, "MASTER")
    wait_states(b, "BACKUP")
    # The client ignores ARP within its 1 s locktime after the first move; the second round
    # of gratuitous ARPs (garp_master_delay, 5 s) updates it.
    wait_until(lambda: client_neighbour(env) == mac(env, "lba"), timeout=10,
               what="the VIP to move back to lba")
    assert set(get_ok(env)) <= {"s1", "s2", "s3"}


def test_restart_does_not_preempt_when_preempt_false(env: LabEnv) -> None:
    a, b = start_pair(env, preempt=False)
    a.stop(signal.SIGKILL)
    wait_states(b, "MASTER", timeout=5)
    a.start()
    wait_states(a, "BACKUP")
    # Several master-down intervals later lbb still holds both instances.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert states(b) == {"front": "MASTER", "back": "MASTER"}
        assert states(a) == {"front": "BACKUP", "back": "BACKUP"}


def test_sigterm_hands_over_faster_than_master_down(env: LabEnv) -> None:
    """A master stopping cleanly sends priority 0, so the backup takes over after its skew
    time instead of a whole master-down interval: lbb's transition says so (master_left,
    not master_down) — shown by the mechanism, not by a stopwatch."""
    a, b = start_pair(env, advert="1s")
    a.kill(signal.SIGTERM)
    wait_states(b, "MASTER", timeout=10)
    assert "front: BACKUP -> MASTER (master_left)" in b.log_text()
    assert a.wait() == 0  # exits by itself; stop() would signal it again
    # Nothing left behind on lba.
    assert "198.18.0.1" not in env.lab.sh("lba", "ip -4 addr show")
    assert env.lab.sh("lba", "ip neigh show proxy").strip() == ""
    assert "lbtun0" not in env.lab.sh("lba", "ip link show")


def test_split_brain_heals_to_one_master(env: LabEnv) -> None:
    a, b = start_pair(env)
    cut_vrrp(env, True)
    wait_states(b, "MASTER", timeout=5)
    assert states(a) == {"front": "MASTER", "back": "MASTER"}
    cut_vrrp(env, False)
    wait_states(b, "BACKUP", timeout=1.0)
    assert states(a) == {"front": "MASTER", "back": "MASTER"}


def test_notify_scripts_keepalived_style(env: LabEnv) -> None:
    log = env.tmp / "notify.log"
    script = env.tmp / "notify.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    script.chmod(0o755)
    master_flag = env.tmp / "became-master"
    env.start_servers()
    a = env.lbd(configs.pair(
        "lba", priority=200,
        extra_instance=f'notify = "{script}"\nnotify_master = "touch {master_flag}"',
        extra_group=f'notify = "{script}"'), "lba")
    wait_states(a, "MASTER")
    wait_until(lambda: log.exists() and "GROUP pair MASTER" in log.read_text(), timeout=5,
               what="the group's MASTER notification")
    wait_until(master_flag.exists, timeout=5, what="notify_master to run")
    assert a.stop() == 0
    lines = log.read_text().splitlines()
    for expected in ("INSTANCE front BACKUP 200", "INSTANCE front MASTER 200",
                     "INSTANCE back MASTER 200", "GROUP pair MASTER 0",
                     "INSTANCE front STOP 200", "INSTANCE back STOP 200"):
        assert expected in lines, (expected, lines)


def test_track_interface_down_faults_and_hands_over(env: LabEnv) -> None:
    env.start_servers()
    a = env.lbd(configs.pair("lba", priority=200, extra_instance='track_interfaces = ["eth2"]'),
                "lba")
    wait_states(a, "MASTER")
    b = env.lbd(configs.pair("lbb", priority=100), "lbb")
    wait_states(b, "BACKUP")
    env.lab.sh("lba", "ip link set eth2 down")
    wait_states(b, "MASTER", timeout=5)
    wait_until(lambda: states(a)["front"] == "FAULT", timeout=5, what="lba front FAULT")
    assert states(a)["back"] in {"FAULT", "BACKUP"}
    assert a.ctl("vrrp")["front"]["tracking_failed"] == ["interface eth2"]
    env.lab.sh("lba", "ip link set eth2 up")
    wait_states(a, "MASTER", timeout=5)
    wait_states(b, "BACKUP", timeout=5)


def test_track_pool_lowers_priority(env: LabEnv) -> None:
    health = ('health_check = { type = "http", interval = "200ms", timeout = "150ms", '
              'rise = 1, fall = 1 }')
    env.start_servers()
    a = env.lbd(configs.pair(
        "lba", priority=200, health=health,
        extra_instance='track_pools = [{ pool = "web", weight = -150 }]'), "lba")
    wait_states(a, "MASTER")
    b = env.lbd(configs.pair("lbb", priority=100, health=health), "lbb")
    wait_states(b, "BACKUP")
    for name in ("s1", "s2", "s3"):
        (env.tmp / f"{name}.status").write_text("503")
    # No usable web server on lba: 200 - 150 = 50 < 100, so lbb preempts.
    wait_states(b, "MASTER", timeout=10)
    assert a.ctl("vrrp")["front"]["priority"] == 50
    # The backup ran its own checks all along: its view of the servers is warm.
    assert {s["state"] for s in b.ctl("servers") if s["pool"] == "web"} == {"DOWN"}
    for name in ("s1", "s2", "s3"):
        (env.tmp / f"{name}.status").unlink()
    wait_states(a, "MASTER", timeout=10)
    assert a.ctl("vrrp")["front"]["priority"] == 200


def test_missing_interface_is_an_error_at_start_and_a_fault_at_run_time(env: LabEnv) -> None:
    env.start_servers()
    bad = env.lbd(configs.pair("lba", priority=200).replace(
        '[vrrp.instances.front]\ninterface = "eth0"',
        '[vrrp.instances.front]\ninterface = "eth9"'), "lba", start=False)
    bad.start(wait=False)
    assert bad.proc is not None and bad.proc.wait(20) == 1
    assert "vrrp.instances.front.interface: interface 'eth9' not found" in bad.log_text()
    # At run time a tracked interface that disappears is a FAULT, never a crash.
    env.lab.sh("lba", "ip link add trk0 type veth peer name trk1")
    env.lab.sh("lba", "ip link set trk0 up")
    env.lab.sh("lba", "ip link set trk1 up")
    a = env.lbd(configs.pair("lba", priority=200, extra_instance='track_interfaces = ["trk0"]'),
                "lba")
    wait_states(a, "MASTER")
    env.lab.sh("lba", "ip link del trk0")
    wait_states(a, "FAULT")
    assert a.proc is not None and a.proc.poll() is None
    assert not holds(env, "lba", "198.18.0.1", "eth1")
