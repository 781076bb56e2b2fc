"""Steering a multi-queue TUN by client address: both directions of a NAT flow on one queue.

A worker per queue of a multi-queue TUN (docs/architecture.md, "The data plane in worker
processes") needs the client's packets (client → VIP) and the real server's replies
(server → client) of one flow on the same queue, or the worker that holds the session never
sees half of them. The kernel's own queue choice pairs them only by chance (its symmetric
flow hash sees two different 5-tuples), so lbd attaches a program of its own with
``TUNSETSTEERINGEBPF``: it returns a hash of the **client's address** — the source of a
packet to a VIP, the destination of any other packet (a reply from a real server) — and the
kernel takes it modulo the number of queues. An ICMP error to a VIP names its flow in the
packet it quotes, which the VIP sent to the client: the client is that packet's destination.
The VIPs are in a BPF hash map that the shell fills (and refills at a reload).

Hashing the address, not address and port, keeps everything lbd keys by client in one
worker: persistence bindings (by client address and netmask, any netmask up to /32 maps a
client to one worker too) and per-source limits.

Pure part: :func:`program` (the instructions, given the map's fd) and :func:`queue_of`, the
same function in Python, which routes what does not come through the TUN (a peer's sync
records) to the worker the packets of that client reach. Shell: :class:`Steering`, the
``bpf(2)`` calls and the ioctl (ctypes; the kernel's ABI, no library needed for four calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterable
from typing import Final

__all__ = ["GOLDEN", "Steering", "client_of", "program", "queue_of"]

GOLDEN: Final = 0x9E3779B1  # Knuth's multiplicative hash: spreads consecutive addresses
MAX_VIPS: Final = 4096

# --- the pure part --------------------------------------------------------------------------

# eBPF opcodes (linux/bpf.h, linux/bpf_common.h)
_LD_ABS_B, _LD_ABS_W = 0x30, 0x20
_LD_IMM64 = 0x18
_STX_MEM_W = 0x63
_MOV64_X, _MOV64_K, _ADD64_K, _AND64_K = 0xBF, 0xB7, 0x07, 0x57
_MUL32_K, _RSH32_K = 0x24, 0x74
_JA, _JEQ_K, _JNE_K, _CALL, _EXIT = 0x05, 0x15, 0x55, 0x85, 0x95
_PSEUDO_MAP_FD = 1
_MAP_LOOKUP_ELEM = 1  # helper id of bpf_map_lookup_elem


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(vip_map_fd: int) -> bytes:
    """The steering program (socket-filter type) over the map of VIPs at ``vip_map_fd``.

    r6 holds the skb for the packet loads; r7 the destination address; the result in r0.
    A packet the loads cannot read (shorter than they need) ends the program with 0:
    queue 0, which is as good as any for a packet no flow owns.
    """
    signed_golden = GOLDEN - (1 << 32)
    code = [  # a jump goes to its own index + 1 + off
        _insn(_MOV64_X, 6, 1),                         # 0: r6 = skb
        _insn(_LD_ABS_B, imm=0),                       # 1: r0 = version/IHL
        _insn(_AND64_K, 0, imm=0xF0),                  # 2
        _insn(_JNE_K, 0, off=19, imm=0x40),            # 3: not IPv4 → 23
        _insn(_LD_ABS_W, imm=16),                      # 4: r0 = daddr
        _insn(_MOV64_X, 7, 0),                         # 5: r7 = daddr
        _insn(_STX_MEM_W, 10, 7, off=-4),              # 6: *(u32 *)(fp - 4) = daddr
        _insn(_LD_IMM64, 1, _PSEUDO_MAP_FD, imm=vip_map_fd),  # 7-8: r1 = &vips
        _insn(0),
        _insn(_MOV64_X, 2, 10),                        # 9: r2 = fp
        _insn(_ADD64_K, 2, imm=-4),                    # 10: r2 = fp - 4
        _insn(_CALL, imm=_MAP_LOOKUP_ELEM),            # 11: r0 = vips[daddr] or NULL
        _insn(_JEQ_K, 0, off=6, imm=0),                # 12: not to a VIP → 19
        _insn(_LD_ABS_B, imm=9),                       # 13: r0 = protocol
        _insn(_JEQ_K, 0, off=2, imm=1),                # 14: ICMP → 17
        _insn(_LD_ABS_W, imm=12),                      # 15: r0 = saddr: the client
        _insn(_JA, off=3),                             # 16: → 20
        _insn(_LD_ABS_W, imm=20 + 8 + 16),             # 17: r0 = the quoted packet's daddr
        _insn(_JA, off=1),                             # 18: → 20
        _insn(_MOV64_X, 0, 7),                         # 19: r0 = daddr: the client
        _insn(_MUL32_K, 0, imm=signed_golden),         # 20: w0 *= GOLDEN
        _insn(_RSH32_K, 0, imm=16),                    # 21: w0 >>= 16
        _insn(_EXIT),                                  # 22
        _insn(_MOV64_K, 0, imm=0),                     # 23: not IPv4: queue 0
        _insn(_EXIT),                                  # 24
    ]
    return b"".join(code)


def client_of(packet: bytes | memoryview, vips: frozenset[int] | set[int]) -> int | None:
    """The client address :func:`program` hashes for this IPv4 packet, or None for what it
    sends to queue 0 (not IPv4, too short)."""
    if len(packet) < 20 or packet[0] & 0xF0 != 0x40:
        return None
    daddr = int.from_bytes(packet[16:20], "big")
    if daddr not in vips:
        return daddr
    if packet[9] != 1:
        return int.from_bytes(packet[12:16], "big")
    if len(packet) < 48:
        return None
    return int.from_bytes(packet[44:48], "big")


def queue_of(client: int, queues: int) -> int:
    """The queue (worker) of a client address among ``queues``: the program's hash, taken
    modulo the number of queues as the kernel does."""
    return (((client * GOLDEN) & 0xFFFFFFFF) >> 16) % queues


# --- the shell ------------------------------------------------------------------------------

_NR_BPF: Final = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _PROG_LOAD = 0, 2, 3, 5
_MAP_TYPE_HASH, _PROG_TYPE_SOCKET_FILTER = 1, 1
TUNSETSTEERINGEBPF: Final = 0x800454E0  # _IOR('T', 224, int)
_LOG_SIZE = 1 << 16


class Steering:
    """The map of VIPs and the loaded program; :meth:`attach` to a multi-queue TUN's fd.

    Raises OSError (with the verifier's log for a refused program) when the kernel says no.
    """

    def __init__(self, vips: Iterable[int]) -> None:
        if _NR_BPF is None:
            raise OSError(errno.ENOSYS, f"bpf(2): unknown syscall number on {os.uname().machine}")
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._vips: set[int] = set()
        self.map_fd = self._bpf(_MAP_CREATE, struct.pack("<IIIII", _MAP_TYPE_HASH, 4, 1,
                                                         MAX_VIPS, 0))
        try:
            self.set_vips(vips)
            self.prog_fd = self._load(program(self.map_fd))
        except OSError:
            os.close(self.map_fd)
            raise

    @property
    def vips(self) -> frozenset[int]:
        return frozenset(self._vips)

    def set_vips(self, vips: Iterable[int]) -> None:
        """Make the map hold exactly ``vips`` (a reload's new set); the program sees each
        change at once."""
        new = set(vips)
        for addr in new - self._vips:
            self._update(addr)
        for addr in self._vips - new:
            self._delete(addr)
        self._vips = new

    def attach(self, tun_fd: int) -> None:
        """Steer the TUN that ``tun_fd`` is a queue of (one call serves every queue)."""
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", self.prog_fd))

    def close(self) -> None:
        os.close(self.prog_fd)
        os.close(self.map_fd)

    # ---- bpf(2)

    def _bpf(self, cmd: int, attr: bytes) -> int:
        buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
        ret = int(self._libc.syscall(_NR_BPF, cmd, buf, 128))
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf(2) command {cmd}: {os.strerror(err)}")
        return ret

    def _elem(self, cmd: int, addr: int, value: bytes | None) -> None:
        key = ctypes.create_string_buffer(struct.pack("=I", addr), 4)
        val = ctypes.create_string_buffer(value or b"\0", 1)
        attr = struct.pack("<IIQQQ", self.map_fd, 0, ctypes.addressof(key),
                           ctypes.addressof(val) if value is not None else 0, 0)
        self._bpf(cmd, attr)

    def _update(self, addr: int) -> None:
        self._elem(_MAP_UPDATE_ELEM, addr, b"\1")

    def _delete(self, addr: int) -> None:
        self._elem(_MAP_DELETE_ELEM, addr, None)

    def _load(self, code: bytes) -> int:
        insns = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(_LOG_SIZE)
        attr = struct.pack("<IIQQIIQ", _PROG_TYPE_SOCKET_FILTER, len(code) // 8,
                           ctypes.addressof(insns), ctypes.addressof(license_), 1, _LOG_SIZE,
                           ctypes.addressof(log))
        try:
            return self._bpf(_PROG_LOAD, attr)
        except OSError as exc:
            text = log.value.decode(errors="replace").strip()
            raise OSError(exc.errno, f"{exc.strerror}; verifier: {text[-2000:]}") from None
