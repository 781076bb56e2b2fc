"""Tests of lb.services: the runtime model built from config, and what a reload keeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.addr import ip_to_int
from lb.config import Config, parse_config
from lb.forwarder import ServiceCounts
from lb.packet import PROTO_TCP, PROTO_UDP
from lb.persistence import prefix_mask
from lb.schedulers import Maglev, maglev_table_size
from lb.servers import AdminState, RealServer
from lb.services import Pool, Service, ServiceSet, build_services, netmask, service_key
from lb.sessions import SessionTable, SessionTimeouts

VIP = "198.51.100.10"
VIP2 = "198.51.100.20"
S1, S2, S3, S4 = "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"


def server(address: str, port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"address": address, "port": port, **extra}


def config(*, web: Sequence[dict[str, Any]] = (server(S1), server(S2), server(S3)),
           web_port: int = 80, web_pool: str = "web", scheduler: str = "wlc",
           persistence: str = "none", netmask_bits: int = 32, with_dns: bool = True,
           extra_pools: dict[str, Any] | None = None) -> Config:
    vs: dict[str, Any] = {
        "web": {"address": VIP, "port": web_port, "pool": web_pool, "scheduler": scheduler,
                "persistence": persistence, "persistence_netmask": netmask_bits,
                "persistence_timeout": "2m"},
    }
    pools: dict[str, Any] = {"web": {"servers": list(web)}}
    if with_dns:
        vs["dns"] = {"address": VIP2, "port": 53, "protocol": "udp", "pool": "dns",
                     "scheduler": "rr"}
        pools["dns"] = {"servers": [server(S1, 5353), server(S2, 5353)]}
    pools.update(extra_pools or {})
    return parse_config({
        "node": {"name": "t", "control_socket": "/run/lbd-test/control.sock"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": vs,
        "pools": pools,
    }, "test_services")


def find(pool: Pool, addr: str, port: int = 8080) -> RealServer:
    srv = pool.find(ip_to_int(addr), port)
    assert srv is not None
    return srv


def service(ss: ServiceSet, name: str) -> Service:
    (svc,) = [s for s in ss.services if s.name == name]
    return svc


def picks(svc: Service, n: int) -> list[str]:
    out = []
    for i in range(n):
        srv = svc.scheduler.pick(ip_to_int("198.51.100.77"), 1000 + i)
        out.append(srv.key if srv else "-")
    return out


# --- build --------------------------------------------------------------------------------------


def test_build_services_from_config() -> None:
    ss = build_services(config(persistence="client-ip", netmask_bits=24))
    assert list(ss.pools) == ["web", "dns"]
    web = ss.pools["web"]
    assert [(s.key, s.weight, s.backup, s.index, s.pool) for s in web.servers] == [
        (f"{S1}:8080", 1, False, 0, "web"), (f"{S2}:8080", 1, False, 1, "web"),
        (f"{S3}:8080", 1, False, 2, "web")]
    svc = service(ss, "web")
    assert (svc.proto, svc.vaddr, svc.vport) == (PROTO_TCP, ip_to_int(VIP), 80)
    assert svc.pool is web and web.services == [svc]
    assert svc.scheduler.name == "wlc"
    assert svc.persistence and svc.persistence_timeout == 120.0
    assert svc.persistence_mask == 0xFFFFFF00
    dns = service(ss, "dns")
    assert (dns.proto, dns.vport, dns.persistence) == (PROTO_UDP, 53, False)
    assert ss.by_key == {svc.key: svc, dns.key: dns}
    assert ss.vips == frozenset({ip_to_int(VIP), ip_to_int(VIP2)})
    assert [s.key for s in ss.servers()] == [f"{S1}:8080", f"{S2}:8080", f"{S3}:8080",
                                              f"{S1}:5353", f"{S2}:5353"]


def test_service_keys_tell_protocols_and_ports_apart() -> None:
    vaddr = ip_to_int(VIP)
    keys = {service_key(p, vaddr, port) for p in (PROTO_TCP, PROTO_UDP) for port in (53, 80)}
    keys.add(service_key(PROTO_TCP, ip_to_int(VIP2), 80))
    assert len(keys) == 5


def test_a_pool_shared_by_two_services_feeds_both() -> None:
    cfg = parse_config({
        "node": {"name": "t"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": {
            "a": {"address": VIP, "port": 80, "pool": "web", "scheduler": "rr"},
            "b": {"address": VIP, "port": 8000, "pool": "web", "scheduler": "rr"},
        },
        "pools": {"web": {"servers": [server(S1), server(S2)]}},
    }, "shared")
    ss = build_services(cfg)
    pool = ss.pools["web"]
    assert [s.name for s in pool.services] == ["a", "b"]
    find(pool, S1).up = False
    pool.refresh()
    for svc in pool.services:
        assert picks(svc, 2) == [f"{S2}:8080"] * 2


# --- Pool.refresh and has_primary ----------------------------------------------------------------


def backup_config() -> Config:
    return config(web=(server(S1), server(S2), server(S3, backup=True)), scheduler="rr")


@pytest.mark.parametrize(
    ("description", "change", "has_primary", "picked"),
    [
        ("all usable: primaries only", {}, True, [S1, S2, S1]),
        ("one primary down", {S1: ("up", False)}, True, [S2, S2, S2]),
        ("all primaries down: the backup", {S1: ("up", False), S2: ("up", False)}, False,
         [S3, S3, S3]),
        ("primaries disabled: the backup", {S1: ("admin", AdminState.DISABLED),
                                            S2: ("admin", AdminState.DRAIN)}, False, [S3] * 3),
        ("backup down too: nothing", {S1: ("up", False), S2: ("up", False),
                                      S3: ("up", False)}, False, ["-"] * 3),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_refresh_feeds_candidates(description: str, change: dict[str, tuple[str, Any]],
                                  has_primary: bool, picked: list[str]) -> None:
    ss = build_services(backup_config())
    pool = ss.pools["web"]
    for addr, (attr, value) in change.items():
        setattr(find(pool, addr), attr, value)
    pool.refresh()
    assert pool.has_primary is has_primary
    want = [f"{a}:8080" if a != "-" else "-" for a in picked]
    assert picks(service(ss, "web"), 3) == want


def test_refresh_brings_a_server_back() -> None:
    ss = build_services(backup_config())
    pool = ss.pools["web"]
    for addr in (S1, S2):
        find(pool, addr).up = False
    pool.refresh()
    assert picks(service(ss, "web"), 1) == [f"{S3}:8080"]
    find(pool, S2).up = True
    pool.refresh()
    assert pool.has_primary
    assert picks(service(ss, "web"), 2) == [f"{S2}:8080"] * 2


def test_without_refresh_the_scheduler_still_skips_a_server_that_refuses() -> None:
    """Schedulers check accepts_new() at pick time; refresh changes the candidate set."""
    ss = build_services(backup_config())
    find(ss.pools["web"], S1).up = False
    assert picks(service(ss, "web"), 2) == [f"{S2}:8080"] * 2


def test_maglev_table_is_sized_for_the_configured_pool() -> None:
    """Both nodes read the same pool, so they size the table alike, and a failure keeps M."""
    ss = build_services(config(scheduler="maglev", web=[server(S1), server(S2), server(S3),
                                                         server(S4, backup=True)]))
    web = service(ss, "web")
    assert isinstance(web.scheduler, Maglev)
    assert len(web.scheduler.table) == maglev_table_size(4)
    find(web.pool, S2).up = False
    web.pool.refresh()
    assert len(web.scheduler.table) == maglev_table_size(4)


# --- netmask -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "mask"), [(32, 0xFFFFFFFF), (24, 0xFFFFFF00),
                                            (16, 0xFFFF0000), (1, 0x80000000), (0, 0)])
def test_netmask(bits: int, mask: int) -> None:
    assert netmask(bits) == mask


@given(st.integers(0, 32))
def test_netmask_agrees_with_persistence_prefix_mask(bits: int) -> None:
    assert netmask(bits) == prefix_mask(bits)


# --- reload --------------------------------------------------------------------------------------


def session_table() -> SessionTable[Service]:
    return SessionTable(SessionTimeouts(), 100, observer=ServiceCounts())


def test_reload_keeps_server_objects_and_their_state() -> None:
    old = build_services(config())
    pool = old.pools["web"]
    s1, s2, s3 = (find(pool, a) for a in (S1, S2, S3))
    s1.up = False
    s2.admin = AdminState.DRAIN
    table = session_table()
    web = service(old, "web")
    sess = table.create(PROTO_TCP, ip_to_int("198.51.100.77"), 1000, web.vaddr, 80, s3, web,
                        0x02, 1.0)
    assert sess is not None
    web.created_total += 1  # what the forwarder records when it schedules a session
    assert (s3.active, s3.created_total, web.active) == (1, 1, 1)

    # s2 gets weight 5, s1 stays, s3 is removed, s4 is new.
    new = build_services(config(web=(server(S1), server(S2, weight=5), server(S4))), old)
    npool = new.pools["web"]
    assert npool.servers[0] is s1 and not s1.up
    assert npool.servers[1] is s2 and s2.admin is AdminState.DRAIN
    # The builder writes what the config says; the weight in force is the runtime owner's
    # (lb.runtime.ServerRuntime.adopt, tests/unit/test_runtime.py).
    assert (s2.config_weight, s2.index) == (5, 1)
    assert npool.find(ip_to_int(S3), 8080) is None and not npool.holds(s3)
    assert npool.holds(s1) and npool.holds(s2)
    s4 = find(npool, S4)
    assert s4 not in (s1, s2, s3) and (s4.up, s4.active, s4.index) == (True, 0, 2)
    # The removed server's session still points at it, and its counts are intact.
    assert sess.server is s3 and s3.active == 1
    # The unchanged virtual server is the same object: sessions and counters carry over.
    nweb = service(new, "web")
    assert nweb is web and nweb.active == 1 and nweb.created_total == 1
    assert nweb.pool is npool and npool.services == [nweb]
    assert new.by_key[nweb.key] is nweb
    # Its new scheduler was fed the new pool's candidates (s1 down, s2 draining: only s4).
    assert picks(nweb, 2) == [f"{S4}:8080"] * 2


def test_reload_with_nothing_changed_keeps_everything() -> None:
    old = build_services(config())
    new = build_services(config(), old)
    assert all(a is b for a, b in zip(new.servers(), old.servers(), strict=True))
    assert all(a is b for a, b in zip(new.services, old.services, strict=True))


def test_reload_changing_vip_port_makes_a_new_service() -> None:
    old = build_services(config())
    web = service(old, "web")
    web.created_total = 7
    new = build_services(config(web_port=8000), old)
    nweb = service(new, "web")
    assert nweb is not web and nweb.vport == 8000 and nweb.created_total == 0
    assert web.key not in new.by_key and nweb.key in new.by_key
    # The untouched dns service carries over.
    assert service(new, "dns") is service(old, "dns")


def test_reload_drops_removed_services_and_pools() -> None:
    old = build_services(config())
    new = build_services(config(with_dns=False), old)
    assert [s.name for s in new.services] == ["web"]
    assert list(new.pools) == ["web"]
    assert ip_to_int(VIP2) not in new.vips


def test_reload_moving_a_service_to_another_pool() -> None:
    extra = {"other": {"servers": [server(S4, 9090)]}}
    old = build_services(config(extra_pools=extra))
    web = service(old, "web")
    new = build_services(config(web_pool="other", extra_pools=extra), old)
    nweb = service(new, "web")
    assert nweb is web and nweb.pool is new.pools["other"]
    assert new.pools["other"].services == [nweb] and new.pools["web"].services == []
    assert picks(nweb, 1) == [f"{S4}:9090"]


def test_reload_changes_persistence_policy_in_place() -> None:
    old = build_services(config())
    web = service(old, "web")
    new = build_services(config(persistence="client-ip", netmask_bits=16, scheduler="rr"), old)
    nweb = service(new, "web")
    assert nweb is web
    assert (nweb.persistence, nweb.persistence_mask, nweb.scheduler.name) == (
        True, 0xFFFF0000, "rr")


def test_reload_writes_no_runtime_state() -> None:
    """Health, admin state and the weights in force belong to lb.runtime: a rebuild keeps
    them as they were and records only the configured weight."""
    old = build_services(config())
    s1 = find(old.pools["web"], S1)
    s1.up, s1.admin, s1.weight, s1.effective_weight = False, AdminState.DRAIN, 7, 2
    build_services(config(web=(server(S1, weight=3), server(S2))), old)
    assert (s1.up, s1.admin, s1.weight, s1.effective_weight, s1.config_weight) == (
        False, AdminState.DRAIN, 7, 2, 3)
