"""Partition and heal of the sync link of the active-active pair (conf/aa-node-*.toml).

Both nodes forward (a new-connection load on both VIPs) when lba's sync interface goes down
for 10 s; VRRP runs on the client and server interfaces and must not move. Connections opened
during the cut (held connections and streams, through both VIPs) exist only on their owner
until the link heals; then both tables agree again, and after a SIGKILL of lba every one of
them still answers through lbb, the streams in order. New connections to lbb's VIP during the
cut work once lba has given up on lbb's silent stream (``peer_timeout``): lba forwards their
replies from the one virtual server of lbb that has their server.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from typing import Any

import pytest

from lab.topology import CLIENTS, VIP, VIP_B, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import Holder, result, scrape, spawn_lab
from tests.netns.test_active_active import ALL_MASTER, OWN, URL, start_aa, states, wait_states

pytestmark = pytest.mark.topology(pair=True)

CUT_SECONDS = 10
STREAM_SECONDS = 30  # opened during the cut, still running when lba is killed
HELD = 3  # connections held per VIP, opened during the cut
SYNC_IF = "eth2"  # lba's sync interface (lab/topology.py)

Key = tuple[str, str]  # (client "ADDR:PORT", virtual "ADDR:PORT")


def long_lived(lbd: Lbd) -> set[Key]:
    """The ESTABLISHED sessions of ``lbd``'s table (own and peer's copies): the held
    connections and streams; the load's connections live for milliseconds."""
    return {(s["client"], s["virtual"]) for s in lbd.ctl("sessions")
            if s["state"] == "ESTABLISHED"}


def keys(holder: Holder, client: str, vip: str) -> set[Key]:
    return {(f"{CLIENTS[client]}:{port}", f"{vip}:80") for port in holder.ports}


def per_virtual(lbd: Lbd) -> dict[str, int]:
    return {vs: len(lbd.ctl("sessions", "--virtual", vs)) for vs in ("web-a", "web-b")}


def cut(env: LabEnv, how: str, up: bool) -> None:
    """``how``: "interface" — lba's sync interface goes down (lba's kernel knows: its sends
    fail at once and TCP retries every 0.5 s); "wire" — the switch port goes down and lba
    keeps carrier (segments vanish: TCP backs off exponentially, as with a dead switch)."""
    if how == "interface":
        env.lab.sh("lba", f"ip link set {SYNC_IF} {'up' if up else 'down'}")
    else:
        env.lab.link_state("lba", "sync", up)


def all_answer(holders: Iterable[Holder]) -> list[str]:
    return [r for h in holders for r in h.send()]


@pytest.mark.parametrize("how", ["interface", "wire"])
def test_a_healed_partition_agrees_and_survives_a_kill(env: LabEnv, how: str) -> None:
    a, b = start_aa(env)
    holders: dict[str, Holder] = {}
    procs: dict[str, Any] = {}
    try:
        # VIP B (lbb's): a stream and held connections opened before the cut, so lba (the
        # gateway holder) has their copies and forwards their replies through the cut.
        holders["b"] = Holder(env, "c2", HELD, vip=VIP_B)
        procs["stream b"] = spawn_lab(env, "c2", "lab.client", "stream",
                                      f"{URL['b']}stream/{STREAM_SECONDS}", "--timeout", "5")
        held = {"b": keys(holders["b"], "c2", VIP_B)}
        wait_until(lambda: held["b"] <= long_lived(a) and len(long_lived(a)) > HELD,
                   timeout=5, what="VIP B's long-lived sessions on lba")
        procs["load a"] = spawn_lab(env, "c1", "lab.client", "load", URL["a"], "--rate", "20",
                                    "--duration", str(CUT_SECONDS + 4), "--timeout", "5")
        connects = {lbd.host: lbd.ctl("sync")["connects"] for lbd in (a, b)}
        cut(env, how, up=False)
        cut_at = time.monotonic()
        # VIP A (lba's): new connections, held ones and a stream opened during the cut.
        holders["a"] = Holder(env, "c1", HELD, vip=VIP)
        procs["stream a"] = spawn_lab(env, "c1", "lab.client", "stream",
                                      f"{URL['a']}stream/{STREAM_SECONDS}", "--timeout", "5")
        held["a"] = keys(holders["a"], "c1", VIP)
        wait_until(lambda: held["a"] <= long_lived(a), timeout=5,
                   what="the held connections' sessions on lba")
        # lba hears nothing from lbb for [sync] peer_timeout (5 s) and drops that connection:
        # from then on a reply of a flow lbb opened (new connections to VIP B, whose records
        # cannot come) is forwarded from VIP B by lba, the gateway holder, and copied there.
        wait_until(lambda: not a.ctl("sync")["inbound"], timeout=8,
                   what="lba to drop lbb's silent connection")
        r = env.client("c2", "load", URL["b"], "--rate", "20", "--duration", "2",
                       "--timeout", "3")
        inferred = scrape(env, "lba").get(("lbd_replies_inferred_total", ()), 0)
        print(f"load on VIP B during the cut: {r}; replies inferred on lba: {inferred}")
        assert r["failed"] == {} and r["ok"] > 0 and inferred >= r["ok"], r
        # The cut lasts CUT_SECONDS, VRRP (client and server sides) never moves, and lbb
        # learns nothing of what lba opens meanwhile.
        while time.monotonic() - cut_at < CUT_SECONDS:
            assert states(a) == OWN["lba"] and states(b) == OWN["lbb"]
            time.sleep(0.5)
        cut_a = long_lived(a)
        assert held["a"] <= cut_a and not cut_a - held["b"] <= long_lived(b)

        cut(env, how, up=True)
        healed_at = time.monotonic()
        wanted = held["a"] | held["b"]

        def agree() -> bool:
            on_a, on_b = long_lived(a), long_lived(b)
            return wanted <= on_a and on_a == on_b
        wait_until(agree, timeout=15, what="both tables to agree after the heal")
        took = time.monotonic() - healed_at
        sync = {lbd.host: lbd.ctl("sync") for lbd in (a, b)}
        print(f"{how}: tables agree {took:.2f} s after the heal; sessions per virtual server: "
              f"lba {per_virtual(a)}, lbb {per_virtual(b)}; connects before {connects}, "
              f"after { {h: s['connects'] for h, s in sync.items()} }; "
              f"errors { {h: s['errors'] for h, s in sync.items()} }")
        assert states(a) == OWN["lba"] and states(b) == OWN["lbb"]
        r = result(procs["load a"])
        assert r["failed"] == {} and r["ok"] > 0, r
        print(f"load on VIP A through the cut: {r}")
        # lbb's new connections work again (their replies need lba to have the record).
        r = env.client("c2", "load", URL["b"], "--rate", "20", "--duration", "2",
                       "--timeout", "5")
        assert r["failed"] == {} and r["ok"] > 0, r

        # lba dies: what it created during the cut lives on through lbb.
        a.stop(signal.SIGKILL)
        wait_states(b, ALL_MASTER, timeout=5)
        assert all_answer(holders.values()) == ["data"] * (2 * HELD)
        for vip in ("a", "b"):
            r = result(procs[f"stream {vip}"], timeout=STREAM_SECONDS + 20)
            assert r["error"] == "" and r["in_order"] and r["lines"] > STREAM_SECONDS * 20, (
                vip, r)
    finally:
        for h in holders.values():
            h.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
