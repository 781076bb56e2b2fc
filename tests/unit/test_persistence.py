"""Client-IP persistence: netmasks, binding lifetime, rebind, events, expiry timing."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.addr import int_to_ip, ip_to_int
from lb.persistence import Binding, PersistenceTable, prefix_mask
from lb.servers import RealServer

SVC = "web"
OTHER_SVC = "api"
A = RealServer("web", ip_to_int("198.18.0.11"), 8080, 1)
B = RealServer("web", ip_to_int("198.18.0.12"), 8080, 1)
NET = ip_to_int("198.51.100.0")


@dataclass
class Recorder:
    events: list[tuple[str, Binding[str], str]] = field(default_factory=list)

    def binding_added(self, b: Binding[str]) -> None:
        self.events.append(("added", b, ""))

    def binding_changed(self, b: Binding[str]) -> None:
        self.events.append(("changed", b, ""))

    def binding_removed(self, b: Binding[str], reason: str) -> None:
        self.events.append(("removed", b, reason))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]


def table(tick: float = 1.0, max_bindings: int = 100) -> tuple[PersistenceTable[str], Recorder]:
    rec = Recorder()
    return PersistenceTable(tick, rec, max_bindings), rec


@pytest.mark.parametrize(
    ("bits", "mask", "client", "net"),
    [
        (32, 0xFFFFFFFF, "198.51.100.77", "198.51.100.77"),
        (24, 0xFFFFFF00, "198.51.100.77", "198.51.100.0"),
        (20, 0xFFFFF000, "198.51.100.77", "198.51.96.0"),
        (16, 0xFFFF0000, "198.51.100.77", "198.51.0.0"),
        (0, 0x00000000, "198.51.100.77", "0.0.0.0"),
    ],
)
def test_netmask_arithmetic(bits: int, mask: int, client: str, net: str) -> None:
    assert prefix_mask(bits) == mask
    assert int_to_ip(ip_to_int(client) & prefix_mask(bits)) == net


def test_prefix_mask_rejects_nonsense() -> None:
    for bits in (-1, 33):
        with pytest.raises(ValueError, match="prefix length"):
            prefix_mask(bits)


def test_clients_of_one_network_share_a_binding() -> None:
    p, _ = table()
    mask = prefix_mask(24)
    b = p.bind(SVC, ip_to_int("198.51.100.7") & mask, A, 60.0, 0.0)
    assert p.lookup(SVC, ip_to_int("198.51.100.200") & mask, 1.0) is b
    assert p.lookup(SVC, ip_to_int("198.51.101.7") & mask, 1.0) is None
    assert p.lookup(OTHER_SVC, ip_to_int("198.51.100.7") & mask, 1.0) is None  # per service


def test_binding_outlives_its_sessions_by_timeout() -> None:
    p, rec = table()
    b = p.bind(SVC, NET, A, 60.0, 0.0)
    p.attach(b, 0.0)
    # While a session uses it, it lives on long past the timeout.
    assert p.lookup(SVC, NET, 500.0) is b
    assert p.expire(500.0) == 0
    assert b.expires_at == float("inf")
    p.release(b, 500.0)
    assert (b.refs, b.idle_since, b.expires_at) == (0, 500.0, 560.0)
    assert p.expire(559.0) == 0
    assert p.lookup(SVC, NET, 559.99) is b
    assert p.lookup(SVC, NET, 560.0) is None  # expired: treated as absent, removed
    assert rec.kinds() == ["added", "removed"]
    assert rec.events[-1][2] == "expired"
    assert (len(p), p.expired_total, b.in_table) == (0, 1, False)


def test_new_sessions_refresh_the_binding() -> None:
    p, _ = table()
    b = p.bind(SVC, NET, A, 60.0, 0.0)
    for start in (10.0, 50.0, 100.0):  # short sessions, each before the previous timeout ran out
        assert p.lookup(SVC, NET, start) is b
        p.attach(b, start)
        p.release(b, start + 1.0)
    assert b.expires_at == 161.0
    assert p.expire(160.0) == 0
    assert p.expire(161.0) == 1


def test_last_use_counts_when_later_than_the_last_session_end() -> None:
    # Two sessions: the later-started one ends first; the binding idles from the last end.
    p, _ = table()
    b = p.bind(SVC, NET, A, 60.0, 0.0)
    p.attach(b, 0.0)
    p.attach(b, 30.0)
    p.release(b, 31.0)
    p.release(b, 40.0)
    assert b.expires_at == 100.0
    # A bind refresh (no session) at 70 moves it to 130.
    assert p.bind(SVC, NET, A, 60.0, 70.0) is b
    assert b.expires_at == 130.0


def test_unused_binding_expires_timeout_after_bind() -> None:
    p, rec = table()
    p.bind(SVC, NET, A, 60.0, 0.0)
    assert p.expire(59.0) == 0
    assert p.expire(60.0) == 1
    assert rec.kinds() == ["added", "removed"]


def test_rebind_points_at_another_server() -> None:
    p, rec = table()
    b = p.bind(SVC, NET, A, 60.0, 0.0)
    p.rebind(b, A, 1.0)  # same server: nothing to say
    assert rec.kinds() == ["added"]
    p.rebind(b, B, 2.0)
    assert p.lookup(SVC, NET, 3.0) is b
    assert b.server is B
    assert rec.kinds() == ["added", "changed"]
    # bind() on an existing binding updates it in place.
    assert p.bind(SVC, NET, A, 60.0, 4.0) is b
    assert b.server is A
    assert rec.kinds() == ["added", "changed", "changed"]
    assert len(p) == 1


def test_unbind_is_idempotent_and_sessions_keep_their_binding() -> None:
    p, rec = table()
    b = p.bind(SVC, NET, A, 60.0, 0.0)
    p.attach(b, 0.0)
    p.unbind(b, "server disabled")
    p.unbind(b, "server disabled")
    assert rec.kinds() == ["added", "removed"]
    assert p.lookup(SVC, NET, 1.0) is None
    p.release(b, 2.0)  # the session ends later: harmless
    assert p.expire(1000.0) == 0
    assert (p.removed_total, p.expired_total) == (1, 0)


def test_full_table_hands_out_detached_bindings() -> None:
    p, rec = table(max_bindings=1)
    p.bind(SVC, NET, A, 60.0, 0.0)
    other = ip_to_int("203.0.113.0")
    b = p.bind(SVC, other, B, 60.0, 0.0)
    assert (b.server, b.in_table, p.full_drops, len(p)) == (B, False, 1, 1)
    assert p.lookup(SVC, other, 1.0) is None
    assert rec.kinds() == ["added"]
    assert p.install(SVC, other, B, 60.0, 0.0, 1.0) is None
    assert p.full_drops == 2


def test_install_creates_and_updates() -> None:
    p, rec = table()
    b = p.install(SVC, NET, A, 60.0, 10.0, 12.0)
    assert b is not None
    assert (b.last_used, b.expires_at, p.installed_total, p.bound_total) == (10.0, 70.0, 1, 0)
    assert p.install(SVC, NET, A, 60.0, 20.0, 21.0) is b  # only a newer use: no event
    assert rec.kinds() == ["added"]
    assert p.install(SVC, NET, B, 30.0, 20.0, 22.0) is b  # server and shorter timeout
    assert (b.server, b.expires_at) == (B, 50.0)
    assert rec.kinds() == ["added", "changed"]
    assert p.expire(49.0) == 0  # the shorter timeout is honoured
    assert p.expire(50.0) == 1


def test_expire_budget_bounds_the_work() -> None:
    p, _ = table()
    for i in range(25):
        p.bind(SVC, NET + i, A, 60.0, i * 0.1)
    counts = []
    while len(p):
        counts.append(p.expire(100.0, budget=4))
    assert counts == [4, 4, 4, 4, 4, 4, 1]
    assert p.expired_total == 25


def test_iteration() -> None:
    p, _ = table()
    bs = {p.bind(SVC, NET + i, A, 60.0, 0.0) for i in range(5)}
    assert set(p) == bs
    assert len(p) == 5


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tick=st.sampled_from([0.1, 0.25, 1.0]))
def test_expiry_is_never_early_and_at_most_a_tick_late(seed: int, tick: float) -> None:
    """A random schedule of binds, session starts/ends and sweeps every <= tick."""
    rng = random.Random(seed)
    now = 0.0
    removed: list[Binding[str]] = []

    class Checker:
        def binding_added(self, b: Binding[str]) -> None:
            pass

        def binding_changed(self, b: Binding[str]) -> None:
            pass

        def binding_removed(self, b: Binding[str], reason: str) -> None:
            assert reason == "expired"
            assert b.refs == 0
            assert b.expires_at <= now  # never early
            removed.append(b)

    p: PersistenceTable[str] = PersistenceTable(tick, Checker(), 1000)
    open_sessions: list[Binding[str]] = []
    for _ in range(300):
        action = rng.random()
        net = rng.randrange(20)
        if action < 0.35:
            b = p.lookup(SVC, net, now) or p.bind(SVC, net, A, rng.choice([0.5, 2.0, 7.0]), now)
            p.attach(b, now)
            open_sessions.append(b)
        elif action < 0.6 and open_sessions:
            p.release(open_sessions.pop(rng.randrange(len(open_sessions))), now)
        else:
            now += rng.uniform(0.0, tick) + rng.choice([0.0, 0.0, 0.0, 5.0])
            p.expire(now, budget=10**9)
            for b in p:  # after a full sweep nothing due is left
                assert b.expires_at > now
        for b in open_sessions:  # in use: never expires
            assert b.in_table
    assert p.expired_total == len(removed)
    assert all(not b.in_table for b in removed)
