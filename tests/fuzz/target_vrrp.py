"""Fuzz target: received VRRP packets through ``parse_advert`` and the runner into the machines.

Input: one setup byte, then IPv4 packets as :func:`tests.fuzz.wire.split` records, fed with
``VrrpRunner.datagram_received`` (what the raw-socket reader does) on a fake loop. The runner
holds two instances on one interface: ``front`` (VRID 51, multicast) and ``back`` (VRID 52).
The setup byte puts ``front`` in BACKUP, MASTER, FAULT or non-preempting BACKUP (bits 0-1),
gives ``back`` a unicast peer list (bit 2), and makes ``front`` the address owner (bit 3).

Invariants, per packet:

- nothing raises; ``parse_advert`` returns an Advert with in-range fields that survives an
  encode/parse round trip, or a Reject;
- each packet is counted exactly once: by the runner (``dropped``, no machine sees it) or by
  the one machine of its VRID (``adverts_received``);
- an advert a machine rejects is counted in its ``dropped`` under the returned reason and
  changes nothing else: state, priority, timer, master, learned interval, adverts sent,
  state changes.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ha.vrrp_io import RunnerInstance, VrrpRunner
from ha.vrrp_machine import StateChange, VrrpConfig, VrrpMachine
from ha.vrrp_packet import (
    VRRP_MULTICAST_GROUP,
    Advert,
    encode_advert,
    ipv4_packet,
    parse_advert,
)
from lb.addr import ip_to_int
from tests.fuzz import wire
from tests.fuzz.targets import Target
from tests.unit.test_vrrp_machine import FakeLoop, FakeTransport

OWN = ip_to_int("198.51.100.2")
PEER = ip_to_int("198.51.100.3")
STRANGER = ip_to_int("198.51.100.9")
VIP = ip_to_int("198.51.100.10")
GW = ip_to_int("198.18.0.1")
FRONT, BACK = 51, 52


class Rig:
    """A runner with its two machines on a fake loop, set up from the setup byte."""

    def __init__(self, flags: int) -> None:
        mode = flags & 3
        front = VrrpMachine(VrrpConfig(
            vrid=FRONT, priority=255 if flags & 8 else 150, advert_interval=1.0,
            primary_address=OWN, addresses=(VIP,), preempt=mode != 3))
        back = VrrpMachine(VrrpConfig(vrid=BACK, priority=100, advert_interval=0.1,
                                      primary_address=OWN, addresses=(GW,)))
        self.loop = FakeLoop()
        self.transport = FakeTransport()
        self.events: list[tuple[str, StateChange]] = []
        peers = (PEER,) if flags & 4 else ()
        self.runner = VrrpRunner(
            self.loop, self.transport, OWN,
            [RunnerInstance("front", front), RunnerInstance("back", back, peers)],
            lambda name, change: self.events.append((name, change)))
        self.machines = {FRONT: front, BACK: back}
        if mode == 2:
            front.set_fault(True, self.loop.now)
        self.runner.start()
        if mode == 1 and not flags & 8:
            self.loop.advance(5.0)  # front's Master_Down_Timer fires: MASTER


def _view(m: VrrpMachine) -> tuple[object, ...]:
    """Everything a caller can see of a machine, but its receive counters."""
    return (m.state, m.priority, m.fault, m.master_adver_interval, m.master_address,
            m.get_timer(), m.wants_master, m.adverts_sent, m.transitions)


def _check_advert(advert: Advert) -> None:
    assert 0 <= advert.vrid <= 255 and 0 <= advert.priority <= 255
    assert 0 <= advert.max_adver_int_cs <= 0x0FFF
    assert len(advert.addresses) <= 255
    assert all(0 <= a <= 0xFFFFFFFF for a in advert.addresses)
    if advert.vrid and advert.max_adver_int_cs and advert.addresses:
        again = parse_advert(ipv4_packet(advert.src, VRRP_MULTICAST_GROUP, encode_advert(
            advert.vrid, advert.priority, advert.max_adver_int_cs, advert.addresses,
            advert.src, VRRP_MULTICAST_GROUP)))
        assert again == advert, f"round trip changed the advert: {again}"


def check(data: bytes) -> None:
    if not data:
        return
    rig = Rig(data[0])
    runner, machines = rig.runner, rig.machines
    for packet in wire.split(data[1:]):
        parsed = parse_advert(packet)
        if isinstance(parsed, Advert):
            _check_advert(parsed)
        runner_drops = sum(runner.dropped.values())
        received = {v: m.adverts_received for v, m in machines.items()}
        drops = {v: dict(m.dropped) for v, m in machines.items()}
        views = {v: _view(m) for v, m in machines.items()}
        sent, events = len(rig.transport.sent), len(rig.events)

        rig.loop.now += 0.01
        runner.datagram_received(packet)

        fed = [v for v, m in machines.items() if m.adverts_received != received[v]]
        if sum(runner.dropped.values()) != runner_drops:
            assert sum(runner.dropped.values()) == runner_drops + 1, "counted twice"
            assert not fed, "a packet the runner dropped reached a machine"
            assert all(_view(m) == views[v] for v, m in machines.items()), "drop changed state"
            continue
        assert isinstance(parsed, Advert), "a packet parse_advert rejects reached a machine"
        assert fed == [parsed.vrid], f"advert for VRID {parsed.vrid} counted by {fed}"
        m = machines[parsed.vrid]
        assert m.adverts_received == received[parsed.vrid] + 1
        grown = {r: n - drops[parsed.vrid].get(r, 0) for r, n in m.dropped.items()
                 if n != drops[parsed.vrid].get(r, 0)}
        assert all(n == 1 for n in grown.values()) and len(grown) <= 1, f"drops grew {grown}"
        if grown:
            assert _view(m) == views[parsed.vrid], f"rejected advert ({grown}) changed state"
            assert len(rig.transport.sent) == sent, "rejected advert made us send"
            assert len(rig.events) == events, "rejected advert changed state"
        other = BACK if parsed.vrid == FRONT else FRONT
        assert _view(machines[other]) == views[other], "advert changed the other instance"


# --- seeds and generation ----------------------------------------------------------------------

def advert_packet(src: int, vrid: int, priority: int, addresses: tuple[int, ...], *,
                  cs: int = 100, dst: int = VRRP_MULTICAST_GROUP, ttl: int = 255,
                  v2_checksum: bool = False) -> bytes:
    payload = encode_advert(vrid, priority, cs, addresses, src, dst, checksum_as_v2=v2_checksum)
    return ipv4_packet(src, dst, payload, ttl=ttl)


def seed_packets() -> list[bytes]:
    return [
        advert_packet(PEER, FRONT, 100, (VIP,)),
        advert_packet(PEER, FRONT, 200, (VIP,)),
        advert_packet(PEER, FRONT, 0, (VIP,)),
        advert_packet(PEER, FRONT, 150, (VIP,), v2_checksum=True),
        advert_packet(PEER, FRONT, 100, (VIP, GW)),
        advert_packet(PEER, BACK, 200, (GW,), cs=10, dst=OWN),
        advert_packet(STRANGER, BACK, 200, (GW,)),
        advert_packet(OWN, FRONT, 100, (VIP,)),
        advert_packet(PEER, 77, 100, (VIP,)),
        advert_packet(PEER, FRONT, 100, (VIP,), ttl=64),
        ipv4_packet(PEER, VRRP_MULTICAST_GROUP, b"\x31\x33\x64\x01\x00\x00\x00\x00", ttl=255),
    ]


def seeds() -> list[bytes]:
    packets = seed_packets()
    return [bytes([flags]) + wire.join([p]) for flags in range(16) for p in packets[:3]] + [
        b"\x00" + wire.join(packets), b"\x01" + wire.join(packets)]


_addr = st.sampled_from([VIP, GW, OWN, PEER, STRANGER]) | st.integers(0, 0xFFFFFFFF)


@st.composite
def _packet(draw: st.DrawFn) -> bytes:
    return advert_packet(
        draw(st.sampled_from([PEER, OWN, STRANGER]) | st.integers(0, 0xFFFFFFFF)),
        draw(st.sampled_from([FRONT, BACK]) | st.integers(1, 255)),
        draw(st.sampled_from([0, 100, 150, 255]) | st.integers(0, 255)),
        tuple(draw(st.lists(_addr, min_size=1, max_size=4))),
        cs=draw(st.integers(1, 0x0FFF)),
        dst=draw(st.sampled_from([VRRP_MULTICAST_GROUP, OWN])),
        ttl=draw(st.sampled_from([255, 255, 1])),
        v2_checksum=draw(st.booleans()),
    )


def inputs() -> st.SearchStrategy[bytes]:
    packets = st.lists(wire.mutated(_packet() | st.binary(max_size=64)), min_size=1, max_size=5)
    built = st.builds(lambda flags, ps: bytes([flags]) + wire.join(ps), st.integers(0, 15),
                      packets)
    return wire.mutated(built | st.sampled_from(seeds()), max_edits=2)


TARGET = Target("vrrp", check, seeds, inputs, max_len=1024)
