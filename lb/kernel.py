"""Kernel plumbing: everything lbd installs with netlink, and how it takes it away again.

All of it is tagged so that a restarted lbd can remove what a killed one left behind:

- routes (VIP /32 into the TUN, the reply table's default route) carry protocol ``RTPROT_LBD``;
- the reply rules sit in a priority range of our own (``rule_priority`` .. +63);
- proxy neighbour entries and interface addresses carry the same protocol number
  (NDA_PROTOCOL / IFA_PROTO).

This module is part of the I/O shell: it holds no policy, only "install X" / "remove X".
It talks to the kernel through pyroute2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETNEIGH
from pyroute2.netlink.rtnl.ndmsg import ndmsg

log = logging.getLogger("lbd.kernel")
T = TypeVar("T")

RTPROT_LBD = 241  # unassigned in /etc/iproute2/rt_protos
RULE_RANGE = 64
FALLBACK_METRIC = 0xFFFFFFFF  # the reply table's blackhole, behind the TUN route
NTF_PROXY = 0x08
ENOENT = 2
EEXIST = 17
ESRCH = 3
EADDRNOTAVAIL = 99


def cpu_mask(setting: str) -> str | None:
    """The kernel's CPU-mask text for ``[dataplane] rps_cpus``; None for "off"."""
    if setting == "off":
        return None
    if setting != "all":
        return setting
    cpus = os.sched_getaffinity(0) or {0}
    bits = 0
    for cpu in cpus:
        bits |= 1 << cpu
    groups = []
    while True:
        groups.append(f"{bits & 0xFFFFFFFF:08x}")
        bits >>= 32
        if not bits:
            break
    return ",".join(reversed(groups))


def write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


class Kernel:
    """Netlink adapter of one lbd process. Create with :meth:`open`, then ``close``.

    pyroute2's asyncio socket cannot be registered with uvloop (it refuses AF_NETLINK
    datagram endpoints), so the adapter keeps a synchronous ``IPRoute`` on one worker thread
    and exposes coroutines: netlink calls never block the event loop and stay in order.
    """

    def __init__(self, *, route_table: int, rule_priority: int) -> None:
        self.route_table = route_table
        # Packets carrying this mark bit skip the reply rules (lb.offload: a server's reply
        # the kernel translates itself); 0: the rules match every reply.
        self.reply_mark = 0
        self.rule_priority = rule_priority
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lbd-netlink")
        self._ipr: Any = None
        self._restore: dict[str, str] = {}  # sysctls changed by prepare(), their old values
        self._changed: dict[str, str] = {}  # ... and the values lbd set

    @classmethod
    async def open(cls, *, route_table: int, rule_priority: int) -> Kernel:
        kernel = cls(route_table=route_table, rule_priority=rule_priority)
        await kernel._call(kernel._open)
        return kernel

    def _open(self) -> None:
        self._ipr = IPRoute()
        # pyroute2 0.9's synchronous nlm_request reads this key, which IPRoute never sets.
        self._ipr.status["nlm_generator"] = False

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        self.restore_sysctls()
        if self._ipr is not None:
            await self._call(self._ipr.close)
        self._executor.shutdown(wait=True)

    # ---- lookups --------------------------------------------------------------------------
    def _ifindex(self, ifname: str) -> int | None:
        found = self._ipr.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    async def ifindex(self, ifname: str) -> int | None:
        return await self._call(self._ifindex, ifname)

    def _primary_address(self, ifname: str) -> str | None:
        idx = self._ifindex(ifname)
        if idx is None:
            return None
        for msg in self._ipr.addr("dump", family=socket.AF_INET, index=idx):
            if msg.get("IFA_PROTO") == RTPROT_LBD:
                continue
            addr = msg.get("address")
            if addr:
                return str(addr)
        return None

    async def primary_address(self, ifname: str) -> str | None:
        """The interface's first IPv4 address not installed by lbd (VRRP source address)."""
        return await self._call(self._primary_address, ifname)

    def _link_up(self, ifname: str) -> bool:
        idx = self._ifindex(ifname)
        if idx is None:
            return False
        links = self._ipr.link("get", index=idx)
        return bool(links) and links[0].get("operstate") in ("UP", "UNKNOWN")

    async def link_up(self, ifname: str) -> bool:
        """Does the interface exist with carrier (operstate UP)?"""
        return await self._call(self._link_up, ifname)

    # ---- set-up ---------------------------------------------------------------------------
    async def prepare(self, *, tun: str, client_if: str, server_if: str,
                      rps_cpus: str = "off", arp_interfaces: Iterable[str] = ()) -> None:
        """Sysctls the NAT path needs, in this namespace only, and RPS on the TUN.
        ``arp_interfaces``: where lbd answers ARP for addresses it holds (besides
        ``client_if``)."""
        self.change_sysctl("net.ipv4.ip_forward", "1")
        self.disable_early_demux()
        # Rewritten client packets re-enter through the TUN with the client's source:
        # strict reverse-path filtering would drop them.
        for dev in ("all", "default", client_if, server_if):
            self.change_sysctl(f"net.ipv4.conf.{dev}.rp_filter", "0", missing_ok=True)
        for dev in ("all", server_if, client_if):
            self.change_sysctl(f"net.ipv4.conf.{dev}.send_redirects", "0", missing_ok=True)
        # The TUN device is lbd's own and goes away with it: its keys are not restored.
        for key in ("rp_filter", "send_redirects"):
            with contextlib.suppress(OSError):
                write_sysctl(f"net.ipv4.conf.{tun}.{key}", "0")
        # The LB's own kernel sends 'fragmentation needed' to a VIP when a reply does not fit
        # the client side; translated, it re-enters through the TUN with the LB's own source
        # address, which the kernel drops as martian unless accept_local is on.
        write_sysctl(f"net.ipv4.conf.{tun}.accept_local", "1")
        # Answer ARP for held addresses at once instead of after a random proxy delay.
        self.change_sysctl(f"net.ipv4.neigh.{client_if}.proxy_delay", "0")
        for dev in set(arp_interfaces) - {client_if}:
            # a missing one is the VRRP start's error
            self.change_sysctl(f"net.ipv4.neigh.{dev}.proxy_delay", "0", missing_ok=True)
        if self._restore:
            log.info("sysctls set (restored at stop): %s", ", ".join(
                f"{k} = {v} (was {self._restore[k]})" for k, v in self._changed.items()))
        with contextlib.suppress(OSError):
            write_sysctl(f"net.ipv6.conf.{tun}.disable_ipv6", "1")
        mask = cpu_mask(rps_cpus)
        if mask is not None:
            # A write into the TUN runs the kernel's receive path for that packet (routing,
            # the next hop, the peer's TCP) in lbd's context: 2/3 of lbd's CPU under connection
            # load. RPS hands that work to the CPUs in the mask instead.
            try:
                Path(f"/sys/class/net/{tun}/queues/rx-0/rps_cpus").write_text(mask)
            except OSError as exc:
                log.warning("cannot set RPS on %s (rps_cpus = %s): %s", tun, rps_cpus, exc)

    def disable_early_demux(self) -> None:
        """Turn TCP and UDP early demux off in this namespace (restored at close).

        A local process that talked on a VIP's 4-tuples (a proxy lbd replaces, on the same
        box) leaves TIME_WAIT (or connected UDP) sockets behind. Early demux looks a client's
        packet up among local sockets before routing, finds such a socket, attaches it, and
        ``ip_forward()`` then drops the packet silently because it carries a socket: lbd never
        sees it (measured: 4 conn/s after an HAProxy run on the same box). IPVS detaches such
        sockets on purpose; here early demux is off where lbd routes VIPs, which costs the
        box's own sockets one route lookup per packet and nothing else."""
        for key in ("net.ipv4.tcp_early_demux", "net.ipv4.udp_early_demux"):
            if self.change_sysctl(key, "0"):
                log.info("%s = 0 (was %s): local sockets left on a VIP must not swallow "
                         "clients' packets", key, self._restore[key])

    def change_sysctl(self, key: str, value: str, *, missing_ok: bool = False) -> bool:
        """Set ``key`` to ``value`` and remember its old value, which :meth:`restore_sysctls`
        (at close) puts back. True when it changed. An unwritable key is logged (or, with
        ``missing_ok``, ignored when absent: an interface that does not exist)."""
        path = Path("/proc/sys", *key.split("."))
        try:
            old = path.read_text().strip()
            if old == value:
                return False
            path.write_text(value)
        except FileNotFoundError:
            if not missing_ok:
                log.warning("cannot set %s = %s: no such sysctl", key, value)
            return False
        except OSError as exc:
            log.warning("cannot set %s = %s: %s", key, value, exc)
            return False
        self._restore.setdefault(key, old)
        self._changed[key] = value
        return True

    def restore_sysctls(self) -> None:
        """Put back every sysctl :meth:`change_sysctl` changed (in reverse order: forwarding
        goes off first). A value lbd found already set is left alone, so a daemon started after
        a killed one (which could not restore) leaves the host as the killed one set it."""
        restore, self._restore, self._changed = self._restore, {}, {}
        for key, value in reversed(restore.items()):
            try:
                write_sysctl(key, value)
            except OSError as exc:
                log.warning("cannot restore %s = %s: %s", key, value, exc)
        if restore:
            log.info("sysctls restored: %s", ", ".join(f"{k} = {v}" for k, v in restore.items()))

    def _set_link_up(self, ifname: str, txqlen: int | None) -> int:
        idx = self._index(ifname)
        if txqlen is not None:  # the TUN's queue toward lbd; the kernel resizes its ring
            self._ipr.link("set", index=idx, txqlen=txqlen)
        self._ipr.link("set", index=idx, state="up")
        return idx

    async def set_link_up(self, ifname: str, txqlen: int | None = None) -> int:
        return await self._call(self._set_link_up, ifname, txqlen)

    def _our_rules(self) -> list[Any]:
        lo, hi = self.rule_priority, self.rule_priority + RULE_RANGE
        return [m for m in self._ipr.rule("dump", family=socket.AF_INET)
                if m.get("priority") is not None and lo <= m.get("priority") < hi]

    def _del_rule(self, msg: Any) -> bool:
        try:
            self._ipr.rule("del", family=socket.AF_INET, priority=msg.get("priority"),
                           table=msg.get("table"), src=msg.get_attr("FRA_SRC"),
                           src_len=msg.get("src_len"), iifname=msg.get_attr("FRA_IIFNAME"))
        except NetlinkError:
            return False
        return True

    def _remove_leftovers(self) -> int:
        removed = sum(self._del_rule(m) for m in self._our_rules())
        for table in (254, self.route_table):
            for msg in self._ipr.route("dump", family=socket.AF_INET, table=table):
                if msg.get("proto") == RTPROT_LBD:
                    with contextlib.suppress(NetlinkError):
                        self._ipr.route("del", table=table, dst=_dst(msg), proto=RTPROT_LBD)
                        removed += 1
        for msg in self._ipr.addr("dump", family=socket.AF_INET):
            if msg.get("IFA_PROTO") == RTPROT_LBD:
                with contextlib.suppress(NetlinkError):
                    self._ipr.addr("del", index=msg["index"], address=msg.get("address"),
                                   prefixlen=msg["prefixlen"])
                    removed += 1
        for ifindex, dst in self._proxy_entries():
            with contextlib.suppress(NetlinkError):
                self._ipr.neigh("del", dst=dst, ifindex=ifindex, flags=NTF_PROXY)
                removed += 1
        return removed

    async def remove_leftovers(self) -> int:
        """Delete everything tagged as ours (a killed lbd's plumbing). Returns the count."""
        return await self._call(self._remove_leftovers)

    def _proxy_entries(self) -> list[tuple[int, str]]:
        """Our proxy neighbour entries. The kernel dumps proxy entries only when the request
        carries NTF_PROXY in ndm_flags, which pyroute2's ``neigh("dump")`` does not send."""
        req = ndmsg()
        req["family"] = socket.AF_INET
        req["flags"] = NTF_PROXY
        result = []
        for msg in self._ipr.nlm_request(req, msg_type=RTM_GETNEIGH,
                                         msg_flags=NLM_F_REQUEST | NLM_F_DUMP):
            if msg.get("NDA_PROTOCOL") == RTPROT_LBD and msg.get("dst"):
                result.append((int(msg["ifindex"]), str(msg.get("dst"))))
        return result

    async def install_reply_path(self, tun_index: int, server_if: str,
                                 servers: Iterable[str]) -> None:
        """Replies from real servers go into the TUN: a default route in our table and one
        rule per server, ``iif server_if from SERVER lookup table``."""
        await self._call(self._replace_route, "0.0.0.0/0", tun_index, self.route_table)
        await self._call(self._blackhole_fallback)
        await self.set_reply_rules(server_if, servers)

    def _blackhole_fallback(self) -> None:
        # The TUN route dies with the TUN device, i.e. with the process: after a SIGKILL the
        # servers' replies then meet this instead of the main table, which would forward them
        # to the clients untranslated.
        try:
            self._ipr.route("add", dst="0.0.0.0/0", table=self.route_table, type="blackhole",
                            priority=FALLBACK_METRIC, proto=RTPROT_LBD)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def _set_reply_rules(self, server_if: str, wanted: list[str]) -> None:
        for msg in self._our_rules():
            self._del_rule(msg)
        marked = {"fwmark": 0, "fwmask": self.reply_mark} if self.reply_mark else {}
        for addr in wanted:
            self._ipr.rule("add", family=socket.AF_INET, priority=self.rule_priority,
                           table=self.route_table, src=addr, src_len=32, iifname=server_if,
                           **marked)

    async def set_reply_rules(self, server_if: str, servers: Iterable[str]) -> None:
        """Make the rule set exactly one rule per server address (idempotent)."""
        await self._call(self._set_reply_rules, server_if, sorted(set(servers)))

    # ---- addresses the master holds ---------------------------------------------------------
    def _claim_address(self, address: str, tun_index: int, ifname: str) -> None:
        self._replace_route(f"{address}/32", tun_index, 254)
        try:
            self._ipr.neigh("add", dst=address, ifindex=self._index(ifname), flags=NTF_PROXY,
                            NDA_PROTOCOL=RTPROT_LBD)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    async def claim_address(self, address: str, tun_index: int, ifname: str) -> None:
        """Route the address into the data plane and answer ARP for it on ``ifname``
        (a proxy neighbour entry: answered only while the route leads into the TUN, which
        lives and dies with lbd, so a killed lbd answers no ARP for it)."""
        await self._call(self._claim_address, address, tun_index, ifname)

    def _claim_addresses(self, claims: list[tuple[str, list[str]]], tun_index: int) -> None:
        for ifname, addresses in claims:
            idx = self._index(ifname)
            for address in addresses:
                self._replace_route(f"{address}/32", tun_index, 254)
                try:
                    self._ipr.neigh("add", dst=address, ifindex=idx, flags=NTF_PROXY,
                                    NDA_PROTOCOL=RTPROT_LBD)
                except NetlinkError as exc:
                    if exc.code != EEXIST:
                        raise

    async def claim_addresses(self, claims: Iterable[tuple[str, Iterable[str]]],
                              tun_index: int) -> None:
        """:meth:`claim_address` for every (interface, addresses) pair, in one hop to the
        netlink thread: a takeover's requests go out back to back, with no trip through the
        event loop between two addresses."""
        await self._call(self._claim_addresses,
                         [(ifname, list(addresses)) for ifname, addresses in claims], tun_index)

    def _release_addresses(self, ifname: str, addresses: list[str]) -> None:
        for address in addresses:
            self._release_address(address, ifname)

    async def release_addresses(self, ifname: str, addresses: Iterable[str]) -> None:
        """:meth:`release_address` for each address, in one hop to the netlink thread."""
        await self._call(self._release_addresses, ifname, list(addresses))

    def _release_address(self, address: str, ifname: str) -> None:
        with contextlib.suppress(NetlinkError):
            self._ipr.route("del", dst=f"{address}/32", table=254, proto=RTPROT_LBD)
        idx = self._ifindex(ifname)
        if idx is not None:
            with contextlib.suppress(NetlinkError):
                self._ipr.neigh("del", dst=address, ifindex=idx, flags=NTF_PROXY)

    async def release_address(self, address: str, ifname: str) -> None:
        await self._call(self._release_address, address, ifname)

    # ---- helpers ----------------------------------------------------------------------------
    def _index(self, ifname: str) -> int:
        idx = self._ifindex(ifname)
        if idx is None:
            raise RuntimeError(f"no such interface: {ifname}")
        return idx

    def _replace_route(self, dst: str, oif: int, table: int) -> None:
        self._ipr.route("replace", dst=dst, oif=oif, table=table, proto=RTPROT_LBD)


def _dst(msg: Any) -> str:
    dst = msg.get("dst") or "0.0.0.0"
    return f"{dst}/{msg['dst_len']}"


ETH_P_ARP = 0x0806
_ARP_REQUEST = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)  # Ethernet/IPv4, who-has


def garp_frame(mac: bytes, address: str) -> bytes:
    """A gratuitous ARP request for ``address`` from ``mac``: broadcast, sender and target
    protocol address both ``address`` (what keepalived sends)."""
    ip = socket.inet_aton(address)
    return (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + _ARP_REQUEST
            + mac + ip + b"\x00" * 6 + ip)


class GarpSender:
    """Gratuitous ARPs from one packet socket per interface, opened once and kept.

    Opening and closing a packet socket per ARP cost 14-33 ms on a 2-core box, inside the
    event loop: binding one to a protocol registers a packet handler and closing it waits for
    an RCU grace period (``synchronize_net``). Here the socket is bound with protocol 0, which
    receives nothing (no handler, no queue to fill) and binds in microseconds; it is opened
    with :meth:`open` at start, kept, and closed by :meth:`close` at stop, off the takeover
    path. Frames are built once per (interface, address, MAC) and sent non-blocking: a full
    queue is an error counted by the caller, never a wait.
    """

    def __init__(self) -> None:
        self._socks: dict[str, socket.socket] = {}
        self._frames: dict[tuple[str, str], bytes] = {}

    def open(self, ifname: str) -> None:
        """Open the interface's socket now (idempotent). Raises OSError."""
        if ifname in self._socks:
            return
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.bind((ifname, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._socks[ifname] = sock

    def frame(self, ifname: str, address: str) -> bytes:
        """The GARP frame for ``address`` on ``ifname`` (built on first use). Raises OSError."""
        self.open(ifname)
        mac = self._socks[ifname].getsockname()[4]
        frame = self._frames.get((ifname, address))
        if frame is None or frame[6:12] != mac:  # built once; again only if the MAC changed
            frame = self._frames[(ifname, address)] = garp_frame(mac, address)
        return frame

    def send(self, ifname: str, frames: Iterable[bytes]) -> None:
        """Send prepared frames out of ``ifname`` without blocking. Raises OSError."""
        self.open(ifname)
        send = self._socks[ifname].send
        for frame in frames:
            send(frame)

    def close(self) -> None:
        socks, self._socks = self._socks, {}
        for sock in socks.values():
            sock.close()
        self._frames.clear()

