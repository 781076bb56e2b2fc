"""Address ownership: what a master installs and a backup removes.

Every address an instance holds (a virtual server's address, or the servers' gateway) is
routed as a /32 into the data plane's TUN and answered for with a proxy ARP entry on the
instance's interface (a prefix length given in the config is not used). The kernel answers a
proxy entry only while the route leads out of another device, and the TUN route disappears
with the TUN device, i.e. with the lbd process: so a SIGKILLed lbd stops answering ARP for
its addresses at once, and the servers' replies that still reach it meet the reply table's
blackhole instead of being forwarded untranslated (an interface address would outlive the
process and keep attracting them). The data plane answers pings to a held address that is
not a VIP. On taking addresses the node announces each with gratuitous ARPs,
keepalived-style: ``count`` of them, ``interval`` apart, so that switches and neighbours
learn the new owner at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from lb.config import VrrpAddress
from lb.kernel import Kernel, gratuitous_arp

log = logging.getLogger("lbd.ha")


class AddressOwner:
    def __init__(self, kernel: Kernel, tun_index: int) -> None:
        self.kernel = kernel
        self.tun_index = tun_index
        self.held: dict[tuple[str, str], VrrpAddress] = {}  # (interface, address) → entry
        self.garps_sent = 0

    async def take(self, ifname: str, addresses: Iterable[VrrpAddress], *, garp_count: int,
                   garp_interval: float, garp_refresh: float = 0.0) -> None:
        for entry in addresses:
            await self.kernel.claim_address(entry.address, self.tun_index, ifname)
            self.held[(ifname, entry.address)] = entry
            self.announce(ifname, entry.address, garp_count, garp_interval)
            if garp_refresh > 0:
                asyncio.get_running_loop().call_later(
                    garp_refresh, self._refresh, ifname, entry.address, garp_count,
                    garp_interval)

    async def release(self, ifname: str, addresses: Iterable[VrrpAddress]) -> None:
        for entry in addresses:
            await self.kernel.release_address(entry.address, ifname)
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
