"""Send forged VRRP adverts to 224.0.0.18 from a namespace on a VRRP link (hostile tests).

    python -m lab.forge_vrrp --iface eth0 --count 1000 [--kinds ttl,checksum,...]
        [--vrid 51] [--address 198.51.100.10] [--rate 2000]

Every packet is built here, IP header included (``IP_HDRINCL``), so the fields we break reach
the wire as built. Linux still fills in the IP header checksum and total length of a
``IP_HDRINCL`` packet (raw(7)), so the IP header is always well-formed; what we break is in
the VRRP message or is the TTL. The codec is written out here on purpose rather than taken
from :mod:`ha.vrrp_packet`: a forger that shares the receiver's codec would share its bugs.

Kinds, named after the ``reason`` label lbd counts them under in
``lbd_vrrp_adverts_dropped_total`` (every one carries priority 255, so it would win an
election if it were accepted):

- ``ttl``          : a valid advert for ``--vrid`` and ``--address``, sent with TTL 64;
- ``checksum``     : the same with TTL 255 and a checksum that is wrong in both forms lbd
  accepts (RFC 5798 with the pseudo-header, and keepalived's ``v3_checksum_as_v2``);
- ``version``      : a well-formed VRRPv2 advert (version 2, auth type 0, auth data);
- ``vrid``         : a valid advert for VRID 99, which nobody on the link runs;
- ``length``       : a valid advert cut short: the header announces one address, the message
  holds two bytes of it;
- ``address_list`` : a valid advert for ``--vrid`` whose address list is ``--other``, not
  ``--address``;
- ``valid``        : a valid advert for ``--vrid`` and ``--address`` (a positive control: it
  is obeyed). Not in the default set.

Kinds are sent in turn (round robin) at ``--rate`` packets per second, so that a receiver
that reads in batches is not flooded past its socket buffer; the run is bounded by
``--count``. Prints {"sent": {kind: n}, "source": ADDR}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import socket
import struct
import time

GROUP = "224.0.0.18"
PROTO_VRRP = 112
FOREIGN_VRID = 99
DEFAULT_KINDS = ("ttl", "checksum", "version", "vrid", "length", "address_list")
ALL_KINDS = (*DEFAULT_KINDS, "valid")
SIOCGIFADDR = 0x8915


def ones_sum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def vrrp3(vrid: int, priority: int, addresses: list[str], src: str, *,
          interval_cs: int = 100, checksum_delta: int = 0) -> bytes:
    """A VRRPv3 advert with the RFC 5798 checksum (pseudo-header included), optionally
    spoiled by adding ``checksum_delta`` to it."""
    body = b"".join(socket.inet_aton(a) for a in addresses)
    head = struct.pack("!BBBBH", 0x31, vrid, priority, len(addresses), interval_cs & 0x0FFF)
    pseudo = socket.inet_aton(src) + socket.inet_aton(GROUP) + struct.pack(
        "!BBH", 0, PROTO_VRRP, len(head) + 2 + len(body))
    csum = ~ones_sum(head + b"\0\0" + body, ones_sum(pseudo)) & 0xFFFF
    csum = (csum + checksum_delta) & 0xFFFF
    return head + struct.pack("!H", csum) + body


def vrrp2(vrid: int, priority: int, addresses: list[str]) -> bytes:
    """A VRRPv2 advert (RFC 3768): auth type 0, 1 s interval, 8 bytes of auth data."""
    body = b"".join(socket.inet_aton(a) for a in addresses) + b"\0" * 8
    head = struct.pack("!BBBBBB", 0x21, vrid, priority, len(addresses), 0, 1)
    csum = ~ones_sum(head + b"\0\0" + body) & 0xFFFF
    return head + struct.pack("!H", csum) + body


def ipv4(src: str, payload: bytes, ttl: int) -> bytes:
    """The IP header we hand the kernel; it fills in total length and header checksum."""
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 0, 0, 0, ttl, PROTO_VRRP, 0,
                       socket.inet_aton(src), socket.inet_aton(GROUP)) + payload


def forged(kind: str, src: str, vrid: int, address: str, other: str) -> bytes:
    good = vrrp3(vrid, 255, [address], src)
    if kind == "ttl":
        return ipv4(src, good, 64)
    if kind == "checksum":
        # Off by 0x1111 from the RFC form; the v2 form differs from the RFC form by the
        # pseudo-header sum, which is never 0x1111 for our addresses (checked below).
        bad = vrrp3(vrid, 255, [address], src, checksum_delta=0x1111)
        assert ones_sum(bad) != 0xFFFF, "the spoiled checksum happens to be the v2 form"
        return ipv4(src, bad, 255)
    if kind == "version":
        return ipv4(src, vrrp2(vrid, 255, [address]), 255)
    if kind == "vrid":
        return ipv4(src, vrrp3(FOREIGN_VRID, 255, [address], src), 255)
    if kind == "length":
        return ipv4(src, good[:10], 255)
    if kind == "address_list":
        return ipv4(src, vrrp3(vrid, 255, [other], src), 255)
    if kind == "valid":
        return ipv4(src, good, 255)
    raise ValueError(f"unknown kind {kind!r}")


def own_address(sock: socket.socket, iface: str) -> str:
    res = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", iface.encode()[:15]))
    return socket.inet_ntoa(res[20:24])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--count", type=int, default=1000, help="packets in all (round robin)")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help=f"comma-separated, of {', '.join(ALL_KINDS)}")
    ap.add_argument("--vrid", type=int, default=51)
    ap.add_argument("--address", default="198.51.100.10", help="the instance's address list")
    ap.add_argument("--other", default="198.51.100.20", help="a different address list")
    ap.add_argument("--rate", type=float, default=2000.0, help="packets per second")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in ALL_KINDS for k in kinds):
        raise SystemExit(f"--kinds must be a comma-separated subset of {ALL_KINDS}")
    if not 0 < args.count <= 1_000_000 or args.rate <= 0:
        raise SystemExit("--count must be 1..1000000 and --rate positive")

    with socket.socket(socket.AF_INET, socket.SOCK_RAW, PROTO_VRRP) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.iface.encode())
        src = own_address(sock, args.iface)
        packets = {k: forged(k, src, args.vrid, args.address, args.other) for k in kinds}
        sent = dict.fromkeys(kinds, 0)
        gap = 1.0 / args.rate
        start = time.monotonic()
        for i in range(args.count):
            # Pace to --rate: the schedule is fixed in advance, so the run takes
            # count / rate seconds however long each send takes.
            delay = start + i * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            kind = kinds[i % len(kinds)]
            sock.sendto(packets[kind], (GROUP, 0))
            sent[kind] += 1
    print(json.dumps({"sent": sent, "source": src}))


if __name__ == "__main__":
    main()
