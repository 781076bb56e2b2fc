"""State sync through the real pipeline: two lbd nodes in namespaces, TCP between them.

The lab pair (lab.topology, ``pair=True``) runs conf/node-a.toml and conf/node-b.toml as
shipped, with a larger session table, half-open sessions kept (``max_half_open``) and no
periodic table snapshot during the run. Figures (issue 8, item 6):

- **sessions synced per second**: a SYN load (lab.synflood, spoofed clients, every SYN a new
  session that the master forwards to a real server) as fast as one sender goes, for
  ``duration`` seconds; the figure is the backup's session count gained per second over the
  load (sampled before it and as it ends, without waiting for the backup to catch up), the
  master's own rate in the notes.
- **delay from creation to installation on the peer**: the same load paced at
  :data:`DELAY_RATE` SYN/s in bursts of :data:`DELAY_BATCH`; p50 and p99 of
  ``lbd_sync_ack_delay_seconds`` on the master over the run (a histogram delta,
  interpolated within buckets as PromQL does). Each change is counted from when the first
  record of its write was queued (in the loop iteration that created the session) to the
  arrival of the backup's ``Applied`` acknowledgement covering it: an upper bound of
  creation -> installation that adds the ack's way back (both ends share CLOCK_MONOTONIC,
  but the records carry no creation time).
- **bulk snapshot**: the master starts with N sessions loaded from a table snapshot written
  by lab.fill (the start's load time is a figure of its own at the largest N), becomes
  master alone, then the backup starts empty; the figure is the backup's ``lbctl sync``
  ``last_snapshot.seconds`` (its first record's arrival to its end applied), the time from
  the backup's spawn in the notes. Bytes per session: what the backup read on its inbound
  connection over that snapshot, divided by N.

VRRP transitions of both nodes are counted over each phase and reported in the notes: a
loop that stalls past the master-down interval would show as one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.harness import ENV, LabEnv, Lbd, Samples, large_node_config, pair_env
from lab.topology import VIP, wait_until
from lb.histogram import quantile

SNAPSHOT_SIZES = (100_000, 1_000_000)
DELAY_RATE = 5000
DELAY_BATCH = 25  # SYNs back to back every 5 ms: a smooth 5k/s, not bursts of 500 each 0.1 s
HISTOGRAM = "lbd_sync_ack_delay_seconds"


@dataclass
class Result:
    """Values by figure key (bench.run's), notes for the table."""

    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def transitions(lbd: Lbd) -> int:
    """VRRP state transitions of the node so far, over its instances."""
    return sum(int(v.get("transitions", 0)) for v in lbd.ctl("vrrp").values())


def states(lbd: Lbd) -> set[str]:
    got = lbd.ctl("vrrp", check=False) or {}
    return {v["state"] for v in got.values()}


def sessions(lbd: Lbd) -> int:
    return int(lbd.ctl("status")["sessions"])


def start_pair(env: LabEnv, fill: int = 0) -> tuple[Lbd, Lbd, dict[str, float]]:
    """lba (filled with ``fill`` sessions) up as master alone, then lbb as backup with its
    sync connected; timings of lba's start."""
    a = env.lbd(large_node_config("node-a", env.tmp), "lba", start=False, fill=fill)
    t0 = time.monotonic()
    a.start(wait=False)
    a.wait_answering(timeout=30 + fill / 10_000)
    answering = time.monotonic() - t0
    wait_until(lambda: states(a) == {"MASTER"}, timeout=30, what="lba to become master")
    times = {"answering": answering, "master": time.monotonic() - t0,
             "load": float(a.ctl("status")["table_snapshot"]["load"].get("seconds", 0.0))}
    times["backup_spawned"] = time.monotonic()
    b = env.lbd(large_node_config("node-b", env.tmp), "lbb")
    wait_until(lambda: states(b) == {"BACKUP"}, timeout=30, what="lbb to be backup")
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["connected"],  # type: ignore[misc]
                   timeout=30, what=f"{lbd.host}'s sync connections")
    return a, b, times


def flood(env: LabEnv, rate: int, duration: float, count: int, seed: int,
          batch: int = 500) -> subprocess.Popen[str]:
    """SYNs at the VIP from c1 (lab.synflood), ``count`` distinct ones (another ``seed``:
    other flows), paced in bursts of ``batch``."""
    cmd = ["ip", "netns", "exec", env.lab.ns("c1"), sys.executable, "-m", "lab.synflood", VIP,
           "--port", "80", "--rate", str(rate), "--duration", str(duration), "--count",
           str(count), "--distinct", str(count), "--seed", str(seed), "--batch", str(batch)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})


def histogram(samples: Samples, name: str) -> list[tuple[float, float]]:
    """A scraped histogram's (upper bound, cumulative count) pairs, +Inf last."""
    out = [(float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
           if n == f"{name}_bucket"]
    return sorted(out)


def measure_rate(env: LabEnv, a: Lbd, b: Lbd, duration: float, res: Result) -> None:
    count = 60_000 * int(duration + 1)  # more than one sender makes in that time
    proc = flood(env, 0, duration, count, seed=2)
    assert proc.stdout is not None
    # synflood builds its packets first, then prints nothing until it ends: the samples
    # frame the run from the first SYN the master counts to the sender's end.
    base_a, base_b = sessions(a), sessions(b)
    wait_until(lambda: sessions(a) > base_a, timeout=60, what="the SYN load to begin")
    t0, a0, b0 = time.monotonic(), sessions(a), sessions(b)
    out, _ = proc.communicate(timeout=duration + 120)
    t1, a1, b1 = time.monotonic(), sessions(a), sessions(b)
    sent = _last_json(out)
    seconds = t1 - t0
    res.values["syncnet_rate"] = (b1 - b0) / seconds
    caught = wait_until(lambda: sessions(b) >= sessions(a) - 10, timeout=60,
                        what="the backup to catch up")
    res.notes.append(f"SYN load: {sent.get('sent', 0):,} SYNs sent at "
                     f"{sent.get('rate', 0):,}/s; master created {(a1 - a0) / seconds:,.0f}/s, "
                     f"backup installed {(b1 - b0) / seconds:,.0f}/s over {seconds:.1f} s "
                     f"(counts before: {base_a:,}/{base_b:,}; caught up: {bool(caught)})")


def measure_delay(env: LabEnv, a: Lbd, duration: float, res: Result) -> None:
    before = histogram(env.scrape("lba"), HISTOGRAM)
    proc = flood(env, DELAY_RATE, duration, int(DELAY_RATE * duration), seed=1,
                 batch=DELAY_BATCH)
    out, _ = proc.communicate(timeout=duration + 120)
    wait_until(lambda: a.ctl("sync")["unacked"] == 0, timeout=30,
               what="the backup to acknowledge everything")
    after = histogram(env.scrape("lba"), HISTOGRAM)
    delta = [(le, n - m) for (le, n), (_, m) in zip(after, before, strict=True)]
    if not delta or delta[-1][1] <= 0:
        res.errors["syncnet_p99"] = res.errors["syncnet_p50"] = "no delay recorded"
        return
    res.values["syncnet_p50"] = quantile(delta, 0.5) * 1e3
    res.values["syncnet_p99"] = quantile(delta, 0.99) * 1e3
    sent = _last_json(out)
    worst = next((le for le, n in delta if n >= delta[-1][1]), float("inf"))
    res.notes.append(f"delay: {int(delta[-1][1]):,} records at {sent.get('rate', 0):,} SYN/s "
                     f"(bursts of {DELAY_BATCH}) for {duration:g} s; every record within "
                     f"{worst * 1e3:g} ms (bucket bound)")


def measure_snapshot(env: LabEnv, count: int, res: Result) -> None:
    a, b, times = start_pair(env, fill=count)
    before = transitions(a), transitions(b)
    got = wait_until(lambda: _snapshot_of(b, count), timeout=120,
                     what=f"lbb to apply the snapshot of {count:,} sessions")
    assert got is not None
    spawn_to_applied = time.monotonic() - times["backup_spawned"]
    sync = b.ctl("sync")
    label = "1m" if count == 1_000_000 else f"{count // 1000}k"
    res.values[f"syncnet_snap_{label}"] = float(got["seconds"])
    res.values.setdefault("syncnet_bytes", sync["bytes_received"] / count)
    res.notes.append(
        f"snapshot of {count:,}: {got['seconds']:.2f} s from its first record, "
        f"{got['since_connect']:.2f} s from the connection, {spawn_to_applied:.1f} s from "
        f"lbb's spawn; {sync['bytes_received'] / count:.1f} B/session read; VRRP transitions "
        f"meanwhile: lba {transitions(a) - before[0]}, lbb {transitions(b) - before[1]}")
    res.notes.append(f"start with {count:,} sessions: loaded in {times['load']:.1f} s, control "
                     f"socket after {times['answering']:.1f} s, MASTER after "
                     f"{times['master']:.1f} s (from the spawn)")
    if count == max(SNAPSHOT_SIZES):
        res.values["syncnet_load"] = times["load"]
    for lbd in (a, b):
        lbd.stop(signal.SIGKILL)
    (env.tmp / "state-lba" / "tables.snap").unlink(missing_ok=True)


def _snapshot_of(lbd: Lbd, count: int) -> dict[str, Any] | None:
    last = lbd.ctl("sync", check=False)
    got = (last or {}).get("last_snapshot")
    return got if got and got["sessions"] >= count else None


def _last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    return dict(json.loads(lines[-1])) if lines else {}


def measure(sizes: Sequence[int] = SNAPSHOT_SIZES, duration: float = 5.0,
            progress: Callable[[str], None] = print) -> Result:
    """Every figure of the module docstring, one lab for all."""
    res = Result()
    with pair_env("lbd-syncnet-") as env:
        progress(f"syncnet: an empty pair, SYN load at {DELAY_RATE}/s, delay to the "
                 "backup's ack")
        a, b, _ = start_pair(env)
        wait_until(lambda: all(s["up"] for s in a.ctl("servers")), timeout=20,
                   what="lba's servers to be up")
        before = transitions(a), transitions(b)
        measure_delay(env, a, duration, res)
        progress("syncnet: SYN load at full rate")
        measure_rate(env, a, b, duration, res)
        res.notes.append(f"VRRP transitions during the SYN loads: lba "
                         f"{transitions(a) - before[0]}, lbb {transitions(b) - before[1]}")
        for lbd in (a, b):
            lbd.stop(signal.SIGKILL)
        for count in sizes:
            progress(f"syncnet: master filled with {count:,} sessions, backup starts")
            measure_snapshot(env, count, res)
    return res


if __name__ == "__main__":
    r = measure(tuple(int(x) for x in sys.argv[1:]) or SNAPSHOT_SIZES)
    print(json.dumps({"values": r.values, "notes": r.notes, "errors": r.errors}, indent=1))
