"""A blackout of the whole pair: both lbd daemons SIGKILLed and both boxes' links down for
5 s, then both started again. Each node loads the table snapshot it wrote to its state_dir
(every ``[sessions] snapshot_interval``), so a stream opened before the blackout carries on
with every line in order and no reset, and every persistent client keeps its server.

The pair is the active-active one of conf/aa-node-{a,b}.toml, with one change: round-robin
instead of maglev, so that only the tables keep a flow or a client on its server (maglev
would send a client back to the same server from its address alone, and a flow picked up
mid-stream after a lost session would pass by luck).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

import pytest

from lab.harness import shipped_node_config
from lab.topology import SERVERS, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import metric, scrape
from tests.netns.test_active_active import OWN, URL, pinned, spawn_client, wait_states

pytestmark = pytest.mark.topology(pair=True)

STREAM_SECONDS = 30  # long enough to outlast the blackout and the restart
LINKS = ("eth0", "eth1", "eth2")


def config(node: str, env: LabEnv) -> str:
    return shipped_node_config(node, env.tmp).replace('scheduler = "maglev"',
                                                      'scheduler = "rr"')


def start_pair(env: LabEnv) -> tuple[Lbd, Lbd]:
    env.start_servers()
    a = env.lbd(config("aa-node-a", env), "lba")
    b = env.lbd(config("aa-node-b", env), "lbb")
    for lbd in (a, b):
        wait_pair_up(lbd)
    return a, b


def wait_pair_up(lbd: Lbd) -> None:
    wait_states(lbd, OWN[lbd.host], timeout=20)
    wait_until(lambda: lbd.ctl("sync")["connected"], timeout=15,
               what=f"{lbd.host}'s sync connections")
    wait_until(lambda: all(s["up"] for s in lbd.ctl("servers")), timeout=15,
               what=f"{lbd.host}'s servers to be up")


def established(lbd: Lbd) -> int:
    return sum(1 for s in lbd.ctl("sessions") if s["state"] == "ESTABLISHED")


def writes(lbd: Lbd) -> int:
    return int(lbd.ctl("status")["table_snapshot"]["writes"])


def provisional(lbd: Lbd) -> tuple[int, int]:
    p = lbd.ctl("sync")["provisional"]
    return int(p["sessions"]), int(p["bindings"])


def stream_result(proc: subprocess.Popen[str]) -> Any:
    out, _ = proc.communicate(timeout=STREAM_SECONDS + 90)
    return json.loads(out.strip().splitlines()[-1])


def test_a_blackout_of_both_boxes_loses_no_session_and_no_binding(env: LabEnv) -> None:
    a, b = start_pair(env)
    pins = {(c, vip): pinned(env, c, vip) for c in ("c1", "c2") for vip in ("a", "b")}
    # c1 streams through VIP A (lba's), c2 through VIP B (lbb's, its replies via lba).
    streams = {vip: spawn_client(env, client, "stream",
                                 f"{URL[vip]}stream/{STREAM_SECONDS}", "--timeout", "60")
               for vip, client in (("a", "c1"), ("b", "c2"))}
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: established(lbd) >= 2, timeout=10,  # type: ignore[misc]
                   what=f"both streams' sessions on {lbd.host}")
    # Two writes after the streams' sessions exist: the second one began after them.
    marks = {lbd.host: writes(lbd) for lbd in (a, b)}
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: writes(lbd) >= marks[lbd.host] + 2,  # type: ignore[misc]
                   timeout=15, what=f"{lbd.host} to write its table snapshot")

    # The blackout: both daemons die at once, both boxes lose every link for 5 s.
    for lbd in (a, b):
        lbd.kill(signal.SIGKILL)
    for lbd in (a, b):
        lbd.wait()
        for ifname in LINKS:
            env.lab.sh(lbd.host, f"ip link set {ifname} down")
    time.sleep(5)  # the outage itself (what the test is about), not a wait for anything
    for lbd in (a, b):
        for ifname in LINKS:
            env.lab.sh(lbd.host, f"ip link set {ifname} up")
    logs_before = {lbd.host: len(lbd.log_text()) for lbd in (a, b)}
    for lbd in (a, b):
        lbd.start(wait=False)
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: lbd.ctl("status", check=False) is not None,  # type: ignore[misc]
                   timeout=20, what=f"lbd on {lbd.host} to answer again")
    for lbd in (a, b):
        wait_pair_up(lbd)

    for lbd in (a, b):
        log = lbd.log_text()[logs_before[lbd.host]:]
        line = next((x for x in log.splitlines() if "loaded" in x and "sessions," in x), "")
        assert line, f"{lbd.host} logged no table snapshot load:\n{log}"
        loaded = int(line.split("loaded ", 1)[1].split(" sessions")[0])
        assert loaded >= 2, line  # both streams, on both nodes (own and the peer's copy)
        assert lbd.ctl("status")["table_snapshot"]["load"]["result"] == "loaded"
        assert metric(scrape(env, lbd.host), "lbd_table_snapshot_loads_total",
                      result="loaded") == 1

    # Reconciled: each node adopted its own instance's restored entries and sent them to the
    # peer, which holds them as confirmed copies; nothing is left provisional.
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: provisional(lbd) == (0, 0), timeout=10,  # type: ignore[misc]
                   what=f"{lbd.host}'s restored entries to be confirmed or adopted")

    for vip, proc in streams.items():
        r = stream_result(proc)
        print(f"stream {vip}: {r}")
        assert r["error"] == "", (vip, r)
        assert r["in_order"] and r["lines"] > STREAM_SECONDS * 20, (vip, r)
        assert r["server"] in SERVERS
    assert {k: pinned(env, *k) for k in pins} == pins


def test_a_corrupted_snapshot_starts_lbd_with_empty_tables_and_says_why(env: LabEnv) -> None:
    a, _ = start_pair(env)
    pinned(env, "c1", "a")
    wait_until(lambda: a.ctl("status")["table_snapshot"].get("last_write", {})
               .get("sessions", 0) >= 1, timeout=15, what="lba to write its sessions")
    a.stop(signal.SIGKILL)
    path = env.tmp / "state-lba" / "tables.snap"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the records
    path.write_bytes(bytes(data))
    before = len(a.log_text())
    a.start()
    log = a.log_text()[before:]
    refused = [x for x in log.splitlines() if "table snapshot" in x and "refused" in x]
    assert len(refused) == 1, log
    assert "WARNING" in refused[0] and "(checksum: " in refused[0], refused[0]
    assert "starting with empty tables" in refused[0]
    assert not any(x for x in log.splitlines() if "loaded" in x and "sessions," in x)
    load = a.ctl("status")["table_snapshot"]["load"]
    assert load["result"] == "checksum" and load["sessions"] == 0
    assert metric(scrape(env, "lba"), "lbd_table_snapshot_loads_total", result="checksum") == 1
    assert (env.tmp / "state-lba" / "tables.snap.refused").exists()
    # It runs on: takes its instances back from the live peer and writes a good file again.
    wait_pair_up(a)
    wait_until(lambda: path.exists() and writes(a) >= 1, timeout=15,
               what="lba to write a new snapshot")
