"""VRRP in the daemon: runners per interface, sync groups, tracking, ownership, notify.

Built from the config by the node, this wires the pure machines (:mod:`ha.vrrp_machine`) to
the I/O around them:

- one :class:`~ha.vrrp_io.VrrpRunner` (one raw socket) per interface that has instances;
- ``[vrrp.groups]`` become :class:`~ha.vrrp_machine.GroupSync` objects reconciled after every
  step of any runner, so a group's instances are master on the same box;
- state changes are applied in order by one worker: on MASTER the instance's addresses are
  taken (VIPs into the data plane, others as interface addresses) and announced with
  gratuitous ARPs; on leaving MASTER they are released;
- tracking: the instance's own interface and ``track_interfaces`` (link down → FAULT, or a
  priority change when a weight is given) and ``track_pools`` (no usable server → same),
  re-evaluated on a short poll and whenever a pool's health changes;
- keepalived-compatible notify scripts, run without blocking the loop.

The runners, their sockets and timers, the machines and the group reconciliation live on
the VRRP thread (:mod:`ha.vrrp_thread`), so adverts leave on time while the main loop
forwards packets; everything else here (ownership, roles, notify, tracking) stays on the
main loop. What crosses: state changes and re-announcements, posted to the main loop in
order; priorities, faults, reconfiguration, demotion, start and stop, run on the VRRP
thread. Status and metrics read the machines' plain attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ha.advert_relay import AdvertRelay, RelayLink
from ha.ownership import AddressOwner, Claim
from ha.vrrp_io import RawVrrpSocket, RunnerInstance, VrrpRunner
from ha.vrrp_machine import (
    GroupSync,
    Reannounce,
    State,
    StateChange,
    VrrpConfig,
    VrrpMachine,
)
from ha.vrrp_thread import VrrpThread
from lb.addr import int_to_ip, ip_to_int
from lb.config import Config, VrrpGroupConfig, VrrpInstanceConfig
from lb.kernel import Kernel

log = logging.getLogger("lbd.vrrp")

TRACK_POLL = 0.2  # seconds between link-state polls
NOTIFY_TIMEOUT = 30.0
STATE_NAMES = {State.INIT: "STOP", State.BACKUP: "BACKUP", State.MASTER: "MASTER",
               State.FAULT: "FAULT"}


@dataclass
class Instance:
    config: VrrpInstanceConfig
    machine: VrrpMachine
    runner: VrrpRunner | None = None
    group: str | None = None
    fault: bool = False
    priority: int = 0
    failed_tracks: list[str] = field(default_factory=list)


class HaController:
    def __init__(self, config: Config, kernel: Kernel, owner: AddressOwner,
                 pool_usable: Callable[[str], bool], *,
                 gate_open: Callable[[], bool] = lambda: True,
                 on_state: Callable[[str, State], None] = lambda name, state: None) -> None:
        self.config = config
        self.kernel = kernel
        self.gate_open = gate_open  # False: hold priority at 1 (sync: wait for the snapshot)
        self.demoted = False  # lbctl demote: priority held at 1 like the gate, masters step down
        # Every state change of every instance, in order, as it happens (feeds ha.roles).
        self.on_state = on_state
        self.owner = owner
        self.pool_usable = pool_usable
        self.instances: dict[str, Instance] = {}
        self.runners: list[VrrpRunner] = []
        self.groups: list[GroupSync] = []
        self.group_configs = {g.name: g for g in config.vrrp_groups}
        self.group_state: dict[str, str] = {}
        self._queue: asyncio.Queue[tuple[str, StateChange | Reannounce, float]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self.notify_failures = 0
        self._vrrp = VrrpThread()
        self._main: asyncio.AbstractEventLoop | None = None
        # Copies of a master's adverts from a process of their own when lbd is late
        # (ha/advert_relay.py); one link per runner.
        self.relay = AdvertRelay()
        self._links: dict[int, RelayLink] = {}  # id(runner) → its link

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._main = asyncio.get_running_loop()
        self._vrrp.start()
        if self.config.vrrp_instances:
            self.relay.start()
        member_of = {i: g.name for g in self.config.vrrp_groups for i in g.instances}
        by_if: dict[str, list[VrrpInstanceConfig]] = {}
        for ic in self.config.vrrp_instances:
            by_if.setdefault(ic.interface, []).append(ic)
        for ifname, configs in by_if.items():
            where = f"{self.config.source}: vrrp.instances.{configs[0].name}.interface"
            idx = await self.kernel.ifindex(ifname)
            if idx is None:
                raise RuntimeError(f"{where}: interface {ifname!r} not found")
            primary = await self.kernel.primary_address(ifname)
            if primary is None:
                raise RuntimeError(f"{where}: interface {ifname!r} has no IPv4 address")
            src = ip_to_int(primary)
            runner_instances = []
            for ic in configs:
                machine = VrrpMachine(_machine_config(ic, src))
                self.instances[ic.name] = Instance(ic, machine, group=member_of.get(ic.name),
                                                   priority=ic.priority)
                runner_instances.append(RunnerInstance(
                    ic.name, machine, tuple(ip_to_int(p) for p in ic.unicast_peers)))
            transport = RawVrrpSocket.open(ifname, idx, src)
            link = self.relay.attach(transport.sock, idx)
            runner = VrrpRunner(self._vrrp.loop, transport, src, runner_instances,
                                self._on_state_change, on_step=self._on_step,
                                on_announce=self._on_announce, copies=link)
            if link is not None:
                self._links[id(runner)] = link
            for ri in runner_instances:
                self.instances[ri.name].runner = runner
            self.runners.append(runner)
        for gc in self.config.vrrp_groups:
            self.groups.append(GroupSync(gc.name, [self.instances[n].machine
                                                   for n in gc.instances]))
        self.owner.open_interfaces(by_if)
        self._tasks.append(loop.create_task(self._apply_changes()))
        await self.evaluate_tracking()
        await self._vrrp.call(self._start_runners)
        self._tasks.append(loop.create_task(self._poll_tracking()))

    def _start_runners(self) -> None:
        for runner in self.runners:
            runner.start()
        if self.relay.fileno() >= 0:
            self._vrrp.loop.add_reader(self.relay.fileno(), self.relay.read_reports)

    def _stop_runners(self) -> None:
        for runner in self.runners:
            runner.stop()
        if self.relay.fileno() >= 0:
            self._vrrp.loop.remove_reader(self.relay.fileno())

    async def stop(self) -> None:
        """Release every address, then leave MASTER announcing priority 0 (the peer takes
        over after skew time), and stop. Released first, so that nothing here answers ARP
        for an address once the peer's gratuitous ARPs have claimed it (a neighbour that
        re-probed us in between would come back to this box and its stopped data plane)."""
        await self.owner.release_all()
        if self.runners:
            await self._vrrp.call(self._stop_runners)
        self._vrrp.stop()
        self.relay.close()
        await self._queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.owner.release_all()
        self.owner.close()
        if self._notify_tasks:
            await asyncio.wait(list(self._notify_tasks), timeout=2)

    # ---- events (the first three run on the VRRP thread) --------------------------------------
    def _on_step(self, now: float) -> None:
        for group in self.groups:
            group.reconcile(now)
        for runner in self.runners:
            runner.flush()

    def _on_state_change(self, name: str, change: StateChange) -> None:
        log.warning("instance %s: %s -> %s (%s)", name, change.old.name, change.new.name,
                    change.reason.name.lower())
        self._to_main(self._state_changed, name, change, time.monotonic())

    def _on_announce(self, name: str, announcement: Reannounce) -> None:
        log.warning("instance %s: %s claimed master and stepped down: announcing the "
                    "addresses again", name, int_to_ip(announcement.rival))
        self._to_main(self._queue.put_nowait, (name, announcement, time.monotonic()))

    def _to_main(self, fn: Callable[..., object], *args: object) -> None:
        assert self._main is not None
        with contextlib.suppress(RuntimeError):  # the main loop is closed: lbd is exiting
            self._main.call_soon_threadsafe(fn, *args)

    def _state_changed(self, name: str, change: StateChange, at: float) -> None:
        """On the main loop, in the order the VRRP thread saw the changes."""
        inst = self.instances[name]
        self._queue.put_nowait((name, change, at))
        self.on_state(name, change.new)
        self._notify(inst.config.notify, inst.config, "INSTANCE", name, change.new,
                     inst.machine.priority)
        if inst.group is not None:
            self._group_changed(inst.group)

    async def _apply_changes(self) -> None:
        """Apply ownership for what is queued, all of it together: a sync group's members
        move in one step, and their takes go to the kernel in one batch, then their GARPs.
        Each instance's changes in a batch reduce to their net effect, so a blip (MASTER
        and back within one batch) installs and announces nothing."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._apply(batch)
            except Exception:
                log.exception("applying VRRP state changes failed")
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _apply(self, batch: list[tuple[str, StateChange | Reannounce, float]]) -> None:
        final: dict[str, State] = {}
        touched_master: set[str] = set()
        since: dict[str, float] = {}
        announce: list[str] = []
        for name, change, at in batch:
            if isinstance(change, Reannounce):
                announce.append(name)
                continue
            final[name] = change.new
            since.setdefault(name, at)
            if State.MASTER in (change.old, change.new):
                touched_master.add(name)
        for name in touched_master:
            if final[name] is not State.MASTER:
                await self._release(name, self.instances[name].config)
        claims = [(name, Claim(ic.interface, ic.addresses, ic.garp_count, ic.garp_interval,
                               ic.garp_master_delay), since[name])
                  for name, state in final.items() if state is State.MASTER
                  for ic in (self.instances[name].config,)]
        await self._take(claims)
        for name in announce:
            ic = self.instances[name].config
            if name not in final and self.instances[name].machine.state is State.MASTER:
                self.owner.announce(ic.interface, [a.address for a in ic.addresses],
                                    ic.garp_count, ic.garp_interval,
                                    refresh=ic.garp_master_delay)

    async def _take(self, claims: list[tuple[str, Claim, float]]) -> None:
        if not claims:
            return
        names = ", ".join(name for name, _, _ in claims)
        try:
            await self.owner.take_many([claim for _, claim, _ in claims])
        except Exception:
            log.exception("instance %s: taking the addresses failed", names)
            return
        done = time.monotonic()
        log.info("instance %s: took %d addresses %.1f ms after the transition", names,
                 sum(len(c.addresses) for _, c, _ in claims),
                 (done - min(at for _, _, at in claims)) * 1000)

    async def _release(self, name: str, ic: VrrpInstanceConfig) -> None:
        try:
            await self.owner.release(ic.interface, ic.addresses)
        except Exception:
            log.exception("instance %s: releasing the addresses failed", name)

    def _group_changed(self, group: str) -> None:
        states = [self.instances[n].machine.state for n in self.group_configs[group].instances]
        if all(s is State.MASTER for s in states):
            new = State.MASTER
        elif any(s is State.FAULT for s in states):
            new = State.FAULT
        elif all(s is State.INIT for s in states):
            new = State.INIT
        else:
            new = State.BACKUP
        if self.group_state.get(group) != new.name:
            self.group_state[group] = new.name
            gc = self.group_configs[group]
            self._notify(gc.notify, gc, "GROUP", group, new, 0)

    # ---- notify scripts ---------------------------------------------------------------------
    def _notify(self, generic: str | None, cfg: VrrpInstanceConfig | VrrpGroupConfig,
                kind: str, name: str, state: State, priority: int) -> None:
        specific = {State.MASTER: cfg.notify_master, State.BACKUP: cfg.notify_backup,
                    State.FAULT: cfg.notify_fault}.get(state)
        if specific:
            self._spawn(shlex.split(specific))
        if generic:
            self._spawn([*shlex.split(generic), kind, name, STATE_NAMES[state], str(priority)])

    def _spawn(self, argv: list[str]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_script(argv))
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def _run_script(self, argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self.notify_failures += 1
            log.error("notify %s: cannot run: %s", argv[0], exc)
            return
        try:
            code = await asyncio.wait_for(proc.wait(), NOTIFY_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            code = -9
        if code != 0:
            self.notify_failures += 1
            log.warning("notify %s exited %d", " ".join(argv), code)

    # ---- tracking ---------------------------------------------------------------------------
    async def _poll_tracking(self) -> None:
        while True:
            await asyncio.sleep(TRACK_POLL)
            try:
                await self.evaluate_tracking()
            except Exception:
                log.exception("tracking failed")

    def pools_changed(self) -> None:
        """A pool's health (or the takeover gate) changed: re-evaluate tracking at once."""
        task = asyncio.get_running_loop().create_task(self.evaluate_tracking())
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    async def evaluate_tracking(self) -> None:
        links: dict[str, bool] = {}
        for inst in self.instances.values():
            ic = inst.config
            failed: list[tuple[str, int]] = []
            for ifname, weight in [(ic.interface, 0),
                                   *((t.interface, t.weight) for t in ic.track_interfaces)]:
                if ifname not in links:
                    links[ifname] = await self.kernel.link_up(ifname)
                if not links[ifname]:
                    failed.append((f"interface {ifname}", weight))
            for tp in ic.track_pools:
                if not self.pool_usable(tp.pool):
                    failed.append((f"pool {tp.pool}", tp.weight))
            fault = any(w == 0 for _, w in failed)
            priority = ic.priority
            if priority < 255:
                priority = max(1, min(254, priority + sum(w for _, w in failed)))
                if not self.gate_open():
                    # Gated takeover: until the peer's sessions have arrived, do not preempt
                    # (a lone node still becomes master when no one else advertises).
                    priority = 1
            if self.demoted:
                priority = 1  # the same hold as the gate, also for an address owner
            self._apply_tracking(inst, fault, priority, [what for what, _ in failed])

    async def reconfigure(self, config: Config) -> list[str]:
        """A reload whose VRRP part may change in place (``lb.config.vrrp_restart_needed``
        found nothing): each instance takes its new priority, advert interval, preempt,
        tracking, GARP and notify settings without a state change, so no address moves unless
        the new priorities say so (preemption decides, as at any priority change). Returns
        the instances that changed."""
        changed = [ic for ic in config.vrrp_instances if ic != self.instances[ic.name].config]

        def apply() -> None:
            now = self._vrrp.loop.time()
            for ic in changed:
                machine = self.instances[ic.name].machine
                machine.reconfigure(_machine_config(ic, machine.config.primary_address), now)
            if changed:
                self._on_step(now)  # re-arm the timers: a MASTER's sooner advert leaves on time
        await self._vrrp.call(apply)
        for ic in changed:
            self.instances[ic.name].config = ic
        self.config = config
        self.group_configs = {g.name: g for g in config.vrrp_groups}
        await self.evaluate_tracking()
        return [ic.name for ic in changed]

    async def demote(self, demoted: bool) -> list[str]:
        """``lbctl demote`` / ``promote``. Demoted, every instance's priority is held at 1
        (as the takeover gate holds it) and each MASTER steps down at once with a
        priority-0 advert, so the peer takes over after its skew time and this node stays
        BACKUP while the peer advertises (a node that hears no one for Master_Down_Interval
        still becomes master: a demoted node never leaves an address unserved). Promoted,
        the configured priority is back and preemption decides. Returns the instances
        that stepped down."""
        self.demoted = demoted
        await self.evaluate_tracking()
        if not demoted:
            return []

        def step_down() -> list[str]:
            stepped = [name for name, inst in self.instances.items()
                       if inst.machine.state is State.MASTER and inst.runner is not None]
            for name in stepped:  # a sync group may already have stepped a member down
                now = self._vrrp.loop.time()
                self.instances[name].machine.force_backup(now)
                self._on_step(now)
            return stepped
        return await self._vrrp.call(step_down)

    def _apply_tracking(self, inst: Instance, fault: bool, priority: int,
                        failed: list[str]) -> None:
        if failed != inst.failed_tracks:
            if failed:
                log.warning("instance %s: tracking failed: %s", inst.config.name,
                            ", ".join(failed))
            else:
                log.warning("instance %s: tracking ok", inst.config.name)
            inst.failed_tracks = failed
        runner = inst.runner
        if runner is None:
            return
        name = inst.config.name
        if priority != inst.priority:
            inst.priority = priority
            self._vrrp.post(lambda: runner.set_priority(name, priority))
        if fault != inst.fault:
            inst.fault = fault
            self._vrrp.post(lambda: runner.set_fault(name, fault))

    # ---- read side --------------------------------------------------------------------------
    def status(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        for name, inst in self.instances.items():
            m = inst.machine
            out[name] = {
                "state": m.state.value, "priority": m.priority, "vrid": inst.config.vrid,
                "base_priority": inst.config.priority, "interface": inst.config.interface,
                "master": int_to_ip(m.master_address) if m.master_address else None,
                "addresses": [f"{a.address}/{a.prefix_len}" for a in inst.config.addresses],
                "group": inst.group, "tracking_failed": inst.failed_tracks,
                "gateway": name == self.config.gateway_instance,
                "transitions": m.transitions, "demoted": self.demoted,
                "advert_interval": inst.config.advert_interval,
                "master_advert_interval": m.master_adver_interval,
                "preempt": inst.config.preempt,
                "scheduling": self._vrrp.scheduling,
            }
        return out

    def metrics(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("lbd_vrrp_state", "1 for the instance's current state",
                                  labels=["instance", "state"])
        prio = GaugeMetricFamily("lbd_vrrp_priority", "Effective VRRP priority",
                                 labels=["instance"])
        trans = CounterMetricFamily("lbd_vrrp_transitions", "VRRP state transitions",
                                    labels=["instance"])
        sent = CounterMetricFamily("lbd_vrrp_adverts_sent", "VRRP adverts sent",
                                   labels=["instance"])
        recv = CounterMetricFamily("lbd_vrrp_adverts_received",
                                   "VRRP adverts handed to the instance", labels=["instance"])
        dropped = CounterMetricFamily("lbd_vrrp_adverts_dropped",
                                      "VRRP adverts dropped, by reason",
                                      labels=["scope", "reason"])
        rivals = CounterMetricFamily(
            "lbd_vrrp_rival_adverts", "Adverts received as master from a node that claimed "
            "master and lost", labels=["instance"])
        reannounced = CounterMetricFamily(
            "lbd_vrrp_reannouncements", "Addresses announced again after a rival master "
            "stepped down", labels=["instance"])
        relayed = CounterMetricFamily(
            "lbd_vrrp_adverts_relayed", "Copies of the master's last advert sent by the "
            "advert relay because lbd's own was late", labels=["instance"])
        for name, inst in self.instances.items():
            m = inst.machine
            link = self._links.get(id(inst.runner)) if inst.runner is not None else None
            relayed.add_metric([name], link.copies.get(inst.config.vrid, 0) if link else 0)
            rivals.add_metric([name], m.rival_adverts)
            reannounced.add_metric([name], m.reannouncements)
            for st in State:
                state.add_metric([name, st.value], 1 if m.state is st else 0)
            prio.add_metric([name], m.priority)
            trans.add_metric([name], m.transitions)
            sent.add_metric([name], m.adverts_sent)
            recv.add_metric([name], m.adverts_received)
            for reason, n in list(m.dropped.items()):  # written by the VRRP thread
                dropped.add_metric([name, reason.value], n)
        late = HistogramMetricFamily(
            "lbd_vrrp_timer_lateness_seconds", "How late the VRRP timer of an interface ran "
            "after its deadline (adverts leave right after)", labels=["interface"])
        late_max = GaugeMetricFamily("lbd_vrrp_timer_lateness_max_seconds",
                                     "The latest the VRRP timer of an interface ran",
                                     labels=["interface"])
        for runner in self.runners:
            scope = f"interface:{int_to_ip(runner.primary_address)}"
            ifname = self.instances[runner.instances[0].name].config.interface
            for reason, n in list(runner.dropped.items()):
                dropped.add_metric([scope, reason.value], n)
            lateness = runner.timer_late  # written by the VRRP thread: exposition copies
            late.add_metric([ifname], lateness.exposition(), lateness.sum)
            late_max.add_metric([ifname], lateness.max)
        yield from (state, prio, trans, sent, recv, dropped, rivals, reannounced, late,
                    late_max, relayed)
        yield CounterMetricFamily("lbd_garps_sent", "Gratuitous ARPs sent",
                                  value=self.owner.garps_sent)
        yield CounterMetricFamily("lbd_garp_errors", "Rounds of gratuitous ARPs that failed",
                                  value=self.owner.garp_errors)
        yield CounterMetricFamily("lbd_vrrp_notify_failures", "Notify scripts that failed",
                                  value=self.notify_failures)


def _machine_config(ic: VrrpInstanceConfig, primary: int) -> VrrpConfig:
    return VrrpConfig(vrid=ic.vrid, priority=ic.priority, advert_interval=ic.advert_interval,
                      primary_address=primary,
                      addresses=tuple(ip_to_int(a.address) for a in ic.addresses),
                      preempt=ic.preempt, preempt_delay=ic.preempt_delay)
