"""Send malformed IPv4 packets at a VIP from a client namespace (tests and fuzzing).

    python -m lab.malformed VIP --count 1000 --iface eth0

Frames are written with a packet socket, so that the lengths and header fields we break
reach the wire as built. Prints {"sent": {kind: n}}. The kinds:

- ip_* : broken IP headers (IHL < 5, total length beyond the frame or below the header,
  truncated header). The LB's kernel drops these in ip_rcv before routing; lbd never sees them.
- l4_* and frag_* : a valid IP header with a broken TCP/UDP header, or a fragment. These are
  routed into the TUN and lbd must drop and count them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import socket
import struct

from scapy.layers.inet import TCP, UDP
from scapy.layers.l2 import Ether, getmacbyip


def ip_header(vip: str, src: str, proto: int, payload_len: int, *, ihl: int = 5,
              total: int | None = None, flags_frag: int = 0, ident: int = 1) -> bytes:
    tot = total if total is not None else 20 + payload_len
    hdr = struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, tot, ident, flags_frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(vip))
    csum = checksum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def variants(vip: str, src: str) -> dict[str, bytes]:
    tcp_ok = bytes(TCP(sport=40000, dport=80, flags="S"))
    udp_ok = bytes(UDP(sport=40000, dport=53) / b"x")
    bad_doff = bytearray(tcp_ok)
    bad_doff[12] = (2 << 4)  # data offset 2 words < 5
    big_doff = bytearray(tcp_ok)
    big_doff[12] = (15 << 4)  # 60 bytes of header in a 20-byte segment
    bad_udp_len = bytearray(udp_ok)
    bad_udp_len[4:6] = struct.pack("!H", 200)
    return {
        "ip_ihl_lt_5": ip_header(vip, src, 6, len(tcp_ok), ihl=3) + tcp_ok,
        "ip_total_too_long": ip_header(vip, src, 6, len(tcp_ok), total=1400) + tcp_ok,
        "ip_total_lt_header": ip_header(vip, src, 6, len(tcp_ok), total=12) + tcp_ok,
        "ip_truncated": ip_header(vip, src, 6, 0)[:14],
        "l4_tcp_truncated": ip_header(vip, src, 6, 8) + tcp_ok[:8],
        "l4_tcp_doff_lt_5": ip_header(vip, src, 6, len(bad_doff)) + bytes(bad_doff),
        "l4_tcp_doff_beyond": ip_header(vip, src, 6, len(big_doff)) + bytes(big_doff),
        "l4_udp_bad_length": ip_header(vip, src, 17, len(bad_udp_len)) + bytes(bad_udp_len),
        "l4_udp_truncated": ip_header(vip, src, 17, 4) + udp_ok[:4],
        "frag_first": ip_header(vip, src, 6, len(tcp_ok), flags_frag=0x2000, ident=7) + tcp_ok,
        "frag_later": ip_header(vip, src, 6, 16, flags_frag=0x0003, ident=7) + b"\0" * 16,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("vip")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--iface", default="eth0")
    args = ap.parse_args()
    mac = getmacbyip(args.vip)
    if mac is None:
        raise SystemExit(f"no ARP answer for {args.vip}")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((args.iface, 0))
        src_mac = sock.getsockname()[4]
        src = _own_ip(args.iface)
        if src is None:
            raise SystemExit(f"{args.iface} has no IPv4 address")
        kinds = variants(args.vip, src)
        eth = bytes(Ether(dst=mac, src=src_mac, type=0x0800))
        sent = dict.fromkeys(kinds, 0)
        names = list(kinds)
        for i in range(args.count):
            kind = names[i % len(names)]
            frame = eth + kinds[kind]
            sock.send(frame.ljust(60, b"\0"))
            sent[kind] += 1
    print(json.dumps({"sent": sent}))


def _own_ip(iface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", iface.encode()[:15]))
        except OSError:
            return None
        return socket.inet_ntoa(res[20:24])


if __name__ == "__main__":
    main()
