"""Per-packet cost of the forwarding core, in process (no TUN, no syscalls).

    python -m bench.hotpath [--packets N]

Times ``Forwarder.handle`` on prepared buffers (a fresh copy per packet, made before the clock
starts): a SYN that opens a new session, an established client packet (an ACK with 64 bytes
of data), and a server's reply to it. Prints µs per packet for each, best of five rounds,
and which build of the modules ran (``pure`` Python or ``compiled`` by mypyc: see
docs/benchmarks.md). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time

import lb.forwarder
from lab.malformed import checksum
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


def forwarder(max_sessions: int) -> Forwarder:
    cfg = parse_config({
        "node": {"name": "bench", "control_socket": "/run/lbd-bench.sock"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "sessions": {"max_sessions": max_sessions},
        # Per-source limits on, high enough that every SYN is admitted: the SYN figure
        # includes the per-source count and token bucket (150 sources, ~670 SYNs each).
        "virtual_servers": {"web": {"address": VIP, "port": 80, "pool": "web",
                                    "scheduler": "rr", "max_conns_per_source": 1 << 20,
                                    "max_conn_rate_per_source": 1 << 20}},
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


def measure(n: int) -> dict[str, float]:
    flows = clients(n)
    syns = [tcp_packet(c, p, VIP, 80, 0x02) for c, p in flows]
    data = [tcp_packet(c, p, VIP, 80, 0x18, b"x" * 64, seq=1001, ack=5001) for c, p in flows]
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, value), value)

    for _ in range(5):
        fwd = forwarder(2 * n)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=100_000)
    args = ap.parse_args()
    print(json.dumps({"build": build(), "us_per_packet": measure(args.packets)}))


if __name__ == "__main__":
    main()
