"""lb.steering's pure part: the client address of each kind of packet, the hash, and the
program's shape (the kernel's verifier judges the rest: tests/netns/test_steering.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.steering import client_of, program, queue_of

VIP = 0xC633640A  # 198.51.100.10
VIPS = frozenset({VIP})
addresses = st.integers(min_value=1, max_value=0xFFFFFFFE)


def ipv4(src: int, dst: int, proto: int, payload: bytes = b"\0" * 8) -> bytes:
    return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                       src, dst) + payload


def icmp_error(router: int, dst: int, quoted: bytes) -> bytes:
    return ipv4(router, dst, 1, struct.pack("!BBHI", 3, 4, 0, 1400) + quoted[:28])


@pytest.mark.parametrize(("packet", "client"), [
    (ipv4(0x0A000001, VIP, 6), 0x0A000001),  # client → VIP: the source
    (ipv4(0xC6120B0B, 0x0A000001, 6), 0x0A000001),  # server → client: the destination
    (ipv4(0x0A000001, VIP, 17), 0x0A000001),
    (icmp_error(0x0A0000FE, VIP, ipv4(VIP, 0x0A000001, 6)), 0x0A000001),  # quoted daddr
    (ipv4(0x0A000001, VIP, 1, b"\0" * 8), None),  # ICMP to a VIP too short to quote
    (b"\x60" + bytes(39), None),  # IPv6: queue 0
    (ipv4(1, 2, 6)[:19], None),  # truncated
])
def test_client_of(packet: bytes, client: int | None) -> None:
    assert client_of(packet, VIPS) == client


@given(client=addresses, server=addresses, router=addresses)
def test_every_packet_of_a_flow_names_the_same_client(client: int, server: int,
                                                      router: int) -> None:
    if VIP in (client, server, router):
        return
    forward = ipv4(client, VIP, 6)
    reply = ipv4(server, client, 6)
    error = icmp_error(router, VIP, ipv4(VIP, client, 6))
    assert client_of(forward, VIPS) == client_of(reply, VIPS) == client_of(error, VIPS) \
        == client


def test_queue_of_spreads_consecutive_clients() -> None:
    for queues in (2, 3, 4):
        counts = [0] * queues
        for i in range(1000):
            counts[queue_of(0xC6336400 + i, queues)] += 1
        assert min(counts) > 1000 / queues * 0.8, counts
    assert queue_of(12345, 1) == 0


def test_program_jumps_stay_inside_and_it_ends_in_exit() -> None:
    code = program(7)
    assert len(code) % 8 == 0
    insns = [struct.unpack("<BBhi", code[i:i + 8]) for i in range(0, len(code), 8)]
    assert insns[-1][0] == 0x95
    for pc, (op, regs, off, imm) in enumerate(insns):
        if op & 0x07 == 0x05 and op not in (0x85, 0x95):  # a jump
            assert 0 <= pc + 1 + off < len(insns), pc
        if op == 0x18:  # the map's fd, as a pseudo map fd
            assert regs >> 4 == 1 and imm == 7
