"""Address ownership: what a master installs and a backup removes.

An instance's address that is a virtual server's address is a VIP: it is routed into the
data plane's TUN and answered for with a proxy ARP entry on the instance's interface. Any
other address (the servers' gateway) is held as an ordinary interface address. On taking
addresses the node announces each with gratuitous ARPs, keepalived-style: ``count`` of them,
``interval`` apart, so that switches and neighbours learn the new owner at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from lb.config import VrrpAddress
from lb.kernel import Kernel, gratuitous_arp

log = logging.getLogger("lbd.ha")


class AddressOwner:
    def __init__(self, kernel: Kernel, tun_index: int, vips: Iterable[str]) -> None:
        self.kernel = kernel
        self.tun_index = tun_index
        self.vips = frozenset(vips)
        self.held: dict[tuple[str, str], VrrpAddress] = {}  # (interface, address) → entry
        self.garps_sent = 0

    def is_vip(self, entry: VrrpAddress) -> bool:
        return entry.prefix_len == 32 and entry.address in self.vips

    async def take(self, ifname: str, addresses: Iterable[VrrpAddress], *, garp_count: int,
                   garp_interval: float, garp_refresh: float = 0.0) -> None:
        for entry in addresses:
            if self.is_vip(entry):
                await self.kernel.claim_vip(entry.address, self.tun_index, ifname)
            else:
                await self.kernel.claim_address(entry.address, entry.prefix_len, ifname)
            self.held[(ifname, entry.address)] = entry
            self.announce(ifname, entry.address, garp_count, garp_interval)
            if garp_refresh > 0:
                asyncio.get_running_loop().call_later(
                    garp_refresh, self._refresh, ifname, entry.address, garp_count,
                    garp_interval)

    async def release(self, ifname: str, addresses: Iterable[VrrpAddress]) -> None:
        for entry in addresses:
            if self.is_vip(entry):
                await self.kernel.release_vip(entry.address, ifname)
            else:
                await self.kernel.release_address(entry.address, entry.prefix_len, ifname)
            self.held.pop((ifname, entry.address), None)

    async def release_all(self) -> None:
        by_if: dict[str, list[VrrpAddress]] = {}
        for (ifname, _), entry in list(self.held.items()):
            by_if.setdefault(ifname, []).append(entry)
        for ifname, entries in by_if.items():
            await self.release(ifname, entries)

    def announce(self, ifname: str, address: str, count: int, interval: float) -> None:
        """Send ``count`` gratuitous ARPs for ``address``, the first now."""
        loop = asyncio.get_running_loop()
        for i in range(count):
            loop.call_later(i * interval, self._garp, ifname, address)

    def _refresh(self, ifname: str, address: str, count: int, interval: float) -> None:
        if (ifname, address) in self.held:  # still ours
            self.announce(ifname, address, count, interval)

    def _garp(self, ifname: str, address: str) -> None:
        try:
            gratuitous_arp(ifname, address)
            self.garps_sent += 1
        except OSError as exc:
            log.warning("gratuitous ARP for %s on %s failed: %s", address, ifname, exc)
