"""Capture VRRP adverts and gratuitous ARPs on a lab link (run inside a namespace).

    python -m tests.netns.capture --iface eth0 --duration 8

A packet socket (all protocols: on a bridge port an IP-only filter would see nothing) reads
frames until ``--duration`` seconds have passed and prints one JSON line:
``{"adverts": [[time, src, vrid, priority], ...], "garps": [[time, mac, address], ...]}``
with wall-clock times (``time.time()``, the same clock in every namespace), so a test can
line them up with a signal it sent. It prints ``{"ready": true}`` first, once the socket is
open, so that the caller knows nothing sent afterwards is missed. A SIGTERM ends the capture
early, with the same JSON line for what it saw until then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import socket
import struct
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PROTO_VRRP = 112


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    if not 0 < args.duration <= 120:
        raise SystemExit("--duration must be in (0, 120] seconds")
    adverts: list[tuple[float, str, int, int]] = []
    garps: list[tuple[float, str, str]] = []
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((args.iface, ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        print(json.dumps({"ready": True}), flush=True)
        end = time.monotonic() + args.duration
        signal.signal(signal.SIGTERM, _stop)
        with contextlib.suppress(_Stopped):
            _read(sock, end, adverts, garps)
    print(json.dumps({"adverts": adverts, "garps": garps}), flush=True)


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def _read(sock: socket.socket, end: float, adverts: list[tuple[float, str, int, int]],
          garps: list[tuple[float, str, str]]) -> None:
    while (left := end - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            continue
        frame = sock.recv(2048)
        when = time.time()
        if len(frame) < 14:
            continue
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        if ethertype == ETH_P_IP and len(frame) >= 14 + 20 + 8 and frame[23] == PROTO_VRRP:
            ihl = (frame[14] & 0x0F) * 4
            src = socket.inet_ntoa(frame[26:30])
            vrrp = frame[14 + ihl:]
            if len(vrrp) >= 3:
                adverts.append((when, src, vrrp[1], vrrp[2]))
        elif ethertype == ETH_P_ARP and len(frame) >= 14 + 28:
            arp = frame[14:42]
            sip, tip = arp[14:18], arp[24:28]
            if sip == tip:
                garps.append((when, arp[8:14].hex(":"), socket.inet_ntoa(sip)))


if __name__ == "__main__":
    main()
