"""TOML configs for the namespace tests and the lab benches, built from a few knobs so each
use shows what differs."""

from __future__ import annotations

from lab.topology import SERVERS, VIP


def servers_toml(port: int, names: tuple[str, ...] = tuple(SERVERS), extra: str = "") -> str:
    items = ",\n".join(f'  {{ address = "{SERVERS[n]}", port = {port}{extra} }}' for n in names)
    return f"[\n{items},\n]"


def with_dataplane(text: str, *lines: str) -> str:
    """``text`` (a config this module made, or one shipped in conf/) with more
    ``[dataplane]`` keys, e.g. ``'offload = "conntrack"'``."""
    anchor = 'server_interface = "eth1"\n'
    assert anchor in text, "no [dataplane] server_interface line to add keys after"
    return text.replace(anchor, anchor + "".join(f"{line}\n" for line in lines), 1)


def single(*, scheduler: str = "rr", persistence: str = "none", netmask: int = 32,
           health: str = "", sessions: str = "", web_servers: str | None = None,
           pool_extra: str = "", udp_port: int = 5353, name: str = "lb-test",
           web_extra: str = "") -> str:
    """A standalone node: web (VIP:80/tcp → :8080) and dns (VIP:53/udp → :udp_port);
    ``web_extra``: more keys of the web virtual server (TOML lines)."""
    web = web_servers or servers_toml(8080)
    return f"""
[node]
name = "{name}"
control_socket = "@SOCKET@"

[dataplane]
client_interface = "eth0"
server_interface = "eth1"

[metrics]
listen = "127.0.0.1:9641"

[sessions]
{sessions}

[virtual_servers.web]
address = "{VIP}"
port = 80
pool = "web"
scheduler = "{scheduler}"
persistence = "{persistence}"
persistence_netmask = {netmask}
{web_extra}

[virtual_servers.dns]
address = "{VIP}"
port = 53
protocol = "udp"
pool = "dns"
scheduler = "rr"

[pools.web]
servers = {web}
{health}
{pool_extra}

[pools.dns]
servers = {servers_toml(udp_port)}
"""


def instance(name: str, *, interface: str, vrid: int, address: str, priority: int,
             advert: str = "100ms", preempt: bool = True, extra: str = "") -> str:
    """One ``[vrrp.instances.NAME]`` table."""
    return f"""
[vrrp.instances.{name}]
interface = "{interface}"
vrid = {vrid}
priority = {priority}
advert_interval = "{advert}"
preempt = {"true" if preempt else "false"}
addresses = ["{address}"]
{extra}
"""


def pair(node: str, *, priority: int, advert: str = "100ms", preempt: bool = True,
         extra_instance: str = "", sessions: str = "", sync: bool = False,
         health: str = "", extra_group: str = "", persistence: str = "none",
         web_extra: str = "") -> str:
    """One node of an HA pair: the single-node services plus VRRP instances "front" (the
    VIP on eth0, vrid 51) and "back" (the servers' gateway on eth1, vrid 52) in group
    "pair". ``node`` is "lba" or "lbb"."""
    me, peer = ("198.19.0.2", "198.19.0.3") if node == "lba" else ("198.19.0.3", "198.19.0.2")
    base = single(name=f"lb-{node}", sessions=sessions, health=health, persistence=persistence,
                  web_extra=web_extra)
    sync_toml = f"""
[sync]
listen = "{me}:7411"
peer = "{peer}:7411"
key_file = "@KEYFILE@"
""" if sync else ""
    front = instance("front", interface="eth0", vrid=51, address=VIP, priority=priority,
                     advert=advert, preempt=preempt, extra=extra_instance)
    back = instance("back", interface="eth1", vrid=52, address="198.18.0.1/24",
                    priority=priority, advert=advert, preempt=preempt, extra=extra_instance)
    return (base + front + back + f"""
[vrrp.groups.pair]
instances = ["front", "back"]
{extra_group}
{sync_toml}""")


def pair_front_only(node: str, *, priority: int, advert: str = "100ms",
                    preempt: bool = True) -> str:
    """One node of a pair with the client-side instance only: "front" (the VIP on eth0,
    vrid 51), no "back" instance and no group. For a peer that runs just that instance
    (keepalived in interop tests). ``node`` is "lba" or "lbb"."""
    return single(name=f"lb-{node}") + instance("front", interface="eth0", vrid=51,
                                                address=VIP, priority=priority, advert=advert,
                                                preempt=preempt)


UNLIMITED_SOURCES = "max_conns_per_source = 0\nmax_conn_rate_per_source = 0"
"""``web_extra`` for a load from one client that is meant to go beyond the per-source
defaults (wrk: thousands of new connections a second from one address)."""


def iperf_service(port: int = 5201, names: tuple[str, ...] = ("s1",)) -> str:
    """TOML to append to a config: virtual server "iperf" (VIP:port/tcp → servers:port)."""
    return f"""
[virtual_servers.iperf]
address = "{VIP}"
port = {port}
pool = "iperf"
scheduler = "rr"

[pools.iperf]
servers = {servers_toml(port, names)}
"""


def udp_flood_service(port: int = 5202, name: str = "s2") -> str:
    """TOML to append: VIP:port over TCP and UDP to ``name``:port — an iperf3 UDP test (its
    control connection is TCP on the same port) through the balancer."""
    return "".join(f"""
[virtual_servers.iperf{proto}]
address = "{VIP}"
port = {port}
protocol = "{proto}"
pool = "iperf{proto}"
scheduler = "rr"

[pools.iperf{proto}]
servers = {servers_toml(port, (name,))}
""" for proto in ("tcp", "udp"))
