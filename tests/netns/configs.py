"""TOML configs for namespace tests, built from a few knobs so each test shows what differs."""

from __future__ import annotations

from lab.topology import SERVERS, VIP


def servers_toml(port: int, names: tuple[str, ...] = tuple(SERVERS), extra: str = "") -> str:
    items = ",\n".join(f'  {{ address = "{SERVERS[n]}", port = {port}{extra} }}' for n in names)
    return f"[\n{items},\n]"


def single(*, scheduler: str = "rr", persistence: str = "none", netmask: int = 32,
           health: str = "", sessions: str = "", web_servers: str | None = None,
           pool_extra: str = "", udp_port: int = 5353, name: str = "lb-test") -> str:
    """A standalone node: web (VIP:80/tcp → :8080) and dns (VIP:53/udp → :udp_port)."""
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
