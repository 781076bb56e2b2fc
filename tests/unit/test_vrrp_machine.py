"""VRRPv3 machines wired back to back on a float clock, and the runner on a fake loop.

The wire between machines is the real codec: every advert is encoded, wrapped in the IPv4
header the kernel would add, and parsed again before the peers see it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ha.vrrp_io import RunnerInstance, TimerHandle, VrrpRunner
from ha.vrrp_machine import (
    AdvertOut,
    GroupSync,
    Reason,
    State,
    StateChange,
    VrrpConfig,
    VrrpMachine,
)
from ha.vrrp_packet import (
    VRRP_MULTICAST_GROUP,
    Advert,
    RejectReason,
    encode_advert,
    ipv4_packet,
    parse_advert,
)
from lb.addr import ip_to_int

TICK = 0.01
EPS = 1e-6
VIP = ip_to_int("198.51.100.10")
GW = ip_to_int("198.18.0.1")
A_ADDR = ip_to_int("198.51.100.2")
B_ADDR = ip_to_int("198.51.100.3")
C_ADDR = ip_to_int("198.51.100.4")


def machine(priority: int, address: int, *, vrid: int = 51, interval: float = 1.0,
            addresses: tuple[int, ...] = (VIP,), preempt: bool = True,
            preempt_delay: float = 0.0) -> VrrpMachine:
    return VrrpMachine(VrrpConfig(vrid=vrid, priority=priority, advert_interval=interval,
                                  primary_address=address, addresses=addresses,
                                  preempt=preempt, preempt_delay=preempt_delay))


def on_the_wire(sender: VrrpMachine, out: AdvertOut) -> Advert:
    src = sender.config.primary_address
    payload = encode_advert(out.vrid, out.priority, out.max_adver_int_cs, out.addresses, src,
                            VRRP_MULTICAST_GROUP)
    parsed = parse_advert(ipv4_packet(src, VRRP_MULTICAST_GROUP, payload))
    assert isinstance(parsed, Advert)
    return parsed


@dataclass
class Lan:
    """One multicast link: every advert reaches every other machine of the same VRID,
    unless its sender is cut off. A float clock moves by TICK."""

    machines: list[VrrpMachine]
    groups: list[GroupSync] = field(default_factory=list)
    now: float = 0.0
    cut: set[int] = field(default_factory=set)
    """Indices of machines whose adverts are lost (dead box or broken link)."""
    events: list[tuple[int, float, StateChange]] = field(default_factory=list)
    delivered: list[tuple[int, float, Advert]] = field(default_factory=list)
    """(sender index, time, advert) for each advert that reached at least one peer."""

    def start(self, *indices: int) -> None:
        for index in indices or range(len(self.machines)):
            self.machines[index].start(self.now)
        self.settle()

    def settle(self) -> None:
        """Reconcile groups and exchange adverts until nothing moves (zero wire delay)."""
        for _ in range(100):
            for group in self.groups:
                group.reconcile(self.now)
            moved = False
            for index, sender in enumerate(self.machines):
                for out in sender.adverts_to_send():
                    moved = True
                    if index in self.cut:
                        continue
                    advert = on_the_wire(sender, out)
                    self.delivered.append((index, self.now, advert))
                    for other in self.machines:
                        if other is not sender and other.config.vrid == advert.vrid:
                            other.receive(advert, self.now)
                while (event := sender.next_event()) is not None:
                    moved = True
                    self.events.append((index, self.now, event))
            if not moved:
                return
        raise AssertionError("the machines never settled")

    def step(self) -> None:
        self.now += TICK
        for m in self.machines:
            m.handle_timer(self.now)
        self.settle()

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - EPS:
            self.step()

    def run_until(self, condition: Callable[[], bool], limit: float) -> float:
        end = self.now + limit
        while not condition():
            if self.now > end:
                raise AssertionError(f"condition not met within {limit}s")
            self.step()
        return self.now

    def states(self) -> list[State]:
        return [m.state for m in self.machines]

    def became(self, index: int, state: State) -> list[tuple[float, StateChange]]:
        return [(t, e) for i, t, e in self.events if i == index and e.new is state]

    def last_delivery(self, index: int) -> float:
        return max(t for i, t, _ in self.delivered if i == index)


# ------------------------------------------------------------------ timers and formulas


def test_skew_time_and_master_down_interval_follow_rfc_5798() -> None:
    m = machine(100, A_ADDR)
    assert m.skew_time == pytest.approx((256 - 100) * 1.0 / 256)
    assert m.master_down_interval == pytest.approx(3 * 1.0 + 156 / 256)
    owner = machine(255, A_ADDR, interval=0.1)
    assert owner.skew_time == pytest.approx(0.1 / 256)


def test_start_backup_arms_master_down_timer() -> None:
    m = machine(100, A_ADDR)
    m.start(10.0)
    assert m.state is State.BACKUP
    assert m.next_event() == StateChange(State.INIT, State.BACKUP, Reason.START)
    assert m.get_timer() == pytest.approx(10.0 + m.master_down_interval)
    assert m.adverts_to_send() == []


def test_owner_goes_master_at_once_and_advertises() -> None:
    m = machine(255, A_ADDR, interval=0.5)
    m.start(3.0)
    assert m.state is State.MASTER
    assert m.next_event() == StateChange(State.INIT, State.MASTER, Reason.OWNER)
    assert m.adverts_to_send() == [AdvertOut(51, 255, 50, (VIP,))]
    assert m.get_timer() == pytest.approx(3.5)


# ------------------------------------------------------------------ elections


def test_higher_priority_wins() -> None:
    lan = Lan([machine(100, B_ADDR), machine(200, A_ADDR)])
    lan.start()
    lan.run(10)
    assert lan.states() == [State.BACKUP, State.MASTER]
    assert lan.became(0, State.MASTER) == []
    (when, event), = lan.became(1, State.MASTER)
    assert event.reason is Reason.MASTER_DOWN
    assert when == pytest.approx(3 + 56 / 256, abs=TICK + EPS)


def test_equal_priority_higher_address_wins() -> None:
    lan = Lan([machine(100, A_ADDR), machine(100, B_ADDR), machine(100, C_ADDR)])
    lan.start()
    lan.run(10)
    assert lan.states() == [State.BACKUP, State.BACKUP, State.MASTER]
    # All three timed out together; the lower addresses yielded on hearing the higher.
    assert [e.reason for _, e in lan.became(0, State.BACKUP)][-1] is Reason.HIGHER_PRIORITY


def test_master_dies_backup_takes_over_after_master_down_interval() -> None:
    lan = Lan([machine(200, A_ADDR), machine(100, B_ADDR)])
    lan.start()
    lan.run(5)
    assert lan.states() == [State.MASTER, State.BACKUP]
    lan.run(0.35)
    lan.cut.add(0)
    last = lan.last_delivery(0)
    down = lan.machines[1].master_down_interval
    taken = lan.run_until(lambda: lan.machines[1].state is State.MASTER, 10)
    assert taken >= last + down - EPS, "took over before Master_Down_Interval"
    assert taken <= last + down + TICK + EPS
    assert lan.became(1, State.MASTER)[-1][1].reason is Reason.MASTER_DOWN


def test_priority_zero_shutdown_hands_over_after_skew_time() -> None:
    lan = Lan([machine(200, A_ADDR), machine(100, B_ADDR)])
    lan.start()
    lan.run(5.5)
    backup = lan.machines[1]
    lan.machines[0].shutdown(lan.now)
    lan.settle()
    assert lan.machines[0].state is State.INIT
    assert lan.delivered[-1][2].priority == 0
    released = lan.now
    taken = lan.run_until(lambda: backup.state is State.MASTER, 10)
    assert taken == pytest.approx(released + backup.skew_time, abs=TICK + EPS)
    assert taken < released + 1.0
    assert lan.became(1, State.MASTER)[-1][1].reason is Reason.MASTER_LEFT


def test_master_answers_priority_zero_at_once() -> None:
    master = machine(200, A_ADDR)
    master.start(0.0)
    master.handle_timer(master.get_timer() or 0.0)
    assert master.state is State.MASTER
    master.adverts_to_send()
    master.receive(Advert(B_ADDR, 51, 0, 100, (VIP,)), 4.2)
    assert master.adverts_to_send() == [AdvertOut(51, 200, 100, (VIP,))]
    assert master.get_timer() == pytest.approx(5.2)


def test_preempt_true_higher_priority_takes_over_from_running_master() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR)])
    lan.start(0)
    lan.run(5)
    assert lan.machines[0].state is State.MASTER
    lan.start(1)
    lan.run(6)
    assert lan.states() == [State.BACKUP, State.MASTER]
    assert lan.became(1, State.MASTER)[-1][1].reason is Reason.PREEMPT
    assert lan.became(0, State.BACKUP)[-1][1].reason is Reason.HIGHER_PRIORITY


def test_preempt_false_leaves_lower_priority_master_alone() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR, preempt=False)])
    lan.start(0)
    lan.run(5)
    lan.start(1)
    lan.run(30)
    assert lan.states() == [State.MASTER, State.BACKUP]
    assert lan.machines[1].master_address == A_ADDR


def test_preempt_false_backup_still_replaces_a_dead_master() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR, preempt=False)])
    lan.start(0)
    lan.run(5)
    lan.start(1)
    lan.run(5)
    lan.cut.add(0)
    lan.run(5)
    assert lan.machines[1].state is State.MASTER


def test_preempt_delay_holds_preemption_after_start() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR, preempt_delay=10)])
    lan.start(0)
    lan.run(5)
    started = lan.now
    lan.start(1)
    lan.run(9.9)
    assert lan.states() == [State.MASTER, State.BACKUP]
    taken = lan.run_until(lambda: lan.machines[1].state is State.MASTER, 10)
    # The first lower-priority advert after the delay is discarded; one Master_Down_Interval
    # (learned interval 1 s) later the backup takes over.
    assert started + 10 < taken <= started + 10 + 1 + lan.machines[1].master_down_interval
    lan.run(2)
    assert lan.states() == [State.BACKUP, State.MASTER]


def test_preempt_delay_does_not_delay_failover() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR, preempt_delay=60)])
    lan.start(0)
    lan.run(5)
    lan.start(1)
    lan.run(2)
    lan.cut.add(0)
    last = lan.last_delivery(0)
    taken = lan.run_until(lambda: lan.machines[1].state is State.MASTER, 10)
    assert taken == pytest.approx(last + lan.machines[1].master_down_interval, abs=TICK + EPS)


def test_lower_priority_master_yields_to_owner_appearing() -> None:
    lan = Lan([machine(100, A_ADDR), machine(255, B_ADDR)])
    lan.start(0)
    lan.run(5)
    lan.start(1)
    assert lan.states() == [State.BACKUP, State.MASTER]
    assert lan.became(0, State.BACKUP)[-1][1].reason is Reason.HIGHER_PRIORITY


def test_split_brain_heals_once_adverts_flow() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR), machine(150, C_ADDR)])
    lan.cut.update({0, 1, 2})
    lan.start()
    lan.run(5)
    assert lan.states() == [State.MASTER] * 3
    lan.cut.clear()
    lan.run(1.5)
    assert lan.states() == [State.BACKUP, State.MASTER, State.BACKUP]
    lan.run(10)
    assert lan.states() == [State.BACKUP, State.MASTER, State.BACKUP]


def test_backup_learns_master_advert_interval() -> None:
    lan = Lan([machine(200, A_ADDR, interval=0.5), machine(100, B_ADDR, interval=2.0)])
    lan.start()
    lan.run(8)
    backup = lan.machines[1]
    assert lan.states() == [State.MASTER, State.BACKUP]
    assert backup.master_adver_interval == pytest.approx(0.5)
    assert backup.master_down_interval == pytest.approx(1.5 + 156 * 0.5 / 256)
    lan.cut.add(0)
    last = lan.last_delivery(0)
    taken = lan.run_until(lambda: backup.state is State.MASTER, 10)
    assert taken == pytest.approx(last + 1.5 + 156 * 0.5 / 256, abs=TICK + EPS)
    # As master it advertises its own configured interval.
    assert lan.delivered[-1][2].max_adver_int_cs == 200


# ------------------------------------------------------------------ reload in place


def reloaded(m: VrrpMachine, **changes: object) -> VrrpConfig:
    c = m.config
    fields = {"vrid": c.vrid, "priority": c.priority, "advert_interval": c.advert_interval,
              "primary_address": c.primary_address, "addresses": c.addresses,
              "preempt": c.preempt, "preempt_delay": c.preempt_delay, **changes}
    return VrrpConfig(**fields)  # type: ignore[arg-type]


def test_a_reloaded_advert_interval_changes_the_masters_adverts_and_no_state() -> None:
    lan = Lan([machine(200, A_ADDR, interval=1.0), machine(100, B_ADDR, interval=1.0)])
    lan.start()
    lan.run(3.05)
    master, backup = lan.machines
    master.reconfigure(reloaded(master, advert_interval=0.1), lan.now)
    lan.run(2)
    assert lan.states() == [State.MASTER, State.BACKUP]
    assert [e.new for _, _, e in lan.events].count(State.MASTER) == 1  # no transition
    sent = [t for i, t, _ in lan.delivered if i == 0 and t > lan.now - 1]
    assert len(sent) >= 9  # every 0.1 s now
    assert lan.delivered[-1][2].max_adver_int_cs == 10
    assert backup.master_adver_interval == pytest.approx(0.1)


def test_reloaded_preempt_and_priority_decide_as_at_start() -> None:
    lan = Lan([machine(100, A_ADDR), machine(200, B_ADDR, preempt=False)])
    lan.start(0)
    lan.run(5)
    lan.start(1)
    lan.run(5)
    assert lan.states() == [State.MASTER, State.BACKUP]
    b = lan.machines[1]
    b.reconfigure(reloaded(b, preempt=True), lan.now)  # the next advert of A is preempted
    lan.run(3)
    assert lan.states() == [State.BACKUP, State.MASTER]


def test_a_reload_cannot_change_the_virtual_router_in_place() -> None:
    m = machine(100, A_ADDR)
    m.start(0.0)
    for change in ({"vrid": 52}, {"addresses": (VIP, GW)}, {"primary_address": C_ADDR}):
        with pytest.raises(ValueError, match="cannot change in place"):
            m.reconfigure(reloaded(m, **change), 1.0)
    assert m.config.vrid == 51


# ------------------------------------------------------------------ tracking


def test_set_priority_master_advertises_at_once_and_loses_preemption() -> None:
    lan = Lan([machine(200, A_ADDR), machine(100, B_ADDR)])
    lan.start()
    lan.run(5.05)
    lan.machines[0].set_priority(50, lan.now)
    lan.settle()
    assert lan.delivered[-1][1:] == (lan.now, lan.delivered[-1][2])
    assert lan.delivered[-1][2].priority == 50
    lan.run(5)
    assert lan.states() == [State.BACKUP, State.MASTER]
    assert lan.machines[0].priority == 50
    lan.machines[0].set_priority(300, lan.now)
    assert lan.machines[0].priority == 255
    lan.machines[0].set_priority(-5, lan.now)
    assert lan.machines[0].priority == 1


def test_set_fault_releases_and_recovers() -> None:
    lan = Lan([machine(200, A_ADDR), machine(100, B_ADDR)])
    lan.start()
    lan.run(5)
    a, b = lan.machines
    a.set_fault(True, lan.now)
    lan.settle()
    assert a.state is State.FAULT
    assert a.get_timer() is None
    assert lan.delivered[-1][2].priority == 0
    released = lan.now
    lan.run_until(lambda: b.state is State.MASTER, 2)
    assert lan.now <= released + b.skew_time + TICK + EPS
    lan.run(10)
    assert a.state is State.FAULT
    a.set_fault(False, lan.now)
    lan.settle()
    assert lan.events[-1] == (0, lan.now, StateChange(State.FAULT, State.BACKUP,
                                                       Reason.FAULT_CLEARED))
    lan.run(6)
    assert lan.states() == [State.MASTER, State.BACKUP]


def test_fault_before_start_and_owner_leaving_fault() -> None:
    owner = machine(255, A_ADDR)
    owner.set_fault(True, 0.0)
    owner.start(0.0)
    assert (owner.state, owner.adverts_to_send()) == (State.FAULT, [])
    owner.set_fault(False, 1.0)
    assert owner.state is State.MASTER
    assert [e.reason for e in iter(owner.next_event, None)] == [Reason.FAULT, Reason.FAULT_CLEARED]
    assert owner.adverts_to_send()[0].priority == 255


def test_adverts_ignored_in_fault_and_init() -> None:
    m = machine(100, A_ADDR)
    m.receive(Advert(B_ADDR, 51, 0, 100, (VIP,)), 0.0)
    m.set_fault(True, 0.0)
    m.start(0.0)
    m.receive(Advert(B_ADDR, 51, 0, 100, (VIP,)), 1.0)
    assert m.state is State.FAULT
    assert m.get_timer() is None
    assert m.adverts_received == 2


def test_shutdown_from_backup_is_silent() -> None:
    m = machine(100, A_ADDR)
    m.start(0.0)
    m.shutdown(1.0)
    assert (m.state, m.get_timer(), m.adverts_to_send()) == (State.INIT, None, [])
    m.start(2.0)
    assert m.state is State.BACKUP


# ------------------------------------------------------------------ hostile adverts


def _hostile() -> list[tuple[Advert, RejectReason]]:
    return [
        (Advert(C_ADDR, 52, 255, 100, (VIP,)), RejectReason.VRID),
        (Advert(C_ADDR, 51, 255, 100, (VIP, GW)), RejectReason.ADDRESS_LIST),
        (Advert(C_ADDR, 51, 255, 100, ()), RejectReason.ADDRESS_LIST),
        (Advert(C_ADDR, 51, 0, 100, (GW,)), RejectReason.ADDRESS_LIST),
        (Advert(C_ADDR, 51, 255, 0, (VIP,)), RejectReason.INTERVAL),
    ]


@pytest.mark.parametrize("state", [State.MASTER, State.BACKUP])
def test_hostile_adverts_change_nothing(state: State) -> None:
    m = machine(200 if state is State.MASTER else 100, A_ADDR)
    m.start(0.0)
    if state is State.MASTER:
        m.handle_timer(m.get_timer() or 0.0)
    m.adverts_to_send()
    while m.next_event() is not None:
        pass
    timer, sent = m.get_timer(), m.adverts_sent
    for advert, reason in _hostile():
        assert m.receive(advert, 4.0) is reason
    assert (m.state, m.get_timer(), m.adverts_sent) == (state, timer, sent)
    assert m.adverts_to_send() == []
    assert m.next_event() is None
    assert m.dropped == {RejectReason.VRID: 1, RejectReason.ADDRESS_LIST: 3,
                         RejectReason.INTERVAL: 1}
    assert m.adverts_received == 5


def test_address_list_compared_as_a_set() -> None:
    m = machine(100, A_ADDR, addresses=(VIP, GW))
    m.start(0.0)
    assert m.receive(Advert(C_ADDR, 51, 200, 100, (GW, VIP)), 1.0) is None
    assert m.get_timer() == pytest.approx(1.0 + m.master_down_interval)


def test_hostile_packets_never_reach_a_machine() -> None:
    """Every packet-level rejection (see test_vrrp_packet) stops before the machine."""
    from tests.unit.test_vrrp_packet import HOSTILE

    m = machine(100, A_ADDR, addresses=(VIP, GW))
    m.start(0.0)
    timer = m.get_timer()
    for _, packet, reason in HOSTILE:
        result = parse_advert(packet)
        assert not isinstance(result, Advert), reason
    assert (m.state, m.get_timer(), m.adverts_received) == (State.BACKUP, timer, 0)


# ------------------------------------------------------------------ sync groups


def _pair_with_groups(*, group_b: bool = True) -> Lan:
    a_front = machine(200, A_ADDR, vrid=51)
    a_back = machine(200, A_ADDR, vrid=52, addresses=(GW,))
    b_front = machine(100, B_ADDR, vrid=51)
    b_back = machine(100, B_ADDR, vrid=52, addresses=(GW,))
    groups = [GroupSync("pair", [a_front, a_back])]
    if group_b:
        groups.append(GroupSync("pair", [b_front, b_back]))
    return Lan([a_front, a_back, b_front, b_back], groups=groups)


def test_group_members_become_master_together() -> None:
    lan = _pair_with_groups()
    lan.start()
    lan.run(8)
    assert lan.states() == [State.MASTER, State.MASTER, State.BACKUP, State.BACKUP]
    assert lan.became(0, State.MASTER)[0][0] == lan.became(1, State.MASTER)[0][0]


def test_group_fault_of_one_member_moves_the_whole_group() -> None:
    lan = _pair_with_groups()
    lan.start()
    lan.run(8)
    a_front, a_back, _, _ = lan.machines
    a_front.set_fault(True, lan.now)
    lan.settle()
    assert a_front.state is State.FAULT
    assert a_back.state is State.BACKUP
    assert lan.became(1, State.BACKUP)[-1][1].reason is Reason.GROUP
    # Both members announced priority 0: the peer's group takes over after Skew_Time.
    lan.run(1)
    assert lan.states() == [State.FAULT, State.BACKUP, State.MASTER, State.MASTER]
    # a_back outranks b_back but is held by its group: no flapping.
    transitions = a_back.transitions
    lan.run(20)
    assert lan.states() == [State.FAULT, State.BACKUP, State.MASTER, State.MASTER]
    assert a_back.transitions == transitions
    assert a_back.wants_master
    # Fault cleared: a_front preempts and the group follows it as one.
    a_front.set_fault(False, lan.now)
    lan.run(8)
    assert lan.states() == [State.MASTER, State.MASTER, State.BACKUP, State.BACKUP]
    assert lan.became(0, State.MASTER)[-1][0] == lan.became(1, State.MASTER)[-1][0]


def test_group_member_losing_election_forces_the_others_to_backup() -> None:
    lan = _pair_with_groups(group_b=False)
    lan.start()
    lan.run(8)
    a_front, _, b_front, _ = lan.machines
    b_front.set_priority(250, lan.now)
    lan.run(6)
    assert a_front.state is State.BACKUP
    assert lan.became(0, State.BACKUP)[-1][1].reason is Reason.HIGHER_PRIORITY
    assert lan.became(1, State.BACKUP)[-1][1].reason is Reason.GROUP
    assert lan.states() == [State.BACKUP, State.BACKUP, State.MASTER, State.MASTER]
    transitions = [m.transitions for m in lan.machines]
    lan.run(20)
    assert [m.transitions for m in lan.machines] == transitions


def test_force_backup_keeps_timers() -> None:
    m = machine(200, A_ADDR)
    m.start(0.0)
    m.handle_timer(m.get_timer() or 0.0)
    m.adverts_to_send()
    m.force_backup(7.0)
    assert m.state is State.BACKUP
    assert m.adverts_to_send() == [AdvertOut(51, 0, 100, (VIP,))]
    assert m.get_timer() == pytest.approx(7.0 + m.master_down_interval)
    m.force_backup(7.5)
    assert m.get_timer() == pytest.approx(7.0 + m.master_down_interval)


# ------------------------------------------------------------------ invariants

OPS = st.lists(
    st.tuples(
        st.sampled_from(["tick", "advert", "prio", "fault", "shutdown", "start", "force"]),
        st.integers(0, 255),
        st.floats(0.0, 2.0),
    ),
    max_size=60,
)


@settings(max_examples=200)
@given(OPS)
def test_machine_invariants_under_any_input(ops: list[tuple[str, int, float]]) -> None:
    m = machine(100, A_ADDR, interval=0.2, preempt_delay=0.5)
    now = 0.0
    for op, value, dt in ops:
        now += dt
        # What the runner does: a due deadline fires before any later input.
        while (due := m.get_timer()) is not None and due <= now:
            m.handle_timer(due)
        assert all(out.priority in (0, m.priority) for out in m.adverts_to_send())
        if op == "tick":
            pass
        elif op == "advert":
            m.receive(Advert(B_ADDR if value % 2 else 0, 51, value, value % 4, (VIP,)), now)
        elif op == "prio":
            m.set_priority(value, now)
        elif op == "fault":
            m.set_fault(bool(value % 2), now)
        elif op == "shutdown":
            m.shutdown(now)
        elif op == "start":
            m.start(now)
        else:
            m.force_backup(now)
        timer = m.get_timer()
        if m.state in (State.INIT, State.FAULT):
            assert timer is None
        if m.state is State.MASTER:
            assert timer is not None
        if timer is not None:
            assert timer >= now
        for out in m.adverts_to_send():
            assert out.priority in (0, m.priority)


# ------------------------------------------------------------------ the runner (vrrp_io)


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float, callback: Callable[[], object]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False
        loop.timers.append(self)

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time / call_at / add_reader / remove_reader on a float clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeHandle] = []
        self.readers: dict[int, Callable[[], object]] = {}

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        return FakeHandle(self, when, callback)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def pending(self) -> list[FakeHandle]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while due := sorted((t for t in self.pending() if t.when <= end), key=lambda t: t.when):
            handle = due[0]
            handle.cancelled = True
            # asyncio may run a timer up to a clock resolution early.
            self.now = max(self.now, handle.when - 1e-9)
            handle.callback()
        self.now = end


class FakeTransport:
    def __init__(self) -> None:
        self.inbox: list[bytes | OSError] = []
        self.sent: list[tuple[bytes, int, int]] = []
        self.fail_sends = False
        self.closed = False

    def fileno(self) -> int:
        return 42

    def recv_packet(self) -> bytes | None:
        if not self.inbox:
            return None
        item = self.inbox.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def send_advert(self, payload: bytes, src: int, dst: int) -> None:
        if self.fail_sends:
            raise OSError(101, "Network is unreachable")
        self.sent.append((payload, src, dst))

    def close(self) -> None:
        self.closed = True

    def sent_adverts(self) -> list[tuple[int, Advert]]:
        out = []
        for payload, src, dst in self.sent:
            parsed = parse_advert(ipv4_packet(src, dst, payload))
            assert isinstance(parsed, Advert)
            out.append((dst, parsed))
        return out


@dataclass
class Rig:
    loop: FakeLoop
    transport: FakeTransport
    runner: VrrpRunner
    events: list[tuple[str, StateChange]]


def rig(machines: Sequence[tuple[str, VrrpMachine, tuple[int, ...]]],
        callback: Callable[[str, StateChange], None] | None = None) -> Rig:
    loop, transport = FakeLoop(), FakeTransport()
    events: list[tuple[str, StateChange]] = []

    def record(name: str, event: StateChange) -> None:
        events.append((name, event))
        if callback is not None:
            callback(name, event)

    runner = VrrpRunner(loop, transport, A_ADDR,
                        [RunnerInstance(name, m, peers) for name, m, peers in machines], record)
    return Rig(loop, transport, runner, events)


def peer_packet(vrid: int = 51, priority: int = 150, *, src: int = B_ADDR,
                addresses: tuple[int, ...] = (VIP,), ttl: int = 255) -> bytes:
    payload = encode_advert(vrid, priority, 100, addresses, src, VRRP_MULTICAST_GROUP)
    return ipv4_packet(src, VRRP_MULTICAST_GROUP, payload, ttl=ttl)


def test_runner_owner_start_sends_and_reports() -> None:
    r = rig([("front", machine(255, A_ADDR, interval=0.1), ())])
    r.runner.start()
    assert r.events == [("front", StateChange(State.INIT, State.MASTER, Reason.OWNER))]
    assert r.transport.sent_adverts() == [
        (VRRP_MULTICAST_GROUP, Advert(A_ADDR, 51, 255, 10, (VIP,)))
    ]
    assert [t.when for t in r.loop.pending()] == [pytest.approx(100.1)]
    r.loop.advance(0.55)
    assert len(r.transport.sent) == 6
    assert 42 in r.loop.readers


def test_runner_backup_times_out_on_one_timer() -> None:
    front = machine(100, A_ADDR)
    back = machine(100, A_ADDR, vrid=52, addresses=(GW,), interval=0.5)
    r = rig([("front", front, ()), ("back", back, ())])
    r.runner.start()
    assert len(r.loop.pending()) == 1
    assert r.loop.pending()[0].when == pytest.approx(100 + back.master_down_interval)
    r.runner.datagram_received(peer_packet(vrid=51, priority=200))
    r.loop.advance(back.master_down_interval + 0.001)
    assert (front.state, back.state) == (State.BACKUP, State.MASTER)
    assert r.events[-1] == ("back", StateChange(State.BACKUP, State.MASTER, Reason.MASTER_DOWN))
    assert len(r.loop.pending()) == 1


def test_runner_drops_and_counts_what_is_not_for_us() -> None:
    m = machine(100, A_ADDR)
    r = rig([("front", m, ())])
    r.runner.start()
    timer = m.get_timer()
    for packet in [b"", b"\x45" * 7, peer_packet(ttl=64), peer_packet(vrid=9),
                   peer_packet(src=A_ADDR), peer_packet(addresses=(GW,)),
                   peer_packet()[:-1] + b"\x00"]:
        r.transport.inbox.append(packet)
    r.loop.readers[42]()
    assert r.runner.dropped == {
        RejectReason.LENGTH: 2, RejectReason.TTL: 1, RejectReason.VRID: 1,
        RejectReason.OWN_ADDRESS: 1, RejectReason.CHECKSUM: 1,
    }
    assert m.dropped == {RejectReason.ADDRESS_LIST: 1}
    assert r.runner.packets_received == 7
    assert (m.state, m.get_timer()) == (State.BACKUP, timer)
    assert r.transport.sent == []


def test_runner_reader_survives_socket_errors_and_bounds_its_batch() -> None:
    r = rig([("front", machine(100, A_ADDR), ())])
    r.runner.start()
    r.transport.inbox.extend([peer_packet(), OSError(100, "Network is down"), peer_packet()])
    r.loop.readers[42]()
    assert (r.runner.recv_errors, r.runner.packets_received, len(r.transport.inbox)) == (1, 1, 1)
    r.transport.inbox.extend([peer_packet()] * (VrrpRunner.RECV_BATCH + 5))
    r.loop.readers[42]()
    assert len(r.transport.inbox) == 6


def test_runner_unicast_peers() -> None:
    peer2 = ip_to_int("198.51.100.9")
    m = machine(255, A_ADDR)
    r = rig([("front", m, (B_ADDR, peer2))])
    r.runner.start()
    assert [(dst, a.priority) for dst, a in r.transport.sent_adverts()] == [
        (B_ADDR, 255), (peer2, 255)
    ]
    r.runner.datagram_received(peer_packet(src=C_ADDR, priority=0))
    assert r.runner.dropped == {RejectReason.UNKNOWN_PEER: 1}
    r.runner.datagram_received(peer_packet(src=B_ADDR, priority=0))
    assert len(r.transport.sent) == 4


def test_runner_stop_sends_priority_zero_and_closes() -> None:
    r = rig([("front", machine(255, A_ADDR), ())])
    r.runner.start()
    r.runner.stop()
    assert r.transport.sent_adverts()[-1][1].priority == 0
    assert r.events[-1] == ("front", StateChange(State.MASTER, State.INIT, Reason.SHUTDOWN))
    assert r.transport.closed
    assert r.loop.readers == {}
    assert r.loop.pending() == []


def test_runner_counts_send_errors_and_callback_errors(caplog: pytest.LogCaptureFixture) -> None:
    def explode(name: str, event: StateChange) -> None:
        raise RuntimeError("notify script crashed")

    r = rig([("front", machine(255, A_ADDR), ())], callback=explode)
    r.transport.fail_sends = True
    with caplog.at_level(logging.ERROR):
        r.runner.start()
    assert (r.runner.send_errors, r.runner.callback_errors) == (1, 1)
    assert "state-change callback failed" in caplog.text
    assert r.runner.machine("front").state is State.MASTER


def test_runner_tracking_api_and_group_hook() -> None:
    front = machine(200, A_ADDR)
    back = machine(200, A_ADDR, vrid=52, addresses=(GW,))
    group = GroupSync("pair", [front, back])
    loop, transport = FakeLoop(), FakeTransport()
    runner = VrrpRunner(loop, transport, A_ADDR,
                        [RunnerInstance("front", front), RunnerInstance("back", back)],
                        lambda name, event: None, on_step=group.reconcile)
    runner.start()
    loop.advance(5)
    assert (front.state, back.state) == (State.MASTER, State.MASTER)
    runner.set_fault("back", True)
    assert (front.state, back.state) == (State.BACKUP, State.FAULT)
    assert [a.priority for _, a in transport.sent_adverts()[-2:]] == [0, 0]
    runner.set_fault("back", False)
    runner.set_priority("front", 100)
    assert front.priority == 100
    loop.advance(5)
    assert (front.state, back.state) == (State.MASTER, State.MASTER)


def test_runner_refuses_duplicate_vrids() -> None:
    with pytest.raises(ValueError, match="VRID 51"):
        rig([("a", machine(100, A_ADDR), ()), ("b", machine(100, A_ADDR), ())])


# ------------------------------------------------------------------ blips and pauses (issue 10)


def announcements(m: VrrpMachine) -> list[int]:
    out = []
    while (a := m.next_announcement()) is not None:
        out.append(a.rival)
    return out


def test_master_reannounces_once_a_rival_master_steps_down() -> None:
    """keepalived #166: a backup that wrongly took over for a moment sent GARPs; the real
    master tells it at once and announces again once it is quiet."""
    lan = Lan([machine(200, A_ADDR, interval=0.03), machine(100, B_ADDR, interval=0.03)])
    lan.start()
    lan.run(1)
    assert lan.states() == [State.MASTER, State.BACKUP]
    master, backup = lan.machines
    # The blip: the backup misses the master's adverts (a starved loop) and takes over.
    lan.cut.add(0)
    lan.run_until(lambda: backup.state is State.MASTER, 1)
    assert master.state is State.MASTER
    lan.cut.discard(0)
    lan.run_until(lambda: backup.state is State.BACKUP, 1)
    assert master.state is State.MASTER
    assert master.rival_adverts >= 1
    assert announcements(master) == []  # not while the rival's own ARPs may be in flight
    quiet = lan.now + 3 * 0.03
    lan.run_until(lambda: master.reannouncements == 1, 1)
    assert lan.now >= quiet - EPS
    assert announcements(master) == [B_ADDR]
    lan.run(2)
    assert master.reannouncements == 1 and announcements(master) == []


def test_a_rival_that_keeps_claiming_is_answered_once_and_not_announced_against() -> None:
    m = machine(200, A_ADDR, interval=0.1)
    m.start(0.0)
    m.handle_timer(m.get_timer() or 0.0)
    m.handle_timer(m.get_timer() or 0.0)
    assert m.state is State.MASTER
    m.adverts_to_send()
    now = 1.0
    for _ in range(20):
        m.receive(Advert(B_ADDR, 51, 100, 10, (VIP,)), now)
        while (due := m.get_timer()) is not None and due <= now + 0.1:
            m.handle_timer(due)
        now += 0.1
    assert m.rival_adverts == 20
    assert sum(a.priority for a in m.adverts_to_send()) > 0
    assert m.reannouncements == 0
    while (due := m.get_timer()) is not None and due <= now + 1:
        m.handle_timer(due)
    assert announcements(m) == [B_ADDR]


def test_leaving_master_drops_a_pending_reannouncement() -> None:
    m = machine(200, A_ADDR, interval=0.1)
    m.start(0.0)
    while m.state is not State.MASTER:
        m.handle_timer(m.get_timer() or 0.0)
    m.receive(Advert(B_ADDR, 51, 100, 10, (VIP,)), 1.0)
    m.receive(Advert(C_ADDR, 51, 250, 10, (VIP,)), 1.05)
    assert m.next_event() is not None and m.wants_master is False
    m.handle_timer(1.5)
    assert announcements(m) == [] and m.reannouncements == 0


def test_runner_reports_reannouncements() -> None:
    loop, transport = FakeLoop(), FakeTransport()
    seen: list[tuple[str, int]] = []
    runner = VrrpRunner(loop, transport, A_ADDR,
                        [RunnerInstance("front", machine(255, A_ADDR, interval=0.1))],
                        lambda name, event: None,
                        on_announce=lambda name, a: seen.append((name, a.rival)))
    runner.start()
    runner.datagram_received(peer_packet(priority=100))  # its interval: 1 s
    loop.advance(2.9)
    assert seen == []
    loop.advance(0.2)
    assert seen == [("front", B_ADDR)]


def test_runner_reads_queued_adverts_before_an_overdue_timer_acts() -> None:
    """A thawed backup (SIGSTOP, VM freeze): its Master_Down_Timer is long overdue and the
    socket holds the live master's adverts. uvloop runs the timer first; the runner must read
    them before the machine decides, so the backup never claims master."""
    m = machine(100, A_ADDR, interval=0.1)
    r = rig([("front", m, ())])
    r.runner.start()
    r.runner.datagram_received(peer_packet(priority=200))
    assert m.state is State.BACKUP
    # Paused for 5 s (Master_Down_Interval is 3.6 s): the master kept advertising once a
    # second, nothing was read.
    r.transport.inbox.extend([peer_packet(priority=200)] * 5)
    r.loop.advance(5.0)  # only the timer runs (the fake loop never calls the reader)
    assert m.state is State.BACKUP
    assert r.transport.inbox == []
    assert [e for _, e in r.events if e.new is State.MASTER] == []
    assert r.transport.sent == []
    # Without adverts the same timer does take over.
    r.loop.advance(4.0)
    assert r.events[-1][1].new is State.MASTER


def test_runner_counts_how_late_its_timer_ran() -> None:
    """The lateness histogram: the loop's time at the timer callback minus the deadline
    (an advert of a master leaves right then); a timer run on time, or a clock resolution
    early, counts as 0."""
    r = rig([("front", machine(255, A_ADDR, interval=0.1), ())])
    r.runner.start()
    r.loop.advance(0.25)  # two timers, on time
    assert r.runner.timer_late.counts[0] == 2 and r.runner.timer_late.count == 2
    assert r.runner.timer_late.max == 0.0
    (handle,) = r.loop.pending()
    r.loop.now = handle.when + 0.03  # the loop woke 30 ms late
    handle.cancelled = True
    sent = len(r.transport.sent)
    handle.callback()
    assert len(r.transport.sent) == sent + 1  # the advert left then
    bounds = VrrpRunner.LATE_BUCKETS
    assert r.runner.timer_late.counts[bounds.index(0.05)] == 1
    assert r.runner.timer_late.max == pytest.approx(0.03)
    assert r.runner.timer_late.sum == pytest.approx(0.03)
    r.loop.now = r.loop.pending()[0].when + 0.5  # beyond the last bound
    r.loop.pending()[0].callback()
    assert r.runner.timer_late.counts[-1] == 1
