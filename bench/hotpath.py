"""Per-packet cost of the forwarding core, in process (no TUN, no syscalls).

    python -m bench.hotpath [--packets N] [--rounds N] [--builds pure,compiled] [--persistence]

Times ``Forwarder.handle`` on prepared buffers (a fresh copy per packet, made before the clock
starts): a SYN that opens a new session, an established client packet (an ACK with 64 bytes
of data), and a server's reply to it. Each build of the hot-path modules (``pure`` Python,
``compiled`` by mypyc: lb/native.py) is measured in a process of its own (``LBD_NATIVE``), the
builds taking turns round after round; prints one JSON document with µs per packet for each
figure, best over the rounds, per build, and compiled/pure. ``--persistence`` gives the virtual
server client-ip persistence (a binding looked up and made per SYN). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

import lb.forwarder
from lab.malformed import checksum
from lb import native
from lb.config import parse_config
from lb.forwarder import Forwarder, ServiceCounts
from lb.packet import VNET_HDR_LEN
from lb.persistence import PersistenceTable
from lb.services import Service, build_services
from lb.sessions import SessionTable, SessionTimeouts

VIP = "198.51.100.10"
SERVERS = ("198.18.0.11", "198.18.0.12", "198.18.0.13")


def tcp_packet(src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes = b"",
               seq: int = 1000, ack: int = 0) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP,
                     0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytes(VNET_HDR_LEN) + ip + tcp


def forwarder(max_sessions: int, persistence: bool) -> Forwarder:
    web: dict[str, object] = {"address": VIP, "port": 80, "pool": "web", "scheduler": "rr",
                              "max_conns_per_source": 1 << 20,
                              "max_conn_rate_per_source": 1 << 20}
    if persistence:
        web["persistence"] = "client-ip"
    cfg = parse_config({
        "node": {"name": "bench", "control_socket": "/run/lbd-bench.sock"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "sessions": {"max_sessions": max_sessions},
        # Per-source limits on, high enough that every SYN is admitted: the SYN figure
        # includes the per-source count and token bucket (150 sources, ~670 SYNs each).
        "virtual_servers": {"web": web},
        "pools": {"web": {"servers": [{"address": a, "port": 8080} for a in SERVERS]}},
    }, "bench.hotpath")
    services = build_services(cfg)
    sessions: SessionTable[Service] = SessionTable(SessionTimeouts(), max_sessions,
                                                   observer=ServiceCounts(),
                                                   max_half_open=max_sessions)
    return Forwarder(services, sessions, PersistenceTable())


def clients(n: int) -> list[tuple[str, int]]:
    return [(f"198.51.100.{100 + (i >> 14) % 150}", 1024 + (i & 0x3FFF)) for i in range(n)]


def timed(fwd: Forwarder, packets: list[bytes], now: float) -> float:
    bufs = [bytearray(p) for p in packets]
    handle = fwd.handle
    start = time.perf_counter()
    for buf in bufs:
        handle(buf, len(buf), now)
    return (time.perf_counter() - start) / len(bufs)


def measure(n: int, rounds: int, persistence: bool) -> dict[str, float]:
    flows = clients(n)
    syns = [tcp_packet(c, p, VIP, 80, 0x02) for c, p in flows]
    data = [tcp_packet(c, p, VIP, 80, 0x18, b"x" * 64, seq=1001, ack=5001) for c, p in flows]
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, value), value)

    for _ in range(rounds):
        fwd = forwarder(2 * n, persistence)
        keep("syn", timed(fwd, syns, 1.0))
        servers = {(s.caddr, s.cport): s.server for s in fwd.sessions}
        synacks, answers = [], []
        for c, p in flows:
            srv = servers[(struct.unpack("!I", socket.inet_aton(c))[0], p)]
            addr = socket.inet_ntoa(struct.pack("!I", srv.addr))
            synacks.append(tcp_packet(addr, srv.port, c, p, 0x12, seq=5000, ack=1001))
            answers.append(tcp_packet(addr, srv.port, c, p, 0x18, b"y" * 64, seq=5001,
                                      ack=1065))
        timed(fwd, synacks, 1.1)
        timed(fwd, data, 1.2)  # the client's first data establishes each session
        keep("established", timed(fwd, data, 1.3))
        keep("reply", timed(fwd, answers, 1.4))
    return {k: round(v * 1e6, 3) for k, v in best.items()}


def build() -> str:
    return "pure" if (lb.forwarder.__file__ or "").endswith(".py") else "compiled"


MODES = {"pure": "pure", "compiled": "require"}  # build -> LBD_NATIVE for its process


def in_process(args: argparse.Namespace, which: str) -> dict[str, float]:
    """One round of ``measure`` in a process of its own that runs build ``which``."""
    cmd = [sys.executable, "-m", "bench.hotpath", "--child", "--packets", str(args.packets)]
    if args.persistence:
        cmd.append("--persistence")
    out = subprocess.run(cmd, env={**os.environ, native.ENV: MODES[which]}, check=True,
                         capture_output=True, text=True).stdout
    doc = json.loads(out)
    if doc["build"] != which:
        raise SystemExit(f"bench.hotpath: asked for {which}, the process ran {doc['build']}")
    result: dict[str, float] = doc["us_per_packet"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--builds", default="pure,compiled",
                    help="comma-separated, of: pure, compiled (needs a fresh make native)")
    ap.add_argument("--persistence", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"build": build(),
                          "us_per_packet": measure(args.packets, 1, args.persistence)}))
        return
    builds = [b for b in args.builds.split(",") if b]
    if not set(builds) <= set(MODES):
        ap.error(f"--builds: expected some of {', '.join(MODES)}")
    fresh = native.compare(native.SOURCE_ROOT)
    if "compiled" in builds and fresh.build != "compiled":
        ap.error(f"no compiled build to measure ({fresh.reason}): make native")
    best: dict[str, dict[str, float]] = {b: {} for b in builds}
    for r in range(args.rounds):
        for which in builds[r % len(builds):] + builds[:r % len(builds)]:  # take turns
            for k, v in in_process(args, which).items():
                best[which][k] = min(best[which].get(k, v), v)
    doc: dict[str, object] = {"us_per_packet": best, "compiled_modules": list(fresh.modules)}
    if len(best) == 2:
        doc["compiled_over_pure"] = {k: round(best["compiled"][k] / best["pure"][k], 2)
                                     for k in best["pure"]}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
