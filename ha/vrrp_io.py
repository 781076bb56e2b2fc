"""asyncio shell around the VRRP machines of one interface.

The shell holds no protocol logic. :class:`VrrpRunner` feeds what the socket and the clock
deliver to the pure machines (:mod:`ha.vrrp_machine`), sends what they want sent, hands their
state changes to the daemon and arms one timer for the earliest deadline. It is written
against two small Protocols so that tests drive it without sockets or a real loop:

- :class:`VrrpTransport`: read one IPv4 packet, send one VRRP message (:class:`RawVrrpSocket`
  is the real one: ``socket(AF_INET, SOCK_RAW, 112)`` on one interface);
- :class:`EventLoop`: ``time``, ``call_at``, ``add_reader``, ``remove_reader`` (an asyncio
  loop is one).

After every input the runner calls the optional ``on_step(now)`` hook before it drains the
machines. The daemon uses it for sync groups, whose members may live on other interfaces::

    def on_step(now: float) -> None:
        for group in groups:
            group.reconcile(now)
        for runner in runners:
            runner.flush()       # re-entrant: a runner already flushing only notes it

Nothing raised by a received packet leaves the reader callback: malformed packets and
packets for somebody else are counted by :class:`~ha.vrrp_packet.RejectReason`, socket
errors are counted, and an exception in the state-change callback is logged and counted.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ha.vrrp_machine import AdvertOut, Reannounce, State, StateChange, VrrpMachine
from ha.vrrp_packet import (
    VRRP_MULTICAST_GROUP,
    VRRP_PROTOCOL,
    VRRP_TTL,
    Advert,
    RejectReason,
    encode_advert,
    parse_advert,
)
from lb.addr import int_to_ip
from lb.histogram import Histogram

_log = logging.getLogger(__name__)

# Linux values; Python's socket module does not export IP_PKTINFO on every version.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_IP_MREQN = struct.Struct("=4s4si")  # struct ip_mreqn: multiaddr, address, ifindex
_IN_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_ADDR = struct.Struct("!I")


class VrrpTransport(Protocol):
    """One interface's VRRP socket, as the runner needs it."""

    def fileno(self) -> int: ...

    def recv_packet(self) -> bytes | None:
        """One received IPv4 packet, IP header included; None when nothing is waiting.
        May raise OSError."""
        ...

    def send_advert(self, payload: bytes, src: int, dst: int) -> None:
        """Send a VRRP message from ``src`` to ``dst`` with TTL 255. May raise OSError."""
        ...

    def close(self) -> None: ...


class AdvertCopies(Protocol):
    """Where a runner reports the adverts it sent (:class:`ha.advert_relay.RelayLink`): a
    process that sends copies if lbd's next advert is late."""

    def sent(self, vrid: int, interval: float, src: int, dst: int, payload: bytes) -> None: ...

    def stop(self, vrid: int = 0) -> None: ...

    def close(self) -> None: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class EventLoop(Protocol):
    """The part of an asyncio loop the runner uses."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle: ...

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...

    def remove_reader(self, fd: int) -> bool: ...


class RawVrrpSocket:
    """The real transport: a raw IP socket for protocol 112 on one interface.

    - ``SO_BINDTODEVICE`` so that only this interface's packets arrive;
    - member of 224.0.0.18 on this interface (``ip_mreqn`` with the ifindex);
    - multicast leaves this interface (``IP_MULTICAST_IF`` with the same ``ip_mreqn``), with
      TTL 255 and without looping back to us; unicast (to peers) also with TTL 255;
    - every send carries ``IP_PKTINFO`` with the interface and the primary address, so the
      source is the primary address for unicast peers too. The socket is not bound to an
      address: a raw socket bound to one only receives packets addressed to it, which would
      lose the multicast adverts.
    """

    RECV_SIZE = 65535

    def __init__(self, sock: socket.socket, ifindex: int) -> None:
        self._sock = sock
        self._ifindex = ifindex

    @classmethod
    def open(cls, ifname: str, ifindex: int, primary_address: int) -> RawVrrpSocket:
        """Open and configure the socket (needs CAP_NET_RAW)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTOCOL)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            mreqn = _IP_MREQN.pack(
                _ADDR.pack(VRRP_MULTICAST_GROUP), _ADDR.pack(primary_address), ifindex
            )
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, VRRP_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, VRRP_TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            # DSCP CS6 (network control), as keepalived marks its adverts.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)
            # A flood of junk must not crowd real adverts out of the receive queue, and our
            # adverts leave ahead of bulk traffic queued on the same interface.
            # (RCVBUFFORCE, allowed with CAP_NET_ADMIN, passes net.core.rmem_max.)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 20)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 7)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, ifindex)

    @property
    def sock(self) -> socket.socket:
        return self._sock

    @property
    def ifindex(self) -> int:
        return self._ifindex

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_packet(self) -> bytes | None:
        try:
            return self._sock.recv(self.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None

    def send_advert(self, payload: bytes, src: int, dst: int) -> None:
        pktinfo = _IN_PKTINFO.pack(self._ifindex, _ADDR.pack(src), b"\x00" * 4)
        self._sock.sendmsg(
            [payload], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, (int_to_ip(dst), 0)
        )

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True, slots=True)
class RunnerInstance:
    """One configured virtual router on this interface."""

    name: str
    """The ``[vrrp.instances.NAME]`` key; state changes are reported with it."""
    machine: VrrpMachine
    unicast_peers: tuple[int, ...] = ()
    """When set, adverts go to each peer instead of 224.0.0.18, and adverts from any other
    source are dropped (:attr:`RejectReason.UNKNOWN_PEER`)."""


StateCallback = Callable[[str, StateChange], None]
AnnounceCallback = Callable[[str, Reannounce], None]


class VrrpRunner:
    """Runs the VRRP machines of one interface on an event loop."""

    RECV_BATCH = 64
    """Packets read per readiness callback: bounded work per wake-up."""
    TIMER_DRAIN = 1024
    """Packets read, at most, before the machines' timers act (see :meth:`_on_timer`)."""
    LATE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1)
    """Upper bounds (s) of the timer-lateness histogram; one more bucket holds the rest."""

    def __init__(
        self,
        loop: EventLoop,
        transport: VrrpTransport,
        primary_address: int,
        instances: Sequence[RunnerInstance],
        on_state_change: StateCallback,
        *,
        on_step: Callable[[float], None] | None = None,
        on_announce: AnnounceCallback | None = None,
        copies: AdvertCopies | None = None,
    ) -> None:
        self._loop = loop
        self.copies = copies
        self._transport = transport
        self.primary_address = primary_address
        self._instances = tuple(instances)
        self._by_vrid: dict[int, RunnerInstance] = {}
        self._by_name: dict[str, RunnerInstance] = {}
        for instance in self._instances:
            config = instance.machine.config
            if config.vrid in self._by_vrid:
                raise ValueError(f"VRID {config.vrid} used twice on one interface")
            if config.primary_address != primary_address:
                raise ValueError(f"instance {instance.name}: primary address differs")
            self._by_vrid[config.vrid] = instance
            self._by_name[instance.name] = instance
        self._on_state_change = on_state_change
        self._on_step = on_step
        self._on_announce = on_announce
        self._timer: TimerHandle | None = None
        self._timer_at: float | None = None
        self._reading = False
        self._flushing = False
        self._flush_again = False
        self.packets_received = 0
        self.dropped: dict[RejectReason, int] = {}
        """Packets dropped here (malformed, not ours, looped); the machines count the rest."""
        self.recv_errors = 0
        self.send_errors = 0
        self.callback_errors = 0
        self.timer_late = Histogram(self.LATE_BUCKETS)
        """How late the machines' timer ran (the loop's time at the callback minus the
        deadline asked for), counted per :attr:`LATE_BUCKETS` bucket: an advert leaves right
        after, so this is how late a master's adverts leave (issue 10: never starved)."""

    # ---------------------------------------------------------------- daemon API

    @property
    def instances(self) -> tuple[RunnerInstance, ...]:
        return self._instances

    def machine(self, name: str) -> VrrpMachine:
        return self._by_name[name].machine

    def start(self) -> None:
        """Start reading and start every machine."""
        self._loop.add_reader(self._transport.fileno(), self._on_readable)
        self._reading = True
        now = self._loop.time()
        for instance in self._instances:
            instance.machine.start(now)
        self._stepped(now)

    def stop(self) -> None:
        """Shut every machine down (a master sends priority 0), send, and close the socket."""
        now = self._loop.time()
        for instance in self._instances:
            instance.machine.shutdown(now)
        self._stepped(now)
        if self.copies is not None:
            self.copies.close()
            self.copies = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if self._reading:
            self._loop.remove_reader(self._transport.fileno())
            self._reading = False
        self._transport.close()

    def set_priority(self, name: str, effective: int) -> None:
        now = self._loop.time()
        self._by_name[name].machine.set_priority(effective, now)
        self._stepped(now)

    def set_fault(self, name: str, fault: bool) -> None:
        now = self._loop.time()
        self._by_name[name].machine.set_fault(fault, now)
        self._stepped(now)

    def datagram_received(self, packet: bytes, now: float | None = None) -> None:
        """Feed one received IPv4 packet (what the reader callback does for each)."""
        self._feed(packet, self._loop.time() if now is None else now)
        self.flush()

    def flush(self) -> None:
        """Send what the machines want sent, report their events, re-arm the timer."""
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            self._flush_again = True
            while self._flush_again:
                self._flush_again = False
                for instance in self._instances:
                    self._drain(instance)
            self._arm_timer()
        finally:
            self._flushing = False

    # ---------------------------------------------------------------- loop callbacks

    def _on_readable(self) -> None:
        self._read(self._loop.time(), self.RECV_BATCH)
        self.flush()

    def _read(self, now: float, limit: int) -> None:
        for _ in range(limit):
            try:
                packet = self._transport.recv_packet()
            except OSError:
                self.recv_errors += 1
                break
            if packet is None:
                break
            self._feed(packet, now)

    def _on_timer(self) -> None:
        # asyncio may run a call_at callback a clock resolution early: never feed the
        # machines a time before the deadline they asked for.
        t = self._loop.time()
        due = self._timer_at or 0.0
        now = max(t, due)
        self._timer = self._timer_at = None
        self.timer_late.observe(now - due)
        # What the socket holds comes first. After a pause (SIGSTOP, a VM freeze) it holds
        # the adverts that arrived meanwhile, and uvloop runs an overdue timer before the
        # reader: a backup would take over from a live master until it read them (seen:
        # MASTER for a few ms, the sync connection reset). Normally this is one recv that
        # finds nothing.
        if self._reading:
            self._read(now, self.TIMER_DRAIN)
        for instance in self._instances:
            instance.machine.handle_timer(now)
        self._stepped(now)

    # ---------------------------------------------------------------- internals

    def _feed(self, packet: bytes, now: float) -> None:
        """Check one packet and hand it to its machine; on_step runs after each advert."""
        self.packets_received += 1
        result = parse_advert(packet)
        if not isinstance(result, Advert):
            self._drop(result.reason)
            return
        if result.src == self.primary_address:
            self._drop(RejectReason.OWN_ADDRESS)
            return
        instance = self._by_vrid.get(result.vrid)
        if instance is None:
            self._drop(RejectReason.VRID)
            return
        if instance.unicast_peers and result.src not in instance.unicast_peers:
            self._drop(RejectReason.UNKNOWN_PEER)
            return
        instance.machine.receive(result, now)
        if self._on_step is not None:
            self._on_step(now)

    def _stepped(self, now: float) -> None:
        if self._on_step is not None:
            self._on_step(now)
        self.flush()

    def _drain(self, instance: RunnerInstance) -> None:
        machine = instance.machine
        for advert in machine.adverts_to_send():
            self._send(instance, advert)
        while (event := machine.next_event()) is not None:
            if event.old is State.MASTER and self.copies is not None:
                self.copies.stop(machine.config.vrid)  # no copies of a master that left
            try:
                self._on_state_change(instance.name, event)
            except Exception:
                self.callback_errors += 1
                _log.exception("VRRP %s: state-change callback failed on %s", instance.name,
                               event)
        while (announcement := machine.next_announcement()) is not None:
            if self._on_announce is None:
                continue
            try:
                self._on_announce(instance.name, announcement)
            except Exception:
                self.callback_errors += 1
                _log.exception("VRRP %s: announce callback failed", instance.name)

    def _send(self, instance: RunnerInstance, advert: AdvertOut) -> None:
        destinations = instance.unicast_peers or (VRRP_MULTICAST_GROUP,)
        for dst in destinations:
            payload = encode_advert(advert.vrid, advert.priority, advert.max_adver_int_cs,
                                    advert.addresses, self.primary_address, dst)
            try:
                self._transport.send_advert(payload, self.primary_address, dst)
            except OSError:
                self.send_errors += 1
                continue
            if self.copies is not None:
                if advert.priority == 0:  # shutting down: the backup takes over now
                    self.copies.stop(advert.vrid)
                else:
                    self.copies.sent(advert.vrid, advert.max_adver_int_cs / 100,
                                     self.primary_address, dst, payload)

    def _arm_timer(self) -> None:
        deadlines = [
            deadline
            for instance in self._instances
            if (deadline := instance.machine.get_timer()) is not None
        ]
        deadline = min(deadlines) if deadlines else None
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None if deadline is None else self._loop.call_at(deadline, self._on_timer)

    def _drop(self, reason: RejectReason) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
