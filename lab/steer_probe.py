"""Which queue of a steered multi-queue TUN each packet of a NAT flow reaches (the namespace
test of lb.steering; run inside a namespace of its own, as root).

    python -m lab.steer_probe --queues 2 --clients 40

Creates TUN ``lbtun0`` with ``--queues`` queues in the current namespace, attaches
:class:`lb.steering.Steering` with the VIP, routes the VIP and the clients' subnet into it,
and sends through a raw socket, for each client: a UDP datagram client → VIP (the client's
direction), one from a real server → client (a reply), and an ICMP "fragmentation needed"
from a router → VIP that quotes a VIP → client packet. Every packet carries its own IP ID.
Prints {"queues": n, "packets": [[kind, client, ip_id, queue read on], ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import time

from lab.malformed import checksum
from lab.topology import SERVERS, VIP
from lb.steering import Steering
from lb.tun import VNET_HDR_LEN, open_tun

CLIENT_BASE = "198.51.100.110"  # the address plan's spoofed sources: 198.51.100.110-250
ROUTER = "198.51.100.1"


def ipv4(src: str, dst: str, proto: int, ident: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 12, 0) + b"lbd\0"


def frag_needed(quoted: bytes) -> bytes:
    body = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted[:28]
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--clients", type=int, default=40)
    args = ap.parse_args()
    fds = [open_tun("lbtun0", offload=False, multi_queue=True) for _ in range(args.queues)]
    vip = int.from_bytes(socket.inet_aton(VIP), "big")
    steering = Steering([vip])
    steering.attach(fds[0])
    for cmd in ("ip link set lbtun0 up", f"ip route add {VIP}/32 dev lbtun0",
                "ip route add 198.51.100.0/24 dev lbtun0"):
        subprocess.run(cmd.split(), check=True)
    base = int.from_bytes(socket.inet_aton(CLIENT_BASE), "big")
    server = SERVERS["s1"]
    sent: dict[int, tuple[str, str]] = {}
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    ident = 1
    for i in range(min(args.clients, 140)):
        client = socket.inet_ntoa((base + i).to_bytes(4, "big"))
        port = 40000 + i
        quoted = ipv4(VIP, client, socket.IPPROTO_UDP, 0, udp(53, port))
        for kind, packet in (
                ("to_vip", ipv4(client, VIP, socket.IPPROTO_UDP, ident, udp(port, 53))),
                ("reply", ipv4(server, client, socket.IPPROTO_UDP, ident + 1, udp(53, port))),
                ("icmp_to_vip", ipv4(ROUTER, VIP, socket.IPPROTO_ICMP, ident + 2,
                                     frag_needed(quoted)))):
            sent[int.from_bytes(packet[4:6], "big")] = (kind, client)
            raw.sendto(packet, (packet_dst(packet), 0))
        ident += 3
    got: dict[int, int] = {}
    deadline = time.monotonic() + 5
    while len(got) < len(sent) and time.monotonic() < deadline:
        ready, _, _ = select.select(fds, [], [], 0.5)
        for fd in ready:
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                pkt = frame[VNET_HDR_LEN:]
                if len(pkt) >= 20 and pkt[0] >> 4 == 4:
                    got[int.from_bytes(pkt[4:6], "big")] = fds.index(fd)
    steering.close()
    print(json.dumps({"queues": args.queues,
                      "packets": [[kind, client, ident, got.get(ident)]
                                  for ident, (kind, client) in sorted(sent.items())]}))


def packet_dst(packet: bytes) -> str:
    return socket.inet_ntoa(packet[16:20])


if __name__ == "__main__":
    main()
