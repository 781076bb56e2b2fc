"""Configuration: one TOML file (DESIGN.md section 3) validated into typed, frozen objects.

Pure: no sockets, no asyncio. :func:`load_config` reads one file; :func:`parse_config` does the
rest on the decoded TOML document, so tests feed it dicts.

Rules of the loader:

- Every problem of a file is collected before anything is refused; :class:`ConfigError` carries
  them all, each reading ``FILE: key.path: problem``.
- Unknown keys are errors, with a close match suggested when there is one.
- Durations are strings with a unit (``"100ms"``, ``"2s"``, ``"10m"``, ``"1h"``) and become float
  seconds; a bare number is refused because its unit would be a guess.
- Addresses are IPv4 dotted quads and stay strings in the model (``lb.addr.ip_to_int`` turns them
  into the integers the data plane uses).
- The defaults live in the dataclasses below, so a test can build a config object directly and
  get the same defaults the loader applies.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import math
import os
import re
import shlex
import tomllib
import types
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeVar, get_args

__all__ = [
    "CheckType",
    "Config",
    "ConfigError",
    "DataplaneConfig",
    "Endpoint",
    "HealthCheckConfig",
    "MetricsConfig",
    "NodeConfig",
    "OnServerDown",
    "Persistence",
    "PoolConfig",
    "Protocol",
    "Scheduler",
    "ServerConfig",
    "SessionsConfig",
    "SyncConfig",
    "TrackInterface",
    "TrackPool",
    "VirtualServerConfig",
    "VrrpAddress",
    "VrrpGroupConfig",
    "VrrpInstanceConfig",
    "load_config",
    "loads_config",
    "parse_config",
    "parse_duration",
]

Protocol: TypeAlias = Literal["tcp", "udp"]
Scheduler: TypeAlias = Literal["rr", "wrr", "lc", "wlc", "sh", "maglev"]
Offload: TypeAlias = Literal["off", "conntrack"]
Persistence: TypeAlias = Literal["none", "client-ip"]
OnServerDown: TypeAlias = Literal["keep", "reset"]
CheckType: TypeAlias = Literal["tcp", "http", "https", "udp", "icmp", "script"]

# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An ``ADDR:PORT`` pair such as the metrics or sync listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """``[node]``: who this box is and where its control socket lives."""

    name: str
    control_socket: str = "/run/lbd/control.sock"
    state_dir: str = "/var/lib/lbd"  # what must outlive the process: operator state, snapshots


@dataclass(frozen=True, slots=True, kw_only=True)
class DataplaneConfig:
    """``[dataplane]``: the TUN device, the two interfaces and what lbd owns in the kernel."""

    tun: str = "lbtun0"
    client_interface: str
    server_interface: str
    batch: int = 256  # packets drained per wake-up
    route_table: int = 4711  # the routing table lbd owns
    rule_priority: int = 4711  # first of the RULE_PRIORITY_SPAN ip rule priorities lbd uses
    # CPUs that do the kernel's work for packets lbd writes back (RPS on the TUN): "all",
    # "off", or a hex CPU mask such as "3" or "ff,ffffffff". Without it that work (routing,
    # the next hop, the peer's TCP) runs on lbd's own CPU.
    rps_cpus: str = "all"
    # Packets the kernel queues on the TUN for lbd to read (the device's txqueuelen; the
    # kernel's default, 500, dropped the bursts of a 15,000 SYN/s flood before lbd read them).
    tun_queue: int = 8192
    # The kernel's SYN proxy (nftables synproxy) answers SYNs to the TCP virtual servers with
    # SYN cookies: a spoofed SYN flood never reaches the TUN. Flows opened through it do not
    # survive a failover (lb.synproxy): off by default. "auto": engaged only while lbd's
    # half-open sessions reach syn_proxy_half_open, released after syn_proxy_hold of calm.
    syn_proxy: bool | Literal["auto"] = False
    syn_proxy_half_open: int = 1000
    syn_proxy_hold: float = 30.0
    # The kernel fast path (lb.offload): "conntrack" hands every flow lbd opened (a SYN, a
    # UDP flow's first datagram) to the kernel's conntrack NAT once scheduled; its later
    # packets no longer cross the TUN. "off": lbd forwards every packet itself.
    offload: Offload = "off"


RULE_PRIORITY_SPAN: Final = 64
"""How many consecutive ip rule priorities lbd uses, starting at ``rule_priority``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionsConfig:
    """``[sessions]``: table size and idle timeouts, in seconds."""

    max_sessions: int = 1_048_576
    max_half_open: int = 0  # 0: max_sessions // 8 (see lb.sessions.SessionTable)
    # Client sources tracked for the per-source limits at most (lb.source_limits);
    # 0: max_sessions // 4.
    max_tracked_sources: int = 0
    tcp_syn_timeout: float = 60.0  # "60s"
    tcp_established_timeout: float = 900.0  # "15m"
    tcp_fin_timeout: float = 120.0  # "2m"
    tcp_time_wait_timeout: float = 120.0  # "2m"
    tcp_close_timeout: float = 10.0  # "10s"
    udp_timeout: float = 300.0  # "5m"
    expiry_tick: float = 0.1  # "100ms": granularity of session expiry
    # How often the tables are written to <state_dir>/tables.snap (0: never; see
    # lb.table_snapshot): a restart loses at most this much of the tables' changes.
    snapshot_interval: float = 2.0  # "2s"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """``[metrics]``: where Prometheus scrapes; ``listen`` is None when disabled (``""``)."""

    listen: Endpoint | None = Endpoint("127.0.0.1", 9641)


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualServerConfig:
    """``[virtual_servers.NAME]``: a VIP:port that clients connect to, served by one pool."""

    name: str
    address: str
    port: int
    protocol: Protocol = "tcp"
    pool: str
    scheduler: Scheduler = "wlc"
    persistence: Persistence = "none"
    persistence_timeout: float = 300.0  # "5m"
    persistence_netmask: int = 32  # clients in the same /N share a binding
    # Per client source address (HAProxy's conn_cur / conn_rate; lb.source_limits), 0 =
    # unlimited: open sessions at once, and new sessions per conn_rate_period (a token bucket
    # of that size). Beyond either a new session is dropped and counted. Reloadable. These
    # are a tcp virtual server's defaults; a udp one's are UDP_SOURCE_LIMITS.
    max_conns_per_source: int = 10_000
    max_conn_rate_per_source: int = 1_000
    conn_rate_period: float = 1.0  # "1s"


SOURCE_LIMIT_KEYS: Final = ("max_conns_per_source", "max_conn_rate_per_source",
                            "conn_rate_period")
"""Keys of a virtual server that say nothing about the sessions it holds: left out of
:meth:`Config.service_digest`, so that two nodes (or a snapshot and the node loading it)
with other limits still agree on every session."""

UDP_SOURCE_LIMITS: Final[Mapping[str, int]] = types.MappingProxyType(
    {"max_conns_per_source": 0, "max_conn_rate_per_source": 0})
"""The loader's defaults for a udp virtual server: unlimited. A UDP flow has no close, so it
counts until it idles out (``udp_timeout``, 5 minutes), and a resolver or a NAT sends
thousands of new flows a second from one address (a new source port per query): a default
would refuse exactly the busiest legitimate clients. Set them per virtual server."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """One entry of a pool's ``servers``."""

    address: str
    port: int
    weight: int = 1  # 0 = takes no new sessions
    backup: bool = False  # serves only while no primary is usable
    max_conns: int = 0  # 0 = unlimited

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    """A pool's ``health_check``. Keys that do not apply to ``type`` are None.

    http/https: ``path``, ``expect_status``, ``expect_body``, ``host``; https also ``verify``.
    udp: ``payload``, ``expect``. script: ``command`` (argv, split with shlex). tcp, icmp: none.
    """

    type: CheckType
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2  # consecutive successes that bring a server up
    fall: int = 3  # consecutive failures that bring it down
    port: int | None = None  # probe this port instead of the server's
    source: str | None = None  # bind probes to this local address
    path: str | None = None
    expect_status: tuple[int, ...] | None = None
    expect_body: str | None = None
    host: str | None = None
    verify: bool | None = None
    payload: str | None = None
    expect: str | None = None
    command: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """``[pools.NAME]``: real servers, in file order, and how their health is judged."""

    name: str
    servers: tuple[ServerConfig, ...]
    health_check: HealthCheckConfig | None = None  # None: servers are always up
    on_server_down: OnServerDown = "keep"  # keep or reset the sessions of a server gone down
    slow_start: float = 0.0  # seconds to ramp a returning server's weight; 0 = off


@dataclass(frozen=True, slots=True)
class VrrpAddress:
    """A virtual address and its prefix length (32 when the config gave none)."""

    address: str
    prefix_len: int = 32

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix_len}"


@dataclass(frozen=True, slots=True)
class TrackInterface:
    """A tracked link: weight 0 puts the instance in FAULT while the link is down, any other
    weight is added to the priority instead (keepalived's ``track_interface``)."""

    interface: str
    weight: int = 0


@dataclass(frozen=True, slots=True)
class TrackPool:
    """A tracked pool, down while none of its servers is up; weight as for interfaces."""

    pool: str
    weight: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class VrrpInstanceConfig:
    """``[vrrp.instances.NAME]``: one VRRPv3 virtual router."""

    name: str
    interface: str
    vrid: int
    priority: int = 100
    advert_interval: float = 1.0  # a whole number of centiseconds, see advert_centiseconds
    preempt: bool = True
    preempt_delay: float = 0.0
    addresses: tuple[VrrpAddress, ...]
    unicast_peers: tuple[str, ...] = ()  # empty: multicast to 224.0.0.18
    track_interfaces: tuple[TrackInterface, ...] = ()
    track_pools: tuple[TrackPool, ...] = ()
    garp_count: int = 5
    garp_interval: float = 0.05
    # keepalived's garp_master_delay: a second round of gratuitous ARPs this long after
    # becoming master, for neighbours that ignored the first (Linux's 1 s ARP locktime).
    garp_master_delay: float = 5.0
    notify: str | None = None
    notify_master: str | None = None
    notify_backup: str | None = None
    notify_fault: str | None = None

    @property
    def advert_centiseconds(self) -> int:
        """The advertisement interval as RFC 5798's 12-bit Max Adver Int field (centiseconds)."""
        return round(self.advert_interval * 100)


INSTANCE_FIXED_KEYS: Final = ("interface", "vrid", "addresses", "unicast_peers")
"""Keys of ``[vrrp.instances.NAME]`` a reload cannot change (a new virtual router, a new
socket): every other key of an instance reloads in place, without a state change."""


def vrrp_restart_needed(old: Config, new: Config) -> list[str]:
    """The key paths of a reload from ``old`` to ``new`` that need a restart on the VRRP side:
    an instance added or removed, a key of :data:`INSTANCE_FIXED_KEYS` changed, the groups or
    the gateway instance changed. Empty: the VRRP change (if any) reloads in place."""
    paths: list[str] = []
    before = {ic.name: ic for ic in old.vrrp_instances}
    after = {ic.name: ic for ic in new.vrrp_instances}
    for name in sorted(before.keys() ^ after.keys()):
        paths.append(f"vrrp.instances.{name}")
    for name in sorted(before.keys() & after.keys()):
        paths += [f"vrrp.instances.{name}.{key}" for key in INSTANCE_FIXED_KEYS
                  if getattr(before[name], key) != getattr(after[name], key)]
    if old.vrrp_groups != new.vrrp_groups:
        paths.append("vrrp.groups")
    if old.gateway_instance != new.gateway_instance:
        paths.append("vrrp.gateway")
    return paths


@dataclass(frozen=True, slots=True, kw_only=True)
class VrrpGroupConfig:
    """``[vrrp.groups.NAME]``: instances that fail over together."""

    name: str
    instances: tuple[str, ...]
    notify: str | None = None
    notify_master: str | None = None
    notify_backup: str | None = None
    notify_fault: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncConfig:
    """``[sync]``: the session-sync link to the peer node."""

    listen: Endpoint
    peer: Endpoint
    key_file: str  # shared secret; the loader does not read it
    # A server's reply that arrives before its session's record (the SYN-ACK of a flow the
    # peer scheduled a moment ago) is held this long for the record, at most this many.
    reply_hold_timeout: float = 0.1
    reply_hold_packets: int = 1024
    # Bytes sent and not yet applied by a peer that does not keep up (beyond a snapshot in
    # flight) before the transport drops the connection; the next one starts with a snapshot.
    max_backlog: int = 8 << 20
    # A connection on which nothing arrives for this long is dead (the peer lost power, the
    # link is cut and TCP has not noticed): dropped, and the peer's copies expire by their
    # own timeouts again. Heartbeats and acknowledgements flow every 0.5 s on a live one.
    peer_timeout: float = 5.0


def _no_pools() -> Mapping[str, PoolConfig]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A whole, validated configuration file."""

    source: str  # the file it came from
    node: NodeConfig
    dataplane: DataplaneConfig
    sessions: SessionsConfig = SessionsConfig()
    metrics: MetricsConfig = MetricsConfig()
    virtual_servers: tuple[VirtualServerConfig, ...] = ()  # file order
    pools: Mapping[str, PoolConfig] = field(default_factory=_no_pools)  # read-only, file order
    vrrp_instances: tuple[VrrpInstanceConfig, ...] = ()
    vrrp_groups: tuple[VrrpGroupConfig, ...] = ()
    sync: SyncConfig | None = None
    # The instance that holds the servers' default gateway (``[vrrp] gateway``, or inferred:
    # the one instance on the server interface holding addresses that are no virtual
    # server's). None without VRRP or without such an instance.
    gateway_instance: str | None = None

    @property
    def standalone(self) -> bool:
        """No VRRP instance: this node holds its VIPs alone."""
        return not self.vrrp_instances

    def service_digest(self) -> bytes:
        """16 bytes that differ when the virtual servers or pools differ.

        Two nodes whose digests match agree on every virtual server (address, port, protocol,
        pool, scheduler, persistence) and every pool's servers, so a session or binding one of
        them sends names something the other has. Health checks, timeouts and VRRP do not
        enter it. Used by the sync hello and the table snapshot on disk."""
        canon = {
            "virtual_servers": sorted(
                tuple(getattr(vs, f.name) for f in dataclasses.fields(vs)
                      if f.name not in SOURCE_LIMIT_KEYS)
                for vs in self.virtual_servers),
            "pools": sorted((p.name, [dataclasses.astuple(s) for s in p.servers])
                            for p in self.pools.values()),
        }
        raw = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(raw, digest_size=16, person=b"lbd-services").digest()

    def owner_of(self, address: str) -> str:
        """The VRRP instance that holds a virtual server's address (``""`` standalone).

        Validation guarantees exactly one for every virtual server's address."""
        for inst in self.vrrp_instances:
            if any(a.address == address for a in inst.addresses):
                return inst.name
        return ""


class ConfigError(Exception):
    """A configuration was refused; ``errors`` holds every problem, ``FILE: key.path: problem``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

_DURATION: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS: Final = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}


def parse_duration(text: str) -> float:
    """``"<number><unit>"`` (unit ms, s, m or h) to float seconds: ``"1.5s"`` → 1.5.

    Raises ValueError for anything else, including a bare number.
    """
    if not isinstance(text, str):
        raise ValueError(
            f'a duration is a string with a unit such as "2s" or "100ms", got {_describe(text)}'
        )
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid duration {json.dumps(text)}: expected a number and a unit "
            '(ms, s, m or h), such as "100ms", "2s" or "10m"'
        )
    seconds = float(Decimal(match[1]) * _UNIT_SECONDS[match[2]])
    if not math.isfinite(seconds):  # hundreds of digits: beyond a float, would be infinity
        raise ValueError(f"duration {json.dumps(text)} is too long")
    return seconds


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate one TOML file. Every problem raises :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read file: {exc.strerror or exc}"]) from exc
    return loads_config(raw, source)


def loads_config(raw: bytes, source: str) -> Config:
    """Validate a file's contents (UTF-8 TOML); ``source`` names it in error messages.

    Every problem raises :class:`ConfigError`.
    """
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: byte {exc.start} is invalid"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from exc
    except ValueError as exc:  # tomllib lets int()'s digit limit through (4300 digits)
        raise ConfigError([f"{source}: TOML value error: {exc}"]) from exc
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: str) -> Config:
    """Validate a decoded TOML document; ``source`` names it in error messages."""
    errors = _Errors(source)
    root = _Table(errors, data, "")
    pools_raw = data.get("pools")
    pool_names = tuple(pools_raw) if isinstance(pools_raw, Mapping) else ()

    node_t = root.table("node", required=True)
    node = _node(node_t) if node_t else None
    dataplane_t = root.table("dataplane", required=True)
    dataplane = _dataplane(dataplane_t) if dataplane_t else None
    sessions_t = root.table("sessions")
    sessions = _sessions(sessions_t) if sessions_t else SessionsConfig()
    metrics_t = root.table("metrics")
    metrics = _metrics(metrics_t) if metrics_t else MetricsConfig()
    virtual_servers = _virtual_servers(root, pool_names)
    pools = _pools(root)
    instances, groups, gateway_raw = _vrrp(root.table("vrrp"), pool_names)
    sync_t = root.table("sync")
    sync = _sync(sync_t) if sync_t else None
    root.finish()
    gateway = _ownership(errors, virtual_servers, instances, gateway_raw,
                         dataplane.server_interface if dataplane else "")

    if errors.items or node is None or dataplane is None:
        raise ConfigError(errors.items)
    return Config(
        source=source,
        node=node,
        dataplane=dataplane,
        sessions=sessions,
        metrics=metrics,
        virtual_servers=virtual_servers,
        pools=types.MappingProxyType({pool.name: pool for pool in pools}),
        vrrp_instances=instances,
        vrrp_groups=groups,
        sync=sync,
        gateway_instance=gateway,
    )


def _ownership(errors: _Errors, virtual_servers: Sequence[VirtualServerConfig],
               instances: Sequence[VrrpInstanceConfig], gateway: str | None,
               server_if: str) -> str | None:
    """Active-active is plain config, so check what it rests on: with ``[vrrp]``, every
    virtual server's address is held, as a /32, by exactly one instance (the loader already
    refuses an address in two instances); and find the gateway instance."""
    if not instances:
        if gateway is not None:
            errors.add("vrrp.gateway", "names an instance, but there are no VRRP instances")
        return None
    held = {a.address: (inst.name, i, a) for inst in instances
            for i, a in enumerate(inst.addresses)}
    vips = set()
    for vs in virtual_servers:
        vips.add(vs.address)
        found = held.get(vs.address)
        if found is None:
            errors.add(f"virtual_servers.{vs.name}.address",
                       f"{vs.address} is held by no VRRP instance: with [vrrp], every virtual "
                       "server's address must be in the addresses of exactly one instance "
                       "(nothing would announce it)")
        elif found[2].prefix_len != 32:
            errors.add(f"vrrp.instances.{found[0]}.addresses[{found[1]}]",
                       f"{found[2]} is virtual server '{vs.name}''s address: it is routed "
                       "into the data plane, so give it as a /32 (no prefix length)")
    names = [inst.name for inst in instances]
    if gateway is not None:
        if gateway not in names:
            errors.add("vrrp.gateway", f"no VRRP instance named '{gateway}'{_hint(gateway, names)}")
            return None
        return gateway
    candidates = [inst.name for inst in instances if inst.interface == server_if
                  and any(a.address not in vips for a in inst.addresses)]
    if len(candidates) > 1:
        errors.add("vrrp.gateway", f"instances {', '.join(candidates)} all hold addresses on "
                   f"the server interface {server_if}: name the one that holds the servers' "
                   "gateway")
        return None
    return candidates[0] if candidates else None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _default(cls: type[Any], name: str) -> Any:
    """The default of a dataclass field: the model is the one place defaults are written."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)  # a typo here is a bug, not a config problem


def _node(t: _Table) -> NodeConfig:
    node = NodeConfig(
        name=t.req("name", _name, ""),
        control_socket=t.get("control_socket", _abs_path, _default(NodeConfig, "control_socket")),
        state_dir=t.get("state_dir", _abs_path, _default(NodeConfig, "state_dir")),
    )
    t.finish()
    return node


def _dataplane(t: _Table) -> DataplaneConfig:
    d = DataplaneConfig
    dp = DataplaneConfig(
        tun=t.get("tun", _ifname, _default(d, "tun")),
        client_interface=t.req("client_interface", _ifname, ""),
        server_interface=t.req("server_interface", _ifname, ""),
        batch=t.get("batch", _int(1, 4096), _default(d, "batch")),
        route_table=t.get("route_table", _route_table, _default(d, "route_table")),
        rule_priority=t.get("rule_priority", _rule_priority, _default(d, "rule_priority")),
        rps_cpus=t.get("rps_cpus", _cpu_mask, _default(d, "rps_cpus")),
        tun_queue=t.get("tun_queue", _int(64, 1 << 20), _default(d, "tun_queue")),
        syn_proxy=t.get("syn_proxy", _syn_proxy, _default(d, "syn_proxy")),
        syn_proxy_half_open=t.get("syn_proxy_half_open", _int(1),
                                  _default(d, "syn_proxy_half_open")),
        syn_proxy_hold=t.get("syn_proxy_hold", _duration(positive=True),
                             _default(d, "syn_proxy_hold")),
        offload=t.get("offload", _choice(get_args(Offload)), _default(d, "offload")),
    )
    if dp.offload != "off" and dp.syn_proxy:
        t.errors.add(t.at("offload"), f"{json.dumps(dp.offload)} and syn_proxy cannot both "
                     "be on: the proxy's flows need their own conntrack entries")
    if dp.tun and dp.tun in {dp.client_interface, dp.server_interface}:
        t.errors.add(t.at("tun"), f"{json.dumps(dp.tun)} is also a client or server interface")
    t.finish()
    return dp


def _sessions(t: _Table) -> SessionsConfig:
    d = SessionsConfig()
    positive = _duration(positive=True)
    sessions = SessionsConfig(
        max_sessions=t.get("max_sessions", _int(1), d.max_sessions),
        max_half_open=t.get("max_half_open", _int(1), d.max_half_open),
        max_tracked_sources=t.get("max_tracked_sources", _int(1), d.max_tracked_sources),
        tcp_syn_timeout=t.get("tcp_syn_timeout", positive, d.tcp_syn_timeout),
        tcp_established_timeout=t.get(
            "tcp_established_timeout", positive, d.tcp_established_timeout
        ),
        tcp_fin_timeout=t.get("tcp_fin_timeout", positive, d.tcp_fin_timeout),
        tcp_time_wait_timeout=t.get("tcp_time_wait_timeout", positive, d.tcp_time_wait_timeout),
        tcp_close_timeout=t.get("tcp_close_timeout", positive, d.tcp_close_timeout),
        udp_timeout=t.get("udp_timeout", positive, d.udp_timeout),
        expiry_tick=t.get("expiry_tick", positive, d.expiry_tick),
        snapshot_interval=t.get("snapshot_interval", _duration(), d.snapshot_interval),
    )
    t.finish()
    return sessions


def _metrics(t: _Table) -> MetricsConfig:
    raw = t.peek("listen")
    if raw == "":
        t.get("listen", _string(nonempty=False), "")  # mark the key as read
        metrics = MetricsConfig(listen=None)
    else:
        metrics = MetricsConfig(listen=t.get("listen", _endpoint(), MetricsConfig().listen))
    t.finish()
    return metrics


def _virtual_servers(root: _Table, pool_names: Collection[str]) -> tuple[VirtualServerConfig, ...]:
    d = VirtualServerConfig
    result: list[VirtualServerConfig] = []
    seen: dict[tuple[str, int, str], str] = {}
    for name, t in root.tables("virtual_servers"):
        protocol = t.get("protocol", _choice(_PROTOCOLS), _default(d, "protocol"))
        limits = (UDP_SOURCE_LIMITS if protocol == "udp"
                  else {key: _default(d, key) for key in UDP_SOURCE_LIMITS})
        vs = VirtualServerConfig(
            name=name,
            address=t.req("address", _ipv4(unicast=True), ""),
            port=t.req("port", _PORT, 0),
            protocol=protocol,
            pool=t.req("pool", _name, ""),
            scheduler=t.get("scheduler", _choice(_SCHEDULERS), _default(d, "scheduler")),
            persistence=t.get("persistence", _choice(_PERSISTENCES), _default(d, "persistence")),
            persistence_timeout=t.get(
                "persistence_timeout", _duration(positive=True), _default(d, "persistence_timeout")
            ),
            persistence_netmask=t.get(
                "persistence_netmask", _int(0, 32), _default(d, "persistence_netmask")
            ),
            max_conns_per_source=t.get("max_conns_per_source", _int(0, _LIMIT_MAX),
                                       limits["max_conns_per_source"]),
            max_conn_rate_per_source=t.get("max_conn_rate_per_source", _int(0, _LIMIT_MAX),
                                           limits["max_conn_rate_per_source"]),
            conn_rate_period=t.get("conn_rate_period", _duration(positive=True),
                                   _default(d, "conn_rate_period")),
        )
        if vs.pool and vs.pool not in pool_names:
            t.errors.add(t.at("pool"), f"no pool named '{vs.pool}'{_hint(vs.pool, pool_names)}")
        if vs.address and vs.port:
            key = (vs.address, vs.port, vs.protocol)
            if key in seen:
                t.errors.add(
                    t.path,
                    f"same address, port and protocol ({vs.address}:{vs.port}/{vs.protocol}) "
                    f"as virtual_servers.{seen[key]}",
                )
            else:
                seen[key] = _key(name)
        t.finish()
        result.append(vs)
    return tuple(result)


def _pools(root: _Table) -> list[PoolConfig]:
    d = PoolConfig
    result: list[PoolConfig] = []
    for name, t in root.tables("pools"):
        servers: list[ServerConfig] = []
        seen: dict[tuple[str, int], int] = {}
        for index, path, item in t.array("servers", required=True, nonempty=True):
            st = _Table.of(t.errors, item, path)
            if st is None:
                continue
            server = _server(st)
            if server.address and server.port:
                key = (server.address, server.port)
                if key in seen:
                    t.errors.add(path, f"duplicate server {server} (same as servers[{seen[key]}])")
                else:
                    seen[key] = index
            servers.append(server)
        hc_t = t.table("health_check")
        result.append(
            PoolConfig(
                name=name,
                servers=tuple(servers),
                health_check=_health_check(hc_t) if hc_t else None,
                on_server_down=t.get(
                    "on_server_down", _choice(_ON_SERVER_DOWN), _default(d, "on_server_down")
                ),
                slow_start=t.get("slow_start", _duration(), _default(d, "slow_start")),
            )
        )
        t.finish()
    return result


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig
    server = ServerConfig(
        address=t.req("address", _ipv4(unicast=True), ""),
        port=t.req("port", _PORT, 0),
        weight=t.get("weight", _int(0), _default(d, "weight")),
        backup=t.get("backup", _bool, _default(d, "backup")),
        max_conns=t.get("max_conns", _int(0), _default(d, "max_conns")),
    )
    t.finish()
    return server


# Which health-check types each type-specific key belongs to.
_CHECK_KEYS: Final[Mapping[str, tuple[CheckType, ...]]] = {
    "path": ("http", "https"),
    "expect_status": ("http", "https"),
    "expect_body": ("http", "https"),
    "host": ("http", "https"),
    "verify": ("https",),
    "payload": ("udp",),
    "expect": ("udp",),
    "command": ("script",),
}


def _health_check(t: _Table) -> HealthCheckConfig:
    d = HealthCheckConfig
    placeholder: CheckType = "tcp"
    kind = t.req("type", _choice(_CHECK_TYPES), placeholder)
    known_type = t.peek("type") in _CHECK_TYPES  # else type-specific keys cannot be judged
    for key, kinds in _CHECK_KEYS.items():
        t.allow(key)
        if known_type and key in t and kind not in kinds:
            t.errors.add(
                t.at(key), f"only valid for type {' or '.join(kinds)}, not {json.dumps(kind)}"
            )
    applies = {key for key, kinds in _CHECK_KEYS.items() if known_type and kind in kinds}

    ok: tuple[int, ...] = (200,)

    def get(key: str, conv: _Conv[_T], default: _T) -> _T | None:
        return t.get(key, conv, default) if key in applies else None

    def opt(key: str, conv: _Conv[_T]) -> _T | None:
        return t.opt(key, conv) if key in applies else None

    for key in ("command", "expect"):
        if key in applies and key not in t:
            t.errors.add(t.at(key), "required key missing")
    check = HealthCheckConfig(
        type=kind,
        interval=t.get("interval", _duration(positive=True), _default(d, "interval")),
        timeout=t.get("timeout", _duration(positive=True), _default(d, "timeout")),
        rise=t.get("rise", _int(1), _default(d, "rise")),
        fall=t.get("fall", _int(1), _default(d, "fall")),
        port=t.opt("port", _PORT),
        source=t.opt("source", _ipv4(unicast=True)),
        path=get("path", _url_path, "/"),
        expect_status=get("expect_status", _statuses, ok),
        expect_body=opt("expect_body", _string(nonempty=False)),
        host=opt("host", _string()),
        verify=get("verify", _bool, False),
        payload=get("payload", _string(nonempty=False), ""),
        expect=opt("expect", _string(nonempty=False)),
        command=opt("command", _argv),
    )
    t.finish()
    return check


def _vrrp(
    t: _Table | None, pool_names: Collection[str]
) -> tuple[tuple[VrrpInstanceConfig, ...], tuple[VrrpGroupConfig, ...], str | None]:
    if t is None:
        return (), (), None
    gateway = t.opt("gateway", _name)
    instances: list[VrrpInstanceConfig] = []
    vrids: dict[tuple[str, int], str] = {}
    holders: dict[str, str] = {}
    for name, it in t.tables("instances"):
        inst = _instance(name, it, pool_names, holders)
        if inst.interface and inst.vrid:
            other = vrids.setdefault((inst.interface, inst.vrid), name)
            if other != name:
                it.errors.add(
                    it.at("vrid"),
                    f"vrid {inst.vrid} on {inst.interface} is already used by instance '{other}'",
                )
        instances.append(inst)

    instance_names = [inst.name for inst in instances]
    groups: list[VrrpGroupConfig] = []
    member_of: dict[str, str] = {}
    for name, gt in t.tables("groups"):
        members: list[str] = []
        for _, path, item in gt.array("instances", required=True, nonempty=True):
            member = _name(gt.errors, path, item)
            if member is None:
                continue
            if member not in instance_names:
                gt.errors.add(
                    path,
                    f"no VRRP instance named '{member}'{_hint(member, instance_names)}",
                )
            elif member in members:
                gt.errors.add(path, f"instance '{member}' is listed twice")
            elif member_of.setdefault(member, name) != name:
                gt.errors.add(
                    path,
                    f"instance '{member}' is already in group '{member_of[member]}'",
                )
            members.append(member)
        groups.append(
            VrrpGroupConfig(
                name=name,
                instances=tuple(members),
                notify=gt.opt("notify", _command),
                notify_master=gt.opt("notify_master", _command),
                notify_backup=gt.opt("notify_backup", _command),
                notify_fault=gt.opt("notify_fault", _command),
            )
        )
        gt.finish()
    t.finish()
    return tuple(instances), tuple(groups), gateway


def _instance(
    name: str, t: _Table, pool_names: Collection[str], holders: dict[str, str]
) -> VrrpInstanceConfig:
    """One instance; ``holders`` maps each address claimed so far to its instance."""
    d = VrrpInstanceConfig
    addresses: list[VrrpAddress] = []
    for _, path, item in t.array("addresses", required=True, nonempty=True):
        vaddr = _vrrp_address(t.errors, path, item)
        if vaddr is None:
            continue
        holder = holders.setdefault(vaddr.address, name)
        if holder != name:
            t.errors.add(path, f"{vaddr.address} is already held by instance '{holder}'")
            continue
        if any(a.address == vaddr.address for a in addresses):
            t.errors.add(path, f"{vaddr.address} is listed twice")
            continue
        addresses.append(vaddr)
    peers: list[str] = []
    for _, path, item in t.array("unicast_peers"):
        peer = _ipv4(unicast=True)(t.errors, path, item)
        if peer is not None:
            if peer in peers:
                t.errors.add(path, f"{peer} is listed twice")
            peers.append(peer)
    track_interfaces: list[TrackInterface] = []
    for _, path, item in t.array("track_interfaces"):
        ti = _track(t.errors, path, item, "interface", _ifname)
        if ti is not None:
            track_interfaces.append(TrackInterface(*ti))
    track_pools: list[TrackPool] = []
    for _, path, item in t.array("track_pools"):
        tp = _track(t.errors, path, item, "pool", _name)
        if tp is None:
            continue
        if tp[0] not in pool_names:
            where = path if isinstance(item, str) else f"{path}.pool"
            t.errors.add(where, f"no pool named '{tp[0]}'{_hint(tp[0], pool_names)}")
        track_pools.append(TrackPool(*tp))
    inst = VrrpInstanceConfig(
        name=name,
        interface=t.req("interface", _ifname, ""),
        vrid=t.req("vrid", _int(1, 255), 0),
        priority=t.get("priority", _int(1, 255), _default(d, "priority")),
        advert_interval=t.get("advert_interval", _advert_interval, _default(d, "advert_interval")),
        preempt=t.get("preempt", _bool, _default(d, "preempt")),
        preempt_delay=t.get("preempt_delay", _duration(), _default(d, "preempt_delay")),
        addresses=tuple(addresses),
        unicast_peers=tuple(peers),
        track_interfaces=tuple(track_interfaces),
        track_pools=tuple(track_pools),
        garp_count=t.get("garp_count", _int(0, 100), _default(d, "garp_count")),
        garp_interval=t.get("garp_interval", _duration(), _default(d, "garp_interval")),
        garp_master_delay=t.get("garp_master_delay", _duration(),
                                _default(d, "garp_master_delay")),
        notify=t.opt("notify", _command),
        notify_master=t.opt("notify_master", _command),
        notify_backup=t.opt("notify_backup", _command),
        notify_fault=t.opt("notify_fault", _command),
    )
    t.finish()
    return inst


def _track(
    errors: _Errors, path: str, item: object, key: str, conv: _Conv[str]
) -> tuple[str, int] | None:
    """A tracking entry: a bare name, or ``{KEY = name, weight = N}``."""
    if isinstance(item, str):
        target = conv(errors, path, item)
        return None if target is None else (target, 0)
    if not isinstance(item, Mapping):
        errors.add(
            path,
            f"expected a name or a table {{ {key} = ..., weight = ... }}, got {_describe(item)}",
        )
        return None
    t = _Table(errors, item, path)
    target = t.req(key, conv, "")
    weight = t.get("weight", _int(-254, 254), 0)
    t.finish()
    return (target, weight) if target else None


def _sync(t: _Table) -> SyncConfig:
    sync = SyncConfig(
        listen=t.req("listen", _endpoint(), Endpoint("", 0)),
        peer=t.req("peer", _endpoint(unicast=True), Endpoint("", 0)),
        key_file=t.req("key_file", _string(), ""),
        reply_hold_timeout=t.get("reply_hold_timeout", _duration(positive=True),
                                 _default(SyncConfig, "reply_hold_timeout")),
        reply_hold_packets=t.get("reply_hold_packets", _int(1, 1 << 20),
                                 _default(SyncConfig, "reply_hold_packets")),
        max_backlog=t.get("max_backlog", _int(1 << 12, 1 << 30),
                          _default(SyncConfig, "max_backlog")),
        peer_timeout=t.get("peer_timeout", _duration(positive=True),
                           _default(SyncConfig, "peer_timeout")),
    )
    if sync.peer_timeout < 1.0:  # heartbeats and acknowledgements come every 0.5 s
        t.errors.add(t.at("peer_timeout"), f"{sync.peer_timeout:g} s is less than 1s: a live "
                     "connection, with a heartbeat every 0.5 s, would be dropped")
    t.finish()
    return sync


# --------------------------------------------------------------------------------------------
# Reading tables: collects errors, tracks which keys were read, reports the rest as unknown
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)


class _Errors:
    __slots__ = ("items", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, path: str, problem: str) -> None:
        self.items.append(f"{self.source}: {path}: {problem}")


class _Missing(enum.Enum):
    MISSING = enum.auto()


_MISSING: Final = _Missing.MISSING

# A converter checks one value and returns it typed, or reports the problem and returns None.
_Conv: TypeAlias = Callable[[_Errors, str, object], "_T | None"]


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    """A key as TOML would write it in a dotted path."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


class _Table:
    """One TOML table under a key path."""

    __slots__ = ("_data", "_known", "errors", "path")

    def __init__(self, errors: _Errors, data: Mapping[str, object], path: str) -> None:
        self.errors = errors
        self._data = data
        self.path = path
        self._known: set[str] = set()

    @classmethod
    def of(cls, errors: _Errors, value: object, path: str) -> _Table | None:
        if isinstance(value, Mapping):
            return cls(errors, value, path)
        errors.add(path, f"expected a table, got {_describe(value)}")
        return None

    def at(self, key: str) -> str:
        return f"{self.path}.{_key(key)}" if self.path else _key(key)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def allow(self, key: str) -> None:
        """Count ``key`` as known without reading it."""
        self._known.add(key)

    def peek(self, key: str) -> object:
        return self._data.get(key, _MISSING)

    def _raw(self, key: str, required: bool, missing: str = "required key missing") -> object:
        self._known.add(key)
        if key in self._data:
            return self._data[key]
        if required:
            self.errors.add(self.at(key), missing)
        return _MISSING

    def req(self, key: str, conv: _Conv[_T], placeholder: _T) -> _T:
        """A required key; the placeholder stands in when it is missing or wrong."""
        raw = self._raw(key, required=True)
        value = None if raw is _MISSING else conv(self.errors, self.at(key), raw)
        return placeholder if value is None else value

    def get(self, key: str, conv: _Conv[_T], default: _T) -> _T:
        raw = self._raw(key, required=False)
        value = None if raw is _MISSING else conv(self.errors, self.at(key), raw)
        return default if value is None else value

    def opt(self, key: str, conv: _Conv[_T]) -> _T | None:
        raw = self._raw(key, required=False)
        return None if raw is _MISSING else conv(self.errors, self.at(key), raw)

    def table(self, key: str, *, required: bool = False) -> _Table | None:
        raw = self._raw(key, required=required, missing="required section missing")
        if raw is _MISSING:
            return None
        return _Table.of(self.errors, raw, self.at(key))

    def tables(self, key: str) -> Iterator[tuple[str, _Table]]:
        """The named tables under ``key`` (``[key.NAME]``), in file order."""
        outer = self.table(key)
        if outer is None:
            return
        for name, value in outer._data.items():
            outer.allow(name)
            path = outer.at(name)
            if _name(self.errors, path, name) is None:
                continue
            inner = _Table.of(self.errors, value, path)
            if inner is not None:
                yield name, inner

    def array(
        self, key: str, *, required: bool = False, nonempty: bool = False
    ) -> Iterator[tuple[int, str, object]]:
        """(index, path, item) for each item of an array."""
        raw = self._raw(key, required=required)
        if raw is _MISSING:
            return
        if not isinstance(raw, list):
            self.errors.add(self.at(key), f"expected an array, got {_describe(raw)}")
            return
        if nonempty and not raw:
            self.errors.add(self.at(key), "must not be empty")
        for index, item in enumerate(raw):
            yield index, f"{self.at(key)}[{index}]", item

    def finish(self) -> None:
        """Report every key that nothing read."""
        for key in self._data:
            if key not in self._known:
                self.errors.add(self.at(key), f"unknown key '{key}'{_hint(key, self._known)}")


def _hint(word: str, options: Collection[str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------

_PROTOCOLS: Final[tuple[Protocol, ...]] = get_args(Protocol)
_SCHEDULERS: Final[tuple[Scheduler, ...]] = get_args(Scheduler)
_PERSISTENCES: Final[tuple[Persistence, ...]] = get_args(Persistence)
_ON_SERVER_DOWN: Final[tuple[OnServerDown, ...]] = get_args(OnServerDown)
_CHECK_TYPES: Final[tuple[CheckType, ...]] = get_args(CheckType)


def _string(*, nonempty: bool = True) -> _Conv[str]:
    def conv(errors: _Errors, path: str, value: object) -> str | None:
        if not isinstance(value, str):
            errors.add(path, f"expected a string, got {_describe(value)}")
            return None
        if nonempty and not value.strip():
            errors.add(path, "must not be empty")
            return None
        return value

    return conv


def _int(lo: int, hi: int | None = None) -> _Conv[int]:
    def conv(errors: _Errors, path: str, value: object) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.add(path, f"expected an integer, got {_describe(value)}")
            return None
        if hi is None and value < lo:
            errors.add(path, f"must be >= {lo}, got {value}")
            return None
        if hi is not None and not lo <= value <= hi:
            errors.add(path, f"must be between {lo} and {hi}, got {value}")
            return None
        return value

    return conv


_PORT: Final = _int(1, 65535)
_LIMIT_MAX: Final = 1 << 31  # a per-source limit (0 = unlimited)


def _bool(errors: _Errors, path: str, value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    errors.add(path, f"expected a boolean (true or false), got {_describe(value)}")
    return None


def _syn_proxy(errors: _Errors, path: str, value: object) -> bool | Literal["auto"] | None:
    if isinstance(value, bool):
        return value
    if value == "auto":
        return "auto"
    errors.add(path, f'expected true, false or "auto", got {_describe(value)}')
    return None


def _choice(choices: tuple[_S, ...]) -> _Conv[_S]:
    def conv(errors: _Errors, path: str, value: object) -> _S | None:
        if not isinstance(value, str):
            errors.add(path, f"expected a string, got {_describe(value)}")
            return None
        for choice in choices:
            if value == choice:
                return choice
        errors.add(
            path,
            f"must be one of {', '.join(choices)}, got {json.dumps(value)}{_hint(value, choices)}",
        )
        return None

    return conv


def _name(errors: _Errors, path: str, value: object) -> str | None:
    """A name of a pool, virtual server, instance or group: it appears on lbctl command lines
    and in metric labels, so it is non-empty and has no whitespace or control characters."""
    if not isinstance(value, str):
        errors.add(path, f"expected a name (string), got {_describe(value)}")
        return None
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        errors.add(path, f"invalid name {json.dumps(value)}: must be non-empty, without spaces")
        return None
    return value


def _duration(*, positive: bool = False) -> _Conv[float]:
    def conv(errors: _Errors, path: str, value: object) -> float | None:
        if not isinstance(value, str):
            errors.add(
                path,
                f'expected a duration string with a unit such as "2s" or "100ms", '
                f"got {_describe(value)}",
            )
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            errors.add(path, str(exc))
            return None
        if positive and seconds <= 0:
            errors.add(path, f"must be greater than 0, got {json.dumps(value)}")
            return None
        return seconds

    return conv


def _advert_interval(errors: _Errors, path: str, value: object) -> float | None:
    """RFC 5798 carries the interval as 12 bits of centiseconds: 10ms..40.95s in 10ms steps."""
    seconds = _duration()(errors, path, value)
    if seconds is None:
        return None
    centis = round(seconds * 100)
    if abs(seconds * 100 - centis) > 1e-6 or not 1 <= centis <= 4095:
        errors.add(
            path,
            f"must be a multiple of 10ms between 10ms and 40.95s, got {json.dumps(value)}",
        )
        return None
    return seconds


def _is_dotted_quad(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(
        part.isascii()
        and part.isdigit()
        and len(part) <= 3
        and (part == "0" or not part.startswith("0"))
        and int(part) <= 255
        for part in parts
    )


def _ipv4(*, unicast: bool = False) -> _Conv[str]:
    """A dotted quad; ``unicast`` also refuses 0/8, 127/8, multicast and 240/4 (which no host,
    VIP or peer can be), while a listen address may be 0.0.0.0 or loopback."""

    def conv(errors: _Errors, path: str, value: object) -> str | None:
        if not isinstance(value, str):
            errors.add(path, f"expected an IPv4 address (string), got {_describe(value)}")
            return None
        if not _is_dotted_quad(value):
            errors.add(path, f"not an IPv4 address (A.B.C.D): {json.dumps(value)}")
            return None
        first = int(value.split(".", 1)[0])
        if unicast and (first in {0, 127} or first >= 224):
            errors.add(path, f"not a unicast host address: {value}")
            return None
        return value

    return conv


def _endpoint(*, unicast: bool = False) -> _Conv[Endpoint]:
    address = _ipv4(unicast=unicast)

    def conv(errors: _Errors, path: str, value: object) -> Endpoint | None:
        if not isinstance(value, str):
            errors.add(path, f'expected "ADDR:PORT" (string), got {_describe(value)}')
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not port.isascii() or not port.isdigit():
            errors.add(path, f'expected "ADDR:PORT", got {json.dumps(value)}')
            return None
        checked = address(errors, path, host)
        if len(port) > 5:  # int() would refuse thousands of digits; no port has six
            errors.add(path, f"port must be between 1 and 65535, got {json.dumps(port)}")
            return None
        number = _PORT(errors, path, int(port))
        if checked is None or number is None:
            return None
        return Endpoint(checked, number)

    return conv


def _vrrp_address(errors: _Errors, path: str, value: object) -> VrrpAddress | None:
    if not isinstance(value, str):
        errors.add(path, f'expected "A.B.C.D" or "A.B.C.D/LEN", got {_describe(value)}')
        return None
    address, sep, length = value.partition("/")
    checked = _ipv4(unicast=True)(errors, path, address)
    if checked is None:
        return None
    if not sep:
        return VrrpAddress(checked)
    if not (length.isascii() and length.isdigit() and len(length) <= 2
            and 1 <= int(length) <= 32):
        errors.add(path, f"prefix length must be 1..32, got {json.dumps(value)}")
        return None
    return VrrpAddress(checked, int(length))


def _ifname(errors: _Errors, path: str, value: object) -> str | None:
    """A Linux interface name: 1..15 bytes, no '/', ':' or whitespace, not '.' or '..'."""
    if not isinstance(value, str):
        errors.add(path, f"expected an interface name (string), got {_describe(value)}")
        return None
    if (
        not 1 <= len(value.encode()) <= 15
        or value in {".", ".."}
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in value)
    ):
        errors.add(path, f"not a valid interface name: {json.dumps(value)}")
        return None
    return value


def _abs_path(errors: _Errors, path: str, value: object) -> str | None:
    text = _string()(errors, path, value)
    if text is not None and not text.startswith("/"):
        errors.add(path, f"must be an absolute path, got {json.dumps(text)}")
        return None
    return text


def _cpu_mask(errors: _Errors, path: str, value: object) -> str | None:
    """"all", "off", or a hex CPU mask in the kernel's format (32-bit groups, commas)."""
    if not isinstance(value, str):
        errors.add(path, f"expected a string, got {_describe(value)}")
        return None
    groups = value.split(",")
    if value in {"all", "off"} or all(
        1 <= len(g) <= 8 and all(c in "0123456789abcdefABCDEF" for c in g) for g in groups
    ):
        return value
    errors.add(path, f'must be "all", "off" or a hex CPU mask like "3", got {json.dumps(value)}')
    return None


def _route_table(errors: _Errors, path: str, value: object) -> int | None:
    table = _int(1, 2**31 - 1)(errors, path, value)
    if table in {253, 254, 255}:
        errors.add(path, f"{table} is a kernel table (253 default, 254 main, 255 local)")
        return None
    return table


def _rule_priority(errors: _Errors, path: str, value: object) -> int | None:
    """lbd's rules must sort before the main table's rule (32766) to be consulted at all."""
    last = 32766 - RULE_PRIORITY_SPAN
    priority = _int(1)(errors, path, value)
    if priority is not None and priority > last:
        errors.add(
            path,
            f"must be <= {last}: lbd uses {RULE_PRIORITY_SPAN} priorities from here, all before "
            f"the main table's rule at 32766; got {priority}",
        )
        return None
    return priority


def _url_path(errors: _Errors, path: str, value: object) -> str | None:
    text = _string()(errors, path, value)
    if text is not None and not text.startswith("/"):
        errors.add(path, f'must start with "/", got {json.dumps(text)}')
        return None
    return text


def _statuses(errors: _Errors, path: str, value: object) -> tuple[int, ...] | None:
    """``expect_status``: one status code or a non-empty array of them."""
    status = _int(100, 599)
    if not isinstance(value, list):
        one = status(errors, path, value)
        return None if one is None else (one,)
    if not value:
        errors.add(path, "must not be empty")
        return None
    codes = [status(errors, f"{path}[{i}]", item) for i, item in enumerate(value)]
    valid = [code for code in codes if code is not None]
    return tuple(valid) if len(valid) == len(codes) else None


def _split(errors: _Errors, path: str, value: object) -> list[str] | None:
    text = _string()(errors, path, value)
    if text is None:
        return None
    try:
        return shlex.split(text)
    except ValueError as exc:
        errors.add(path, f"cannot split into arguments: {exc}")
        return None


def _command(errors: _Errors, path: str, value: object) -> str | None:
    """A notify command, kept as written (keepalived runs it through a shell-like split)."""
    return value if isinstance(value, str) and _split(errors, path, value) is not None else None


def _argv(errors: _Errors, path: str, value: object) -> tuple[str, ...] | None:
    """A script check's command: an absolute executable path, then its arguments."""
    argv = _split(errors, path, value)
    if argv is None:
        return None
    if not argv[0].startswith("/"):
        errors.add(path, f"must start with an absolute executable path, got {json.dumps(argv[0])}")
        return None
    return tuple(argv)
