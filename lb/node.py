"""The composition root: build the data plane, checks, control and metrics from a config.

This is the one place where pure cores meet I/O. Everything it builds is handed what it needs
(injected), nothing reaches back into the node.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ha.controller import HaController
from ha.ownership import AddressOwner
from ha.replication import Replicator
from ha.roles import STANDALONE, Lost, PeerSnapshotComplete, Roles, Took
from ha.sync import SyncService
from ha.sync_codec import load_key
from ha.vrrp_machine import State
from lb import opstate
from lb.addr import endpoint, int_to_ip, ip_to_int
from lb.config import Config, ConfigError, VrrpAddress, load_config, vrrp_restart_needed
from lb.control import CommandError, ControlServer, Stream, parse_args
from lb.dataplane import DataPlane
from lb.forwarder import Forwarder, ServiceCounts
from lb.health.monitor import HealthMonitor, PoolChecks
from lb.health.probes import ProbeResult
from lb.health.state import Transition
from lb.heap import HeapWatch
from lb.histogram import Histogram
from lb.kernel import Kernel
from lb.listing import (
    Filter,
    binding_filter,
    chunks,
    render_binding,
    render_session,
    session_filter,
)
from lb.metrics import (
    MetricsServer,
    SourceCollector,
    dataplane_metrics,
    offload_metrics,
    syn_proxy_metrics,
)
from lb.offload import REPLY_MARK, ConntrackOffload, conntrack_sysctls
from lb.persistence import PersistenceTable
from lb.reply_hold import ReplyHold
from lb.runtime import Refused, ServerRuntime
from lb.servers import AdminState, RealServer, candidates
from lb.services import Service, ServiceSet, build_services
from lb.sessions import Session, SessionTable, SessionTimeouts
from lb.snapshot_store import SnapshotStore
from lb.source_limits import CONN_LIMIT, RATE_LIMIT, SourceTracker
from lb.synproxy import ENGAGE, AutoProxy, SynProxy
from lb.table_snapshot import Installed
from lb.tun import open_tun

log = logging.getLogger("lbd")

PROTO_NAMES = {6: "tcp", 17: "udp"}
AUTO_PROXY_TICK = 1.0  # seconds between two looks of syn_proxy = "auto" at the half-open count
# After a release, conntrack goes on judging unknown ACKs as invalid (so the armed rule still
# validates the cookies of handshakes the proxy began) this long before it picks flows up
# mid-stream again.
AUTO_PROXY_RELEASE_GRACE = 3.0
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def session_table(config: Config, observer: ServiceCounts) -> SessionTable[Service]:
    """The session table ``[sessions]`` asks for (half-open cap, per-source tracker)."""
    s = config.sessions
    return SessionTable(session_timeouts(config), s.max_sessions, tick=s.expiry_tick,
                        observer=observer, max_half_open=s.max_half_open or None,
                        sources=SourceTracker(s.max_tracked_sources
                                              or max(1, s.max_sessions // 4)))


def session_timeouts(config: Config) -> SessionTimeouts:
    s = config.sessions
    return SessionTimeouts(tcp_syn=s.tcp_syn_timeout, tcp_established=s.tcp_established_timeout,
                           tcp_fin=s.tcp_fin_timeout, tcp_time_wait=s.tcp_time_wait_timeout,
                           tcp_close=s.tcp_close_timeout, udp=s.udp_timeout)


class CheckStats:
    """Check durations (histogram) and transitions, fed by the health monitor's hooks."""

    def __init__(self) -> None:
        self.durations = Histogram(DURATION_BUCKETS)
        self.transitions: dict[tuple[str, str, str], int] = {}
        # Counts of monitors replaced by a reload: their counters must not go back to zero.
        self.carried_checks: dict[tuple[str, str, str], int] = {}
        self.carried_failures: dict[tuple[str, str, str], int] = {}

    def carry(self, monitor: HealthMonitor) -> None:
        """Keep the probe counts of a stopped ``monitor`` that a new one replaces."""
        for src, dst in ((monitor.checks_total, self.carried_checks),
                         (monitor.failures_total, self.carried_failures)):
            for labels, n in src.items():
                dst[labels] = dst.get(labels, 0) + n

    def observe(self, server: RealServer, result: ProbeResult) -> None:
        self.durations.observe(result.duration)

    def metrics(self, monitor: Callable[[], HealthMonitor | None]) -> list[Metric]:
        hist = HistogramMetricFamily("lbd_health_check_duration_seconds",
                                     "Duration of health check probes")
        hist.add_metric([], self.durations.exposition(), self.durations.sum)
        checks = CounterMetricFamily("lbd_health_checks", "Health check probes run",
                                     labels=["pool", "server", "result"])
        failures = CounterMetricFamily("lbd_health_check_failures",
                                       "Failed health check probes by reason",
                                       labels=["pool", "server", "reason"])
        mon = monitor()
        for family, carried, current in (
                (checks, self.carried_checks, mon.checks_total if mon else {}),
                (failures, self.carried_failures, mon.failures_total if mon else {})):
            for labels in sorted(carried.keys() | current.keys()):
                family.add_metric(list(labels), carried.get(labels, 0) + current.get(labels, 0))
        trans = CounterMetricFamily("lbd_server_transitions",
                                    "Real server health transitions",
                                    labels=["pool", "server", "to"])
        for labels, n in sorted(self.transitions.items()):
            trans.add_metric(list(labels), n)
        return [hist, checks, failures, trans]


def _limits(svc: Service) -> dict[str, float] | None:
    """A virtual server's per-source limits as status shows them (None: unlimited)."""
    lim = svc.source_limits
    if lim is None:
        return None
    return {"max_conns_per_source": lim.max_conns, "max_conn_rate_per_source": lim.max_rate,
            "conn_rate_period": lim.period}


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.kernel: Kernel | None = None
        self.syn_proxy = SynProxy()
        dp = config.dataplane
        self.auto_proxy = (AutoProxy(dp.syn_proxy_half_open, dp.syn_proxy_hold)
                           if dp.syn_proxy == "auto" else None)
        self._auto_proxy_timer: asyncio.TimerHandle | None = None
        self._auto_proxy_timer_grace: asyncio.TimerHandle | None = None
        self.tun_fd = -1
        self.tun_index = 0
        # Which VRRP instances this node masters: the one owner of roles (see ha.roles).
        self.roles = (Roles.standalone() if config.standalone
                      else Roles(ic.name for ic in config.vrrp_instances))
        self.services: ServiceSet = build_services(config)
        self.services.follow(self.roles.masters)
        # The one owner of every server's health, admin state, weight and ramp (lb.runtime);
        # it also keeps the operator state, loaded from and saved to [node] state_dir.
        self.runtime = ServerRuntime(self.services)
        # Reconfiguration (reload, operator changes) one at a time, in arrival order.
        self._reconfig = asyncio.Lock()
        self._ramp_timer: asyncio.TimerHandle | None = None
        self.counts = ServiceCounts()
        self.sessions = session_table(config, self.counts)
        self.persistence: PersistenceTable[Service] = PersistenceTable()
        # The tables on local disk: loaded at start, written every snapshot_interval.
        self.snapshots = SnapshotStore(config.node.state_dir, config.service_digest(),
                                       config.sessions.snapshot_interval, self.sessions,
                                       self.persistence)
        self._restored: Installed | None = None  # until the replication marks it provisional
        hold = (ReplyHold(config.sync.reply_hold_timeout, config.sync.reply_hold_packets)
                if config.sync is not None else None)
        self.forwarder = Forwarder(self.services, self.sessions, self.persistence, hold=hold)
        sessions, bindings = self.sessions, self.persistence
        self.heap = HeapWatch(lambda: sessions.created_total + sessions.installed_total
                              + bindings.bound_total + bindings.installed_total)
        self.forwarder.echo_addresses = self._echo_addresses(config)
        # The kernel fast path ([dataplane] offload): wired in at start.
        self.offload = (ConntrackOffload(self.sessions, session_timeouts(config),
                                         time.monotonic)
                        if dp.offload == "conntrack" else None)
        self.dataplane: DataPlane | None = None
        self.monitor: HealthMonitor | None = None
        self.check_stats = CheckStats()
        self.control: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = SourceCollector()
        self.registry.register(self.collector)
        # CPU, RSS, open fds: the data plane's CPU is the capacity signal.
        ProcessCollector(namespace="lbd", registry=self.registry)
        self.sync: SyncService | None = None
        self.replicator: Replicator | None = None
        self.owner: AddressOwner | None = None
        self.ha: HaController | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # The peer's operator states received: applied, ours kept (not newer), refused.
        self.peer_operator_state = {"applied": 0, "kept_ours": 0, "refused": 0}
        self.reloads = 0
        self.last_reload_ok = True  # the config in force was read at start: a success
        self.last_reload_success = time.time()
        self.reload_failures = 0

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        await self._load_operator_state()
        # Before the data plane and VRRP: restored sessions belong to no one until a role
        # says (they are installed as a peer's snapshot would be). In a thread: nothing else
        # touches the tables yet, and 10⁶ sessions take seconds during which the loop must
        # still ping systemd's watchdog.
        self._restored = await asyncio.to_thread(self.snapshots.load, self.services,
                                                 time.monotonic(), time.time())
        dp = cfg.dataplane
        self.kernel = await Kernel.open(route_table=dp.route_table,
                                        rule_priority=dp.rule_priority)
        if self.offload is not None:
            self.kernel.reply_mark = REPLY_MARK
        for key, ifname in (("client_interface", dp.client_interface),
                            ("server_interface", dp.server_interface)):
            if await self.kernel.ifindex(ifname) is None:
                raise RuntimeError(
                    f"{cfg.source}: dataplane.{key}: interface {ifname!r} not found")
        removed = await self.kernel.remove_leftovers()
        if removed:
            log.info("removed %d leftover kernel entries of an earlier lbd", removed)
        self.tun_fd = open_tun(dp.tun)
        self.tun_index = await self.kernel.set_link_up(dp.tun, dp.tun_queue)
        await self.kernel.prepare(tun=dp.tun, client_if=dp.client_interface,
                                  server_if=dp.server_interface, rps_cpus=dp.rps_cpus,
                                  arp_interfaces={ic.interface for ic in cfg.vrrp_instances})
        await self.kernel.install_reply_path(self.tun_index, dp.server_interface,
                                             self._server_addresses())
        if dp.syn_proxy:
            await self._apply_syn_proxy(cfg)
            self._conntrack_for_proxy(pick_up=self.auto_proxy is not None)
            if self.auto_proxy is not None:
                self._auto_proxy_timer = self.loop.call_later(AUTO_PROXY_TICK,
                                                              self._auto_proxy_tick)
        else:
            await asyncio.to_thread(self.syn_proxy.remove, leftover=True)
        if self.offload is not None:
            await self._start_offload(cfg)
        else:
            await asyncio.to_thread(ConntrackOffload.remove, leftover=True)
        self.dataplane = DataPlane(self.tun_fd, self.forwarder, batch=dp.batch)
        self.dataplane.start(self.loop)
        self.heap.install()
        self._schedule_expiry()
        self._start_health()
        self.collector.sources.append(dataplane_metrics(self.forwarder, lambda: self.services,
                                                        self._extra_counters))
        self.collector.sources.append(lambda: self.check_stats.metrics(lambda: self.monitor))
        self.collector.sources.append(self._node_gauges)
        self.collector.sources.append(self.snapshots.metrics)
        self.collector.sources.append(self.heap.metrics)
        self.collector.sources.append(syn_proxy_metrics(self.syn_proxy_status))
        if self.offload is not None:
            self.collector.sources.append(offload_metrics(self.offload.stats))
        self.control = ControlServer(cfg.node.control_socket, self.control_handlers())
        await self.control.start()
        if cfg.metrics.listen is not None:
            self.metrics_server = MetricsServer(cfg.metrics.listen.host, cfg.metrics.listen.port,
                                                self.registry)
            await self.metrics_server.start()
        self.owner = AddressOwner(self.kernel, self.tun_index)
        if cfg.sync is not None:
            await self._start_sync(cfg)
        if cfg.standalone:
            await self.hold_vips()
        else:
            self.ha = HaController(cfg, self.kernel, self.owner, self.pool_usable,
                                   gate_open=self._gate_open, on_state=self._on_vrrp_state)
            self.ha.demoted = self.runtime.operator.demoted
            if self.ha.demoted:
                log.warning("this node is demoted (lbctl demote): it stays BACKUP while the "
                            "peer advertises, until lbctl promote")
            await self.ha.start()
            self.collector.sources.append(self.ha.metrics)
        self._restored = None
        self.snapshots.start()
        self.heap.freeze()  # what start built (modules, config, tables): never rescanned
        log.info("lbd node %s started: %d virtual servers, %d pools", cfg.node.name,
                 len(self.services.services), len(self.services.pools))

    async def _start_sync(self, cfg: Config) -> None:
        assert cfg.sync is not None
        try:
            key = load_key(Path(cfg.sync.key_file).read_bytes())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{cfg.source}: sync.key_file: {exc}") from exc
        rep = Replicator(self.sessions, self.persistence, lambda: self.services,
                         time.monotonic, on_installed=self._installed)
        self.sync = SyncService(cfg.sync, key, cfg.node.name, rep,
                                config_digest=cfg.service_digest(),
                                masters_any=lambda: self.roles.masters_any,
                                on_snapshot=self._peer_snapshot,
                                operator_state=self._operator_state_bytes,
                                on_operator_state=self._peer_operator_state)
        rep.wake = self.sync.kick
        self.replicator = rep
        if self._restored is not None:  # provisional until the peer or a takeover confirms
            rep.restored(self._restored.sessions, self._restored.bindings)
        self.counts.downstream = rep
        self.persistence.observer = rep
        self.forwarder.peer = rep
        sync = self.sync
        self.forwarder.peer_streaming = lambda: sync.inbound_connected
        await self.sync.start()
        self.collector.sources.append(self.sync.metrics)

    async def stop(self) -> None:
        log.info("stopping")
        if self.ha is not None:
            await self.ha.stop()
        if self.sync is not None:
            await self.sync.stop()
        if self._expiry is not None:
            self._expiry.cancel()
        for timer in (self._auto_proxy_timer, self._auto_proxy_timer_grace):
            if timer is not None:
                timer.cancel()
        self.heap.uninstall()
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.dataplane is not None:
            self.dataplane.stop()
        await self.snapshots.stop()  # the tables as the data plane left them
        if self.owner is not None:
            await self.owner.release_all()
        if self.kernel is not None:
            await self.kernel.remove_leftovers()
        if self.syn_proxy.loaded:
            await asyncio.to_thread(self.syn_proxy.remove)
        if self.offload is not None and self.offload.loaded:
            self.forwarder.offload = self.forwarder.offload_seen = None
            self.counts.on_removed = None
            self.offload.close()
            await asyncio.to_thread(self.offload.remove)
        if self.control is not None:
            await self.control.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.tun_fd >= 0:
            os.close(self.tun_fd)
            self.tun_fd = -1
        if self.kernel is not None:
            await self.kernel.close()

    # ---- addresses --------------------------------------------------------------------------
    async def hold_vips(self) -> None:
        """A standalone node holds exactly the VIPs of its virtual servers."""
        assert self.owner is not None
        client_if = self.config.dataplane.client_interface
        wanted = {VrrpAddress(vc.address) for vc in self.config.virtual_servers}
        held = {entry for (ifname, _), entry in self.owner.held.items() if ifname == client_if}
        await self.owner.release(client_if, held - wanted)
        await self.owner.take(client_if, wanted - held, garp_count=3, garp_interval=0.05)

    def pool_usable(self, name: str) -> bool:
        """Has the pool a server that can take new sessions (VRRP track_pools)?"""
        pool = self.services.pools.get(name)
        return pool is not None and bool(candidates(pool.servers))

    def _server_addresses(self) -> set[str]:
        """Servers whose replies the kernel steers into the TUN: the pools' servers, and
        removed ones whose sessions still drain."""
        return {int_to_ip(s.addr) for s in (*self.services.servers(), *self.runtime.retired)}

    # ---- periodic work ----------------------------------------------------------------------
    def _schedule_expiry(self) -> None:
        assert self.loop is not None
        self._expiry = self.loop.call_later(self.config.sessions.expiry_tick, self._expire)

    def _expire(self) -> None:
        now = time.monotonic()
        # The peer's copies are expired by their owner while its stream is up.
        keep = self.replicator.keep if self.replicator is not None else None
        session_keep: Callable[[Session], bool] | None = keep
        off = self.offload
        if off is not None:  # and the flows the kernel still forwards
            session_keep = off.keep if keep is None else (
                lambda s: keep(s) or off.keep(s))
        self.sessions.expire(now, keep=session_keep)
        self.persistence.expire(now, keep=keep)
        self.forwarder.expire_held(now)
        self.heap.grown()  # the tables grew by FREEZE_STEP entries: out of the GC's scans
        if self.runtime.retired and self.runtime.retired_idle():
            self._spawn(self._update_reply_rules())  # a removed server's last session ended
        self._schedule_expiry()

    def _spawn(self, coro: Any) -> None:
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update_reply_rules(self) -> None:
        async with self._reconfig:
            if self.kernel is not None:
                await self.kernel.set_reply_rules(self.config.dataplane.server_interface,
                                                  self._server_addresses())

    # ---- roles ------------------------------------------------------------------------------
    def _on_vrrp_state(self, instance: str, state: State) -> None:
        """Every VRRP state change, in order (a flip between two ticks is two changes)."""
        self.roles.vrrp_state(instance, master=state is State.MASTER)
        self._follow_roles()

    def _peer_snapshot(self) -> None:
        self.roles.peer_snapshot()
        self._follow_roles()

    def _follow_roles(self) -> None:
        """Make the data plane, the sync stream and the takeover gate follow what changed."""
        while (ev := self.roles.next_event()) is not None:
            if isinstance(ev, (Took, Lost)) and self.offload is not None:
                self.offload.replies_here = self._replies_here()
            if isinstance(ev, Took):
                self.services.follow(self.roles.masters)
                now = time.monotonic()
                name = ev.instance

                def of_instance(svc: Service, name: str = name) -> bool:
                    return svc.owner == name

                n = self.sessions.refresh(of_instance, now)
                self.persistence.refresh(of_instance, now)
                if self.replicator is not None:  # restored from disk: ours now, the peer's copy
                    self.replicator.adopted(name, now)
                log.info("took instance %s: %d sessions adopted", name, n)
            elif isinstance(ev, Lost):
                self.services.follow(self.roles.masters)
                log.info("lost instance %s: its sessions are the peer's now", ev.instance)
                if self.sync is not None:
                    self.sync.resync()
            elif isinstance(ev, PeerSnapshotComplete) and self.ha is not None:
                self.ha.pools_changed()  # the takeover gate opened: use our priority now

    def _replies_here(self) -> bool:
        """Do the servers' replies reach this node? Yes while it masters every VRRP
        instance on the server interface (the servers' gateway), or is standalone."""
        server_if = self.config.dataplane.server_interface
        return all(ic.name in self.roles.mastered for ic in self.config.vrrp_instances
                   if ic.interface == server_if)

    def _installed(self, s: Session) -> None:
        """The peer's record for ``s`` was installed: send the replies held for it."""
        if self.forwarder.release_held(s, time.monotonic()) and self.dataplane is not None:
            self.dataplane.write_ready()

    @staticmethod
    def _echo_addresses(config: Config) -> frozenset[int]:
        vips = {vc.address for vc in config.virtual_servers}
        return frozenset(ip_to_int(a.address) for ic in config.vrrp_instances
                         for a in ic.addresses if a.address not in vips)

    # ---- health -----------------------------------------------------------------------------
    def _start_health(self) -> None:
        pools = {name: PoolChecks(self.config.pools[name].health_check, list(pool.servers))
                 for name, pool in self.services.pools.items()}
        if self.monitor is not None:  # a reload replaces it: keep its counts
            self.check_stats.carry(self.monitor)
        self.monitor = HealthMonitor(pools, self._on_transition,
                                     on_result=self.check_stats.observe)
        self.monitor.start()

    async def _restart_health(self) -> None:
        """The pools' members changed (add-server, remove-server): a monitor for them."""
        if self.monitor is not None:
            await self.monitor.stop()
        if self.loop is not None:
            self._start_health()

    def _on_transition(self, server: RealServer, t: Transition) -> None:
        state = "UP" if t.up else "DOWN"
        log.warning("server %s of pool %s is %s: %s", server.key, server.pool, state, t.reason)
        key = (server.pool, server.key, state)
        self.check_stats.transitions[key] = self.check_stats.transitions.get(key, 0) + 1
        pool = self.services.pools.get(server.pool)
        if pool is None or not pool.holds(server):
            return
        self._runtime_changed(self.runtime.set_health(server, t.up, time.monotonic()))
        if not t.up and pool.on_server_down == "reset":
            n = self._reset_sessions(server, "server_down")
            if n:
                log.info("reset %d sessions of %s", n, server.key)

    def _reset_sessions(self, server: RealServer, reason: str) -> int:
        now = time.monotonic()
        doomed = self.sessions.sessions_for_server(server)
        for s in doomed:
            self.sessions.remove(s, reason, now)
        return len(doomed)

    def _runtime_changed(self, refreshed: bool) -> None:
        """After any input to the runtime owner: tracking sees a changed pool at once, and
        the one ramp timer follows the owner's deadline."""
        if refreshed and self.ha is not None:
            self.ha.pools_changed()
        self._arm_ramp()

    def _arm_ramp(self) -> None:
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
            self._ramp_timer = None
        deadline = self.runtime.get_timer()
        if deadline is not None and self.loop is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._ramp_timer = self.loop.call_later(delay, self._ramp_step)

    def _ramp_step(self) -> None:
        self._ramp_timer = None
        self._runtime_changed(self.runtime.handle_timer(time.monotonic()) > 0)

    # ---- operator state ---------------------------------------------------------------------
    async def _load_operator_state(self) -> None:
        state_dir = self.config.node.state_dir
        state, problem = await asyncio.to_thread(opstate.load, state_dir)
        if problem is not None:
            log.error("operator state not used, starting fresh: %s", problem)
        elif state.records or state.demoted:
            log.info("operator state loaded from %s: %d servers changed by an operator%s",
                     Path(state_dir) / opstate.FILE_NAME, len(state.records),
                     ", demoted" if state.demoted else "")
        self.runtime.operator = state
        notes = self.runtime.adopt(self.services, time.monotonic())
        for note in notes:
            log.warning("operator state: %s", note)
        if notes or problem is not None:
            await self._save_operator_state()

    async def _save_operator_state(self) -> str | None:
        """Write the operator state; None, or why it could not be written (logged)."""
        data = self.runtime.operator
        try:
            await asyncio.to_thread(opstate.save, self.config.node.state_dir, data)
        except OSError as exc:
            log.error("operator state not saved in %s: %s", self.config.node.state_dir, exc)
            return f"not saved: {exc}"
        return None

    async def _apply_syn_proxy(self, config: Config) -> None:
        """Point the kernel's SYN proxy at the TCP virtual servers of ``config``: engaged, or
        armed while ``"auto"`` is not engaged."""
        targets = [(vs.address, vs.port) for vs in config.virtual_servers
                   if vs.protocol == "tcp"]
        engaged = self.auto_proxy is None or self.auto_proxy.engaged
        try:
            await asyncio.to_thread(self.syn_proxy.apply, config.dataplane.client_interface,
                                    targets, engaged=engaged)
        except RuntimeError as exc:
            raise RuntimeError(f"{config.source}: dataplane.syn_proxy: {exc}") from exc

    async def _start_offload(self, cfg: Config) -> None:
        """The kernel fast path: the nft table, the conntrack settings (restored at stop),
        no entry of an earlier lbd, the netlink sockets; then the forwarder hands it flows."""
        assert self.offload is not None and self.kernel is not None and self.loop is not None
        await asyncio.to_thread(ConntrackOffload.flush_entries)
        await self._apply_offload(cfg)
        for key, value in conntrack_sysctls(session_timeouts(cfg)).items():
            self.kernel.change_sysctl(f"net.netfilter.{key}", value)
        self.offload.open(self.loop)
        self.offload.loaded = True
        self.offload.replies_here = self._replies_here()
        self.forwarder.offload = self.offload.opened
        self.forwarder.offload_seen = self.offload.seen
        self.counts.on_removed = self.offload.removed

    async def _apply_offload(self, config: Config) -> None:
        targets = [(vs.address, vs.port) for vs in config.virtual_servers
                   if vs.protocol == "tcp"]
        dp = config.dataplane
        try:
            await asyncio.to_thread(ConntrackOffload.apply, dp.client_interface, dp.tun,
                                    targets)
        except RuntimeError as exc:
            raise RuntimeError(f"{config.source}: dataplane.offload: {exc}") from exc

    def _conntrack_for_proxy(self, *, pick_up: bool) -> None:
        """The conntrack settings the proxy needs (restored at stop). Not ``pick_up``
        (engaged): an ACK that matches no conntrack entry must reach synproxy as 'invalid',
        not be picked up as an established flow (which would bypass the cookie check).
        ``pick_up`` (armed, "auto"): flows are picked up mid-stream (the peer's, after a
        failover) and, with "auto", never judged by window, so that conntrack tracks them
        when the proxy engages."""
        assert self.kernel is not None
        self.kernel.change_sysctl("net.netfilter.nf_conntrack_tcp_loose",
                                  "1" if pick_up else "0")
        if self.auto_proxy is not None:
            self.kernel.change_sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", "1")

    def _auto_proxy_tick(self) -> None:
        assert self.loop is not None and self.auto_proxy is not None
        self._auto_proxy_timer = self.loop.call_later(AUTO_PROXY_TICK, self._auto_proxy_tick)
        table = self.sessions
        action = self.auto_proxy.tick(time.monotonic(), table.half_open,
                                      self.syn_proxy.stats(), evicted=table.half_open_evictions)
        if action is not None:
            self._spawn(self._auto_proxy_apply(action, table.half_open))

    async def _auto_proxy_apply(self, action: str, half_open: int) -> None:
        """Engage (conntrack stops picking up flows first, then the ruleset) or release
        (the armed ruleset first, conntrack picks up again after a grace)."""
        assert self.auto_proxy is not None and self.loop is not None
        async with self._reconfig:
            if action == ENGAGE:
                self._conntrack_for_proxy(pick_up=False)
            try:
                await self._apply_syn_proxy(self.config)
            except RuntimeError as exc:
                self.auto_proxy.undo()  # tried again on the next tick
                if action == ENGAGE:  # still armed
                    self._conntrack_for_proxy(pick_up=True)
                log.error("syn_proxy auto: cannot %s: %s", action, exc)
                return
        if action == ENGAGE:
            log.warning("syn_proxy auto: engaged, %d half-open sessions (the SYN flood is "
                        "answered by the kernel from now on)", half_open)
        else:
            self._auto_proxy_timer_grace = self.loop.call_later(AUTO_PROXY_RELEASE_GRACE,
                                                                self._auto_proxy_pick_up)
            log.warning("syn_proxy auto: released after %.0f s with fewer than %d "
                        "unanswered SYN/s", self.auto_proxy.hold, self.auto_proxy.half_open)

    async def _install_services(self, config: Config) -> None:
        """Rebuild the services from ``config`` with the runtime owner's operator records on
        them, keeping every session (a reload, or the peer's operator state); the health
        monitor restarts on the new set. The caller holds ``_reconfig``."""
        if self.monitor is not None:
            await self.monitor.stop()
        self.services = build_services(config, self.services)
        self.services.follow(self.roles.masters)
        notes = self.runtime.adopt(self.services, time.monotonic())
        for note in notes:
            log.warning("operator state: %s", note)
        self.forwarder.set_services(self.services)
        self.config = config
        await self._save_operator_state()
        self._arm_ramp()
        if self.kernel is not None:
            await self.kernel.set_reply_rules(config.dataplane.server_interface,
                                              self._server_addresses())
        self._start_health()

    # ---- operator state shared with the peer ------------------------------------------------
    def _operator_state_bytes(self) -> bytes:
        return self.runtime.operator.shared().to_bytes()

    def _operator_changed(self) -> None:
        """An operator changed a pool's server here: stamp it and tell the peer."""
        self.runtime.operator.changed_at = int(time.time() * 1000)
        if self.sync is not None:
            self.sync.send_operator_state()

    def _peer_operator_state(self, data: bytes) -> None:
        if self.loop is not None:
            task = self.loop.create_task(self._adopt_peer_operator_state(data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _adopt_peer_operator_state(self, data: bytes) -> None:
        """The peer's operator state: applied when it was changed after ours (the pair keeps
        one operator state, the last one set on either node), so a takeover keeps every
        drain, weight and added server. Malformed: counted, nothing changes."""
        try:
            theirs = opstate.OperatorState.from_bytes(data)
        except opstate.StateError as exc:
            self.peer_operator_state["refused"] += 1
            log.error("sync: the peer's operator state refused: %s", exc)
            return
        async with self._reconfig:
            ours = self.runtime.operator
            if not theirs.newer_than(ours):
                self.peer_operator_state["kept_ours"] += 1
                return
            theirs.demoted = ours.demoted  # demote is this node's own
            self.runtime.operator = theirs
            await self._install_services(self.config)
            self.peer_operator_state["applied"] += 1
            log.warning("sync: operator state of the peer applied (%d server records, changed "
                        "%s)", len(theirs.records), time.strftime(
                            "%Y-%m-%d %H:%M:%S", time.gmtime(theirs.changed_at / 1000)))

    # ---- reload -----------------------------------------------------------------------------
    async def reload(self) -> list[str]:
        """Re-read the config file; on any error keep running on the old one. Reloads and
        operator changes run one at a time (two SIGHUPs leave one health monitor)."""
        async with self._reconfig:
            errors = await self._reload()
        self.last_reload_ok = not errors
        if not errors:
            self.last_reload_success = time.time()
        return errors

    async def _reload(self) -> list[str]:
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            self.reload_failures += 1
            for line in exc.errors:
                log.error("reload refused: %s", line)
            return exc.errors
        fixed = ("dataplane", "node", "sessions", "metrics", "sync")
        changed = [k for k in fixed if getattr(new, k) != getattr(self.config, k)]
        changed += vrrp_restart_needed(self.config, new)
        if changed:
            msg = f"{new.source}: {', '.join(changed)}: changes need a restart; kept the old"
            self.reload_failures += 1
            log.error("reload refused: %s", msg)
            return [msg]
        try:
            if new.dataplane.syn_proxy:
                await self._apply_syn_proxy(new)
            if self.offload is not None:
                await self._apply_offload(new)
        except RuntimeError as exc:  # the old ruleset stays (nft applies all or nothing)
            self.reload_failures += 1
            log.error("reload refused: %s", exc)
            return [str(exc)]
        await self._install_services(new)
        if self.sync is not None:  # the peer sees whether our services still match its own
            self.sync.set_config_digest(new.service_digest())
        self.snapshots.digest = new.service_digest()  # what the next start will compare
        if new.standalone and self.owner is not None:
            await self.hold_vips()
        if self.ha is not None:
            for name in await self.ha.reconfigure(new):
                log.info("instance %s: reloaded in place", name)
        self.reloads += 1
        log.info("reloaded %s: %d virtual servers", new.source, len(self.services.services))
        return []

    # ---- control ----------------------------------------------------------------------------
    def control_handlers(self) -> dict[str, Callable[[list[str]], Any]]:
        return {
            "status": lambda args: self.status(),
            "sessions": self.session_list,
            "persistence": self.persistence_list,
            "servers": lambda args: self.server_list(),
            "vrrp": lambda args: self.vrrp_status(),
            "sync": lambda args: self.sync_status(),
            "drain": lambda args: self.set_admin(args, AdminState.DRAIN),
            "enable": lambda args: self.set_admin(args, AdminState.ENABLED),
            "disable": lambda args: self.set_admin(args, AdminState.DISABLED),
            "weight": self.set_weight,
            "add-server": self.add_server,
            "remove-server": self.remove_server,
            "kill-sessions": self.kill_sessions,
            "demote": lambda args: self.demote(args, True),
            "promote": lambda args: self.demote(args, False),
            "reload": self._reload_command,
        }

    async def _reload_command(self, args: list[str]) -> dict[str, Any]:
        errors = await self.reload()
        if errors:
            raise CommandError("reload refused, old config kept:\n" + "\n".join(errors))
        return {"reloaded": True, "config": self.config.source}

    def status(self) -> dict[str, Any]:
        return {
            "node": self.config.node.name,
            "uptime": round(time.time() - self.started, 3),
            "vrrp": {k: {"state": v["state"]} for k, v in self.vrrp_status().items()},
            "sessions": len(self.sessions),
            "sessions_half_open": self.sessions.half_open,
            "half_open_evicted": self.sessions.half_open_evictions,
            "source_limits": self.source_limits_status(),
            "syn_proxy": self.syn_proxy_status(),
            "offload": self.offload_status(),
            "persistence": len(self.persistence),
            # A standalone node masters one implicit instance (ha.roles.STANDALONE, ""):
            # not a VRRP instance, so not listed; "standalone" says it owns everything.
            "masters": sorted(i for i in self.roles.mastered if i != STANDALONE),
            "standalone": self.config.standalone,
            "demoted": self.runtime.operator.demoted,
            "sync": self.sync_status(),
            "table_snapshot": self.snapshots.status(),
            "virtual_servers": {s.name: {"address": endpoint(s.vaddr, s.vport),
                                         "protocol": PROTO_NAMES[s.proto],
                                         "active_sessions": s.active,
                                         "sessions_created": s.created_total,
                                         "instance": s.owner or None, "owned": s.owned,
                                         "source_limits": _limits(s),
                                         "held": self._held(int_to_ip(s.vaddr))}
                                for s in self.services.services},
        }

    def source_limits_status(self) -> dict[str, int]:
        """The per-source limits at a glance (lb.source_limits; the drops are the
        forwarder's counts, the same as ``lbd_drops_total{reason}``)."""
        tracker = self.sessions.sources
        drops = self.forwarder.drops
        return {"tracked": len(tracker), "idle": tracker.idle, "capacity": tracker.capacity,
                "conn_limit_drops": drops.get(CONN_LIMIT, 0),
                "rate_limit_drops": drops.get(RATE_LIMIT, 0),
                "untracked": tracker.untracked, "evicted": tracker.evicted}

    def _auto_proxy_pick_up(self) -> None:
        if self.auto_proxy is not None and not self.auto_proxy.engaged and self.kernel:
            self._conntrack_for_proxy(pick_up=True)

    def syn_proxy_status(self) -> dict[str, Any]:
        """``[dataplane] syn_proxy`` at a glance: on or off, engaged or not (``"auto"``),
        and while on the kernel's counters (lb.synproxy; the same as
        ``lbd_syn_proxy_*_total``)."""
        stats = self.syn_proxy.stats()
        auto, setting = self.auto_proxy, self.config.dataplane.syn_proxy
        return {"enabled": self.syn_proxy.loaded,
                "mode": "auto" if setting == "auto" else "on" if setting else "off",
                "engaged": self.syn_proxy.engaged,
                "engagements": auto.engagements if auto else 0,
                **(stats or {})}

    def offload_status(self) -> dict[str, Any]:
        """``[dataplane] offload`` at a glance (lb.offload; the same as
        ``lbd_offload_*``): the mode, and while on, flows in the kernel and what became of
        those handed to it."""
        off = self.offload
        return {"mode": self.config.dataplane.offload,
                **(off.stats() if off is not None else {})}

    _LIST_OPTIONS: dict[str, type[int] | type[str] | None] = {
        "--virtual": str, "--server": str, "--client": str, "--limit": int}

    def _listing_args(self, args: list[str], *, state: bool) -> tuple[Filter, int | None]:
        options = dict(self._LIST_OPTIONS)
        if state:
            options["--state"] = str
        _, opts = parse_args(args, [], options)
        try:
            flt = Filter.parse(opts)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if flt.virtual is not None and all(v.name != flt.virtual
                                           for v in self.services.services):
            raise CommandError(f"no virtual server {flt.virtual!r}")
        limit = opts.get("limit")
        if limit is not None and limit < 0:
            raise CommandError("--limit must be >= 0")
        return flt, limit

    def session_list(self, args: list[str]) -> Stream:
        """The session table (filtered, limited), built in chunks (lb.listing)."""
        flt, limit = self._listing_args(args, state=True)
        table, now = self.sessions, time.monotonic()
        return Stream(chunks(table, session_filter(flt),
                             lambda s: render_session(s, table.deadline(s), now), limit))

    def persistence_list(self, args: list[str]) -> Stream:
        """The persistence bindings (filtered, limited), built in chunks."""
        flt, limit = self._listing_args(args, state=False)
        now = time.monotonic()
        return Stream(chunks(self.persistence, binding_filter(flt),
                             lambda b: render_binding(b, now), limit))

    def server_list(self) -> list[dict[str, Any]]:
        out = []
        for srv in self.services.servers():
            last = self.monitor.last_result(srv) if self.monitor else None
            if srv.admin is not AdminState.ENABLED:
                state = srv.admin.name
            else:
                state = "UP" if srv.up else "DOWN"
            out.append({"pool": srv.pool, "server": srv.key, "up": srv.up, "state": state,
                        "admin": srv.admin.value, "weight": srv.weight,
                        "effective_weight": srv.effective_weight, "backup": srv.backup,
                        "active_sessions": srv.active, "sessions_created": srv.created_total,
                        "reason": last.reason if last else ""})
        return out

    def _held(self, address: str) -> bool:
        return self.owner is not None and any(a == address for _, a in self.owner.held)

    def vrrp_status(self) -> dict[str, dict[str, Any]]:
        return self.ha.status() if self.ha is not None else {}

    def sync_status(self) -> dict[str, Any]:
        if self.sync is None:
            return {"connected": False, "configured": False}
        return {"configured": True, **self.sync.status(),
                "operator_state": {"changed_at_ms": self.runtime.operator.changed_at,
                                   "records": len(self.runtime.operator.records),
                                   "from_peer": dict(self.peer_operator_state)}}

    def _gate_open(self) -> bool:
        return self.sync is None or self.sync.gate_open

    # ---- operator changes (one at a time, with reloads; each saved before it answers) -----
    def _server(self, pool: str, target: str) -> RealServer:
        try:
            return self.runtime.server(pool, target)
        except Refused as exc:
            raise CommandError(str(exc)) from None

    async def _saved(self, answer: dict[str, Any]) -> dict[str, Any]:
        problem = await self._save_operator_state()
        answer["saved"] = problem is None
        if problem is not None:
            answer["save_error"] = problem
        return answer

    async def set_admin(self, args: list[str], state: AdminState) -> dict[str, Any]:
        (pool_name, target), _ = parse_args(args, ["POOL", "ADDR:PORT"])
        async with self._reconfig:
            server = self._server(pool_name, target)
            self._runtime_changed(self.runtime.set_admin(server, state))
            self._operator_changed()
            log.info("server %s of pool %s set %s by operator", server.key, pool_name,
                     state.value)
            return await self._saved({"pool": pool_name, "server": server.key,
                                      "admin": state.value})

    async def set_weight(self, args: list[str]) -> dict[str, Any]:
        (pool_name, target, text), _ = parse_args(args, ["POOL", "ADDR:PORT", "WEIGHT"])
        try:
            weight = int(text)
        except ValueError:
            raise CommandError(f"weight {text!r} is not an integer") from None
        async with self._reconfig:
            server = self._server(pool_name, target)
            old = server.weight
            try:
                refreshed = self.runtime.set_weight(server, weight, time.monotonic())
            except Refused as exc:
                raise CommandError(str(exc)) from None
            self._runtime_changed(refreshed)
            self._operator_changed()
            log.info("server %s of pool %s: weight %d -> %d by operator", server.key,
                     pool_name, old, weight)
            return await self._saved({"pool": pool_name, "server": server.key,
                                      "weight": weight, "previous_weight": old,
                                      "effective_weight": server.effective_weight})

    async def add_server(self, args: list[str]) -> dict[str, Any]:
        (pool_name, target), opts = parse_args(args, ["POOL", "ADDR:PORT"],
                                               {"--weight": int, "--backup": None})
        async with self._reconfig:
            try:
                server = self.runtime.add_server(pool_name, target, opts.get("weight"),
                                                 opts.get("backup"), time.monotonic())
            except Refused as exc:
                raise CommandError(str(exc)) from None
            self._runtime_changed(True)
            self._operator_changed()
            if self.kernel is not None:
                await self.kernel.set_reply_rules(self.config.dataplane.server_interface,
                                                  self._server_addresses())
            await self._restart_health()
            log.info("server %s added to pool %s by operator (weight %d%s%s)", server.key,
                     pool_name, server.weight, ", backup" if server.backup else "",
                     "" if server.up else ", down until its health check passes")
            return await self._saved({"pool": pool_name, "server": server.key,
                                      "weight": server.weight, "backup": server.backup,
                                      "up": server.up})

    async def remove_server(self, args: list[str]) -> dict[str, Any]:
        (pool_name, target), _ = parse_args(args, ["POOL", "ADDR:PORT"])
        async with self._reconfig:
            server = self._server(pool_name, target)
            pool = self.runtime.pool(pool_name)
            reset = pool.on_server_down == "reset"
            n = self._reset_sessions(server, "server_removed") if reset else 0
            self.runtime.remove_server(server)
            self._runtime_changed(True)
            self._operator_changed()
            await self._restart_health()
            if self.kernel is not None and not self.runtime.retired.count(server):
                await self.kernel.set_reply_rules(self.config.dataplane.server_interface,
                                                  self._server_addresses())
            log.info("server %s removed from pool %s by operator: %s", server.key, pool_name,
                     f"{n} sessions reset" if reset else
                     f"{server.active} sessions drain")
            return await self._saved({"pool": pool_name, "server": server.key,
                                      "sessions_reset": n, "sessions_draining": server.active})

    async def kill_sessions(self, args: list[str]) -> dict[str, Any]:
        (pool_name, target), _ = parse_args(args, ["POOL", "ADDR:PORT"])
        async with self._reconfig:
            server = self._server(pool_name, target)
            n = self._reset_sessions(server, "killed")
            log.info("killed %d sessions of server %s of pool %s by operator", n, server.key,
                     pool_name)
            return {"pool": pool_name, "server": server.key, "sessions_killed": n}

    async def demote(self, args: list[str], demoted: bool) -> dict[str, Any]:
        parse_args(args, [])
        if self.config.standalone:
            raise CommandError("a standalone node (no [vrrp] instances) has no peer to "
                               "give its addresses to")
        async with self._reconfig:
            self.runtime.operator.demoted = demoted
            stepped: list[str] = []
            if self.ha is not None:
                stepped = await self.ha.demote(demoted)
            if demoted:
                log.warning("demoted by operator: instances %s step down; BACKUP until "
                            "lbctl promote", ", ".join(stepped) or "(none mastered)")
            else:
                log.warning("promoted by operator: configured priorities are back")
            return await self._saved({"demoted": demoted, "stepped_down": stepped})

    def _extra_counters(self) -> dict[str, int]:
        dp = self.dataplane
        return {
            "lbd_dataplane_wakeups_total": dp.wakeups if dp else 0,
            "lbd_dataplane_packets_read_total": dp.rx_packets if dp else 0,
            "lbd_dataplane_write_errors_total": dp.tx_errors if dp else 0,
            "lbd_config_reloads_total": self.reloads,
            "lbd_config_reload_failures_total": self.reload_failures,
            "lbd_sessions_picked_up_total": self.forwarder.picked_up,
            "lbd_replies_inferred_total": self.forwarder.replies_inferred,
            "lbd_replies_ambiguous_total": self.forwarder.replies_ambiguous,
            **self._hold_counters(),
        }

    def _node_gauges(self) -> Iterator[Metric]:
        if self.sync is not None:
            got = CounterMetricFamily("lbd_sync_operator_state_received",
                                      "The peer's operator states received, by what became "
                                      "of them", labels=["result"])
            for result, n in sorted(self.peer_operator_state.items()):
                got.add_metric([result], n)
            yield got
        yield GaugeMetricFamily("lbd_config_last_reload_successful",
                                "1 when the last reload was applied, 0 when it was refused",
                                value=1 if self.last_reload_ok else 0)
        yield GaugeMetricFamily("lbd_config_last_reload_success_timestamp_seconds",
                                "When the config in force was read (start or last good reload)",
                                value=self.last_reload_success)
        if self.sync is not None:
            yield GaugeMetricFamily("lbd_sync_gate_open",
                                    "1 once this node may use its priority (peer's snapshot "
                                    "applied, or none to wait for)",
                                    value=1 if self._gate_open() else 0)

    def _hold_counters(self) -> dict[str, int]:
        hold = self.forwarder.hold
        if hold is None:
            return {}
        return {"lbd_sync_replies_held_total": hold.held_total,
                "lbd_sync_replies_released_total": hold.released_total,
                "lbd_sync_reply_hold_full_total": hold.full_drops,
                "lbd_sync_reply_hold_wait_microseconds_total": int(hold.wait_total * 1e6)}
