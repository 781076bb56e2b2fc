"""Tests of lb.runtime: the one owner of a server's health, admin state, weight and ramp."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from lb.addr import ip_to_int
from lb.config import Config, parse_config
from lb.opstate import OperatorState, Record
from lb.packet import PROTO_TCP
from lb.runtime import Refused, ServerRuntime
from lb.schedulers import Maglev, Scheduler, SourceHash
from lb.servers import AdminState, RealServer
from lb.services import Service, ServiceSet, build_services
from lb.sessions import SessionTable, SessionTimeouts

VIP = "198.51.100.10"
S1, S2, S3, S4 = "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"


def config(*, scheduler: str = "maglev", weights: Sequence[int] = (10, 10, 10),
           slow_start: str = "10s", checked: bool = False, other_pool: bool = True,
           with_s3: bool = True) -> Config:
    addrs = [S1, S2, S3] if with_s3 else [S1, S2]
    web: dict[str, Any] = {"servers": [{"address": a, "port": 8080, "weight": w}
                                       for a, w in zip(addrs, weights, strict=False)],
                           "slow_start": slow_start}
    if checked:
        web["health_check"] = {"type": "tcp"}
    vs: dict[str, Any] = {"web": {"address": VIP, "port": 80, "pool": "web",
                                  "scheduler": scheduler}}
    pools: dict[str, Any] = {"web": web}
    if other_pool:
        vs["api"] = {"address": VIP, "port": 81, "pool": "api", "scheduler": "maglev"}
        pools["api"] = {"servers": [{"address": S4, "port": 9000}]}
    return parse_config({
        "node": {"name": "t", "control_socket": "/run/lbd-test/control.sock"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": vs, "pools": pools}, "test_runtime")


def server(ss: ServiceSet, addr: str, pool: str = "web", port: int = 8080) -> RealServer:
    srv = ss.pools[pool].find(ip_to_int(addr), port)
    assert srv is not None
    return srv


def service(ss: ServiceSet, name: str) -> Service:
    (svc,) = [s for s in ss.services if s.name == name]
    return svc


def shares(svc: Service) -> Counter[str]:
    """Slots (maglev) or buckets (sh) per server key of a table scheduler."""
    sched = svc.scheduler
    assert isinstance(sched, Maglev | SourceHash)
    return Counter(s.key for s in sched.table)


def fraction(svc: Service, key: str) -> float:
    """The share of the table (so of new clients) that goes to ``key``."""
    counts = shares(svc)
    return counts[key] / sum(counts.values())


class Counting:
    """A scheduler wrapper that counts updates (which schedulers a change refreshed)."""

    def __init__(self, inner: Scheduler) -> None:
        self.inner = inner
        self.name = inner.name
        self.consistent = inner.consistent
        self.updates = 0

    def update(self, servers: Sequence[RealServer]) -> int:
        self.updates += 1
        return self.inner.update(servers)

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        return self.inner.pick(caddr, cport)


def counting(svc: Service) -> Counting:
    c = Counting(svc.scheduler)
    svc.scheduler = c
    return c


# --- slow start ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["maglev", "sh"])
def test_slow_start_ramps_under_table_schedulers(scheduler: str) -> None:
    """The bug this owner fixes: the ramp changed effective_weight without refreshing, so a
    table scheduler kept the returning server at its first ramp weight."""
    ss = build_services(config(scheduler=scheduler))
    rt = ServerRuntime(ss)
    web = service(ss, "web")
    s1 = server(ss, S1)
    full = fraction(web, s1.key)
    assert full == pytest.approx(1 / 3, abs=0.01)
    rt.set_health(s1, False, 10.0)
    assert shares(web)[s1.key] == 0
    rt.set_health(s1, True, 100.0)
    assert s1.effective_weight == 1
    first = fraction(web, s1.key)
    assert first == pytest.approx(1 / 21, abs=0.01)  # weights 1, 10, 10
    seen = [first]
    now = 100.0
    while (deadline := rt.get_timer()) is not None:
        assert deadline > now
        now = deadline
        rt.handle_timer(now)
        seen.append(fraction(web, s1.key))
    assert now >= 110.0 and s1.effective_weight == 10
    assert seen[-1] == full  # back at its full share: the table followed the ramp
    assert seen == sorted(seen) and len(set(seen)) >= 9  # and grew step by step


def test_ramp_steps_that_change_no_weight_refresh_nothing() -> None:
    ss = build_services(config(weights=(2, 10, 10), slow_start="100s"))
    rt = ServerRuntime(ss)
    s1 = server(ss, S1)
    rt.set_health(s1, False, 0.0)
    rt.set_health(s1, True, 0.0)
    c = counting(service(ss, "web"))
    steps = 0
    while (deadline := rt.get_timer()) is not None:
        rt.handle_timer(deadline)
        steps += 1
    # weight 2 over 100 s: 1 → 2 once, however many looks the ramp took
    assert steps > 10 and c.updates == 1 and s1.effective_weight == 2


def test_fall_during_ramp_ends_it_at_base_weight() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    s1 = server(ss, S1)
    rt.set_health(s1, False, 0.0)
    rt.set_health(s1, True, 1.0)
    assert rt.ramping(s1) and rt.get_timer() is not None
    rt.set_health(s1, False, 2.0)
    assert not rt.ramping(s1) and rt.get_timer() is None
    assert s1.effective_weight == s1.weight == 10


def test_weight_set_during_ramp_scales_the_ramp() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    s1 = server(ss, S1)
    rt.set_health(s1, False, 0.0)
    rt.set_health(s1, True, 100.0)
    rt.set_weight(s1, 100, 105.0)  # half way through a 10 s ramp
    assert (s1.weight, s1.effective_weight) == (100, 50)
    rt.handle_timer(111.0)
    assert s1.effective_weight == 100 and rt.get_timer() is None


def test_no_slow_start_means_full_weight_at_once() -> None:
    ss = build_services(config(slow_start="0s"))
    rt = ServerRuntime(ss)
    s1 = server(ss, S1)
    rt.set_health(s1, False, 0.0)
    rt.set_health(s1, True, 1.0)
    assert s1.effective_weight == 10 and rt.get_timer() is None


# --- exactly the schedulers that depend on a server ----------------------------------------------


def test_a_change_refreshes_only_the_pools_services() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    web, api = counting(service(ss, "web")), counting(service(ss, "api"))
    assert rt.set_health(server(ss, S1), False, 1.0)
    assert rt.set_admin(server(ss, S2), AdminState.DRAIN)
    assert rt.set_weight(server(ss, S3), 3, 1.0)
    assert (web.updates, api.updates) == (3, 0)
    assert rt.set_admin(server(ss, S4, "api", 9000), AdminState.DISABLED)
    assert (web.updates, api.updates) == (3, 1)


@pytest.mark.parametrize("change", [
    "health already up", "admin already enabled", "same weight", "weight of a drained server",
])
def test_a_change_no_scheduler_sees_refreshes_nothing(change: str) -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    s1 = server(ss, S1)
    if change == "weight of a drained server":
        rt.set_admin(s1, AdminState.DRAIN)
    c = counting(service(ss, "web"))
    if change == "health already up":
        refreshed = rt.set_health(s1, True, 1.0)
    elif change == "admin already enabled":
        refreshed = rt.set_admin(s1, AdminState.ENABLED)
    elif change == "same weight":
        refreshed = rt.set_weight(s1, 10, 1.0)
    else:  # a drained server is no candidate: its weight changes nothing a scheduler sees
        refreshed = rt.set_weight(s1, 3, 1.0)
    assert not refreshed and c.updates == 0


def test_drain_and_enable_feed_the_scheduler() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    web, s1 = service(ss, "web"), server(ss, S1)
    rt.set_admin(s1, AdminState.DRAIN)
    assert shares(web)[s1.key] == 0
    rt.set_admin(s1, AdminState.ENABLED)
    assert shares(web)[s1.key] > 0


# --- operator records ----------------------------------------------------------------------------


def test_operator_records_say_only_what_differs_from_config() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    s1, s2 = server(ss, S1), server(ss, S2)
    rt.set_admin(s1, AdminState.DRAIN)
    rt.set_weight(s2, 4, 0.0)
    assert rt.operator.records == {("web", s1.key): Record(admin=AdminState.DRAIN),
                                   ("web", s2.key): Record(weight=4)}
    rt.set_admin(s1, AdminState.ENABLED)
    rt.set_weight(s2, 10, 0.0)  # the configured weight: nothing to remember
    assert rt.operator.records == {}


def test_add_server_takes_sessions_and_is_recorded() -> None:
    ss = build_services(config(other_pool=False))
    rt = ServerRuntime(ss)
    new = rt.add_server("web", "198.18.0.15:8080", 10, None, 0.0)
    assert ss.pools["web"].holds(new) and new.up and shares(service(ss, "web"))[new.key] > 0
    assert rt.operator.get("web", new.key) == Record(added=True, weight=10)
    with pytest.raises(Refused, match="already has"):
        rt.add_server("web", "198.18.0.15:8080", None, None, 0.0)
    with pytest.raises(Refused, match="no pool"):
        rt.add_server("nope", "198.18.0.16:8080", None, None, 0.0)
    with pytest.raises(Refused, match="not ADDR:PORT"):
        rt.add_server("web", "198.18.0.16", None, None, 0.0)
    with pytest.raises(Refused, match="out of range"):
        rt.add_server("web", "198.18.0.16:8080", 70000, None, 0.0)


def test_a_server_added_to_a_checked_pool_must_rise_first() -> None:
    ss = build_services(config(checked=True))
    rt = ServerRuntime(ss)
    new = rt.add_server("web", "198.18.0.15:8080", None, True, 0.0)
    assert (new.up, new.backup, new.weight) == (False, True, 1)


def test_remove_server_keeps_a_draining_server_retired_until_idle() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    web, s1 = service(ss, "web"), server(ss, S1)
    table: SessionTable[Service] = SessionTable(SessionTimeouts(), 10)
    sess = table.create(PROTO_TCP, ip_to_int("198.51.100.77"), 1000, web.vaddr, 80, s1, web,
                        0x02, 1.0)
    assert sess is not None
    rt.remove_server(s1)
    assert not ss.pools["web"].holds(s1) and shares(web)[s1.key] == 0
    assert rt.retired == [s1] and rt.operator.get("web", s1.key) == Record(removed=True)
    assert rt.retired_idle() == []
    table.remove(sess, "expired", 2.0)
    assert rt.retired_idle() == [s1] and rt.retired == []


def test_removed_configured_server_comes_back_as_configured() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    s1 = server(ss, S1)
    rt.remove_server(s1)
    with pytest.raises(Refused, match="backup = false"):
        rt.add_server("web", s1.key, None, True, 0.0)
    back = rt.add_server("web", s1.key, None, None, 0.0)
    assert back is s1 and s1.weight == 10 and rt.operator.records == {}


def test_removing_an_added_server_forgets_it() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    new = rt.add_server("web", "198.18.0.15:8080", 2, None, 0.0)
    rt.remove_server(new)
    assert rt.operator.records == {} and not ss.pools["web"].holds(new)


# --- adopt: a restart or a reload ----------------------------------------------------------------


def view(ss: ServiceSet) -> list[tuple[str, str, bool, str, int, bool]]:
    return [(s.pool, s.key, s.up, s.admin.value, s.weight, s.backup) for s in ss.servers()]


def test_operator_state_survives_a_restart() -> None:
    """Encoded, decoded and applied to a model built afresh from the same config, the
    operator state gives the same servers, weights and admin states — and the same table."""
    ss = build_services(config())
    rt = ServerRuntime(ss)
    rt.set_admin(server(ss, S1), AdminState.DRAIN)
    rt.set_weight(server(ss, S2), 3, 0.0)
    rt.remove_server(server(ss, S3))
    rt.add_server("web", "198.18.0.15:8080", 5, None, 0.0)
    rt.operator.demoted = True
    data = rt.operator.to_bytes()

    fresh = build_services(config())
    rt2 = ServerRuntime(fresh, OperatorState.from_bytes(data))
    assert rt2.adopt(fresh, 0.0) == []
    assert view(fresh) == view(ss)
    assert shares(service(fresh, "web")) == shares(service(ss, "web"))
    assert rt2.operator.demoted and rt2.operator.records == rt.operator.records


def test_reload_keeps_operator_overrides_and_drops_what_no_longer_applies() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    rt.set_weight(server(ss, S1), 3, 0.0)
    rt.remove_server(server(ss, S3))
    added = rt.add_server("web", "198.18.0.15:8080", 5, None, 0.0)
    rt.set_admin(server(ss, S4, "api", 9000), AdminState.DRAIN)
    # the new config: weights changed, s3 gone, the api pool gone
    new = build_services(config(weights=(7, 7), with_s3=False, other_pool=False), ss)
    notes = rt.adopt(new, 0.0)
    assert len(notes) == 2 and any("api" in n for n in notes)
    assert any(S3 in n and "removal" in n for n in notes)
    s1 = server(new, S1)
    assert (s1.config_weight, s1.weight) == (7, 3)  # the operator's weight wins
    assert server(new, S2).weight == 7
    assert new.pools["web"].holds(added)  # the same object: its sessions carry over
    assert set(rt.operator.records) == {("web", s1.key), ("web", added.key)}


def test_config_takes_over_a_server_it_now_lists() -> None:
    ss = build_services(config(with_s3=False))
    rt = ServerRuntime(ss)
    added = rt.add_server("web", f"{S3}:8080", 10, None, 0.0)
    new = build_services(config(), ss)
    (note,) = rt.adopt(new, 0.0)
    assert "configured now" in note
    assert server(new, S3) is added and rt.operator.records == {}


def test_reload_ends_ramps_of_servers_that_left() -> None:
    ss = build_services(config())
    rt = ServerRuntime(ss)
    s3 = server(ss, S3)
    rt.set_health(s3, False, 0.0)
    rt.set_health(s3, True, 1.0)
    assert rt.get_timer() is not None
    rt.adopt(build_services(config(with_s3=False), ss), 2.0)
    assert rt.get_timer() is None
