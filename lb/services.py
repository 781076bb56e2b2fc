"""The runtime model of virtual servers and pools, built from config (pure).

A :class:`Pool` owns its :class:`~lb.servers.RealServer` objects; a :class:`Service` (one
virtual server) points at a pool and owns a scheduler over that pool's candidates. When a
server's health, operator state or weight changes, its one owner
(:class:`lb.runtime.ServerRuntime`) calls :meth:`Pool.refresh`, which re-feeds the schedulers
of every service that uses the pool. The builders here write only what comes from config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from lb.addr import ip_to_int
from lb.config import Config, PoolConfig, VirtualServerConfig
from lb.packet import PROTO_TCP, PROTO_UDP
from lb.schedulers import Scheduler, make_scheduler
from lb.servers import RealServer, candidates
from lb.source_limits import SourceLimits

PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}


@dataclass(eq=False)
class Pool:
    name: str
    servers: list[RealServer]
    on_server_down: str = "keep"  # keep | reset
    slow_start: float = 0.0  # seconds over which a returning server's weight ramps up
    checked: bool = False  # has a health check (a server added at run time must rise first)
    services: list[Service] = field(default_factory=list)
    has_primary: bool = True  # a primary server is usable (backups then take no clients)

    def holds(self, server: RealServer) -> bool:
        """Is this server object still a member (not removed by a reload)?"""
        return any(s is server for s in self.servers)

    def find(self, addr: int, port: int) -> RealServer | None:
        for s in self.servers:
            if s.addr == addr and s.port == port:
                return s
        return None

    def refresh(self) -> None:
        """Recompute candidates for every service of this pool (health/admin/weight change)."""
        cands = candidates(self.servers)
        self.has_primary = any(not s.backup for s in cands)
        for svc in self.services:
            svc.scheduler.update(cands)


@dataclass(eq=False)
class Service:
    """One virtual server: VIP:port/protocol → pool, with scheduler and persistence policy."""

    name: str
    proto: int
    vaddr: int
    vport: int
    pool: Pool
    scheduler: Scheduler
    persistence: bool
    persistence_timeout: float
    persistence_mask: int
    # The VRRP instance that holds the VIP ("" standalone): its master owns this service's
    # sessions and bindings. ``owned`` is whether this node masters it now; the node sets it
    # from ha.roles, and the data plane reads it per packet.
    owner: str = ""
    owned: bool = True
    # Per client source address (lb.source_limits); None when no limit applies. Read per new
    # flow, so a reload that changes the limits applies to the next SYN.
    source_limits: SourceLimits | None = None
    # counters read at scrape time
    active: int = 0
    created_total: int = 0  # sessions this node scheduled (not those synced from the peer)

    @property
    def key(self) -> int:
        return service_key(self.proto, self.vaddr, self.vport)


def service_key(proto: int, vaddr: int, vport: int) -> int:
    return (proto << 48) | (vaddr << 16) | vport


def netmask(bits: int) -> int:
    return (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF if bits else 0


def build_pool(cfg: PoolConfig, previous: Pool | None = None) -> Pool:
    """A runtime pool; servers that existed in ``previous`` keep their object (and with it
    their health, operator state, weight in force and session counts) across a reload: only
    what comes from config is written here; :meth:`lb.runtime.ServerRuntime.adopt` then
    decides the weights in force."""
    servers: list[RealServer] = []
    for i, sc in enumerate(cfg.servers):
        addr = ip_to_int(sc.address)
        old = previous.find(addr, sc.port) if previous else None
        if old is not None:
            old.config_weight = sc.weight
            old.backup = sc.backup
            old.max_conns = sc.max_conns
            old.index = i
            servers.append(old)
        else:
            servers.append(RealServer(pool=cfg.name, addr=addr, port=sc.port, weight=sc.weight,
                                      backup=sc.backup, max_conns=sc.max_conns, index=i))
    return Pool(name=cfg.name, servers=servers, on_server_down=cfg.on_server_down,
                slow_start=cfg.slow_start, checked=cfg.health_check is not None)


def build_service(cfg: VirtualServerConfig, pool: Pool, previous: Service | None,
                  owner: str = "") -> Service:
    """A runtime service; one that existed before a reload with the same VIP:port/protocol is
    updated in place, so that its sessions (which point at it) and counters carry over."""
    proto, vaddr = PROTOCOLS[cfg.protocol], ip_to_int(cfg.address)
    scheduler = make_scheduler(cfg.scheduler, pool_size=len(pool.servers))
    mask = netmask(cfg.persistence_netmask)
    persistent = cfg.persistence == "client-ip"
    limits = SourceLimits(cfg.max_conns_per_source, cfg.max_conn_rate_per_source,
                          cfg.conn_rate_period)
    if previous is not None and previous.key == service_key(proto, vaddr, cfg.port):
        svc = previous
        svc.pool, svc.scheduler = pool, scheduler
        svc.persistence, svc.persistence_timeout = persistent, cfg.persistence_timeout
        svc.persistence_mask = mask
        svc.owner = owner
        svc.source_limits = limits if limits.active else None
    else:
        svc = Service(name=cfg.name, proto=proto, vaddr=vaddr, vport=cfg.port, pool=pool,
                      scheduler=scheduler, persistence=persistent,
                      persistence_timeout=cfg.persistence_timeout, persistence_mask=mask,
                      owner=owner, source_limits=limits if limits.active else None)
    pool.services.append(svc)
    return svc


@dataclass(eq=False)
class ServiceSet:
    pools: dict[str, Pool]
    services: list[Service]
    by_key: dict[int, Service]

    @property
    def vips(self) -> frozenset[int]:
        return frozenset(s.vaddr for s in self.services)

    def servers(self) -> Iterable[RealServer]:
        for pool in self.pools.values():
            yield from pool.servers

    def follow(self, masters: Callable[[str], bool]) -> None:
        """Set every service's ``owned`` from the roles (``masters(instance)``)."""
        for svc in self.services:
            svc.owned = masters(svc.owner)


def build_services(config: Config, previous: ServiceSet | None = None) -> ServiceSet:
    """Build (or rebuild on reload) the runtime model; see build_pool and build_service for
    what carries over from ``previous``."""
    old_pools: Mapping[str, Pool] = previous.pools if previous else {}
    old_services = {s.name: s for s in previous.services} if previous else {}
    pools = {name: build_pool(pc, old_pools.get(name)) for name, pc in config.pools.items()}
    services = [build_service(vc, pools[vc.pool], old_services.get(vc.name),
                              config.owner_of(vc.address))
                for vc in config.virtual_servers]
    for pool in pools.values():
        pool.refresh()
    return ServiceSet(pools=pools, services=services, by_key={s.key: s for s in services})
