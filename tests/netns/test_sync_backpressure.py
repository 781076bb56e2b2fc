"""Back-pressure: a peer that stops reading its sync socket costs a bounded backlog.

A single-master pair (lab/configs.py ``pair(..., sync=True)``): lba masters both
instances, lbb is the backup of every one, so freezing lbb (SIGSTOP: its sync socket is no
longer read, and its VRRP, as a silent backup, changes nothing) leaves lba forwarding alone.
A bounded new-connection load through lba fills the stream towards lbb; once the kernel's
buffers are full, lba's write buffer grows to ``[sync] max_backlog`` (set small here so that
the load reaches it) and lba drops the connection, counted as ``errors["backlog"]``. Its
memory stays bounded while lbb stays frozen; after SIGCONT the pair reconnects, lba sends a
snapshot and lbb's copy agrees again — connections opened during the freeze included.
"""

from __future__ import annotations

import signal
import time

import pytest

from lab.topology import CLIENTS, VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import Holder, metric, result, scrape, spawn_lab
from tests.netns.test_sync import synced_config
from tests.netns.test_vrrp import states, wait_states

pytestmark = pytest.mark.topology(pair=True)

MAX_BACKLOG = 64 << 10  # bytes: reached by a few seconds of the load below
FREEZE_SECONDS = 30
RATE, LOAD_SECONDS = 100, 25  # the load: 2,500 connections at most, 25 s at most
HELD = 3
RSS_GROWTH_BOUND = 32 << 20  # bytes: generous; an unbounded backlog would pass it


def start_pair(env: LabEnv) -> tuple[Lbd, Lbd]:
    env.start_servers()
    cfg = {node: synced_config(env, node, prio) + f"max_backlog = {MAX_BACKLOG}\n"
           for node, prio in (("lba", 200), ("lbb", 100))}
    a = env.lbd(cfg["lba"], "lba")
    wait_states(a, "MASTER")
    b = env.lbd(cfg["lbb"], "lbb")
    wait_states(b, "BACKUP")
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["connected"], timeout=10,  # type: ignore[misc]
                   what=f"{lbd.host}'s sync connections")
    return a, b


def rss(env: LabEnv, host: str) -> float:
    return metric(scrape(env, host), "lbd_process_resident_memory_bytes")


def established(lbd: Lbd) -> set[tuple[str, str]]:
    return {(s["client"], s["virtual"]) for s in lbd.ctl("sessions")
            if s["state"] == "ESTABLISHED"}


def test_a_frozen_peer_is_cut_off_at_a_bounded_backlog_and_resynced(env: LabEnv) -> None:
    a, b = start_pair(env)
    before = rss(env, "lba")
    snapshots = b.ctl("sync")["snapshots_received"]
    holder: Holder | None = None
    load = None
    try:
        b.kill(signal.SIGSTOP)
        frozen_at = time.monotonic()
        load = spawn_lab(env, "c1", "lab.client", "load", f"http://{VIP}/", "--rate",
                         str(RATE), "--duration", str(LOAD_SECONDS), "--timeout", "5")
        holder = Holder(env, "c1", HELD)
        held = {(f"{CLIENTS['c1']}:{p}", f"{VIP}:80") for p in holder.ports}
        wait_until(lambda: a.ctl("sync")["errors"].get("backlog", 0) >= 1,
                   timeout=FREEZE_SECONDS - 2, what="lba to cut the frozen lbb off")
        cut_after = time.monotonic() - frozen_at
        at_cut = rss(env, "lba")
        # lbb stays frozen for the rest of FREEZE_SECONDS; lba keeps forwarding the load
        # and stays master, and its memory does not grow with the frozen time.
        while time.monotonic() - frozen_at < FREEZE_SECONDS:
            assert states(a) == {"front": "MASTER", "back": "MASTER"}
            time.sleep(0.5)
        at_end = rss(env, "lba")
        sync = a.ctl("sync")
        assert not sync["outbound"] and sync["errors"]["backlog"] >= 1, sync
        assert at_end - before < RSS_GROWTH_BOUND, (before, at_cut, at_end)

        b.kill(signal.SIGCONT)
        thawed_at = time.monotonic()

        def agree() -> bool:
            st = b.ctl("sync")
            return st["snapshots_received"] > snapshots and held <= established(b)
        wait_until(agree, timeout=15, what="lbb's copy to agree after the thaw")
        took = time.monotonic() - thawed_at
        wait_until(lambda: a.ctl("sync")["connected"] and b.ctl("sync")["connected"],
                   timeout=10, what="both sync connections again")
        wait_states(b, "BACKUP")
        assert states(a) == {"front": "MASTER", "back": "MASTER"}
        r = result(load, timeout=LOAD_SECONDS + 20)
        assert r["failed"] == {} and r["ok"] > 0, r
        sync = a.ctl("sync")
        print(f"cut off {cut_after:.1f} s into the freeze (max_backlog {MAX_BACKLOG} B, "
              f"errors {sync['errors']}); lba RSS before {before / 2**20:.1f} MiB, at the cut "
              f"{at_cut / 2**20:.1f} MiB, after {FREEZE_SECONDS} s frozen "
              f"{at_end / 2**20:.1f} MiB; lbb agrees {took:.2f} s after SIGCONT; "
              f"snapshots sent {sync['snapshots_sent']}; load {r}")
        # lba dies: lbb, resynced, carries the connections opened while it was frozen.
        a.stop(signal.SIGKILL)
        wait_states(b, "MASTER", timeout=5)
        assert holder.send() == ["data"] * HELD
    finally:
        if b.proc is not None and b.proc.poll() is None:
            b.kill(signal.SIGCONT)
        if holder is not None:
            holder.close()
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
