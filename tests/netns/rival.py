"""A blip, played by a third host: claim master for a moment, then go quiet.

    python -m tests.netns.rival --iface eth0 --address 198.51.100.10 --priority 50 \\
        --adverts 5 --interval-ms 30

What a backup that wrongly took over for a moment does on the wire: gratuitous ARPs for the
address (with this host's MAC, so neighbours follow it) and a few MASTER adverts at a
priority lower than the real master's, then silence (it heard the master and stepped back).
Packets are built with :mod:`lab.forge_vrrp`'s own codec (not lbd's). Prints
{"adverts": n, "garps": n, "mac": MAC}.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time

from lab.forge_vrrp import GROUP, PROTO_VRRP, ipv4, own_address, vrrp3


def garp(mac: bytes, address: str) -> bytes:
    ip = socket.inet_aton(address)
    return (b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--vrid", type=int, default=51)
    ap.add_argument("--address", default="198.51.100.10")
    ap.add_argument("--priority", type=int, default=50)
    ap.add_argument("--adverts", type=int, default=5)
    ap.add_argument("--interval-ms", type=int, default=30)
    args = ap.parse_args()
    if not 0 < args.adverts <= 100 or not 1 <= args.priority <= 254:
        raise SystemExit("--adverts 1..100, --priority 1..254")
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_VRRP) as sock, \
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as link:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.iface.encode())
        link.bind((args.iface, 0))
        mac = link.getsockname()[4]
        src = own_address(sock, args.iface)
        advert = ipv4(src, vrrp3(args.vrid, args.priority, [args.address], src,
                                 interval_cs=max(1, args.interval_ms // 10)), 255)
        frame = garp(mac, args.address)
        garps = 0
        for i in range(args.adverts):
            sock.sendto(advert, (GROUP, 0))
            if i < 3:  # a new master's first ARPs
                link.send(frame)
                garps += 1
            time.sleep(args.interval_ms / 1000)  # the advert interval on the wire, not a wait
    print(json.dumps({"adverts": args.adverts, "garps": garps, "mac": mac.hex(":")}))


if __name__ == "__main__":
    main()
