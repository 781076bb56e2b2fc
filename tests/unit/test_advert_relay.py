"""ha.advert_relay: the schedule of copies (pure), the runner's reports to it, and the child
process end to end over its socketpair (a UDP socket stands in for the VRRP socket)."""

from __future__ import annotations

import socket

import pytest

from ha.advert_relay import FILL_AFTER, MAX_FILLS, AdvertRelay, FillIn
from ha.vrrp_machine import State
from tests.unit.test_vrrp_machine import A_ADDR, machine, peer_packet, rig

KEY = (1, 51, 0xE0000012)


def test_a_copy_is_due_fill_after_intervals_after_the_last_advert() -> None:
    fill = FillIn()
    assert fill.due() is None and fill.take_due(100.0) == []
    fill.sent(KEY, b"advert", 0x0A000001, 0.03, 100.0)
    assert fill.due() == pytest.approx(100.0 + FILL_AFTER * 0.03)
    assert fill.take_due(100.03) == []  # the runner's next advert is not late yet
    fill.sent(KEY, b"advert2", 0x0A000001, 0.03, 100.03)  # ...and here it is
    assert fill.take_due(100.03 + FILL_AFTER * 0.03) == [(KEY, b"advert2", 0x0A000001)]


def test_at_most_max_fills_copies_in_a_row_then_silence() -> None:
    fill = FillIn()
    fill.sent(KEY, b"a", 1, 0.1, 0.0)
    now, copies = 0.0, 0
    for _ in range(MAX_FILLS + 5):
        due = fill.due()
        if due is None:
            break
        now = due
        copies += len(fill.take_due(now))
    assert copies == MAX_FILLS
    assert len(fill) == 0  # a master stuck longer than that loses its role, as it should
    fill.sent(KEY, b"a", 1, 0.1, now)  # the runner is back: copies again if it is late
    assert fill.due() is not None


def test_stop_by_vrid_and_by_socket() -> None:
    fill = FillIn()
    fill.sent((1, 51, 9), b"a", 1, 0.1, 0.0)
    fill.sent((1, 52, 9), b"b", 1, 0.1, 0.0)
    fill.sent((2, 51, 9), b"c", 1, 0.1, 0.0)
    fill.stop(1, 51)
    assert len(fill) == 2
    fill.stop(1)
    assert [k for k, _, _ in fill.take_due(1.0)] == [(2, 51, 9)]


class FakeCopies:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def sent(self, vrid: int, interval: float, src: int, dst: int, payload: bytes) -> None:
        assert src == A_ADDR and payload
        self.calls.append(("sent", vrid))

    def stop(self, vrid: int = 0) -> None:
        self.calls.append(("stop", vrid))

    def close(self) -> None:
        self.calls.append(("close", 0))


def test_the_runner_reports_each_advert_and_stops_copies_when_it_leaves_master() -> None:
    m = machine(200, A_ADDR, interval=0.1)
    r = rig([("front", m, ())])
    copies = FakeCopies()
    r.runner.copies = copies
    r.runner.start()
    r.loop.advance(m.master_down_interval + 0.01)
    assert m.state is State.MASTER
    sent = copies.calls.count(("sent", 51))
    assert sent >= 1 and ("stop", 51) not in copies.calls
    r.runner.datagram_received(peer_packet(priority=250))  # a better master: step down
    assert m.state.value == State.BACKUP.value
    assert copies.calls[-1] == ("stop", 51)


def test_a_priority_zero_advert_stops_the_copies_and_stop_closes() -> None:
    r = rig([("front", machine(255, A_ADDR, interval=0.1), ())])
    copies = FakeCopies()
    r.runner.copies = copies
    r.runner.start()
    assert copies.calls == [("sent", 51)]
    r.runner.stop()  # the shutdown advert (priority 0) is not to be repeated
    # stopped by the priority-0 advert, and again as the machine leaves MASTER; then closed
    assert copies.calls[1:] == [("stop", 51), ("stop", 51), ("close", 0)]
    assert r.runner.copies is None


def test_the_relay_process_starts_takes_a_socket_and_exits_when_lbd_closes_its_end() -> None:
    """The child's life cycle (its copies on a real VRRP socket: tests/netns/
    test_vrrp_load.py::test_a_paused_master_keeps_its_role_through_the_relay)."""
    relay = AdvertRelay()
    assert relay.start()
    proc = relay._proc
    assert proc is not None
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        link = relay.attach(tx, 1)
        assert link is not None and link.sid == 1
        link.sent(51, 0.02, 0x7F000001, 0x7F000001, b"advert")
        link.stop(51)
        link.close()
        relay.read_reports()
        assert relay.alive and proc.poll() is None
    finally:
        tx.close()
        relay.close()
    assert not relay.alive and proc.returncode == 0
    assert relay.attach(tx, 1) is None  # a closed relay: no link, the runner sends alone
