"""Open the TUN device lbd reads and writes packets on.

The device is opened with IFF_TUN|IFF_NO_PI|IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6):
every read and write then carries a 10-byte ``virtio_net_hdr`` in front of the IP packet, and
the kernel hands over (and accepts) GSO super-packets of up to 64 KB with partial checksums —
one header rewrite instead of forty (DESIGN.md §1).
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

VNET_HDR_LEN = 10


def open_tun(name: str, *, offload: bool = True, multi_queue: bool = False) -> int:
    """Create (or attach to) TUN device ``name``; return a non-blocking fd.

    The device exists as long as an fd is open (it is not persistent), so a killed lbd's
    device — and every route through it — disappears with the process.
    """
    if len(name.encode()) > 15:
        raise ValueError(f"interface name too long: {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        if offload:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError:
        os.close(fd)
        raise
    return fd
