"""Prometheus exposition: a collector that reads plain integer counters at scrape time.

Subsystems keep ordinary ints (a labelled ``Counter.inc()`` per packet costs ~30x more);
each registers a *source* — a callable yielding metric families — and the collector calls
them on every scrape. The HTTP endpoint runs on the daemon's event loop, so a scrape never
reads a table while the data plane mutates it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lb import native
from lb.forwarder import DROP_REASONS, Forwarder
from lb.servers import AdminState
from lb.services import ServiceSet
from lb.synproxy import METRIC_HELP as SYN_PROXY_HELP
from lb.version import VERSION

Source = Callable[[], Iterable[Metric]]


def build_info() -> Iterator[Metric]:
    """``lbd_build_info{version}`` = 1: which lbd a scrape came from (join on it in queries)."""
    info = GaugeMetricFamily("lbd_build_info", "Always 1; the labels say which lbd this is",
                             labels=["version"])
    info.add_metric([VERSION], 1)
    yield info


def native_modules() -> Iterator[Metric]:
    """``lbd_native_modules``: how many hot-path modules run compiled by mypyc, 0 when lbd
    runs pure Python (lb/native.py; the start-up log names them and says why not)."""
    yield GaugeMetricFamily("lbd_native_modules",
                            "Hot-path modules running compiled by mypyc (0: pure Python)",
                            value=len(native.status().modules))


class SourceCollector:
    """Calls every source on each scrape; :func:`build_info` is always the first."""

    def __init__(self) -> None:
        self.sources: list[Source] = [build_info, native_modules]

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


def dataplane_metrics(fwd: Forwarder, services: Callable[[], ServiceSet],
                      extra: Callable[[], dict[str, int]] | None = None) -> Source:
    def collect() -> Iterator[Metric]:
        svcset = services()
        active = GaugeMetricFamily("lbd_sessions_active", "Sessions in the table",
                                   labels=["virtual_server"])
        created = CounterMetricFamily("lbd_sessions_created",
                                      "Sessions created per virtual server",
                                      labels=["virtual_server"])
        for svc in svcset.services:
            active.add_metric([svc.name], svc.active)
            created.add_metric([svc.name], svc.created_total)
        yield active
        yield created
        per_server = CounterMetricFamily("lbd_server_sessions_created",
                                         "Sessions created towards each real server",
                                         labels=["pool", "server"])
        server_active = GaugeMetricFamily("lbd_server_sessions_active",
                                          "Sessions in the table per real server",
                                          labels=["pool", "server"])
        server_up = GaugeMetricFamily("lbd_server_up", "1 when the real server is healthy",
                                      labels=["pool", "server"])
        weight = GaugeMetricFamily("lbd_server_weight",
                                   "Weight in force (the configured or set one, ramped by slow "
                                   "start)", labels=["pool", "server"])
        admin = GaugeMetricFamily("lbd_server_admin_state",
                                  "1 for the operator state the server is in",
                                  labels=["pool", "server", "state"])
        for srv in svcset.servers():
            labels = [srv.pool, srv.key]
            per_server.add_metric(labels, srv.created_total)
            server_active.add_metric(labels, srv.active)
            server_up.add_metric(labels, 1 if srv.up else 0)
            weight.add_metric(labels, srv.effective_weight)
            for state in AdminState:
                admin.add_metric([*labels, state.value], 1 if srv.admin is state else 0)
        yield per_server
        yield server_active
        yield server_up
        yield weight
        yield admin
        packets = CounterMetricFamily("lbd_packets_forwarded",
                                      "Packets forwarded (a GSO super-packet counts once)",
                                      labels=["direction"])
        packets.add_metric(["in"], fwd.packets_in)
        packets.add_metric(["out"], fwd.packets_out)
        yield packets
        octets = CounterMetricFamily("lbd_bytes_forwarded", "IP bytes forwarded",
                                     labels=["direction"])
        octets.add_metric(["in"], fwd.bytes_in)
        octets.add_metric(["out"], fwd.bytes_out)
        yield octets
        drops = CounterMetricFamily("lbd_drops", "Packets dropped, by reason",
                                    labels=["reason"])
        for reason in sorted({*DROP_REASONS, *fwd.drops}):
            drops.add_metric([reason], fwd.drops.get(reason, 0))
        drops.add_metric(["exception"], fwd.errors)
        yield drops
        yield CounterMetricFamily("lbd_resets_sent", "TCP resets sent by lbd",
                                  value=fwd.resets_sent)
        yield CounterMetricFamily("lbd_icmp_echo_replies", "ICMP echo requests to VIPs answered",
                                  value=fwd.icmp_replies)
        table = fwd.sessions
        yield GaugeMetricFamily("lbd_session_table_size", "Sessions in the table",
                                value=len(table))
        yield CounterMetricFamily("lbd_sessions_expired", "Sessions removed by timeout",
                                  value=table.expired_total)
        yield GaugeMetricFamily("lbd_sessions_half_open", "Sessions in SYN_RECV",
                                value=table.half_open)
        yield CounterMetricFamily("lbd_sessions_half_open_evicted",
                                  "Half-open sessions evicted for a new SYN (oldest first: "
                                  "max_half_open reached, or the table full)",
                                  value=table.half_open_evictions)
        sources = table.sources
        yield GaugeMetricFamily("lbd_sources_tracked",
                                "Client sources tracked for the per-source limits",
                                value=len(sources))
        yield CounterMetricFamily("lbd_sources_untracked",
                                  "New sessions admitted without a per-source count (the "
                                  "source tracker was full of sources with sessions)",
                                  value=sources.untracked)
        yield CounterMetricFamily("lbd_sources_evicted",
                                  "Idle sources forgotten before their rate window ended, "
                                  "to make room for a new one",
                                  value=sources.evicted)
        yield GaugeMetricFamily("lbd_persistence_bindings", "Client-IP persistence bindings",
                                value=len(fwd.persistence))
        if extra is not None:
            for name, value in extra().items():
                yield CounterMetricFamily(name, name.replace("_", " "), value=value)

    return collect


def syn_proxy_metrics(status: Callable[[], Mapping[str, Any]]) -> Source:
    """``lbd_syn_proxy_enabled``, ``_engaged``, ``_engagements_total`` and, while enabled,
    the kernel's SYN proxy counters as ``lbd_syn_proxy_<name>_total``, from ``status``
    (the node's ``syn_proxy`` status: lb.synproxy, read from /proc at scrape time)."""
    def collect() -> Iterator[Metric]:
        now = status()
        yield GaugeMetricFamily("lbd_syn_proxy_enabled",
                                "1 while the kernel's SYN proxy is loaded for the TCP "
                                "virtual servers ([dataplane] syn_proxy on or auto)",
                                value=1 if now["enabled"] else 0)
        yield GaugeMetricFamily("lbd_syn_proxy_engaged",
                                "1 while the kernel's SYN proxy answers SYNs to the TCP "
                                "virtual servers (always when on; during a flood when auto)",
                                value=1 if now["engaged"] else 0)
        yield CounterMetricFamily("lbd_syn_proxy_engagements",
                                  "Times syn_proxy = auto engaged the proxy",
                                  value=now["engagements"])
        for name in SYN_PROXY_HELP:
            if name in now:
                yield CounterMetricFamily(f"lbd_syn_proxy_{name}", SYN_PROXY_HELP[name],
                                          value=now[name])
    return collect


OFFLOAD_HELP: dict[str, str] = {
    "offloaded": "Flows handed to the kernel's conntrack NAT ([dataplane] offload)",
    "failed": "Flows the kernel refused to take (they stay on lbd's path)",
    "established": "Offloaded TCP flows the kernel saw complete their handshake",
    "closed": "Offloaded flows the kernel ended (their sessions removed)",
    "returned": "Offloaded flows whose packets came back to lbd (the kernel refused them)",
    "checks": "Kernel lookups of an offloaded flow whose session deadline passed",
    "send_errors": "ctnetlink requests that could not be sent",
    "events_lost": "Times the kernel's conntrack events overflowed lbd's socket",
    "bad_messages": "ctnetlink messages lbd could not decode",
}


def offload_metrics(stats: Callable[[], Mapping[str, int]]) -> Source:
    """``lbd_offload_flows`` and the kernel fast path's counters as
    ``lbd_offload_<name>_total`` (lb.offload), read at scrape time."""
    def collect() -> Iterator[Metric]:
        now = stats()
        yield GaugeMetricFamily("lbd_offload_flows",
                                "Flows the kernel forwards for lbd right now",
                                value=now["flows"])
        for name, text in OFFLOAD_HELP.items():
            yield CounterMetricFamily(f"lbd_offload_{name}", text, value=now[name])
    return collect


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on the event loop."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.host, self.port, self.registry = host, port, registry
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        if self.port == 0 and self._server.sockets:  # an ephemeral port: tell which
            self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body = generate_latest(self.registry)
                head = (f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n")
            else:
                body = b"lbd: see /metrics\n"
                head = f"HTTP/1.0 404 Not Found\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
