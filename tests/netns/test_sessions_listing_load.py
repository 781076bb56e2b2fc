"""Issue 9, item 3: with 10⁶ sessions, VRRP adverts stay on time while ``lbctl sessions`` runs.

A pair: lba starts holding 10⁶ sessions (a table snapshot written by lab.fill, loaded at
start) and becomes master; lbb starts empty and receives them through the sync snapshot, so
both nodes hold the whole table. Then, while lbb captures lba's adverts on its client link,
``lbctl --json sessions`` lists lba's table with ``--limit`` and whole. The listing must be
complete (as many entries as the table holds) and neither node may change VRRP state: a
listing that held lba's event loop past lbb's master-down interval (361 ms at 100 ms
adverts) would make lbb take over. The worst gap between two of lba's adverts is measured
and reported, not asserted on (a shared CI box moves it).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.harness import BIN, ENV, LabEnv, Lbd, large_node_config
from lab.topology import LB_FRONT, wait_until
from tests.netns.test_vrrp import wait_states

pytestmark = pytest.mark.topology(pair=True)

COUNT = 1_000_000
LIMIT = 1000


def transitions(lbd: Lbd) -> dict[str, int]:
    return {name: int(v["transitions"]) for name, v in lbd.ctl("vrrp").items()}


def listing(lbd: Lbd, out: Path, *args: str) -> tuple[int, float]:
    """``lbctl --json sessions ARGS`` into ``out``; the entries listed and the seconds taken.
    (Counted in the file: 10⁶ entries are ~300 MB of indented JSON.)"""
    t0 = time.monotonic()
    with out.open("wb") as f:
        proc = subprocess.run([str(BIN / "lbctl"), "--socket", lbd.socket, "--json",
                               "sessions", *args], stdout=f, stderr=subprocess.PIPE,
                              timeout=180, check=False, env=ENV)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    with out.open("rb") as f:  # one '    "client": ' line per entry (indent=2)
        entries = sum(1 for line in f if line.startswith(b'    "client": '))
    out.unlink()
    return entries, took


def test_adverts_stay_on_time_while_a_million_sessions_are_listed(
        env: LabEnv, record_property: Callable[[str, object], None]) -> None:
    env.start_servers()
    a = env.lbd(large_node_config("node-a", env.tmp), "lba", fill=COUNT)
    wait_states(a, "MASTER", timeout=30)
    b = env.lbd(large_node_config("node-b", env.tmp), "lbb")
    wait_states(b, "BACKUP", timeout=30)
    wait_until(lambda: (b.ctl("sync").get("last_snapshot") or {}).get("sessions") == COUNT,
               timeout=90, what=f"lbb to apply lba's snapshot of {COUNT:,} sessions")
    assert a.ctl("status")["sessions"] == COUNT and b.ctl("status")["sessions"] == COUNT
    before = {lbd.host: transitions(lbd) for lbd in (a, b)}

    capture = subprocess.Popen(
        ["ip", "netns", "exec", env.lab.ns("lbb"), sys.executable, "-m", "tests.netns.capture",
         "--iface", "eth0", "--duration", "120"],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert capture.stdout is not None
        assert json.loads(capture.stdout.readline()) == {"ready": True}
        limited, limited_s = listing(a, env.tmp / "limited.json", "--limit", str(LIMIT))
        whole, whole_s = listing(a, env.tmp / "whole.json")
    finally:
        capture.terminate()
        out, _ = capture.communicate(timeout=30)
    adverts = [t for t, src, vrid, _ in json.loads(out.strip().splitlines()[-1])["adverts"]
               if src == LB_FRONT["lba"] and vrid == 51]

    assert limited == LIMIT
    assert whole == COUNT == a.ctl("status")["sessions"]
    assert {lbd.host: transitions(lbd) for lbd in (a, b)} == before
    gaps = [y - x for x, y in itertools.pairwise(adverts)]
    figures = {"listing_seconds": round(whole_s, 1), "limited_seconds": round(limited_s, 2),
               "adverts": len(adverts),
               "worst_advert_gap_ms": round(max(gaps) * 1000, 1) if gaps else None}
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nlisting figures: {json.dumps(figures)}")
    assert len(adverts) > 10  # the capture saw lba's adverts
