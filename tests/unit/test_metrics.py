"""Tests of lb.metrics: the data-plane collector (names, types, values) and the HTTP endpoint.

Every test uses its own CollectorRegistry; nothing touches prometheus_client's global one.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Packet, Raw

from lb.config import Config, parse_config
from lb.forwarder import DROP, FORWARD, SEND, Forwarder, ServiceCounts
from lb.metrics import MetricsServer, SourceCollector, dataplane_metrics
from lb.packet import VNET_HDR_LEN
from lb.persistence import PersistenceTable
from lb.services import Service, ServiceSet, build_services
from lb.sessions import SessionTable, SessionTimeouts
from lb.version import VERSION

VIP, CLIENT = "198.51.100.10", "198.51.100.77"
S1, S2 = "198.18.0.11", "198.18.0.12"
K1, K2 = f"{S1}:8080", f"{S2}:8080"

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def make_config(servers: tuple[str, ...] = (S1, S2)) -> Config:
    return parse_config({
        "node": {"name": "t"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "virtual_servers": {
            "web": {"address": VIP, "port": 80, "pool": "web", "scheduler": "rr",
                    "persistence": "client-ip"},
            "dns": {"address": VIP, "port": 53, "protocol": "udp", "pool": "dns",
                    "scheduler": "rr"},
        },
        "pools": {"web": {"servers": [{"address": a, "port": 8080} for a in servers]},
                  "dns": {"servers": [{"address": S1, "port": 5353}]}},
    }, "test_metrics")


@dataclass
class World:
    services: ServiceSet
    fwd: Forwarder
    registry: CollectorRegistry
    extra: dict[str, int]

    def feed(self, p: Packet, verdict: int) -> int:
        """Hand the packet to the forwarder; returns its IP length."""
        data = bytes(p)
        buf = bytearray(bytes(VNET_HDR_LEN) + data)
        assert self.fwd.handle(buf, len(buf), 1.0) == verdict
        return len(data)

    def scrape(self) -> str:
        return generate_latest(self.registry).decode()


def make_world() -> World:
    cfg = make_config()
    services = build_services(cfg)
    sessions: SessionTable[Service] = SessionTable(SessionTimeouts(), 100,
                                                   observer=ServiceCounts())
    persistence: PersistenceTable[Service] = PersistenceTable()
    fwd = Forwarder(services, sessions, persistence)
    registry = CollectorRegistry(auto_describe=False)
    collector = SourceCollector()
    registry.register(collector)
    w = World(services, fwd, registry, {"lbd_config_reloads_total": 2})
    collector.sources.append(dataplane_metrics(fwd, lambda: w.services, lambda: w.extra))
    return w


def samples(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(smp: Samples, name: str, **labels: str) -> float:
    return smp[(name, tuple(sorted(labels.items())))]


SYN = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S", seq=1)
SYNACK = IP(src=S1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", seq=9, ack=2)
STRAY = IP(src=S2, dst=CLIENT) / TCP(sport=8080, dport=40001, flags="A")
NO_VS = IP(src=CLIENT, dst=VIP) / TCP(sport=40002, dport=81, flags="S")
PING = IP(src=CLIENT, dst=VIP) / ICMP(type=8) / Raw(b"hello")


@pytest.fixture
def world() -> World:
    w = make_world()
    w.feed(SYN, FORWARD)
    w.feed(SYNACK, FORWARD)
    w.feed(STRAY, DROP)
    w.feed(NO_VS, SEND)
    w.feed(PING, FORWARD)
    w.services.pools["web"].servers[1].up = False
    return w


# --- names and types -----------------------------------------------------------------------------

NAME = re.compile(r"^lbd_[a-z0-9_]+$")


def test_exposition_parses_and_follows_conventions(world: World) -> None:
    text = world.scrape()
    families = list(text_string_to_metric_families(text))
    assert families
    for fam in families:
        assert NAME.match(fam.name), fam.name
        assert fam.documentation.strip(), f"{fam.name} has no HELP"
        assert fam.type in ("counter", "gauge", "histogram"), fam.name
        for s in fam.samples:
            assert NAME.match(s.name), s.name
            if fam.type == "counter":
                assert s.name == fam.name + "_total", s.name
            else:
                assert not s.name.endswith("_total"), f"{s.name} is a {fam.type}"
    # The text itself (classic format): a counter's TYPE line names it with _total, as its
    # samples do; no other type's name ends in _total.
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        assert name.endswith("_total") == (kind == "counter"), name
        assert re.search(rf"^{name}[{{ ]", text, re.M), name


@pytest.mark.parametrize(
    ("name", "labels", "want"),
    [
        ("lbd_sessions_active", {"virtual_server": "web"}, 1),
        ("lbd_sessions_active", {"virtual_server": "dns"}, 0),
        ("lbd_sessions_created_total", {"virtual_server": "web"}, 1),
        ("lbd_server_sessions_created_total", {"pool": "web", "server": K1}, 1),
        ("lbd_server_sessions_created_total", {"pool": "web", "server": K2}, 0),
        ("lbd_server_sessions_active", {"pool": "web", "server": K1}, 1),
        ("lbd_server_up", {"pool": "web", "server": K1}, 1),
        ("lbd_server_up", {"pool": "web", "server": K2}, 0),
        ("lbd_server_up", {"pool": "dns", "server": f"{S1}:5353"}, 1),
        ("lbd_packets_forwarded_total", {"direction": "in"}, 1),
        ("lbd_packets_forwarded_total", {"direction": "out"}, 1),
        ("lbd_bytes_forwarded_total", {"direction": "in"}, len(SYN)),
        ("lbd_bytes_forwarded_total", {"direction": "out"}, len(SYNACK)),
        ("lbd_drops_total", {"reason": "no_session"}, 1),
        ("lbd_drops_total", {"reason": "no_service"}, 1),
        ("lbd_drops_total", {"reason": "exception"}, 0),
        ("lbd_drops_total", {"reason": "source_conn_limit"}, 0),
        ("lbd_drops_total", {"reason": "source_rate_limit"}, 0),
        ("lbd_sources_tracked", {}, 1),  # the one client, under the default limits
        ("lbd_sources_untracked_total", {}, 0),
        ("lbd_sources_evicted_total", {}, 0),
        ("lbd_resets_sent_total", {}, 1),
        ("lbd_icmp_echo_replies_total", {}, 1),
        ("lbd_session_table_size", {}, 1),
        ("lbd_sessions_expired_total", {}, 0),
        ("lbd_persistence_bindings", {}, 1),
        ("lbd_config_reloads_total", {}, 2),
    ],
)
def test_required_samples(world: World, name: str, labels: dict[str, str],
                          want: float) -> None:
    assert value(samples(world.scrape()), name, **labels) == want


def test_counters_are_read_at_scrape_time(world: World) -> None:
    before = samples(world.scrape())
    world.feed(SYNACK, FORWARD)
    world.feed(STRAY, DROP)
    world.extra["lbd_config_reloads_total"] = 3
    after = samples(world.scrape())
    assert value(after, "lbd_packets_forwarded_total", direction="out") == 2
    assert value(after, "lbd_drops_total", reason="no_session") == 2
    assert value(after, "lbd_config_reloads_total") == 3
    for key, v in before.items():  # nothing went backwards
        if key[0].endswith("_total"):
            assert after[key] >= v, key


def test_the_service_set_is_read_at_scrape_time(world: World) -> None:
    """After a reload (a new ServiceSet) a removed server disappears, kept ones keep counts."""
    world.services = build_services(make_config(servers=(S1,)), world.services)
    world.fwd.set_services(world.services)
    smp = samples(world.scrape())
    assert ("lbd_server_up", (("pool", "web"), ("server", K2))) not in smp
    assert value(smp, "lbd_server_sessions_created_total", pool="web", server=K1) == 1
    assert value(smp, "lbd_sessions_active", virtual_server="web") == 1


def test_registries_are_isolated(world: World) -> None:
    other = CollectorRegistry(auto_describe=False)
    assert "lbd_" not in generate_latest(other).decode()
    assert "lbd_sessions_active" in world.scrape()


# --- the HTTP endpoint ---------------------------------------------------------------------------


async def http(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return status, headers, body


def serve(world: World, scenario: Callable[[MetricsServer], Awaitable[None]]) -> None:
    async def main() -> None:
        server = MetricsServer("127.0.0.1", 0, world.registry)
        await server.start()
        try:
            assert server.port != 0
            await scenario(server)
        finally:
            await server.stop()

    asyncio.run(main())


def test_get_metrics(world: World) -> None:
    async def scenario(server: MetricsServer) -> None:
        for path in (b"/metrics", b"/metrics?name[]=x"):
            status, headers, body = await http(server.port,
                                               b"GET " + path + b" HTTP/1.0\r\n\r\n")
            assert status == "HTTP/1.0 200 OK"
            assert headers["content-type"].startswith("text/plain; version=")
            assert int(headers["content-length"]) == len(body)
            assert body.decode() == world.scrape()

    serve(world, scenario)


@pytest.mark.parametrize("request_bytes", [b"GET / HTTP/1.0\r\n\r\n",
                                           b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n",
                                           b"GET /metricsX HTTP/1.0\r\n\r\n",
                                           b"nonsense\r\n\r\n"])
def test_other_paths_are_404(world: World, request_bytes: bytes) -> None:
    async def scenario(server: MetricsServer) -> None:
        status, headers, body = await http(server.port, request_bytes)
        assert status == "HTTP/1.0 404 Not Found"
        assert int(headers["content-length"]) == len(body)

    serve(world, scenario)


def test_an_ordinary_http_client_and_a_rude_one(world: World) -> None:
    async def scenario(server: MetricsServer) -> None:
        # A client that hangs up without a request does not stop the server.
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        await writer.wait_closed()
        url = f"http://127.0.0.1:{server.port}"
        loop = asyncio.get_running_loop()

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url + path, timeout=10) as resp:
                    return int(resp.status), resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, ""

        status, text = await loop.run_in_executor(None, get, "/metrics")
        assert status == 200
        assert value(samples(text), "lbd_resets_sent_total") == 1
        assert (await loop.run_in_executor(None, get, "/"))[0] == 404

    serve(world, scenario)


def test_stop_closes_the_port(world: World) -> None:
    async def main() -> None:
        server = MetricsServer("127.0.0.1", 0, world.registry)
        await server.start()
        port = server.port
        await server.stop()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(main())


def test_build_info_names_the_version_of_this_checkout(world: World) -> None:
    assert value(samples(world.scrape()), "lbd_build_info", version=VERSION) == 1
