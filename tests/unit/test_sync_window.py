"""Acknowledgement bookkeeping of the sync sender, on a float clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ha.sync_window import AckWindow, Backlog


def test_an_empty_window_has_nothing_unacknowledged() -> None:
    w = AckWindow()
    assert w.unacked == 0 and w.oldest_unacked_age(100.0) == 0.0


def test_applied_pops_every_write_at_or_below_the_sequence() -> None:
    w = AckWindow()
    w.sent(1, 1, 10.0)  # Hello
    w.sent(3, 2001, 10.0)  # a snapshot chunk of two frames
    w.sent(4, 5, 10.5)
    assert w.unacked == 2007
    assert w.oldest_unacked_age(11.0) == pytest.approx(1.0)
    assert w.applied(2)  # half of the chunk: it stays
    assert w.unacked == 2006 and w.oldest_unacked_age(11.0) == pytest.approx(1.0)
    assert w.applied(3)
    assert w.unacked == 5 and w.oldest_unacked_age(11.0) == pytest.approx(0.5)
    assert w.applied(4)
    assert w.unacked == 0 and w.oldest_unacked_age(11.0) == 0.0


def test_heartbeat_writes_advance_the_position_but_count_nothing() -> None:
    w = AckWindow()
    w.sent(1, 3, 0.0)
    w.sent(2, 0, 0.5)  # a heartbeat
    assert w.unacked == 3 and w.sent_sequence == 2
    assert w.applied(2)  # the peer acknowledges the heartbeat's frame too
    assert w.unacked == 0 and w.acked_sequence == 2


def test_an_old_acknowledgement_changes_nothing() -> None:
    w = AckWindow()
    w.sent(1, 1, 0.0)
    w.sent(2, 1, 0.0)
    assert w.applied(2)
    w.sent(3, 4, 1.0)
    assert w.applied(1) and w.unacked == 4 and w.acked_sequence == 2


def test_an_acknowledgement_ahead_of_what_was_sent_is_refused() -> None:
    w = AckWindow()
    w.sent(2, 7, 0.0)
    assert not w.applied(3)
    assert w.unacked == 7 and w.acked_sequence == 0


def test_clear_forgets_the_connection() -> None:
    w = AckWindow()
    w.sent(5, 9, 0.0)
    w.clear()
    assert w.unacked == 0 and w.sent_sequence == 0 and w.oldest_unacked_age(9.0) == 0.0
    assert not w.applied(1)  # a new connection starts at sequence 1 again


def test_the_age_never_goes_negative() -> None:
    w = AckWindow()
    w.sent(1, 1, 10.0)
    assert w.oldest_unacked_age(9.0) == 0.0


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 50)), min_size=1, max_size=40),
       st.lists(st.integers(0, 200), max_size=10))
def test_unacked_is_what_was_sent_after_the_last_acknowledgement(
        writes: list[tuple[int, int]], acks: list[int]) -> None:
    w = AckWindow()
    seq, log = 0, []
    for frames, records in writes:
        seq += frames
        w.sent(seq, records, float(seq))
        log.append((seq, records))
    acked = 0
    for a in acks:
        assert w.applied(a) == (a <= seq)
        if a <= seq:
            acked = max(acked, a)
    assert w.unacked == sum(r for s, r in log if s > acked)
    waiting = [s for s, r in log if s > acked and r > 0]
    assert w.oldest_unacked_age(1000.0) == (1000.0 - waiting[0] if waiting else 0.0)


# ---- Backlog ------------------------------------------------------------------------------

def test_a_buffer_within_the_limit_is_never_over() -> None:
    b = Backlog(1000)
    assert not b.over(0) and not b.over(1000)


def test_live_records_past_the_limit_are_over() -> None:
    b = Backlog(1000)
    assert b.over(1001)


def test_a_snapshot_bigger_than_the_limit_does_not_cut_itself() -> None:
    b = Backlog(1000)
    buffered = 0
    for _ in range(50):  # 50 chunks of 300 bytes, nothing drained
        b.snapshot_written(300)
        buffered += 300
        assert not b.over(buffered)
    assert b.over(buffered + 1001)  # the limit still holds beyond the snapshot


def test_the_allowance_ends_once_the_snapshot_has_left() -> None:
    b = Backlog(1000)
    b.snapshot_written(5000)
    assert not b.over(5000)
    assert not b.over(800)  # drained: the snapshot has left
    assert b.allowance == 0
    assert b.over(1500)  # a frozen peer after its snapshot: cut at the limit again


def test_clear_forgets_the_allowance() -> None:
    b = Backlog(1000)
    b.snapshot_written(5000)
    b.clear()
    assert b.over(5000)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5000), st.integers(0, 5000)),
                max_size=60))
def test_a_snapshot_alone_never_cuts_and_the_bound_is_limit_plus_snapshots(
        steps: list[tuple[bool, int, int]]) -> None:
    """Writes (snapshot or live) of some bytes, then some drained: a snapshot's write never
    cuts, a cut means past the limit, and a connection that stays holds at most the limit
    plus the snapshots still allowed."""
    b = Backlog(2000)
    buffered = 0
    for snapshot, wrote, drained in steps:
        buffered += wrote
        if snapshot:
            b.snapshot_written(wrote)
        cut = b.over(buffered)
        if snapshot:
            assert not cut
        if cut:
            assert buffered > 2000
            return
        assert buffered <= 2000 + b.allowance  # what a connection may hold
        buffered = max(0, buffered - drained)


def test_bytes_count_every_write_and_leave_with_their_acknowledgement() -> None:
    w = AckWindow()
    w.sent(1, 3, 0.0, 300)
    w.sent(2, 0, 0.1, 20)  # a heartbeat: no record, but bytes in the pipe
    w.sent(3, 1, 0.2, 100)
    assert w.unacked_bytes == 420 and w.unacked == 4
    w.applied(2)
    assert w.unacked_bytes == 100 and w.unacked == 1
    w.clear()
    assert w.unacked_bytes == 0


def test_each_change_counts_its_delay_from_queued_to_the_acknowledgement() -> None:
    w = AckWindow()
    w.sent(1, 1, 0.0)  # a hello: no queued_at, no delay
    w.sent(2, 3, 10.002, 90, queued_at=10.0)  # three changes queued at 10.0
    w.sent(3, 2000, 10.003, 48_000)  # a snapshot chunk: not changes
    w.sent(4, 1, 10.004, 30, queued_at=10.004)
    assert w.applied(3, 10.012)
    assert w.delays.count == 3 and w.delays.sum == pytest.approx(0.036)
    assert w.applied(4, 10.024)
    assert w.delays.count == 4
    assert [n for _, n in w.delays.cumulative()][-1] == 4
    assert w.delays.quantile(0.5) == pytest.approx(0.01 + 0.005 * 2 / 3)  # 3 in (10, 15] ms
    w.clear()  # the histogram is the node's: it outlives the connection
    assert w.delays.count == 4


def test_an_acknowledgement_without_its_arrival_time_counts_no_delay() -> None:
    w = AckWindow()
    w.sent(1, 5, 0.0, 100, queued_at=0.0)
    assert w.applied(1)
    assert w.unacked == 0 and w.delays.count == 0
