"""Schedulers: table-driven cases and named properties (Katran style for Maglev)."""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.addr import ip_to_int
from lb.schedulers import (
    SCHEDULERS,
    Maglev,
    SourceHash,
    client_hash,
    maglev_permutation,
    maglev_populate,
    maglev_table_size,
    make_scheduler,
)
from lb.servers import AdminState, RealServer

FAST = settings(max_examples=40, deadline=None)


def server(last: int, weight: int = 1, *, max_conns: int = 0, active: int = 0) -> RealServer:
    return RealServer(
        pool="web",
        addr=ip_to_int(f"198.18.0.{last}"),
        port=8080,
        weight=weight,
        max_conns=max_conns,
        active=active,
    )


def servers(n: int, weight: int = 1) -> list[RealServer]:
    return [server(11 + i, weight) for i in range(n)]


def client(last: int) -> int:
    return ip_to_int(f"198.51.100.{last}")


def picks(name: str, pool: Sequence[RealServer], count: int) -> list[RealServer | None]:
    sched = make_scheduler(name)
    sched.update(pool)
    return [sched.pick(client(1 + i % 250), 40000 + i) for i in range(count)]


def keys(table: Sequence[RealServer]) -> list[str]:
    return [s.key for s in table]


def last_octets(chosen: Sequence[RealServer | None]) -> list[str]:
    return [s.key.split(":")[0].rsplit(".", 1)[1] if s else "-" for s in chosen]


def spread(counts: Counter[str]) -> int:
    return max(counts.values()) - min(counts.values())


# --------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", SCHEDULERS)
def test_make_scheduler_names(name: str) -> None:
    assert make_scheduler(name).name == name


def test_make_scheduler_unknown() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'random'"):
        make_scheduler("random")


# --------------------------------------------------------------------------- all schedulers


def _down(s: RealServer) -> None:
    s.up = False


def _disabled(s: RealServer) -> None:
    s.admin = AdminState.DISABLED


def _drained(s: RealServer) -> None:
    s.admin = AdminState.DRAIN


def _full(s: RealServer) -> None:
    s.max_conns = 3
    s.active = 3


def _weight0(s: RealServer) -> None:
    s.effective_weight = 0


REFUSALS: list[tuple[str, Callable[[RealServer], None]]] = [
    ("down", _down),
    ("disabled", _disabled),
    ("drain", _drained),
    ("max_conns reached", _full),
    ("weight 0", _weight0),
]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_none_before_any_server(name: str) -> None:
    sched = make_scheduler(name)
    assert sched.pick(client(1), 1) is None
    assert sched.update([]) == 0
    assert sched.pick(client(1), 1) is None


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize(("why", "refuse"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_none_when_nothing_accepts(
    name: str, why: str, refuse: Callable[[RealServer], None]
) -> None:
    # State changes after update(): pick() itself must notice.
    pool = servers(4)
    sched = make_scheduler(name)
    sched.update(pool)
    for s in pool:
        refuse(s)
    assert all(sched.pick(client(c), 1) is None for c in range(1, 50)), why


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize(("why", "refuse"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusing_server_is_skipped(
    name: str, why: str, refuse: Callable[[RealServer], None]
) -> None:
    pool = servers(4)
    sched = make_scheduler(name)
    sched.update(pool)
    refuse(pool[2])
    chosen = [sched.pick(client(c), c) for c in range(1, 200)]
    assert all(s is not None and s is not pool[2] for s in chosen), why
    assert {s.key for s in chosen if s is not None} == {pool[0].key, pool[1].key, pool[3].key}


@pytest.mark.parametrize("name", SCHEDULERS)
@FAST
@given(
    limits=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=8),
    weights=st.lists(st.integers(min_value=1, max_value=5), min_size=8, max_size=8),
)
def test_max_conns_respected(name: str, limits: list[int], weights: list[int]) -> None:
    # Each pick opens a session; a limit of 0 means unlimited, which these tests cap at 6.
    pool = [server(11 + i, weights[i], max_conns=lim) for i, lim in enumerate(limits)]
    sched = make_scheduler(name)
    sched.update(pool)
    capacity = sum(lim for lim in limits if lim) if all(limits) else None
    for i in range(60):
        chosen = sched.pick(client(1 + i), i)
        if chosen is None:
            assert capacity is not None
            assert i == capacity
            break
        chosen.active += 1
        assert chosen.max_conns == 0 or chosen.active <= chosen.max_conns
    else:
        assert capacity is None or capacity >= 60


# --------------------------------------------------------------------------- rr


def test_rr_order_and_wrap() -> None:
    pool = servers(3)
    assert picks("rr", pool, 7) == [pool[0], pool[1], pool[2], pool[0], pool[1], pool[2], pool[0]]


def test_rr_skips_and_resumes() -> None:
    pool = servers(3)
    sched = make_scheduler("rr")
    sched.update(pool)
    assert sched.pick(0, 0) is pool[0]
    pool[1].up = False
    assert [sched.pick(0, 0) for _ in range(3)] == [pool[2], pool[0], pool[2]]
    pool[1].up = True
    assert [sched.pick(0, 0) for _ in range(3)] == [pool[0], pool[1], pool[2]]


def test_rr_update_continues_after_last_pick() -> None:
    pool = servers(4)
    sched = make_scheduler("rr")
    sched.update(pool)
    assert [sched.pick(0, 0) for _ in range(2)] == [pool[0], pool[1]]
    assert sched.update([pool[0], pool[1], pool[3]]) == 0
    assert [sched.pick(0, 0) for _ in range(3)] == [pool[3], pool[0], pool[1]]


# --------------------------------------------------------------------------- wrr


@FAST
@given(st.lists(st.integers(min_value=0, max_value=10), min_size=1, max_size=10))
def test_wrr_exact_over_one_cycle(weights: list[int]) -> None:
    pool = [server(11 + i, w) for i, w in enumerate(weights)]
    positive = [w for w in weights if w > 0]
    if not positive:
        assert picks("wrr", pool, 5) == [None] * 5
        return
    g = math.gcd(*positive)
    cycle = sum(positive) // g
    sched = make_scheduler("wrr")
    sched.update(pool)
    for _ in range(2):  # two consecutive cycles, each exact
        got = Counter(id(sched.pick(0, 0)) for _ in range(cycle))
        assert {id(s): s.weight // g for s in pool if s.weight} == dict(got)


def test_wrr_interleaves() -> None:
    # nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a.
    a, b, c = server(11, 5), server(12, 1), server(13, 1)
    assert picks("wrr", [a, b, c], 7) == [a, a, b, a, c, a, a]


def test_wrr_uses_effective_weight() -> None:
    a, b = server(11, 4), server(12, 4)
    a.effective_weight = 1  # slow start
    got = Counter(id(s) for s in picks("wrr", [a, b], 5))
    assert got == {id(a): 1, id(b): 4}


# --------------------------------------------------------------------------- lc / wlc


LC_CASES: list[tuple[str, list[int], int]] = [
    ("single least", [5, 2, 7], 1),
    ("zero beats all", [3, 1, 0, 4], 2),
    ("first of ties on a fresh scheduler", [2, 1, 1], 1),
]


@pytest.mark.parametrize(("why", "active", "want"), LC_CASES, ids=[c[0] for c in LC_CASES])
def test_lc_least_active(why: str, active: list[int], want: int) -> None:
    pool = [server(11 + i, 1, active=a) for i, a in enumerate(active)]
    assert picks("lc", pool, 1) == [pool[want]], why


def test_lc_ties_rotate() -> None:
    pool = [server(11 + i, 1, active=3) for i in range(4)]
    assert picks("lc", pool, 8) == pool + pool


def test_lc_balances_as_sessions_open() -> None:
    pool = [server(11, active=4), server(12), server(13, active=1)]
    sched = make_scheduler("lc")
    sched.update(pool)
    for _ in range(10):
        chosen = sched.pick(0, 0)
        assert chosen is not None
        chosen.active += 1
    assert [s.active for s in pool] == [5, 5, 5]


WLC_CASES: list[tuple[str, list[tuple[int, int]], int]] = [
    # (weight, active) per server; want index.
    ("idle: heaviest first", [(1, 0), (3, 0), (2, 0)], 1),
    ("load per weight", [(1, 1), (4, 5), (2, 4)], 1),  # 2/1, 6/4, 5/2
    ("light server loaded", [(1, 2), (10, 9)], 1),  # 3/1 vs 10/10
    ("heavy server saturated", [(1, 0), (10, 10)], 0),  # 1/1 vs 11/10
]


@pytest.mark.parametrize(("why", "spec", "want"), WLC_CASES, ids=[c[0] for c in WLC_CASES])
def test_wlc_least_weighted_load(why: str, spec: list[tuple[int, int]], want: int) -> None:
    pool = [server(11 + i, w, active=a) for i, (w, a) in enumerate(spec)]
    assert picks("wlc", pool, 1) == [pool[want]], why


def test_wlc_ties_rotate() -> None:
    pool = [server(11, 2, active=1), server(12, 4, active=3), server(13, 2, active=1)]
    assert picks("wlc", pool, 6) == pool + pool


def test_wlc_fills_in_weight_proportion() -> None:
    pool = [server(11, 1), server(12, 2), server(13, 5)]
    sched = make_scheduler("wlc")
    sched.update(pool)
    for _ in range(80):
        chosen = sched.pick(0, 0)
        assert chosen is not None
        chosen.active += 1
    assert [s.active for s in pool] == [10, 20, 50]


# --------------------------------------------------------------------------- sh


def test_sh_fixed_expected() -> None:
    # Pins the hash functions: a change of hash or fill order fails here.
    sh = SourceHash()
    assert sh.update([server(11), server(12), server(13)]) == 256
    table = "\n".join(keys(sh.table)).encode()
    assert zlib.crc32(table) == 0xA76CD92B
    got = [sh.pick(client(i), 1000) for i in range(1, 9)]
    assert last_octets(got) == ["11", "11", "11", "12", "11", "12", "12", "12"]


def test_client_hash_fixed() -> None:
    assert client_hash(client(1)) == 3258621753
    assert client_hash(0) == 0


@FAST
@given(st.permutations(servers(6)), st.lists(st.integers(1, 10), min_size=6, max_size=6))
def test_sh_order_independent(order: list[RealServer], weights: list[int]) -> None:
    for i, s in enumerate(sorted(order, key=lambda s: s.key)):
        s.effective_weight = weights[i]
    a, b = SourceHash(), SourceHash()
    a.update(order)
    b.update(sorted(order, key=lambda s: s.key))
    assert a.table == b.table


@FAST
@given(st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=12))
def test_sh_bucket_shares_follow_weights(weights: list[int]) -> None:
    pool = [server(11 + i, w) for i, w in enumerate(weights)]
    sh = SourceHash()
    sh.update(pool)
    size = len(sh.table)
    assert size >= 256
    assert size & (size - 1) == 0
    counts = Counter(id(s) for s in sh.table)
    total = sum(weights)
    for s in pool:
        assert abs(counts[id(s)] - size * s.weight / total) < 1


def test_sh_affinity_and_fallthrough() -> None:
    pool = servers(3)
    sh = SourceHash()
    sh.update(pool)
    first = sh.pick(client(7), 1)
    assert first is not None
    assert all(sh.pick(client(7), port) is first for port in range(1000, 1100))
    first.up = False
    bucket = client_hash(client(7)) & (len(sh.table) - 1)
    following = next(
        sh.table[(bucket + i) % len(sh.table)]
        for i in range(1, len(sh.table))
        if sh.table[(bucket + i) % len(sh.table)].accepts_new()
    )
    assert sh.pick(client(7), 1) is following


@pytest.mark.parametrize(
    ("weights", "size"),
    [([], 0), ([1], 256), ([3, 3, 3], 256), ([1] * 17, 512), ([1, 4000], 65536), ([9] * 20, 512)],
)
def test_sh_table_size(weights: list[int], size: int) -> None:
    assert SourceHash.table_size(weights) == size


def test_sh_update_counts_changed_buckets() -> None:
    pool = servers(4)
    sh = SourceHash()
    assert sh.update(pool) == 256
    assert sh.update(list(reversed(pool))) == 0
    before = keys(sh.table)
    changed = sh.update(pool[:3])
    assert changed == sum(1 for a, b in zip(before, keys(sh.table), strict=True) if a != b)
    assert changed > 0
    assert sh.update([]) == 256
    assert sh.table == ()


# --------------------------------------------------------------------------- maglev


def build(pool: Sequence[RealServer]) -> Maglev:
    m = Maglev()
    m.update(pool)
    return m


@pytest.mark.parametrize(
    ("n", "m"), [(0, 0), (1, 101), (2, 211), (3, 307), (10, 1009), (20, 2003), (65, 6521)]
)
def test_maglev_table_size(n: int, m: int) -> None:
    assert maglev_table_size(n) == m


def test_maglev_table_sized_for_the_pool() -> None:
    pool = servers(7)
    m = Maglev(pool_size=6)
    for alive in (pool[:4], pool[:1], pool[:6]):
        m.update(alive)
        assert len(m.table) == maglev_table_size(6)
    m.update(pool)  # more servers than configured: M grows to fit them
    assert len(m.table) == maglev_table_size(7)
    assert make_scheduler("maglev", pool_size=6).update(pool[:2]) == maglev_table_size(6)


@FAST
@given(st.text(min_size=1, max_size=30), st.sampled_from([101, 211, 307, 1009]))
def test_maglev_permutation_covers_table(key: str, size: int) -> None:
    offset, skip = maglev_permutation(key, size)
    assert 0 <= offset < size
    assert 1 <= skip < size
    assert len({(offset + j * skip) % size for j in range(size)}) == size


def test_maglev_fixed_expected() -> None:
    # Pins both key hashes, the client hash and the population order.
    assert maglev_permutation("198.18.0.11:8080", 307) == (75, 29)
    m = Maglev()
    assert m.update([server(11), server(12), server(13)]) == 307
    assert zlib.crc32("\n".join(keys(m.table)).encode()) == 0x4D1ABCFF
    got = [m.pick(client(i), 1000) for i in range(1, 9)]
    assert last_octets(got) == ["13", "13", "11", "13", "13", "11", "11", "13"]


@FAST
@given(st.permutations(servers(8)), st.lists(st.integers(1, 4), min_size=8, max_size=8))
def test_maglev_order_independent(order: list[RealServer], weights: list[int]) -> None:
    for i, s in enumerate(sorted(order, key=lambda s: s.key)):
        s.effective_weight = weights[i]
    assert keys(build(order).table) == keys(build(sorted(order, key=lambda s: s.key)).table)


def test_maglev_same_table_across_objects() -> None:
    # Another node (or a restart) builds its own RealServer objects from the same config.
    assert keys(build(servers(5)).table) == keys(build(servers(5)).table)


@pytest.mark.parametrize("n", range(2, 21))
def test_maglev_balance(n: int) -> None:
    table = build(servers(n)).table
    assert len(table) == maglev_table_size(n)
    counts = Counter(s.key for s in table)
    assert len(counts) == n
    assert spread(counts) <= 1  # the paper's bound; the brief asks only 1% of M
    assert spread(counts) <= len(table) // 100


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=2, max_value=20), st.data())
def test_maglev_minimal_disruption_on_leave(n: int, data: st.DataObject) -> None:
    pool = servers(n)
    gone = pool[data.draw(st.integers(min_value=0, max_value=n - 1), label="gone")]
    m = build(pool)
    before = keys(m.table)
    canonical = list(before)
    own = sum(1 for k in before if k == gone.key)

    assert m.update([s for s in pool if s is not gone]) == own
    after = keys(m.table)
    assert len(after) == len(before)  # M is kept
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert all(before[i] == gone.key for i in moved)
    assert len(moved) == own
    assert gone.key not in after
    counts = Counter(after)
    assert spread(counts) <= 1
    assert spread(counts) <= len(after) // 100

    # Adding it back restores the canonical table, moving exactly its slots back.
    assert m.update(pool) == own
    assert keys(m.table) == canonical


@FAST
@given(st.integers(min_value=3, max_value=16), st.data())
def test_maglev_several_leave_one_by_one(n: int, data: st.DataObject) -> None:
    pool = servers(n)
    order = data.draw(st.permutations(pool))
    leaving = data.draw(st.integers(min_value=1, max_value=n - 1))
    m = build(pool)
    alive = list(pool)
    for s in order[:leaving]:
        before = keys(m.table)
        alive.remove(s)
        changed = m.update(alive)
        after = keys(m.table)
        assert changed == before.count(s.key)
        assert all(a in (b, s.key) for a, b in zip(before, after, strict=True))
        assert spread(Counter(after)) <= 1
    # A join makes it canonical again, whatever the history.
    m.update(pool)
    assert keys(m.table) == keys(build(pool).table)


def test_maglev_weight_zero_counts_as_leave() -> None:
    pool = servers(5)
    m = build(pool)
    before = keys(m.table)
    pool[1].effective_weight = 0
    assert m.update(pool) == before.count(pool[1].key)
    assert pool[1].key not in keys(m.table)


@FAST
@given(
    st.lists(
        st.integers(min_value=1, max_value=10) | st.integers(min_value=1, max_value=1000),
        min_size=2,
        max_size=12,
    )
)
def test_maglev_weighted_shares(weights: list[int]) -> None:
    pool = [server(11 + i, w) for i, w in enumerate(weights)]
    table = build(pool).table
    size = len(table)
    counts = Counter(id(s) for s in table)
    total = sum(weights)
    for s in pool:
        assert abs(counts[id(s)] - size * s.weight / total) < 1  # largest-remainder quotas
        assert abs(counts[id(s)] - size * s.weight / total) <= size / 100


@FAST
@given(st.lists(st.integers(min_value=1, max_value=10), min_size=3, max_size=10), st.data())
def test_maglev_weighted_leave_stays_proportional(weights: list[int], data: st.DataObject) -> None:
    pool = [server(11 + i, w) for i, w in enumerate(weights)]
    gone = data.draw(st.sampled_from(pool))
    m = build(pool)
    alive = [s for s in pool if s is not gone]
    m.update(alive)
    size = len(m.table)
    counts = Counter(id(s) for s in m.table)
    total = sum(s.weight for s in alive)
    for s in alive:
        assert abs(counts[id(s)] - size * s.weight / total) <= size / 100


def test_maglev_weight_change_is_canonical() -> None:
    pool = servers(6)
    m = build(pool)
    m.update(pool[:4])  # history: a leave
    pool[0].effective_weight = 3
    changed = m.update(pool[:4])
    want = keys(build(pool[:4]).table)
    assert keys(m.table) == want
    # M shrank from the 6-server size to the 4-server size: every lookup moved.
    assert changed == max(maglev_table_size(6), len(want))


def test_maglev_update_returns_changed_slots() -> None:
    pool = servers(4)
    m = Maglev()
    assert m.update(pool) == maglev_table_size(4)
    assert m.update(list(reversed(pool))) == 0
    # New objects under the same keys (config reload): nothing moves, references follow.
    fresh = servers(4)
    assert m.update(fresh) == 0
    assert {id(s) for s in m.table} == {id(s) for s in fresh}
    # Weight change at the same size: exactly the differing slots are counted.
    before = keys(m.table)
    fresh[2].effective_weight = 2
    changed = m.update(fresh)
    after = keys(m.table)
    assert changed == sum(1 for a, b in zip(before, after, strict=True) if a != b)
    assert 0 < changed < len(after)
    assert m.update([]) == len(after)
    assert m.table == ()


def test_maglev_affinity_and_fallthrough() -> None:
    pool = servers(5)
    m = build(pool)
    slot = client_hash(client(9)) % len(m.table)
    first = m.pick(client(9), 1)
    assert first is m.table[slot]
    assert all(m.pick(client(9), port) is first for port in range(2000, 2100))
    first.active, first.max_conns = 1, 1
    step = next(
        i for i in range(1, len(m.table)) if m.table[(slot + i) % len(m.table)] is not first
    )
    assert m.pick(client(9), 1) is m.table[(slot + step) % len(m.table)]


def test_maglev_server_without_slots_is_never_picked() -> None:
    # Weight 1 against 1000: its share of the 211 slots rounds to none.
    light, heavy = server(11, 1), server(12, 1000)
    m = build([light, heavy])
    assert light not in m.table
    heavy.up = False
    assert m.pick(client(1), 1) is None


def test_maglev_duplicate_keys_refused() -> None:
    with pytest.raises(ValueError, match=r"duplicate server key 198\.18\.0\.11:8080"):
        Maglev().update([server(11), server(11)])


def test_maglev_populate_rejects_weight_zero() -> None:
    with pytest.raises(ValueError, match="weights must be > 0"):
        maglev_populate([("a", 1), ("b", 0)], 211)
