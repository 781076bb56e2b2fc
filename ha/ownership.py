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

A takeover is one batch: every address of every instance that became master in the same
step (a sync group's members) goes to the netlink thread in one call, and the first round of
gratuitous ARPs for all of them leaves right after, from packet sockets opened at start
(:class:`~lb.kernel.GarpSender`). Later rounds send only what is still held, so a node that
stepped back in between stops announcing at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lb.config import VrrpAddress
from lb.kernel import GarpSender, Kernel

log = logging.getLogger("lbd.ha")


@dataclass(frozen=True, slots=True)
class Claim:
    """Addresses to take on one interface, and how to announce them."""

    ifname: str
    addresses: tuple[VrrpAddress, ...]
    garp_count: int
    garp_interval: float
    garp_refresh: float = 0.0
    """A second round of announcements this long after the first (0: none)."""


class AddressOwner:
    def __init__(self, kernel: Kernel, tun_index: int,
                 garp: GarpSender | None = None) -> None:
        self.kernel = kernel
        self.tun_index = tun_index
        self.garp = garp if garp is not None else GarpSender()
        self.held: dict[tuple[str, str], VrrpAddress] = {}  # (interface, address) → entry
        self.garps_sent = 0
        self.garp_errors = 0

    def open_interfaces(self, ifnames: Iterable[str]) -> None:
        """Open the GARP sockets of these interfaces now, not at the first takeover."""
        for ifname in ifnames:
            try:
                self.garp.open(ifname)
            except OSError as exc:
                log.warning("cannot open a packet socket on %s for gratuitous ARP: %s",
                            ifname, exc)

    def close(self) -> None:
        self.garp.close()

    async def take(self, ifname: str, addresses: Iterable[VrrpAddress], *, garp_count: int,
                   garp_interval: float, garp_refresh: float = 0.0) -> None:
        await self.take_many([Claim(ifname, tuple(addresses), garp_count, garp_interval,
                                    garp_refresh)])

    async def take_many(self, claims: Sequence[Claim]) -> None:
        """Install every claim's addresses in one netlink batch, then announce them all."""
        await self.kernel.claim_addresses(
            [(c.ifname, [e.address for e in c.addresses]) for c in claims], self.tun_index)
        for c in claims:
            for entry in c.addresses:
                self.held[(c.ifname, entry.address)] = entry
        for c in claims:
            self.announce(c.ifname, [e.address for e in c.addresses], c.garp_count,
                          c.garp_interval, refresh=c.garp_refresh)

    async def release(self, ifname: str, addresses: Iterable[VrrpAddress]) -> None:
        entries = list(addresses)
        for entry in entries:  # first, so that no later GARP round announces them
            self.held.pop((ifname, entry.address), None)
        await self.kernel.release_addresses(ifname, [e.address for e in entries])

    async def release_all(self) -> None:
        by_if: dict[str, list[VrrpAddress]] = {}
        for (ifname, _), entry in list(self.held.items()):
            by_if.setdefault(ifname, []).append(entry)
        for ifname, entries in by_if.items():
            await self.release(ifname, entries)

    def announce(self, ifname: str, addresses: Sequence[str], count: int, interval: float,
                 *, refresh: float = 0.0) -> None:
        """``count`` rounds of gratuitous ARPs for the held ones of ``addresses``,
        ``interval`` apart, the first now; with ``refresh``, the same again that much later."""
        if count <= 0:
            return
        addresses = tuple(addresses)
        self._round(ifname, addresses)
        loop = asyncio.get_running_loop()
        for i in range(1, count):
            loop.call_later(i * interval, self._round, ifname, addresses)
        if refresh > 0:
            loop.call_later(refresh, self.announce, ifname, addresses, count, interval)

    def _round(self, ifname: str, addresses: tuple[str, ...]) -> None:
        held = [a for a in addresses if (ifname, a) in self.held]
        if not held:
            return
        try:
            self.garp.send(ifname, [self.garp.frame(ifname, a) for a in held])
            self.garps_sent += len(held)
        except OSError as exc:
            self.garp_errors += 1
            log.warning("gratuitous ARP for %s on %s failed: %s", ", ".join(held), ifname, exc)
