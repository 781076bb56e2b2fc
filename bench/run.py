"""``python -m bench``: run the benchmarks, print one table of figures and ratios.

    python -m bench [--only throughput,pps,cps,memory,failover,sync,syncnet,synflood,
                          vrrpload]
                    [--systems lbd,kernel,haproxy,lbd-pure]
                    [--duration 3] [--rounds 3] [--json PATH]
                    [--sessions 1000000] [--conns 32] [--streams 4]

Network figures are measured in namespaces (bench.netbench, needs root): every system gets a
lab of its own, all are set up first, then each is measured once per round, the systems taking
turns, and a figure is the median of its rounds — so a disturbance (another job on the box)
hits all systems alike instead of one. The memory figure is measured in-process
(bench.memory). Benchmarks report, they do not judge: the exit status is 0 when
every selected figure was measured, 1 when one could not be (a tool missing, a system that did
not start), whatever the ratios. Everything started is killed and every namespace deleted at
the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TypeVar

from bench import failover, memory, netbench, syncnet, syncrate, synflood, vrrpload
from bench.report import Check, Figure, as_json, table

T = TypeVar("T")

BENCHES = ("throughput", "pps", "cps", "memory", "failover", "sync", "syncnet", "synflood",
           "vrrpload")
FLOOD_RATES: dict[str, tuple[int, bool | str]] = {  # key: (SYN/s, 0 = full rate; syn_proxy)
    "synflood_15k": (15000, False), "synflood_max": (0, False),
    "synflood_max_proxy": (0, True), "synflood_max_auto": (0, "auto")}
VRRP_LOADS = {"vrrp_udp": "iperf3 4 streams + wrk + 64 B UDP flood",
              "vrrp_junk": "iperf3 4 streams + wrk + 64 B junk flood"}
SYSTEMS_ORDER = ("kernel", "haproxy", "lbd", "lbd-pure", "lbd-2w", "lbd-offload")
# lbd-offload: lbd with [dataplane] offload = "conntrack" (the kernel fast path). On
# request: lbd-pure, lbd with LBD_NATIVE=pure; lbd-2w, the two-worker prototype
# (bench/workers.py, not lbd: it measures the design's lever before it is built).
DEFAULT_SYSTEMS = ("kernel", "haproxy", "lbd", "lbd-offload")


def make_figures(benches: Sequence[str], plan: netbench.Plan, sessions: int,
                 systems: Sequence[str] = DEFAULT_SYSTEMS) -> list[Figure]:
    # compiled/pure, shown when the run measures lbd-pure beside lbd (no target: a report)
    pure = (Check("lbd-pure"),) if "lbd-pure" in systems else ()
    off = "lbd-offload" in systems

    def offload(*checks: Check) -> tuple[Check, ...]:
        """The same targets for lbd-offload, when the run measures it."""
        return tuple(Check(c.peer, c.op, c.target, "lbd-offload") for c in checks) if off \
            else ()
    # issue 10's targets: 1 stream ≥ 1.2x HAProxy, more streams ≥ 0.8x the kernel, 64 B UDP
    # ≥ 0.8x the kernel, new connections ≥ 1.0x HAProxy, ≤ 300 B per session
    figs: list[Figure] = []
    if "throughput" in benches:
        figs.append(Figure("tcp_1", "TCP throughput, 1 stream", "Gbit/s", True,
                           (Check("haproxy", ">=", 1.2), Check("kernel", ">=", 0.5), *pure,
                            *offload(Check("haproxy", ">=", 1.2)))))
        if plan.streams > 1:
            figs.append(Figure(f"tcp_{plan.streams}",
                               f"TCP throughput, {plan.streams} streams", "Gbit/s", True,
                               (Check("haproxy", ">=", 1.0), Check("kernel", ">=", 0.8),
                                *pure, *offload(Check("kernel", ">=", 0.8)))))
    if "pps" in benches:
        figs.append(Figure("udp_pps", f"UDP {netbench.UDP_PAYLOAD} B datagrams received",
                           "pkt/s", True, (Check("kernel", ">=", 0.8), *pure,
                                           *offload(Check("kernel", ">=", 0.8)))))
    if "cps" in benches:
        figs.append(Figure("cps", "New TCP connections (HTTP, Connection: close)", "conn/s",
                           True, (Check("haproxy", ">=", 1.0), *pure,
                                  *offload(Check("haproxy", ">=", 1.0)))))
    if "failover" in benches:
        figs.append(Figure("failover", "Failover seen by a client (SIGKILL → first good "
                           "request, 100 ms adverts)", "s", False, (Check(None, "<=", 0.5),)))
        figs.append(Figure("failover_30", "Failover, 30 ms adverts: SIGKILL → first good "
                           "request", "s", False, (Check(None, "<=", 0.15),)))
        figs.append(Figure("failover_gap_30", "Failover, 30 ms adverts: largest gap of a "
                           "stream across the kill", "s", False, (Check(None, "<=", 0.25),)))
    if "sync" in benches:
        figs.append(Figure("sync_rate", "Sessions synced per second (encode, MAC, decode, "
                           "install; in-process)", "sess/s", True, (Check(None),)))
    if "syncnet" in benches:
        figs += [
            Figure("syncnet_rate", "Sessions synced per second, two lbd nodes (SYN load "
                   "through the master)", "sess/s", True, (Check(None, ">=", 20_000.0),)),
            Figure("syncnet_p50", f"Change delay to the peer's ack, p50 "
                   f"({syncnet.DELAY_RATE:,} new sessions/s)", "ms", False, (Check(None),)),
            Figure("syncnet_p99", f"Change delay to the peer's ack, p99 "
                   f"({syncnet.DELAY_RATE:,} new sessions/s)", "ms", False,
                   (Check(None, "<=", 20.0),)),
            Figure("syncnet_snap_100k", "Snapshot of 100,000 sessions to a starting backup",
                   "s", False, (Check(None),)),
            Figure("syncnet_snap_1m", "Snapshot of 1,000,000 sessions to a starting backup",
                   "s", False, (Check(None, "<=", 10.0),)),
            Figure("syncnet_bytes", "Sync bytes per session on the wire (snapshot)", "B",
                   False, (Check(None),)),
            Figure("syncnet_load", "Start holding 1,000,000 sessions: table snapshot load",
                   "s", False, (Check(None),)),
        ]
    if "synflood" in benches:
        for key, (rate, proxy) in FLOOD_RATES.items():
            figs.append(Figure(key, "Real clients' GETs through a spoofed SYN flood at "
                               + (f"{rate:,} SYN/s" if rate else "full raw-socket rate")
                               + _proxy_label(proxy),
                               "share", True, (Check(None, ">=", 0.95),)))
    if "vrrpload" in benches:
        for key, what in VRRP_LOADS.items():
            figs.append(Figure(f"{key}_gap", f"Worst gap between the master's 30 ms adverts, "
                               f"{vrrpload.SECONDS} s of {what}", "ms", False,
                               (Check(None, "<=", 45.0),)))
            figs.append(Figure(f"{key}_failovers", f"False failovers (VRRP transitions), "
                               f"{vrrpload.SECONDS} s of {what}", "count", False,
                               (Check(None, "<=", 0.0),)))
    if "memory" in benches:
        figs.append(Figure("mem_session", f"Memory per session ({sessions:,} sessions)",
                           "B", False, (Check(None, "<=", 300.0),)))
    return figs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(BENCHES),
                    help=f"comma-separated subset of {','.join(BENCHES)} (default: all)")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help="comma-separated subset of " + ",".join(SYSTEMS_ORDER) + " (default: "
                         + ",".join(DEFAULT_SYSTEMS) + "; lbd-pure is lbd on pure-Python "
                         "modules, lbd-2w the two-worker prototype of bench/workers.py, "
                         "lbd-offload lbd with the kernel fast path)")
    ap.add_argument("--duration", type=float, default=3.0,
                    help="seconds per client run (iperf3, wrk); default 3")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measurements per figure and system, interleaved; the median is "
                         "reported; default 3")
    ap.add_argument("--sessions", type=int, default=1_000_000,
                    help="sessions for the memory figure; default 1,000,000")
    ap.add_argument("--conns", type=int, default=32,
                    help="wrk's concurrent connections; default 32")
    ap.add_argument("--streams", type=int, default=4,
                    help="iperf3 parallel streams of the second TCP figure (<2: skip it)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    args.benches = _subset(ap, "--only", args.only, BENCHES)
    args.system_list = _subset(ap, "--systems", args.systems, SYSTEMS_ORDER)
    if not 1 <= args.duration <= 60:
        ap.error("--duration must be between 1 and 60 seconds")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be between 1 and 20")
    if not 1 <= args.sessions <= 5_000_000:
        ap.error("--sessions must be between 1 and 5,000,000")
    if not 1 <= args.conns <= 1000:
        ap.error("--conns must be between 1 and 1000")
    return args


def _subset(ap: argparse.ArgumentParser, flag: str, value: str,
            allowed: Sequence[str]) -> tuple[str, ...]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        ap.error(f"{flag}: choose from {','.join(allowed)} (got {value!r})")
    return tuple(v for v in allowed if v in chosen)  # canonical order


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    plan = netbench.Plan(tuple(b for b in args.benches
                               if b not in ("memory", "failover", "sync", "syncnet",
                                            "synflood", "vrrpload")),
                         args.duration,
                         rounds=args.rounds, conns=args.conns, streams=args.streams)
    figures = make_figures(args.benches, plan, args.sessions, args.system_list)
    by_key = {f.key: f for f in figures}
    started = time.monotonic()
    others = _other_namespaces()
    load_before = os.getloadavg()[0]
    if others:
        progress(f"warning: {len(others)} other network namespaces exist (tests running?); "
                 "their load disturbs the figures")
    try:
        if plan.benches:
            _network(args.system_list, plan, by_key)
        if "memory" in args.benches:
            _memory(args.sessions, by_key["mem_session"])
        if "synflood" in args.benches:
            for key, (rate, proxy) in FLOOD_RATES.items():
                _synflood(args.rounds, by_key[key], rate, proxy)
        if "failover" in args.benches:
            _failover(args.rounds, by_key["failover"], None, None)
            _failover(args.rounds, by_key["failover_30"], by_key["failover_gap_30"], "30ms")
        if "vrrpload" in args.benches:
            for key in VRRP_LOADS:
                _vrrpload(args.rounds, by_key[f"{key}_gap"], by_key[f"{key}_failovers"],
                          junk=key == "vrrp_junk")
        if "sync" in args.benches:
            _sync_rate(by_key["sync_rate"])
        if "syncnet" in args.benches:
            _syncnet(args.duration, [f for f in figures if f.key.startswith("syncnet_")])
    except KeyboardInterrupt:
        progress("interrupted: everything started was stopped and the namespaces deleted")
        return 130
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "duration_per_run_s": args.duration,
        "rounds": args.rounds,
        "other_namespaces": others,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "wrk_connections": args.conns,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print()
    print(f"lbd benchmarks — {meta['cpus']} CPUs, Linux {meta['kernel']}, "
          f"{args.rounds} x {args.duration:g} s per figure and system (median), "
          f"{meta['wall_s']} s in all, load average {load_before:.2f} before, "
          f"{meta['loadavg_after']:.2f} after")
    if others:
        print(f"warning: {len(others)} other network namespaces existed when the run began; "
              "whatever runs in them competes for the CPUs")
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(as_json(figures, meta), indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 1 if any(f.errors for f in figures) else 0


def _network(systems: Sequence[str], plan: netbench.Plan, by_key: dict[str, Figure]) -> None:
    wanted = [s for s in systems if any(s in netbench.NEEDS[b] for b in plan.benches)]
    if os.geteuid() != 0 or netbench.which("ip") is None:
        why = "needs root" if os.geteuid() != 0 else "iproute2 (ip) is not installed"
        for system in wanted:
            for bench in plan.benches:
                if system in netbench.NEEDS[bench]:
                    for key in netbench.figure_keys(bench, plan):
                        by_key[key].errors[system] = why
        return
    with tempfile.TemporaryDirectory(prefix="lbd-bench-") as tmpdir, \
            netbench.Systems() as labs:
        for name in wanted:
            progress(f"{name}: setting up its lab")
            for key, error in labs.start(name, plan, Path(tmpdir) / name).items():
                by_key[key].errors[name] = error
        failed: set[tuple[str, str]] = set()
        for rnd in range(plan.rounds):
            for bench in plan.benches:
                # Systems take turns, starting with a different one each round.
                turn = [s for s in labs.ready if bench in s.benches]
                turn = turn[rnd % len(turn):] + turn[:rnd % len(turn)] if turn else []
                for ready in turn:
                    if (ready.name, bench) in failed:
                        continue
                    progress(f"round {rnd + 1}/{plan.rounds}: {bench} through {ready.name}")
                    try:
                        values, notes = netbench.measure(ready, bench, plan)
                    except netbench.BenchError as exc:
                        failed.add((ready.name, bench))
                        for key in netbench.figure_keys(bench, plan):
                            by_key[key].errors[ready.name] = f"round {rnd + 1}: {exc}"
                        continue
                    for key, value in values.items():
                        by_key[key].add_sample(ready.name, value)
                        if rnd == 0:
                            by_key[key].notes.extend(f"{ready.name}: {n}" for n in notes)
        progress("tearing the labs down")


def _memory(sessions: int, fig: Figure) -> None:
    progress(f"memory: {sessions:,} sessions under tracemalloc")
    try:
        result = memory.measure(sessions)
    except (ImportError, RuntimeError, TypeError, ValueError) as exc:
        fig.errors["lbd"] = f"{exc.__class__.__name__}: {exc}"
        return
    fig.values["lbd"] = result.bytes_per_session
    fig.notes.append(f"{result.bytes_total / 2**20:,.0f} MiB traced for {result.sessions:,} "
                     f"sessions, built in {result.seconds:.1f} s")


def _sync_rate(fig: Figure) -> None:
    progress("sync: 200,000 sessions through the sync pipeline")
    try:
        result = syncrate.measure()
    except (RuntimeError, ValueError) as exc:
        fig.errors["lbd"] = f"{exc.__class__.__name__}: {exc}"
        return
    fig.values["lbd"] = result.per_second
    fig.notes.append(f"{result.wire_bytes_per_session:.1f} bytes per session on the wire")


def _syncnet(duration: float, figs: list[Figure]) -> None:
    if os.geteuid() != 0:
        for fig in figs:
            fig.errors["lbd"] = "needs root"
        return
    try:
        result = syncnet.measure(duration=max(duration, 5.0), progress=progress)
    except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError,
            AssertionError) as exc:
        for fig in figs:
            fig.errors["lbd"] = f"{exc.__class__.__name__}: {exc}"
        return
    for fig in figs:
        if fig.key in result.values:
            fig.values["lbd"] = result.values[fig.key]
        else:
            fig.errors["lbd"] = result.errors.get(fig.key, "not measured")
    figs[0].notes.extend(result.notes)


ROUND_ERRORS = (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError, ValueError,
                KeyError)
"""What a round of a lab bench may fail with: the figure records it, the run goes on."""


def _rounds(rounds: int, figs: Sequence[Figure], what: str,
            measure: Callable[[], T]) -> Iterator[T]:
    """Each round's result of ``measure`` (a bench that builds a lab of its own); a figure of
    ``figs`` gets the error of the first round that fails, or "needs root", and no more."""
    if os.geteuid() != 0:
        for f in figs:
            f.errors["lbd"] = "needs root"
        return
    for rnd in range(rounds):
        progress(f"round {rnd + 1}/{rounds}: {what}")
        try:
            got = measure()
        except ROUND_ERRORS as exc:
            for f in figs:
                f.errors["lbd"] = f"round {rnd + 1}: {exc.__class__.__name__}: {exc}"
            return
        yield got


def _proxy_label(proxy: bool | str) -> str:
    return f", syn_proxy {'auto' if proxy == 'auto' else 'on'}" if proxy else ""


def _synflood(rounds: int, fig: Figure, rate: int, proxy: bool | str) -> None:
    what = f"SYN flood at {rate} SYN/s" if rate else "SYN flood at full rate"
    what += _proxy_label(proxy)
    for rnd, got in enumerate(_rounds(rounds, [fig], what,
                                      lambda: synflood.one_round(rate, proxy))):
        fig.add_sample("lbd", got.legit_ok)
        fig.notes.append(f"round {rnd + 1}: flood {got.flood_rate:,.0f} SYN/s sent, lbd CPU "
                         f"{got.lbd_cpu:.2f} cores, {got.tun_dropped:,} packets dropped at "
                         "the TUN by the kernel")


def _vrrpload(rounds: int, gap: Figure, failovers: Figure, junk: bool) -> None:
    what = f"VRRP at 30 ms under saturation ({'junk' if junk else 'UDP'} flood)"
    for rnd, got in enumerate(_rounds(rounds, [gap, failovers], what,
                                      lambda: vrrpload.one_round(junk))):
        gap.add_sample("lbd", got.worst_gap_ms)
        failovers.add_sample("lbd", got.transitions)
        load = ", ".join(f"{k} {v:g}" for k, v in got.figures.items())
        gap.notes.append(f"round {rnd + 1}: {got.over_1_5x} of {got.adverts} gaps over 45 ms; "
                         f"{load}")


def _failover(rounds: int, fig: Figure, gap_fig: Figure | None, advert: str | None) -> None:
    figs = [f for f in (fig, gap_fig) if f is not None]
    what = "failover of an lbd pair" + (f" ({advert} adverts)" if advert else "")
    for got in _rounds(rounds, figs, what, lambda: failover.one_round(advert)):
        fig.add_sample("lbd", got.first_request)
        if gap_fig is not None:
            gap_fig.add_sample("lbd", got.stream_gap)


def _other_namespaces() -> list[str]:
    """Network namespaces that exist before the run (other labs or tests), by name."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]
