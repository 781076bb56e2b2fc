"""Kernel plumbing: everything lbd installs with netlink, and how it takes it away again.

All of it is tagged so that a restarted lbd can remove what a killed one left behind:

- routes (VIP /32 into the TUN, the reply table's default route) carry protocol ``RTPROT_LBD``;
- the reply rules sit in a priority range of our own (``rule_priority`` .. +63);
- proxy neighbour entries and interface addresses carry the same protocol number
  (NDA_PROTOCOL / IFA_PROTO).

This module is part of the I/O shell: it holds no policy, only "install X" / "remove X".
It talks to the kernel through pyroute2's asyncio ``AsyncIPRoute``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETNEIGH
from pyroute2.netlink.rtnl.ndmsg import ndmsg

log = logging.getLogger("lbd.kernel")

RTPROT_LBD = 241  # unassigned in /etc/iproute2/rt_protos
RULE_RANGE = 64
NTF_PROXY = 0x08
ENOENT = 2
EEXIST = 17
ESRCH = 3
EADDRNOTAVAIL = 99


def write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


class Kernel:
    """Netlink adapter of one lbd process. Create with :meth:`open`, then ``close``."""

    def __init__(self, ipr: Any, *, route_table: int, rule_priority: int) -> None:
        self._ipr = ipr
        self.route_table = route_table
        self.rule_priority = rule_priority

    @classmethod
    async def open(cls, *, route_table: int, rule_priority: int) -> Kernel:
        ipr = AsyncIPRoute()
        await ipr.setup_endpoint()
        return cls(ipr, route_table=route_table, rule_priority=rule_priority)

    async def close(self) -> None:
        self._ipr.close()

    # ---- lookups --------------------------------------------------------------------------
    async def ifindex(self, ifname: str) -> int | None:
        found = await self._ipr.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    async def primary_address(self, ifname: str) -> str | None:
        """The interface's first IPv4 address not installed by lbd (VRRP source address)."""
        idx = await self.ifindex(ifname)
        if idx is None:
            return None
        async for msg in await self._ipr.addr("dump", family=socket.AF_INET, index=idx):
            if msg.get("IFA_PROTO") == RTPROT_LBD:
                continue
            addr = msg.get("address")
            if addr:
                return str(addr)
        return None

    async def link_up(self, ifname: str) -> bool:
        idx = await self.ifindex(ifname)
        if idx is None:
            return False
        links = [m async for m in await self._ipr.link("get", index=idx)]
        return bool(links) and links[0].get("operstate") in ("UP", "UNKNOWN")

    # ---- set-up ---------------------------------------------------------------------------
    async def prepare(self, *, tun: str, client_if: str, server_if: str) -> None:
        """Sysctls the NAT path needs, in this namespace only."""
        write_sysctl("net.ipv4.ip_forward", "1")
        # Rewritten client packets re-enter through the TUN with the client's source:
        # strict reverse-path filtering would drop them.
        for dev in ("all", "default", tun, client_if, server_if):
            with contextlib.suppress(OSError):
                write_sysctl(f"net.ipv4.conf.{dev}.rp_filter", "0")
        for dev in ("all", tun, server_if, client_if):
            with contextlib.suppress(OSError):
                write_sysctl(f"net.ipv4.conf.{dev}.send_redirects", "0")
        # Answer ARP for VIPs at once instead of after a random proxy delay.
        write_sysctl(f"net.ipv4.neigh.{client_if}.proxy_delay", "0")
        with contextlib.suppress(OSError):
            write_sysctl(f"net.ipv6.conf.{tun}.disable_ipv6", "1")

    async def set_link_up(self, ifname: str) -> int:
        idx = await self.ifindex(ifname)
        if idx is None:
            raise RuntimeError(f"no such interface: {ifname}")
        await self._ipr.link("set", index=idx, state="up")
        return idx

    async def remove_leftovers(self) -> int:
        """Delete everything tagged as ours (a killed lbd's plumbing). Returns the count."""
        removed = 0
        for msg in [m async for m in await self._ipr.rule("dump", family=socket.AF_INET)]:
            prio = msg.get("priority")
            if prio is not None and self.rule_priority <= prio < self.rule_priority + RULE_RANGE:
                with contextlib.suppress(NetlinkError):
                    await self._ipr.rule("del", family=socket.AF_INET, priority=prio,
                                         table=msg.get("table"))
                    removed += 1
        for table in (254, self.route_table):
            routes = [m async for m in await self._ipr.route("dump", family=socket.AF_INET,
                                                             table=table)]
            for msg in routes:
                if msg.get("proto") == RTPROT_LBD:
                    with contextlib.suppress(NetlinkError):
                        await self._ipr.route("del", table=table, dst=_dst(msg),
                                              proto=RTPROT_LBD)
                        removed += 1
        for msg in [m async for m in await self._ipr.addr("dump", family=socket.AF_INET)]:
            if msg.get("IFA_PROTO") == RTPROT_LBD:
                with contextlib.suppress(NetlinkError):
                    await self._ipr.addr("del", index=msg["index"], address=msg.get("address"),
                                         prefixlen=msg["prefixlen"])
                    removed += 1
        for ifindex, dst in await self._proxy_entries():
            with contextlib.suppress(NetlinkError):
                await self._ipr.neigh("del", dst=dst, ifindex=ifindex, flags=NTF_PROXY)
                removed += 1
        return removed

    async def _proxy_entries(self) -> list[tuple[int, str]]:
        """Our proxy neighbour entries. The kernel dumps proxy entries only when the request
        carries NTF_PROXY in ndm_flags, which pyroute2's ``neigh("dump")`` does not send."""
        req = ndmsg()
        req["family"] = socket.AF_INET
        req["flags"] = NTF_PROXY
        result = []
        async for msg in await self._ipr.nlm_request(
            req, msg_type=RTM_GETNEIGH, msg_flags=NLM_F_REQUEST | NLM_F_DUMP
        ):
            if msg.get("NDA_PROTOCOL") == RTPROT_LBD and msg.get("dst"):
                result.append((int(msg["ifindex"]), str(msg.get("dst"))))
        return result

    async def install_reply_path(self, tun_index: int, server_if: str,
                                 servers: Iterable[str]) -> None:
        """Replies from real servers go into the TUN: a default route in our table and one
        rule per server, ``iif server_if from SERVER lookup table``."""
        await self._replace_route("0.0.0.0/0", tun_index, table=self.route_table)
        await self.set_reply_rules(server_if, servers)

    async def set_reply_rules(self, server_if: str, servers: Iterable[str]) -> None:
        """Make the rule set exactly one rule per server address (idempotent)."""
        wanted = sorted(set(servers))
        current = [m async for m in await self._ipr.rule("dump", family=socket.AF_INET)]
        for msg in current:
            prio = msg.get("priority")
            if prio is not None and self.rule_priority <= prio < self.rule_priority + RULE_RANGE:
                with contextlib.suppress(NetlinkError):
                    await self._ipr.rule("del", family=socket.AF_INET, priority=prio,
                                         table=msg.get("table"), src=msg.get_attr("FRA_SRC"),
                                         src_len=msg.get("src_len"),
                                         iifname=msg.get_attr("FRA_IIFNAME"))
        for addr in wanted:
            await self._ipr.rule("add", family=socket.AF_INET, priority=self.rule_priority,
                                 table=self.route_table, src=addr, src_len=32,
                                 iifname=server_if)

    # ---- addresses the master holds ---------------------------------------------------------
    async def claim_vip(self, vip: str, tun_index: int, client_if: str) -> None:
        """Route the VIP into the data plane and answer ARP for it on the client side."""
        await self._replace_route(f"{vip}/32", tun_index, table=254)
        idx = await self._index(client_if)
        try:
            await self._ipr.neigh("add", dst=vip, ifindex=idx, flags=NTF_PROXY,
                                  NDA_PROTOCOL=RTPROT_LBD)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    async def release_vip(self, vip: str, client_if: str) -> None:
        with contextlib.suppress(NetlinkError):
            await self._ipr.route("del", dst=f"{vip}/32", table=254, proto=RTPROT_LBD)
        idx = await self.ifindex(client_if)
        if idx is not None:
            with contextlib.suppress(NetlinkError):
                await self._ipr.neigh("del", dst=vip, ifindex=idx, flags=NTF_PROXY)

    async def claim_address(self, address: str, prefixlen: int, ifname: str) -> None:
        idx = await self._index(ifname)
        try:
            await self._ipr.addr("add", index=idx, address=address, prefixlen=prefixlen,
                                 IFA_PROTO=RTPROT_LBD)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    async def release_address(self, address: str, prefixlen: int, ifname: str) -> None:
        idx = await self.ifindex(ifname)
        if idx is not None:
            with contextlib.suppress(NetlinkError):
                await self._ipr.addr("del", index=idx, address=address, prefixlen=prefixlen)

    # ---- helpers ----------------------------------------------------------------------------
    async def _index(self, ifname: str) -> int:
        idx = await self.ifindex(ifname)
        if idx is None:
            raise RuntimeError(f"no such interface: {ifname}")
        return idx

    async def _replace_route(self, dst: str, oif: int, *, table: int) -> None:
        await self._ipr.route("replace", dst=dst, oif=oif, table=table, proto=RTPROT_LBD)


def _dst(msg: Any) -> str:
    dst = msg.get("dst") or "0.0.0.0"
    return f"{dst}/{msg['dst_len']}"


def gratuitous_arp(ifname: str, address: str, count: int = 1) -> None:
    """Send ``count`` gratuitous ARP requests for ``address`` out of ``ifname`` (blocking,
    microseconds; the caller spaces repeats)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as sock:
        sock.bind((ifname, 0x0806))
        mac = sock.getsockname()[4]
        ip = socket.inet_aton(address)
        frame = (b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
                 + mac + ip + b"\x00" * 6 + ip)
        for _ in range(count):
            sock.send(frame)
