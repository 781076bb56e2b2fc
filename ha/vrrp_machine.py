"""VRRPv3 state machine for one virtual router (RFC 5798 §6), sans-I/O.

One :class:`VrrpMachine` is one virtual router (one VRID on one interface). It never reads a
clock, opens a socket or logs: the caller feeds it

- API calls: :meth:`~VrrpMachine.start`, :meth:`~VrrpMachine.shutdown`,
  :meth:`~VrrpMachine.set_priority`, :meth:`~VrrpMachine.set_fault`,
  and for sync groups :meth:`~VrrpMachine.force_backup` / :meth:`~VrrpMachine.promote`;
- received adverts: :meth:`~VrrpMachine.receive` (already checked by
  :func:`ha.vrrp_packet.parse_advert`);
- time: :meth:`~VrrpMachine.handle_timer` once :meth:`~VrrpMachine.get_timer` is due,

and pulls the outputs: :meth:`~VrrpMachine.adverts_to_send` (the I/O shell encodes and sends
them) and :meth:`~VrrpMachine.next_event` (:class:`StateChange`; the daemon applies address
ownership, gratuitous ARPs and notify scripts on them). There is one deadline at a time:
the Master_Down_Timer in BACKUP, the Adver_Timer in MASTER, none in INIT and FAULT.

Transitions (RFC 5798 §6.4, plus FAULT from keepalived's vocabulary)::

    INIT   --start, priority 255----------------------------> MASTER   (OWNER)
    INIT   --start-------------------------------------------> BACKUP   (START)
    INIT   --start while faulted-----------------------------> FAULT    (FAULT)
    BACKUP --Master_Down_Timer fires-------------------------> MASTER   (MASTER_DOWN/PREEMPT)
    MASTER --advert: higher priority, or equal and higher src-> BACKUP  (HIGHER_PRIORITY)
    MASTER --force_backup (sync group)-----------------------> BACKUP   (GROUP)
    BACKUP/MASTER --set_fault(True)--------------------------> FAULT    (FAULT)
    FAULT  --set_fault(False)--------------------------------> BACKUP, or MASTER if priority 255
    any    --shutdown----------------------------------------> INIT     (SHUTDOWN)

Every path out of MASTER except losing an election sends a priority-0 advert first, so that
a backup takes over after Skew_Time rather than Master_Down_Interval.

Timers, in seconds (the RFC counts centiseconds; the arithmetic is the same):

- Skew_Time = ((256 - priority) * Master_Adver_Interval) / 256, with our effective priority;
- Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time;
- Master_Adver_Interval is learned from every advert a backup accepts.

Choices where the RFC leaves room:

- Received adverts whose address set differs from ours are dropped and counted
  (:attr:`RejectReason.ADDRESS_LIST`), in every state, as keepalived 2.x does; the RFC only
  says a receiver MAY log. A Max Adver Int of 0 is dropped (:attr:`RejectReason.INTERVAL`).
- An address owner still processes adverts (RFC 9568 / erratum 8298 turned the RFC 5798 MUST
  discard into SHOULD log), so two misconfigured owners still elect one master.
- ``preempt_delay`` follows keepalived: for that long after :meth:`start` (and after leaving
  FAULT, which is a restart of the instance as far as its peers can tell) a backup does not
  preempt a live lower-priority master; it accepts its adverts as if ``preempt`` were false.
  Once the delay is over the next lower-priority advert is discarded and the backup takes over
  when its Master_Down_Timer runs out. The delay never postpones taking over from a dead
  master: with no adverts at all the backup becomes master after Master_Down_Interval.
- Effective priority changes (tracking) take effect at once: a master sends an advert with
  the new priority immediately; a backup uses it for the next advert it compares.
- Priority 255 makes the instance the address owner: master at once on start and when leaving
  FAULT.
- A master that hears another node claim master and lose to us (lower priority, or equal
  from a lower address: a backup that wrongly took over for a moment and sent gratuitous
  ARPs) answers with an advert at once, so that the rival steps down in one round trip, and
  once the rival has been silent for ``RIVAL_QUIET`` of its advert intervals it emits a
  :class:`Reannounce` (pulled with :meth:`~VrrpMachine.next_announcement`): the shell sends
  a round of gratuitous ARPs again, so that neighbours which followed the rival come back
  (keepalived's ``garp_lower_prio_repeat``, issue #166). Announcing at once would race the
  rival's own ARPs and lose; waiting until it is quiet means its last ARP is behind us. A
  rival that never goes quiet (it cannot hear us) gets one advert per episode, not one per
  advert it sends, and no ARPs: that is a split brain, not a blip.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ha.vrrp_packet import MAX_ADVER_INT_CS, Advert, RejectReason

RIVAL_QUIET = 3
"""A rival master is taken as stepped down after this many of its advert intervals of
silence (the same count a backup waits before declaring a master dead)."""


class State(enum.Enum):
    """RFC 5798 state names (INIT is the RFC's Initialize), plus keepalived's FAULT."""

    INIT = "INIT"
    BACKUP = "BACKUP"
    MASTER = "MASTER"
    FAULT = "FAULT"


class Reason(enum.Enum):
    """Why a transition happened."""

    START = "start"
    """start(): INIT -> BACKUP."""
    OWNER = "owner"
    """Priority 255 (address owner) goes master without waiting."""
    MASTER_DOWN = "master_down"
    """Master_Down_Timer fired: no advert from the master in Master_Down_Interval."""
    MASTER_LEFT = "master_left"
    """Master_Down_Timer fired Skew_Time after the master announced priority 0 (it stopped
    cleanly), rather than after a whole Master_Down_Interval of silence."""
    PREEMPT = "preempt"
    """Master_Down_Timer fired while we were discarding a lower-priority master's adverts."""
    HIGHER_PRIORITY = "higher_priority"
    """As master, heard a higher priority (or an equal one from a higher address)."""
    GROUP = "group"
    """A sync group forced this instance to follow the others."""
    FAULT = "fault"
    """set_fault(True)."""
    FAULT_CLEARED = "fault_cleared"
    """set_fault(False)."""
    SHUTDOWN = "shutdown"
    """shutdown()."""


@dataclass(frozen=True, slots=True)
class VrrpConfig:
    """What one virtual router is configured with. Times in seconds, addresses as ints."""

    vrid: int
    priority: int
    """Base priority 1..255; 255 means this router owns the addresses."""
    advert_interval: float
    """Advertisement_Interval; sent in centiseconds, so 0.01 .. 40.95 s."""
    primary_address: int
    """Our primary IPv4 address on the interface: the source of our adverts and the
    tie-break when priorities are equal."""
    addresses: tuple[int, ...]
    preempt: bool = True
    preempt_delay: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.vrid <= 255:
            raise ValueError(f"VRID out of range 1..255: {self.vrid}")
        if not 1 <= self.priority <= 255:
            raise ValueError(f"priority out of range 1..255: {self.priority}")
        if not 1 <= self.advert_interval_cs <= MAX_ADVER_INT_CS:
            raise ValueError(f"advert_interval out of range 10ms..40.95s: {self.advert_interval}")
        if not 1 <= len(self.addresses) <= 255:
            raise ValueError("a virtual router has 1..255 addresses")
        if self.preempt_delay < 0:
            raise ValueError(f"preempt_delay is negative: {self.preempt_delay}")

    @property
    def advert_interval_cs(self) -> int:
        return round(self.advert_interval * 100)


@dataclass(frozen=True, slots=True)
class AdvertOut:
    """An advert to send; the I/O shell adds source, destination and checksum."""

    vrid: int
    priority: int
    max_adver_int_cs: int
    addresses: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StateChange:
    """The instance moved from ``old`` to ``new``. On ``new is MASTER`` the owner of the
    addresses installs them and sends gratuitous ARPs; on leaving MASTER it removes them."""

    old: State
    new: State
    reason: Reason


@dataclass(frozen=True, slots=True)
class Reannounce:
    """As master, announce the addresses again (gratuitous ARPs): ``rival`` claimed master
    and has stepped down, and neighbours may have followed it."""

    rival: int


class VrrpMachine:
    """One VRRPv3 virtual router. See the module docstring for the rules."""

    def __init__(self, config: VrrpConfig) -> None:
        self.config = config
        self._addresses = frozenset(config.addresses)
        self._interval = config.advert_interval_cs / 100
        self._state = State.INIT
        self._priority = config.priority
        self._fault = False
        self._master_adver_interval = self._interval
        self._deadline: float | None = None
        self._preempt_after = 0.0
        self._discarding = False  # backup: last advert was a lower-priority master's, dropped
        self._master_left = False  # backup: the last advert was the master's priority 0
        self._gated = False  # sync-group member: may only become master through promote()
        self._pending: Reason | None = None  # gated backup that would have become master
        self._master_src: int | None = None
        self._outbox: list[AdvertOut] = []
        self._events: deque[StateChange] = deque()
        self._announcements: deque[Reannounce] = deque()
        self._rival: int | None = None  # master: a losing node claimed master lately
        self._rival_deadline: float | None = None
        self.adverts_sent = 0
        self.adverts_received = 0
        """Every advert handed to receive(), dropped or not."""
        self.dropped: dict[RejectReason, int] = {}
        self.transitions = 0
        self.rival_adverts = 0
        """Adverts received as MASTER from a node that claimed master and lost to us."""
        self.reannouncements = 0

    # ---------------------------------------------------------------- read-only views

    @property
    def state(self) -> State:
        return self._state

    @property
    def priority(self) -> int:
        """Effective priority (base priority as changed by tracking)."""
        return self._priority

    @property
    def fault(self) -> bool:
        return self._fault

    @property
    def master_adver_interval(self) -> float:
        """Master_Adver_Interval in seconds (learned from the master while BACKUP)."""
        return self._master_adver_interval

    @property
    def master_address(self) -> int | None:
        """Source of the last advert accepted as BACKUP, or our own address as MASTER."""
        if self._state is State.MASTER:
            return self.config.primary_address
        return self._master_src if self._state is State.BACKUP else None

    @property
    def skew_time(self) -> float:
        return (256 - self._priority) * self._master_adver_interval / 256

    @property
    def master_down_interval(self) -> float:
        return 3 * self._master_adver_interval + self.skew_time

    @property
    def wants_master(self) -> bool:
        """MASTER, or a sync-group member in BACKUP that would be master if the group let it."""
        return self._state is State.MASTER or (
            self._state is State.BACKUP and self._pending is not None
        )

    # ---------------------------------------------------------------- outputs

    def adverts_to_send(self) -> list[AdvertOut]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> StateChange | None:
        return self._events.popleft() if self._events else None

    def next_announcement(self) -> Reannounce | None:
        return self._announcements.popleft() if self._announcements else None

    def get_timer(self) -> float | None:
        """The one deadline (in the caller's clock) at which handle_timer() is due."""
        if self._rival_deadline is None:
            return self._deadline
        if self._deadline is None:
            return self._rival_deadline
        return min(self._deadline, self._rival_deadline)

    # ---------------------------------------------------------------- inputs

    def start(self, now: float) -> None:
        """RFC 5798 §6.4.1 Startup event."""
        if self._state is not State.INIT:
            return
        self._preempt_after = now + self.config.preempt_delay
        if self._fault:
            self._transition(State.FAULT, Reason.FAULT)
        else:
            self._come_up(now, Reason.START)

    def shutdown(self, now: float) -> None:
        """RFC 5798 §6.4.2/6.4.3 Shutdown event: a master announces priority 0 first."""
        if self._state is State.INIT:
            return
        if self._state is State.MASTER:
            self._send(0)
        self._deadline = None
        self._pending = None
        self._master_src = None
        self._transition(State.INIT, Reason.SHUTDOWN)

    def handle_timer(self, now: float) -> None:
        if self._rival_deadline is not None and now >= self._rival_deadline:
            assert self._rival is not None and self._state is State.MASTER
            self._announcements.append(Reannounce(self._rival))
            self.reannouncements += 1
            self._rival = self._rival_deadline = None
        if self._deadline is None or now < self._deadline:
            return
        if self._state is State.MASTER:
            # §6.4.3: Adver_Timer fired.
            self._send(self._priority)
            self._deadline = now + self._interval
        elif self._state is State.BACKUP:
            # §6.4.2: Master_Down_Timer fired.
            if self._discarding:
                reason = Reason.PREEMPT
            elif self._master_left:
                reason = Reason.MASTER_LEFT
            else:
                reason = Reason.MASTER_DOWN
            self._become_master(now, reason)

    def receive(self, advert: Advert, now: float) -> RejectReason | None:
        """An advert that passed parse_advert(). Returns the reason when it is dropped."""
        self.adverts_received += 1
        if advert.vrid != self.config.vrid:
            return self._drop(RejectReason.VRID)
        if advert.max_adver_int_cs == 0:
            return self._drop(RejectReason.INTERVAL)
        if frozenset(advert.addresses) != self._addresses:
            return self._drop(RejectReason.ADDRESS_LIST)
        if self._state is State.BACKUP:
            self._backup_receive(advert, now)
        elif self._state is State.MASTER:
            self._master_receive(advert, now)
        # INIT and FAULT take no part in the election.
        return None

    def set_priority(self, effective: int, now: float) -> None:
        """Tracking changed the effective priority; it is clamped to 1..255."""
        effective = max(1, min(255, effective))
        if effective == self._priority:
            return
        self._priority = effective
        if self._state is State.MASTER:
            self._send(self._priority)
            self._deadline = now + self._interval

    def reconfigure(self, config: VrrpConfig, now: float) -> None:
        """A reload changed what may change without a restart: base priority (the effective
        one follows through :meth:`set_priority`, from tracking), advert interval, preempt and
        preempt_delay. The state stays; a MASTER sends its next advert at the new interval
        (at once when that is sooner), a BACKUP keeps timing the master by what the master
        advertises. Anything else (VRID, addresses, source) raises ValueError: a new virtual
        router, which needs a new machine."""
        same = (config.vrid, config.addresses, config.primary_address)
        if same != (self.config.vrid, self.config.addresses, self.config.primary_address):
            raise ValueError("vrid, addresses and primary address cannot change in place")
        self.config = config
        interval = config.advert_interval_cs / 100
        if interval != self._interval:
            self._interval = interval
            if self._state is State.MASTER and self._deadline is not None:
                self._deadline = min(self._deadline, now + interval)
        self._preempt_after = min(self._preempt_after, now + config.preempt_delay)

    def set_fault(self, fault: bool, now: float) -> None:
        """Tracking says the instance can (not) work: FAULT holds no addresses."""
        if fault == self._fault:
            return
        self._fault = fault
        if fault:
            if self._state in (State.BACKUP, State.MASTER):
                if self._state is State.MASTER:
                    self._send(0)
                self._deadline = None
                self._pending = None
                self._master_src = None
                self._transition(State.FAULT, Reason.FAULT)
        elif self._state is State.FAULT:
            self._preempt_after = now + self.config.preempt_delay
            self._come_up(now, Reason.FAULT_CLEARED)

    # ---------------------------------------------------------------- sync-group hooks

    def set_gated(self, gated: bool) -> None:
        """Sync-group membership: a gated instance never makes itself master; when it would,
        it stays BACKUP with :attr:`wants_master` set until :meth:`promote` is called."""
        self._gated = gated

    def force_backup(self, now: float) -> None:
        """Leave MASTER for BACKUP because the sync group says so. Announces priority 0 so
        the peer takes over after Skew_Time, then runs a normal Master_Down_Timer."""
        if self._state is not State.MASTER:
            return
        self._send(0)
        self._enter_backup(now, self._interval, Reason.GROUP)

    def promote(self, now: float) -> None:
        """Let a gated BACKUP that wants to be master become master."""
        if self._state is State.BACKUP and self._pending is not None:
            reason, self._pending = self._pending, None
            self._to_master(now, reason)

    # ---------------------------------------------------------------- internals

    def _come_up(self, now: float, reason: Reason) -> None:
        """§6.4.1 Startup, also used when leaving FAULT."""
        if self._priority == 255:
            self._become_master(now, Reason.OWNER if reason is Reason.START else reason)
        else:
            self._enter_backup(now, self._interval, reason)

    def _backup_receive(self, advert: Advert, now: float) -> None:
        """§6.4.2 Backup: an ADVERTISEMENT is received."""
        if advert.priority == 0:
            self._discarding = False
            self._master_left = True
            self._deadline = now + self.skew_time
            return
        self._master_left = False
        preempting = self.config.preempt and now >= self._preempt_after
        if not preempting or advert.priority >= self._priority:
            self._master_src = advert.src
            self._discarding = False
            self._pending = None
            self._master_adver_interval = advert.max_adver_int_cs / 100
            self._deadline = now + self.master_down_interval
        else:
            self._discarding = True

    def _master_receive(self, advert: Advert, now: float) -> None:
        """§6.4.3 Master: an ADVERTISEMENT is received."""
        if advert.priority == 0:
            self._send(self._priority)
            self._deadline = now + self._interval
        elif advert.priority > self._priority or (
            advert.priority == self._priority and advert.src > self.config.primary_address
        ):
            self._master_src = advert.src
            self._enter_backup(now, advert.max_adver_int_cs / 100, Reason.HIGHER_PRIORITY)
        else:
            # A node claims master and loses to us: tell it once, announce when it is quiet.
            self.rival_adverts += 1
            if self._rival is None:
                self._send(self._priority)
                self._deadline = now + self._interval
            self._rival = advert.src
            self._rival_deadline = now + RIVAL_QUIET * advert.max_adver_int_cs / 100

    def _enter_backup(self, now: float, master_adver_interval: float, reason: Reason) -> None:
        self._master_adver_interval = master_adver_interval
        self._discarding = False
        self._pending = None
        self._deadline = now + self.master_down_interval
        self._transition(State.BACKUP, reason)

    def _become_master(self, now: float, reason: Reason) -> None:
        if self._gated:
            # Wait for the sync group; adverts keep deciding whether we still want to.
            if self._state is not State.BACKUP:
                self._enter_backup(now, self._interval, reason)
            self._pending = reason
            self._deadline = None
            return
        self._to_master(now, reason)

    def _to_master(self, now: float, reason: Reason) -> None:
        self._send(self._priority)
        self._deadline = now + self._interval
        self._discarding = False
        self._transition(State.MASTER, reason)

    def _send(self, priority: int) -> None:
        self._outbox.append(
            AdvertOut(self.config.vrid, priority, self.config.advert_interval_cs,
                      self.config.addresses)
        )
        self.adverts_sent += 1

    def _drop(self, reason: RejectReason) -> RejectReason:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return reason

    def _transition(self, new: State, reason: Reason) -> None:
        old, self._state = self._state, new
        if old is State.MASTER:
            self._rival = self._rival_deadline = None
            self._announcements.clear()
        self.transitions += 1
        self._events.append(StateChange(old, new, reason))


class GroupSync:
    """A ``[vrrp.groups]`` sync group: its instances are master together or not at all.

    Construction gates every member (see :meth:`VrrpMachine.set_gated`). After any input to
    any member, the runner calls :meth:`reconcile`, which moves the group to a fixed point:

    - if every member wants to be master (is MASTER, or is a BACKUP whose Master_Down_Timer
      fired), all of them become MASTER;
    - otherwise (some member is BACKUP behind a live master, FAULT or INIT) every MASTER
      member is forced to BACKUP, announcing priority 0 so that the peer's members take over
      quickly. Like keepalived, a FAULT member thus keeps the healthy ones from holding
      addresses; they stay BACKUP (not FAULT) since they themselves are fine.
    """

    def __init__(self, name: str, machines: Sequence[VrrpMachine]) -> None:
        self.name = name
        self.machines = tuple(machines)
        for machine in self.machines:
            machine.set_gated(True)

    def reconcile(self, now: float) -> None:
        if all(machine.wants_master for machine in self.machines):
            for machine in self.machines:
                machine.promote(now)
        else:
            for machine in self.machines:
                machine.force_backup(now)
