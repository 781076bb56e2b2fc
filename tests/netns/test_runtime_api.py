"""The runtime API against a running lbd: every lbctl command that changes a server, the
filtered views, operator state across a restart, exit codes, and demote/promote on a pair."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from typing import Any

import pytest

from lab import configs
from lab.topology import SERVERS, VIP, wait_until
from tests.netns.harness import BIN, ENV, LabEnv, Lbd
from tests.netns.helpers import Holder, holds
from tests.netns.test_sync import start_synced_pair
from tests.netns.test_vrrp import wait_states

URL = f"http://{VIP}/"
S1, S2, S3 = (f"{SERVERS[n]}:8080" for n in ("s1", "s2", "s3"))
NAME_OF = {f"{addr}:8080": name for name, addr in SERVERS.items()}


def answers(env: LabEnv, host: str, count: int) -> Counter[str]:
    got: Any = env.client(host, "get", URL, "--count", str(count), "--timeout", "2")
    return Counter(got["answers"])


def lbctl(lbd: Lbd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "lbctl"), "--socket", lbd.socket, *args],
                          capture_output=True, text=True, timeout=20, check=False,
                          env={**os.environ, **ENV})


def servers(lbd: Lbd) -> dict[str, dict[str, Any]]:
    return {s["server"]: s for s in lbd.ctl("servers") if s["pool"] == "web"}


def test_drain_keeps_existing_and_persistent_clients(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr", persistence="client-ip"))
    holder = Holder(env, "c1", 1)
    try:
        (sess,) = lbd.ctl("sessions", "--virtual", "web", "--client", "198.51.100.100")
        bound = sess["server"]
        assert 0 < sess["expires_in"] <= 900 and sess["state"] == "ESTABLISHED"
        (binding,) = lbd.ctl("persistence", "--virtual", "web")
        assert binding["server"] == bound and binding["client"] == "198.51.100.100/32"
        assert lbd.ctl("drain", "web", bound)["admin"] == "drain"
        assert servers(lbd)[bound]["admin"] == "drain"
        assert holder.send() == ["data"]  # the existing session goes on
        assert answers(env, "c1", 4) == {NAME_OF[bound]: 4}  # the bound client stays
        others = answers(env, "c2", 6)  # a new client never reaches the drained server
        assert NAME_OF[bound] not in others and sum(others.values()) == 6
        assert lbd.ctl("sessions", "--server", bound, "--limit", "1") != []
        assert len(lbd.ctl("sessions", "--client", "198.51.100.101", "--limit", "2")) == 2
    finally:
        holder.close()


def test_weight_changes_the_split(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="wrr"))
    assert answers(env, "c1", 30) == {"s1": 10, "s2": 10, "s3": 10}
    answer = lbd.ctl("weight", "web", S1, "3")
    assert (answer["weight"], answer["previous_weight"], answer["saved"]) == (3, 1, True)
    assert servers(lbd)[S1]["weight"] == 3
    assert answers(env, "c1", 50) == {"s1": 30, "s2": 10, "s3": 10}


def test_add_remove_server_and_kill_sessions(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr"))
    lbd.ctl("remove-server", "web", S3)
    assert set(servers(lbd)) == {S1, S2}
    assert answers(env, "c1", 6) == {"s1": 3, "s2": 3}
    added = lbd.ctl("add-server", "web", S3, "--weight", "1")
    assert added["up"] is True
    assert servers(lbd)[S3]["admin"] == "enabled"
    assert answers(env, "c1", 6) == {"s1": 2, "s2": 2, "s3": 2}
    holder = Holder(env, "c2", 3)  # rr: one on each server
    try:
        assert lbd.ctl("kill-sessions", "web", S1)["sessions_killed"] >= 1  # closing ones too
        assert lbd.ctl("sessions", "--server", S1) == []
        results = holder.send()
        # lbd answers the killed flow's next segment with a RST; the others go on
        assert sorted(results) == ["data", "data", "reset"]
    finally:
        holder.close()
    # a server removed while its sessions run: they drain (on_server_down = keep)
    holder = Holder(env, "c2", 3)
    try:
        gone = lbd.ctl("remove-server", "web", S2)
        assert gone["sessions_draining"] >= 1 and gone["sessions_reset"] == 0
        assert holder.send() == ["data", "data", "data"]
        assert "s2" not in answers(env, "c1", 6)
    finally:
        holder.close()
    assert lbctl(lbd, "remove-server", "web", S2).returncode == 1  # already gone: refused
    assert lbctl(lbd, "weight", "web", S1).returncode == 2  # usage
    assert lbctl(lbd, "weight", "--help").returncode == 0


def test_operator_state_survives_a_restart(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr"))
    lbd.ctl("weight", "web", S1, "4")
    lbd.ctl("disable", "web", S2)
    lbd.ctl("remove-server", "web", S3)
    before = {k: (v["weight"], v["admin"]) for k, v in servers(lbd).items()}
    assert before == {S1: (4, "enabled"), S2: (1, "disabled")}
    assert lbd.stop() == 0
    down = lbctl(lbd, "servers")
    assert down.returncode == 3 and "not running" in down.stderr
    lbd.start()
    assert {k: (v["weight"], v["admin"]) for k, v in servers(lbd).items()} == before
    assert answers(env, "c1", 4) == {"s1": 4}
    assert "operator state loaded" in lbd.log_text()


@pytest.mark.topology(pair=True)
def test_demote_moves_the_addresses_to_the_peer_with_a_stream_intact(env: LabEnv) -> None:
    a, b = start_synced_pair(env)
    holder = Holder(env, "c1", 1)
    try:
        (sess,) = a.ctl("sessions", "--virtual", "web")
        wait_until(lambda: any(s["client"] == sess["client"] for s in
                               b.ctl("sessions", "--virtual", "web")),
                   timeout=5, what="the session to reach the backup")
        answer = a.ctl("demote")
        assert answer["demoted"] is True and set(answer["stepped_down"]) == {"front", "back"}
        wait_states(b, "MASTER", timeout=5)
        wait_states(a, "BACKUP", timeout=5)
        wait_until(lambda: holds(env, "lbb", VIP, "eth0"), timeout=5, what="lbb to hold VIP")
        assert not holds(env, "lba", VIP, "eth0")
        # the same TCP connection, now through lbb (one request: the server then closes it)
        assert holder.send() == ["data"]
        status = a.ctl("status")
        assert status["demoted"] is True and status["masters"] == []
        assert b.ctl("status")["masters"] == ["back", "front"]
        assert status["standalone"] is False
        assert a.ctl("promote")["demoted"] is False
        wait_states(a, "MASTER", timeout=10)  # its priority is back: it preempts
        wait_until(lambda: holds(env, "lba", VIP, "eth0"), timeout=5, what="lba to hold VIP")
        assert sum(answers(env, "c2", 3).values()) == 3
    finally:
        holder.close()
    a.stop(signal.SIGTERM)


@pytest.mark.topology(pair=True)
def test_operator_state_reaches_the_peer_and_survives_a_takeover(env: LabEnv) -> None:
    """A drain, a weight and a removed server set on the master are the backup's too: when
    the master dies, the new master keeps them; a change on either node wins if later."""
    a, b = start_synced_pair(env)
    a.ctl("drain", "web", S2)
    a.ctl("weight", "web", S1, "3")
    a.ctl("remove-server", "web", S3)
    want = {S1: (3, "enabled"), S2: (1, "drain")}
    wait_until(lambda: {k: (v["weight"], v["admin"]) for k, v in servers(b).items()} == want,
               timeout=5, what="the master's operator state on the backup")
    assert b.ctl("sync")["operator_state"]["from_peer"]["applied"] >= 1
    a.stop(signal.SIGKILL)
    wait_states(b, "MASTER", timeout=5)
    assert answers(env, "c1", 6) == {"s1": 6}  # s2 drained, s3 removed: new clients on s1
    b.ctl("enable", "web", S2)  # changed on the survivor, later: the restarted node takes it
    a.start()
    wait_until(lambda: servers(a)[S2]["admin"] == "enabled", timeout=10,
               what="the survivor's later change on the restarted node")
    assert {k: v["weight"] for k, v in servers(a).items()} == {S1: 3, S2: 1}
