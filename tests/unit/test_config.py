"""Config loader: defaults, every class of error, and the example files in conf/.

Error tests start from one valid document (``BASE``), change one key path and expect the exact
``FILE: key.path: problem`` line among the errors.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from lb.config import (
    Config,
    ConfigError,
    Endpoint,
    HealthCheckConfig,
    TrackInterface,
    TrackPool,
    VrrpAddress,
    load_config,
    parse_config,
    parse_duration,
    vrrp_restart_needed,
)

REPO = Path(__file__).resolve().parents[2]
SOURCE = "conf/x.toml"

MINIMAL = """
[node]
name = "lb-test"

[dataplane]
client_interface = "eth0"
server_interface = "eth1"
"""

BASE = """
[node]
name = "lb-test"

[dataplane]
client_interface = "eth0"
server_interface = "eth1"

[virtual_servers.web]
address = "198.51.100.10"
port = 80
pool = "web"

[virtual_servers.dns]
address = "198.51.100.10"
port = 53
protocol = "udp"
pool = "dns"

[pools.web]
health_check = { type = "http" }
servers = [
  { address = "198.18.0.11", port = 8080 },
  { address = "198.18.0.12", port = 8080 },
]

[pools.dns]
servers = [{ address = "198.18.0.11", port = 5353 }]

[vrrp.instances.front]
interface = "eth0"
vrid = 51
addresses = ["198.51.100.10"]
track_interfaces = ["eth0"]
track_pools = [{ pool = "web", weight = -50 }]

[vrrp.instances.back]
interface = "eth1"
vrid = 52
addresses = ["198.18.0.1/24"]

[vrrp.groups.pair]
instances = ["front", "back"]

[sync]
listen = "198.19.0.2:7411"
peer = "198.19.0.3:7411"
key_file = "/etc/lbd/sync.key"
"""

# The example of DESIGN.md section 3, the contract, verbatim.
CONTRACT_EXAMPLE = """
[node]
name = "lb-a"                         # unique per node
control_socket = "/run/lbd/control.sock"

[dataplane]
tun = "lbtun0"
client_interface = "eth0"
server_interface = "eth1"

[metrics]
listen = "127.0.0.1:9641"

[virtual_servers.web]
address = "198.51.100.10"
port = 80
protocol = "tcp"
pool = "web"
scheduler = "wlc"
persistence = "client-ip"
persistence_timeout = "10m"
persistence_netmask = 32

[pools.web]
health_check = { type = "http", path = "/", expect_status = 200, interval = "1s", timeout = "500ms", rise = 2, fall = 2 }
servers = [
  { address = "198.18.0.11", port = 8080, weight = 1 },
  { address = "198.18.0.12", port = 8080, weight = 1 },
  { address = "198.18.0.13", port = 8080, weight = 1, backup = true },
]

[vrrp.instances.front]
interface = "eth0"
vrid = 51
priority = 200
advert_interval = "100ms"
preempt = true
addresses = ["198.51.100.10"]

[vrrp.instances.back]
interface = "eth1"
vrid = 52
priority = 200
advert_interval = "100ms"
addresses = ["198.18.0.1/24"]

[vrrp.groups.pair]
instances = ["front", "back"]

[sync]
listen = "198.19.0.2:7411"
peer = "198.19.0.3:7411"
key_file = "/etc/lbd/sync.key"
"""  # noqa: E501  (the contract's health_check line, kept as written)

_DELETE = object()
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def doc(text: str = BASE, **changes: Any) -> dict[str, Any]:
    """Decode ``text`` and apply ``changes``: key path (dots as ``__``) → value or _DELETE."""
    data = tomllib.loads(text)
    for path, value in changes.items():
        edit(data, path.replace("__", "."), value)
    return data


def edit(data: dict[str, Any], path: str, value: object) -> None:
    steps: list[str | int] = [name if name else int(index) for name, index in _STEP.findall(path)]
    node: Any = data
    for step in steps[:-1]:
        node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
    last = steps[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, SOURCE)
    return info.value.errors


# --------------------------------------------------------------------------------------------
# Valid configurations and defaults
# --------------------------------------------------------------------------------------------


def test_minimal_config_is_standalone_with_no_services() -> None:
    config = parse_config(doc(MINIMAL), SOURCE)
    assert config.source == SOURCE
    assert config.node.name == "lb-test"
    assert config.dataplane.client_interface == "eth0"
    assert config.dataplane.server_interface == "eth1"
    assert config.standalone
    assert (config.virtual_servers, dict(config.pools), config.vrrp_groups) == ((), {}, ())
    assert config.sync is None


def test_base_document_is_valid() -> None:
    config = parse_config(doc(), SOURCE)
    assert [vs.name for vs in config.virtual_servers] == ["web", "dns"]
    assert list(config.pools) == ["web", "dns"]
    assert not config.standalone
    assert config.vrrp_groups[0].instances == ("front", "back")
    assert config.vrrp_instances[1].addresses == (VrrpAddress("198.18.0.1", 24),)


def _get(config: Config, path: str) -> object:
    """Read a dotted attribute path; a step in brackets indexes or looks up by key."""
    value: Any = config
    for name, index in _STEP.findall(path):
        if name and isinstance(value, tuple):
            value = next(item for item in value if getattr(item, "name", None) == name)
        elif name and not hasattr(value, name):
            value = value[name]
        else:
            value = getattr(value, name) if name else value[int(index)]
    return value


DEFAULTS = [
    ("node.control_socket", "/run/lbd/control.sock"),
    ("dataplane.tun", "lbtun0"),
    ("dataplane.batch", 256),
    ("dataplane.route_table", 4711),
    ("dataplane.rule_priority", 4711),
    ("dataplane.rps_cpus", "all"),
    ("dataplane.syn_proxy", False),
    ("dataplane.syn_proxy_half_open", 1000),
    ("dataplane.syn_proxy_hold", 30.0),
    ("dataplane.offload", "off"),
    ("sessions.max_sessions", 1_048_576),
    ("sessions.tcp_syn_timeout", 60.0),
    ("sessions.tcp_established_timeout", 900.0),
    ("sessions.tcp_fin_timeout", 120.0),
    ("sessions.tcp_time_wait_timeout", 120.0),
    ("sessions.tcp_close_timeout", 10.0),
    ("sessions.udp_timeout", 300.0),
    ("sessions.expiry_tick", 0.1),
    ("sessions.snapshot_interval", 2.0),
    ("metrics.listen", Endpoint("127.0.0.1", 9641)),
    ("virtual_servers.web.protocol", "tcp"),
    ("virtual_servers.web.scheduler", "wlc"),
    ("virtual_servers.web.persistence", "none"),
    ("virtual_servers.web.persistence_timeout", 300.0),
    ("virtual_servers.web.persistence_netmask", 32),
    ("virtual_servers.web.max_conns_per_source", 10_000),
    ("virtual_servers.web.max_conn_rate_per_source", 1_000),
    ("virtual_servers.web.conn_rate_period", 1.0),
    ("virtual_servers.dns.max_conns_per_source", 0),  # udp: unlimited unless set
    ("virtual_servers.dns.max_conn_rate_per_source", 0),
    ("sessions.max_tracked_sources", 0),
    ("pools.web.on_server_down", "keep"),
    ("pools.web.slow_start", 0.0),
    ("pools.dns.health_check", None),
    ("pools.web.servers[0].weight", 1),
    ("pools.web.servers[0].backup", False),
    ("pools.web.servers[0].max_conns", 0),
    ("pools.web.health_check.interval", 2.0),
    ("pools.web.health_check.timeout", 1.0),
    ("pools.web.health_check.rise", 2),
    ("pools.web.health_check.fall", 3),
    ("pools.web.health_check.port", None),
    ("pools.web.health_check.source", None),
    ("pools.web.health_check.path", "/"),
    ("pools.web.health_check.expect_status", (200,)),
    ("pools.web.health_check.expect_body", None),
    ("pools.web.health_check.host", None),
    ("pools.web.health_check.verify", None),  # https only
    ("vrrp_instances.back.priority", 100),
    ("vrrp_instances.back.advert_interval", 1.0),
    ("vrrp_instances.back.preempt", True),
    ("vrrp_instances.back.preempt_delay", 0.0),
    ("vrrp_instances.back.unicast_peers", ()),
    ("vrrp_instances.back.track_interfaces", ()),
    ("vrrp_instances.back.track_pools", ()),
    ("vrrp_instances.back.garp_count", 5),
    ("vrrp_instances.back.garp_interval", 0.05),
    ("vrrp_instances.back.notify", None),
    ("vrrp_instances.back.notify_master", None),
    ("vrrp_instances.back.notify_backup", None),
    ("vrrp_instances.back.notify_fault", None),
    ("vrrp_groups.pair.notify", None),
]


@pytest.mark.parametrize(("path", "expected"), DEFAULTS, ids=[p for p, _ in DEFAULTS])
def test_default(path: str, expected: object) -> None:
    assert _get(parse_config(doc(), SOURCE), path) == expected


# (description, changes to BASE, attribute path, expected value)
VALUES: list[tuple[str, dict[str, Any], str, object]] = [
    ("metrics disabled", {"metrics__listen": ""}, "metrics.listen", None),
    (
        "metrics endpoint",
        {"metrics__listen": "0.0.0.0:9100"},
        "metrics.listen",
        Endpoint("0.0.0.0", 9100),
    ),
    ("sync endpoints", {}, "sync.peer", Endpoint("198.19.0.3", 7411)),
    ("sync peer_timeout default", {}, "sync.peer_timeout", 5.0),
    ("sync peer_timeout", {"sync__peer_timeout": "2s"}, "sync.peer_timeout", 2.0),
    ("duration in minutes", {"sessions__udp_timeout": "1.5m"}, "sessions.udp_timeout", 90.0),
    ("snapshots every 500ms", {"sessions__snapshot_interval": "500ms"},
     "sessions.snapshot_interval", 0.5),
    ("snapshots disabled", {"sessions__snapshot_interval": "0s"}, "sessions.snapshot_interval",
     0.0),
    ("no concurrent limit per source", {"virtual_servers__web__max_conns_per_source": 0},
     "virtual_servers.web.max_conns_per_source", 0),
    ("a rate per 10s", {"virtual_servers__web__max_conn_rate_per_source": 20,
                        "virtual_servers__web__conn_rate_period": "10s"},
     "virtual_servers.web.conn_rate_period", 10.0),
    ("a udp virtual server's limit when set", {"virtual_servers__dns__max_conns_per_source": 9},
     "virtual_servers.dns.max_conns_per_source", 9),
    ("sources tracked", {"sessions__max_tracked_sources": 5000},
     "sessions.max_tracked_sources", 5000),
    (
        "address without prefix is /32",
        {},
        "vrrp_instances.front.addresses",
        (VrrpAddress("198.51.100.10", 32),),
    ),
    (
        "advert interval in centiseconds",
        {"vrrp__instances__front__advert_interval": "40.95s"},
        "vrrp_instances.front.advert_centiseconds",
        4095,
    ),
    (
        "track interface by name",
        {},
        "vrrp_instances.front.track_interfaces",
        (TrackInterface("eth0", 0),),
    ),
    (
        "track interface with weight",
        {"vrrp__instances__front__track_interfaces": [{"interface": "eth1", "weight": -20}]},
        "vrrp_instances.front.track_interfaces",
        (TrackInterface("eth1", -20),),
    ),
    ("track pool with weight", {}, "vrrp_instances.front.track_pools", (TrackPool("web", -50),)),
    (
        "track pool by name",
        {"vrrp__instances__front__track_pools": ["dns"]},
        "vrrp_instances.front.track_pools",
        (TrackPool("dns", 0),),
    ),
    (
        "expect_status list",
        {"pools__web__health_check__expect_status": [200, 301]},
        "pools.web.health_check.expect_status",
        (200, 301),
    ),
    (
        "https verify default",
        {"pools__web__health_check__type": "https"},
        "pools.web.health_check.verify",
        False,
    ),
    (
        "udp check",
        {"pools__dns__health_check": {"type": "udp", "expect": "ok"}},
        "pools.dns.health_check",
        HealthCheckConfig(type="udp", payload="", expect="ok"),
    ),
    (
        "script command split with shlex",
        {"pools__dns__health_check": {"type": "script", "command": "/usr/bin/check -p 'a b'"}},
        "pools.dns.health_check.command",
        ("/usr/bin/check", "-p", "a b"),
    ),
    (
        "icmp check",
        {"pools__dns__health_check": {"type": "icmp", "source": "198.18.0.2"}},
        "pools.dns.health_check",
        HealthCheckConfig(type="icmp", source="198.18.0.2"),
    ),
    ("probe port", {"pools__web__health_check__port": 9000}, "pools.web.health_check.port", 9000),
    ("slow start", {"pools__web__slow_start": "30s"}, "pools.web.slow_start", 30.0),
    ("rps off", {"dataplane__rps_cpus": "off"}, "dataplane.rps_cpus", "off"),
    ("syn proxy on", {"dataplane__syn_proxy": True}, "dataplane.syn_proxy", True),
    ("syn proxy auto", {"dataplane__syn_proxy": "auto"}, "dataplane.syn_proxy", "auto"),
    ("syn proxy hold", {"dataplane__syn_proxy_hold": "2m"}, "dataplane.syn_proxy_hold", 120.0),
    ("kernel fast path", {"dataplane__offload": "conntrack"}, "dataplane.offload", "conntrack"),
    ("rps mask", {"dataplane__rps_cpus": "ff,0000000f"}, "dataplane.rps_cpus", "ff,0000000f"),
    ("weight 0 allowed", {"pools__web__servers[1]__weight": 0}, "pools.web.servers[1].weight", 0),
    (
        "same address and port on another protocol",
        {"virtual_servers__dns__port": 80},
        "virtual_servers.dns.port",
        80,
    ),
    (
        "notify command kept as written",
        {"vrrp__groups__pair__notify": "/bin/notify 'x y'"},
        "vrrp_groups.pair.notify",
        "/bin/notify 'x y'",
    ),
]


@pytest.mark.parametrize(
    ("changes", "path", "expected"), [v[1:] for v in VALUES], ids=[v[0] for v in VALUES]
)
def test_value(changes: dict[str, Any], path: str, expected: object) -> None:
    assert _get(parse_config(doc(**changes), SOURCE), path) == expected


def test_config_objects_are_frozen() -> None:
    config = parse_config(doc(), SOURCE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pools["x"] = config.pools["web"]  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Errors: (id, changes to BASE, expected "key.path: problem")
# --------------------------------------------------------------------------------------------

ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "negative concurrent limit per source",
        {"virtual_servers__web__max_conns_per_source": -1},
        "virtual_servers.web.max_conns_per_source: must be between 0 and 2147483648, got -1",
    ),
    (
        "rate limit per source not an integer",
        {"virtual_servers__web__max_conn_rate_per_source": 2.5},
        "virtual_servers.web.max_conn_rate_per_source: expected an integer, got float 2.5",
    ),
    (
        "rate period zero",
        {"virtual_servers__web__conn_rate_period": "0s"},
        'virtual_servers.web.conn_rate_period: must be greater than 0, got "0s"',
    ),
    (
        "rate period without a unit",
        {"virtual_servers__web__conn_rate_period": 10},
        'virtual_servers.web.conn_rate_period: expected a duration string with a unit such as '
        '"2s" or "100ms", got integer 10',
    ),
    (
        "no sources tracked",
        {"sessions__max_tracked_sources": 0},
        "sessions.max_tracked_sources: must be >= 1, got 0",
    ),
    (
        "misspelt per-source key",
        {"virtual_servers__web__max_conn_per_source": 5},
        "virtual_servers.web.max_conn_per_source: unknown key 'max_conn_per_source' "
        "(did you mean 'max_conns_per_source'?)",
    ),
    (
        "syn_proxy neither a boolean nor auto",
        {"dataplane__syn_proxy": "yes"},
        'dataplane.syn_proxy: expected true, false or "auto", got string "yes"',
    ),
    (
        "offload not a mode",
        {"dataplane__offload": "xdp"},
        'dataplane.offload: must be one of off, conntrack, got "xdp"',
    ),
    (
        "offload with the syn proxy",
        {"dataplane__offload": "conntrack", "dataplane__syn_proxy": "auto"},
        'dataplane.offload: "conntrack" and syn_proxy cannot both be on: the proxy\'s flows '
        "need their own conntrack entries",
    ),
    (
        "syn_proxy_half_open zero",
        {"dataplane__syn_proxy_half_open": 0},
        "dataplane.syn_proxy_half_open: must be >= 1, got 0",
    ),
    (
        "rps_cpus not a mask",
        {"dataplane__rps_cpus": "cpu0"},
        'dataplane.rps_cpus: must be "all", "off" or a hex CPU mask like "3", got "cpu0"',
    ),
    # unknown keys, with and without a suggestion
    (
        "unknown key with suggestion",
        {"pools__web__servers[1]__wieght": 2},
        "pools.web.servers[1].wieght: unknown key 'wieght' (did you mean 'weight'?)",
    ),
    (
        "unknown key without suggestion",
        {"node__colour": "red"},
        "node.colour: unknown key 'colour'",
    ),
    (
        "unknown section",
        {"virtual_server": {}},
        "virtual_server: unknown key 'virtual_server' (did you mean 'virtual_servers'?)",
    ),
    (
        "unknown key in vrrp instance",
        {"vrrp__instances__front__priorty": 3},
        "vrrp.instances.front.priorty: unknown key 'priorty' (did you mean 'priority'?)",
    ),
    (
        "unknown key in health check",
        {"pools__web__health_check__intervall": "1s"},
        "pools.web.health_check.intervall: unknown key 'intervall' (did you mean 'interval'?)",
    ),
    # missing required
    ("missing section", {"dataplane": _DELETE}, "dataplane: required section missing"),
    ("missing key", {"node__name": _DELETE}, "node.name: required key missing"),
    (
        "missing server port",
        {"pools__web__servers[0]__port": _DELETE},
        "pools.web.servers[0].port: required key missing",
    ),
    (
        "missing vrid",
        {"vrrp__instances__back__vrid": _DELETE},
        "vrrp.instances.back.vrid: required key missing",
    ),
    ("missing sync key_file", {"sync__key_file": _DELETE}, "sync.key_file: required key missing"),
    ("sync peer_timeout too short", {"sync__peer_timeout": "800ms"},
     "sync.peer_timeout: 0.8 s is less than 1s: a live connection, with a heartbeat every "
     "0.5 s, would be dropped"),
    ("empty servers", {"pools__dns__servers": []}, "pools.dns.servers: must not be empty"),
    (
        "empty vrrp addresses",
        {"vrrp__instances__back__addresses": []},
        "vrrp.instances.back.addresses: must not be empty",
    ),
    # wrong types
    (
        "string for int",
        {"virtual_servers__web__port": "80"},
        'virtual_servers.web.port: expected an integer, got string "80"',
    ),
    (
        "bool for int",
        {"dataplane__batch": True},
        "dataplane.batch: expected an integer, got boolean true",
    ),
    (
        "int for bool",
        {"pools__web__servers[0]__backup": 1},
        "pools.web.servers[0].backup: expected a boolean (true or false), got integer 1",
    ),
    ("int for string", {"node__name": 7}, "node.name: expected a name (string), got integer 7"),
    ("table for section expected", {"sessions": 5}, "sessions: expected a table, got integer 5"),
    (
        "array expected",
        {"pools__web__servers": {"address": "198.18.0.11"}},
        "pools.web.servers: expected an array, got a table",
    ),
    (
        "server not a table",
        {"pools__web__servers[1]": "198.18.0.12:8080"},
        'pools.web.servers[1]: expected a table, got string "198.18.0.12:8080"',
    ),
    (
        "bare number duration",
        {"sessions__udp_timeout": 30},
        'sessions.udp_timeout: expected a duration string with a unit such as "2s" or "100ms", '
        "got integer 30",
    ),
    # addresses and ports
    (
        "bad address",
        {"virtual_servers__web__address": "198.51.100.256"},
        'virtual_servers.web.address: not an IPv4 address (A.B.C.D): "198.51.100.256"',
    ),
    (
        "short address",
        {"pools__web__servers[0]__address": "198.18.11"},
        'pools.web.servers[0].address: not an IPv4 address (A.B.C.D): "198.18.11"',
    ),
    (
        "leading zero address",
        {"pools__web__servers[0]__address": "198.18.0.011"},
        'pools.web.servers[0].address: not an IPv4 address (A.B.C.D): "198.18.0.011"',
    ),
    (
        "hostname address",
        {"sync__peer": "peer.example:7411"},
        'sync.peer: not an IPv4 address (A.B.C.D): "peer.example"',
    ),
    (
        "multicast server",
        {"pools__web__servers[0]__address": "224.0.0.18"},
        "pools.web.servers[0].address: not a unicast host address: 224.0.0.18",
    ),
    (
        "bad unicast peer",
        {"vrrp__instances__back__unicast_peers": ["198.18.0.2", "x"]},
        'vrrp.instances.back.unicast_peers[1]: not an IPv4 address (A.B.C.D): "x"',
    ),
    (
        "bad health check source",
        {"pools__web__health_check__source": "1.2.3"},
        'pools.web.health_check.source: not an IPv4 address (A.B.C.D): "1.2.3"',
    ),
    (
        "port zero",
        {"virtual_servers__web__port": 0},
        "virtual_servers.web.port: must be between 1 and 65535, got 0",
    ),
    (
        "port too big",
        {"pools__web__servers[1]__port": 65536},
        "pools.web.servers[1].port: must be between 1 and 65535, got 65536",
    ),
    (
        "endpoint without port",
        {"metrics__listen": "127.0.0.1"},
        'metrics.listen: expected "ADDR:PORT", got "127.0.0.1"',
    ),
    (
        "endpoint port out of range",
        {"sync__listen": "198.19.0.2:70000"},
        "sync.listen: must be between 1 and 65535, got 70000",
    ),
    (
        "bad prefix length",
        {"vrrp__instances__back__addresses": ["198.18.0.1/33"]},
        'vrrp.instances.back.addresses[0]: prefix length must be 1..32, got "198.18.0.1/33"',
    ),
    # durations
    (
        "duration without unit",
        {"sessions__udp_timeout": "30"},
        'sessions.udp_timeout: invalid duration "30": expected a number and a unit '
        '(ms, s, m or h), such as "100ms", "2s" or "10m"',
    ),
    (
        "duration with bad unit",
        {"virtual_servers__web__persistence_timeout": "10min"},
        'virtual_servers.web.persistence_timeout: invalid duration "10min"',
    ),
    (
        "zero timeout",
        {"pools__web__health_check__timeout": "0s"},
        'pools.web.health_check.timeout: must be greater than 0, got "0s"',
    ),
    (
        "negative duration",
        {"vrrp__instances__back__preempt_delay": "-1s"},
        'vrrp.instances.back.preempt_delay: invalid duration "-1s"',
    ),
    (
        "snapshot interval not a duration",
        {"sessions__snapshot_interval": 2},
        "sessions.snapshot_interval: expected a duration string with a unit",
    ),
    # ranges and choices
    (
        "weight below zero",
        {"pools__web__servers[1]__weight": -1},
        "pools.web.servers[1].weight: must be >= 0, got -1",
    ),
    (
        "max_conns below zero",
        {"pools__web__servers[0]__max_conns": -5},
        "pools.web.servers[0].max_conns: must be >= 0, got -5",
    ),
    (
        "batch too big",
        {"dataplane__batch": 5000},
        "dataplane.batch: must be between 1 and 4096, got 5000",
    ),
    (
        "kernel route table",
        {"dataplane__route_table": 254},
        "dataplane.route_table: 254 is a kernel table (253 default, 254 main, 255 local)",
    ),
    (
        "rule priority after main",
        {"dataplane__rule_priority": 32720},
        "dataplane.rule_priority: must be <= 32702",
    ),
    (
        "max_sessions zero",
        {"sessions__max_sessions": 0},
        "sessions.max_sessions: must be >= 1, got 0",
    ),
    (
        "netmask too big",
        {"virtual_servers__web__persistence_netmask": 33},
        "virtual_servers.web.persistence_netmask: must be between 0 and 32, got 33",
    ),
    (
        "unknown scheduler",
        {"virtual_servers__web__scheduler": "wrrr"},
        'virtual_servers.web.scheduler: must be one of rr, wrr, lc, wlc, sh, maglev, got "wrrr" '
        "(did you mean 'wrr'?)",
    ),
    (
        "unknown protocol",
        {"virtual_servers__dns__protocol": "sctp"},
        'virtual_servers.dns.protocol: must be one of tcp, udp, got "sctp"',
    ),
    (
        "unknown on_server_down",
        {"pools__web__on_server_down": "drop"},
        'pools.web.on_server_down: must be one of keep, reset, got "drop"',
    ),
    (
        "rise zero",
        {"pools__web__health_check__rise": 0},
        "pools.web.health_check.rise: must be >= 1, got 0",
    ),
    (
        "status out of range",
        {"pools__web__health_check__expect_status": [200, 600]},
        "pools.web.health_check.expect_status[1]: must be between 100 and 599, got 600",
    ),
    (
        "bad interface name",
        {"dataplane__client_interface": "a-very-long-ifname0"},
        'dataplane.client_interface: not a valid interface name: "a-very-long-ifname0"',
    ),
    (
        "relative control socket",
        {"node__control_socket": "lbd.sock"},
        'node.control_socket: must be an absolute path, got "lbd.sock"',
    ),
    # health check types
    (
        "missing check type",
        {"pools__web__health_check": {"interval": "1s"}},
        "pools.web.health_check.type: required key missing",
    ),
    (
        "unknown check type",
        {"pools__web__health_check__type": "htp"},
        "pools.web.health_check.type: must be one of tcp, http, https, udp, icmp, script, "
        "got \"htp\" (did you mean 'http'?)",
    ),
    (
        "http key on tcp check",
        {"pools__web__health_check": {"type": "tcp", "path": "/"}},
        'pools.web.health_check.path: only valid for type http or https, not "tcp"',
    ),
    (
        "verify on http check",
        {"pools__web__health_check__verify": True},
        'pools.web.health_check.verify: only valid for type https, not "http"',
    ),
    (
        "udp key on http check",
        {"pools__web__health_check__expect": "x"},
        'pools.web.health_check.expect: only valid for type udp, not "http"',
    ),
    (
        "command on icmp check",
        {"pools__dns__health_check": {"type": "icmp", "command": "/bin/true"}},
        'pools.dns.health_check.command: only valid for type script, not "icmp"',
    ),
    (
        "udp check without expect",
        {"pools__dns__health_check": {"type": "udp"}},
        "pools.dns.health_check.expect: required key missing",
    ),
    (
        "script check without command",
        {"pools__dns__health_check": {"type": "script"}},
        "pools.dns.health_check.command: required key missing",
    ),
    (
        "relative script command",
        {"pools__dns__health_check": {"type": "script", "command": "check.sh"}},
        "pools.dns.health_check.command: must start with an absolute executable path, "
        'got "check.sh"',
    ),
    (
        "unbalanced quotes in command",
        {"pools__dns__health_check": {"type": "script", "command": "/bin/x 'a"}},
        "pools.dns.health_check.command: cannot split into arguments: No closing quotation",
    ),
    (
        "path without slash",
        {"pools__web__health_check__path": "health"},
        'pools.web.health_check.path: must start with "/", got "health"',
    ),
    # cross-references and uniqueness
    (
        "pool missing",
        {"virtual_servers__web__pool": "wbe"},
        "virtual_servers.web.pool: no pool named 'wbe' (did you mean 'web'?)",
    ),
    (
        "duplicate virtual server",
        {"virtual_servers__dns__port": 80, "virtual_servers__dns__protocol": "tcp"},
        "virtual_servers.dns: same address, port and protocol (198.51.100.10:80/tcp) "
        "as virtual_servers.web",
    ),
    (
        "duplicate server in pool",
        {"pools__web__servers[1]__address": "198.18.0.11"},
        "pools.web.servers[1]: duplicate server 198.18.0.11:8080 (same as servers[0])",
    ),
    (
        "vrid out of range",
        {"vrrp__instances__back__vrid": 256},
        "vrrp.instances.back.vrid: must be between 1 and 255, got 256",
    ),
    (
        "vrid zero",
        {"vrrp__instances__back__vrid": 0},
        "vrrp.instances.back.vrid: must be between 1 and 255, got 0",
    ),
    (
        "priority out of range",
        {"vrrp__instances__back__priority": 0},
        "vrrp.instances.back.priority: must be between 1 and 255, got 0",
    ),
    (
        "duplicate interface and vrid",
        {"vrrp__instances__back__interface": "eth0", "vrrp__instances__back__vrid": 51},
        "vrrp.instances.back.vrid: vrid 51 on eth0 is already used by instance 'front'",
    ),
    (
        "address in two instances",
        {"vrrp__instances__back__addresses": ["198.18.0.1/24", "198.51.100.10/32"]},
        "vrrp.instances.back.addresses[1]: 198.51.100.10 is already held by instance 'front'",
    ),
    (
        "address twice in one instance",
        {"vrrp__instances__back__addresses": ["198.18.0.1/24", "198.18.0.1"]},
        "vrrp.instances.back.addresses[1]: 198.18.0.1 is listed twice",
    ),
    (
        "group naming missing instance",
        {"vrrp__groups__pair__instances": ["front", "bak"]},
        "vrrp.groups.pair.instances[1]: no VRRP instance named 'bak' (did you mean 'back'?)",
    ),
    (
        "instance in two groups",
        {"vrrp__groups__other__instances": ["back"]},
        "vrrp.groups.other.instances[0]: instance 'back' is already in group 'pair'",
    ),
    (
        "empty group",
        {"vrrp__groups__pair__instances": []},
        "vrrp.groups.pair.instances: must not be empty",
    ),
    (
        "track_pools naming missing pool",
        {"vrrp__instances__front__track_pools[0]__pool": "wbe"},
        "vrrp.instances.front.track_pools[0].pool: no pool named 'wbe' (did you mean 'web'?)",
    ),
    (
        "track_pools name string missing pool",
        {"vrrp__instances__front__track_pools": ["db"]},
        "vrrp.instances.front.track_pools[0]: no pool named 'db'",
    ),
    (
        "track weight out of range",
        {"vrrp__instances__front__track_interfaces": [{"interface": "eth0", "weight": 255}]},
        "vrrp.instances.front.track_interfaces[0].weight: must be between -254 and 254, got 255",
    ),
    (
        "track entry of wrong type",
        {"vrrp__instances__front__track_interfaces": [3]},
        "vrrp.instances.front.track_interfaces[0]: expected a name or a table "
        "{ interface = ..., weight = ... }, got integer 3",
    ),
    (
        "garp count too big",
        {"vrrp__instances__back__garp_count": 101},
        "vrrp.instances.back.garp_count: must be between 0 and 100, got 101",
    ),
    (
        "advert interval not centiseconds",
        {"vrrp__instances__back__advert_interval": "15ms"},
        "vrrp.instances.back.advert_interval: must be a multiple of 10ms between 10ms and 40.95s, "
        'got "15ms"',
    ),
    (
        "advert interval too long",
        {"vrrp__instances__back__advert_interval": "41s"},
        "vrrp.instances.back.advert_interval: must be a multiple of 10ms between 10ms and 40.95s, "
        'got "41s"',
    ),
    (
        "advert interval too short",
        {"vrrp__instances__back__advert_interval": "5ms"},
        "vrrp.instances.back.advert_interval: must be a multiple of 10ms between 10ms and 40.95s, "
        'got "5ms"',
    ),
    # Found by fuzzing (docs/fuzzing.md): these raised ValueError / OverflowError instead.
    (
        "port of thousands of digits",
        {"metrics__listen": "127.0.0.1:" + "1" * 5000},
        'metrics.listen: port must be between 1 and 65535, got "111',
    ),
    (
        "prefix length of thousands of digits",
        {"vrrp__instances__back__addresses": ["198.18.0.1/" + "2" * 5000]},
        'vrrp.instances.back.addresses[0]: prefix length must be 1..32, got "198.18.0.1/222',
    ),
    (
        "advert interval beyond a float",
        {"vrrp__instances__back__advert_interval": "9" * 400 + "s"},
        f'vrrp.instances.back.advert_interval: duration "{"9" * 400}s" is too long',
    ),
    (
        "timeout beyond a float (would be infinity)",
        {"sessions__udp_timeout": "9" * 400 + "ms"},
        f'sessions.udp_timeout: duration "{"9" * 400}ms" is too long',
    ),
    (
        "name with space",
        {"pools": {"my pool": {"servers": [{"address": "198.18.0.11", "port": 1}]}}},
        'pools."my pool": invalid name "my pool": must be non-empty, without spaces',
    ),
]


@pytest.mark.parametrize(
    ("changes", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_error(changes: dict[str, Any], expected: str) -> None:
    errors = errors_of(doc(**changes))
    assert any(e.startswith(f"{SOURCE}: {expected}") for e in errors), errors


def test_every_error_of_a_file_is_reported_with_file_and_key_path() -> None:
    data = doc(
        node__name=_DELETE,
        node__nmae="x",
        pools__web__servers=[
            {"address": "198.18.0.11", "port": 8080, "weight": -1},
            {"address": "198.18.0.300", "port": 8080},
        ],
        virtual_servers__dns__pool="nope",
        vrrp__instances__back__vrid=300,
        sessions__udp_timeout=5,
    )
    errors = errors_of(data)
    assert errors == [
        f"{SOURCE}: node.name: required key missing",
        f"{SOURCE}: node.nmae: unknown key 'nmae' (did you mean 'name'?)",
        f"{SOURCE}: sessions.udp_timeout: expected a duration string with a unit such as "
        '"2s" or "100ms", got integer 5',
        f"{SOURCE}: virtual_servers.dns.pool: no pool named 'nope'",
        f"{SOURCE}: pools.web.servers[0].weight: must be >= 0, got -1",
        f'{SOURCE}: pools.web.servers[1].address: not an IPv4 address (A.B.C.D): "198.18.0.300"',
        f"{SOURCE}: vrrp.instances.back.vrid: must be between 1 and 255, got 300",
    ]


def test_config_error_str_joins_lines() -> None:
    error = ConfigError(["a: b: c", "a: d: e"])
    assert str(error) == "a: b: c\na: d: e"
    assert error.errors == ["a: b: c", "a: d: e"]


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("100ms", 0.1),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("0s", 0.0),
        ("300ms", 0.3),
        ("0.5m", 30.0),
        ("40.95s", 40.95),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5", "5 s", "s", "1.s", ".5s", "-1s", "1e3ms", "5S", "5sec", "1d", "1.5.5s", "٣s"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [5, 2.5, True])
def test_parse_duration_rejects_bare_numbers(value: object) -> None:
    with pytest.raises(ValueError, match="a duration is a string with a unit"):
        parse_duration(value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single.toml", "node-a.toml", "node-b.toml"])
def test_example_file_loads(name: str) -> None:
    config = load_config(REPO / "conf" / name)
    assert config.source == str(REPO / "conf" / name)
    assert [vs.name for vs in config.virtual_servers] == ["web", "dns"]
    web = config.pools["web"]
    assert [str(s) for s in web.servers] == [
        "198.18.0.11:8080",
        "198.18.0.12:8080",
        "198.18.0.13:8080",
    ]
    assert not any(s.backup for s in web.servers)
    assert web.health_check == HealthCheckConfig(
        type="http", path="/", expect_status=(200,), interval=1.0, timeout=0.5, rise=2, fall=2
    )
    assert config.pools["dns"].health_check is None


def test_all_files_in_conf_load() -> None:
    files = sorted((REPO / "conf").glob("*.toml"))
    assert files
    for path in files:
        load_config(path)


def test_example_pair_is_symmetric() -> None:
    a = load_config(REPO / "conf" / "node-a.toml")
    b = load_config(REPO / "conf" / "node-b.toml")
    assert load_config(REPO / "conf" / "single.toml").standalone
    assert [(i.name, i.interface, i.vrid, i.advert_centiseconds) for i in a.vrrp_instances] == [
        ("front", "eth0", 51, 10),
        ("back", "eth1", 52, 10),
    ]
    assert {i.priority for i in a.vrrp_instances} == {200}
    assert {i.priority for i in b.vrrp_instances} == {100}
    assert a.vrrp_groups[0].instances == ("front", "back")
    assert a.sync is not None and b.sync is not None
    assert (a.sync.listen, a.sync.peer) == (b.sync.peer, b.sync.listen)
    assert a.virtual_servers == b.virtual_servers
    assert a.pools == b.pools


def test_contract_example_loads() -> None:
    config = parse_config(tomllib.loads(CONTRACT_EXAMPLE), "DESIGN.md")
    assert config.pools["web"].servers[2].backup
    assert config.virtual_servers[0].persistence_timeout == 600.0


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: cannot read file: No such file or directory"]


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[node]\nname = "a\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.startswith(f"{path}: TOML syntax error: ")
    assert "line 2" in error


def test_toml_integer_beyond_the_digit_limit_is_a_config_error(tmp_path: Path) -> None:
    """Found by fuzzing: tomllib raised a plain ValueError (int()'s 4300-digit limit)."""
    path = tmp_path / "big.toml"
    path.write_text(MINIMAL + "batch = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.startswith(f"{path}: TOML value error: ")


def test_load_config_reports_validation_errors_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(MINIMAL + "batch = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors == [f"{path}: dataplane.batch: must be between 1 and 4096, got 0"]


def test_service_digest_follows_services_not_timeouts() -> None:
    base = parse_config(tomllib.loads(BASE), SOURCE)
    later = dataclasses.replace(base.sessions, tcp_established_timeout=1.0)
    assert base.service_digest() == dataclasses.replace(base, sessions=later).service_digest()
    assert len(base.service_digest()) == 16
    vs = dataclasses.replace(base.virtual_servers[0], port=81)
    moved = dataclasses.replace(base, virtual_servers=(vs, *base.virtual_servers[1:]))
    assert base.service_digest() != moved.service_digest()


def test_per_source_limits_leave_the_service_digest_as_it_was() -> None:
    """Limits say nothing about the sessions a node holds: a pair with other limits still
    matches, and a table snapshot written before the limits existed still loads."""
    base = parse_config(tomllib.loads(BASE), SOURCE)
    assert base.service_digest().hex() == "deb5e9f472ba53107752159f9fa9463a"  # as before them
    vs = dataclasses.replace(base.virtual_servers[0], max_conns_per_source=3,
                             max_conn_rate_per_source=0, conn_rate_period=9.0)
    other = dataclasses.replace(base, virtual_servers=(vs, *base.virtual_servers[1:]))
    assert other.service_digest() == base.service_digest()


@pytest.mark.parametrize(("old", "new", "needs_restart"), [
    ("vrid = 51", "vrid = 51\npriority = 150", []),
    ("vrid = 51", "vrid = 51\nadvert_interval = \"30ms\"\npreempt = false", []),
    ("vrid = 51", "vrid = 51\ngarp_count = 2\npreempt_delay = \"5s\"", []),
    ('track_pools = [{ pool = "web", weight = -50 }]', "", []),
    ("vrid = 51", "vrid = 53", ["vrrp.instances.front.vrid"]),
    ('[vrrp.instances.front]\ninterface = "eth0"', '[vrrp.instances.front]\ninterface = "eth2"',
     ["vrrp.instances.front.interface"]),
    ('addresses = ["198.51.100.10"]', 'addresses = ["198.51.100.10", "198.51.100.12"]',
     ["vrrp.instances.front.addresses"]),
    ("vrid = 51", 'vrid = 51\nunicast_peers = ["198.51.100.3"]',
     ["vrrp.instances.front.unicast_peers"]),
    ('instances = ["front", "back"]', 'instances = ["front"]', ["vrrp.groups"]),
    ("[vrrp.instances.back]", "[vrrp.instances.rear]",
     ["vrrp.instances.back", "vrrp.instances.rear", "vrrp.groups", "vrrp.gateway"]),
])
def test_which_vrrp_changes_reload_in_place(old: str, new: str,
                                            needs_restart: list[str]) -> None:
    before = parse_config(tomllib.loads(BASE), SOURCE)
    text = BASE.replace(old, new, 1)
    if "rear" in new:
        text = text.replace('instances = ["front", "back"]', 'instances = ["front", "rear"]')
    after = parse_config(tomllib.loads(text), SOURCE)
    assert after != before
    assert vrrp_restart_needed(before, after) == needs_restart
    assert vrrp_restart_needed(before, before) == []


def test_state_dir_default() -> None:
    assert parse_config(tomllib.loads(MINIMAL), SOURCE).node.state_dir == "/var/lib/lbd"


def test_every_key_is_documented() -> None:
    """Every key lb/config.py reads appears in docs/config.md's reference."""
    src = (REPO / "lb" / "config.py").read_text()
    keys = set(re.findall(r'(?:\.|\b)(?:req|get|opt|table|tables|array|allow)\(\s*"([a-z_]+)"',
                          src))
    doc = (REPO / "docs" / "config.md").read_text()
    assert len(keys) > 60
    missing = sorted(k for k in keys
                     if f"`{k}`" not in doc and f"[{k}" not in doc and f".{k}" not in doc
                     and not re.search(rf"[{{, ]{k}[ ,}}(]", doc))
    assert missing == [], f"keys missing from docs/config.md: {missing}"
