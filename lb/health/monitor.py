"""The asyncio shell that runs health probes and applies their verdicts to real servers.

One task per checked server: the first probe after a random delay in ``[0, interval)`` (so
that a pool's checks do not all fire together), then one every ``interval`` ±10 %, measured
from the end of the previous probe. A semaphore bounds the probes in flight; every probe is
also bounded in time (its own ``spec.timeout`` and a guard on top), so a hanging probe of one
server never delays another's.

Each result feeds that server's :class:`~lb.health.state.HealthState`. On a transition the
monitor calls ``on_transition`` once, and that is all it does: it writes nothing on the
server. The daemon hands the transition to the one owner of a server's runtime state
(:class:`lb.runtime.ServerRuntime`: ``up``, the slow-start ramp, the schedulers), logs it with
the reason and counts it. A server's checks start from the ``up`` it has when the monitor
starts.

Input is a mapping ``pool name -> PoolChecks(spec, servers)``; a pool whose spec is ``None``
has no health check: a server of it that is not UP gets one "no health check" transition to
UP at start.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from lb.addr import int_to_ip
from lb.health.probes import HealthCheckSpec, ProbeFn, ProbeResult, make_probe, reason_kind
from lb.health.state import HealthState, Transition
from lb.servers import RealServer

__all__ = ["GUARD_SECONDS", "HealthMonitor", "LastResult", "PoolChecks", "ProbeFactory"]

log = logging.getLogger(__name__)

GUARD_SECONDS = 1.0  # grace beyond spec.timeout before the monitor abandons a probe itself

ProbeFactory = Callable[[HealthCheckSpec, str], ProbeFn]
"""``factory(spec, pool_name) -> probe``; :func:`lb.health.probes.make_probe` by default."""


class PoolChecks(NamedTuple):
    """What the monitor needs of one pool."""

    spec: HealthCheckSpec | None  # None: no health check, servers always up
    servers: Sequence[RealServer]


@dataclass(frozen=True, slots=True)
class LastResult:
    """The latest probe result of a server, with the monitor clock's time of it."""

    ok: bool
    reason: str
    duration: float
    at: float


@dataclass(slots=True, eq=False)
class _Checked:
    pool: str
    server: RealServer
    spec: HealthCheckSpec
    probe: ProbeFn
    state: HealthState
    addr: str
    port: int


class HealthMonitor:
    """Runs the checks of every pool; see the module docstring.

    The constructor touches no event loop; :meth:`start` must be called from a running loop
    and :meth:`stop` awaited on the same one.
    """

    def __init__(
        self,
        pools: Mapping[str, PoolChecks],
        on_transition: Callable[[RealServer, Transition], None],
        *,
        max_in_flight: int = 64,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[RealServer, ProbeResult], None] | None = None,
        probe_factory: ProbeFactory = make_probe,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._pools = {name: PoolChecks(*checks) for name, checks in pools.items()}
        self._on_transition = on_transition
        self._on_result = on_result
        self._max_in_flight = max_in_flight
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._factory = probe_factory
        self._checked: dict[RealServer, _Checked] = {}
        self._last: dict[RealServer, LastResult] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._checks_total: dict[tuple[str, str, str], int] = {}
        self._failures_total: dict[tuple[str, str, str], int] = {}

    # ------------------------------------------------------------------ read side

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    @property
    def checks_total(self) -> Mapping[tuple[str, str, str], int]:
        """Probes run, by ``(pool, "ADDR:PORT", "ok" | "fail")``."""
        return MappingProxyType(self._checks_total)

    @property
    def failures_total(self) -> Mapping[tuple[str, str, str], int]:
        """Failed probes by ``(pool, "ADDR:PORT", reason_kind(reason))`` — a bounded label."""
        return MappingProxyType(self._failures_total)

    def last_result(self, server: RealServer) -> LastResult | None:
        """The latest probe result of ``server``; None before its first probe or if unchecked."""
        return self._last.get(server)

    def checked(self) -> Iterator[RealServer]:
        """The servers this monitor probes."""
        return iter(list(self._checked))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create one probe task per checked server; report servers of unchecked pools UP."""
        if self._tasks:
            raise RuntimeError("health monitor already started")
        semaphore = asyncio.Semaphore(self._max_in_flight)
        now = self._clock()
        for pool, checks in self._pools.items():
            spec = checks.spec
            if spec is None:
                for server in checks.servers:
                    if not server.up:
                        self._notify(server, Transition(True, "no health check", now))
                continue
            probe = self._factory(spec, pool)
            for server in checks.servers:
                chk = _Checked(
                    pool=pool,
                    server=server,
                    spec=spec,
                    probe=probe,
                    state=HealthState(spec.rise, spec.fall, initial_up=server.up, now=now),
                    addr=int_to_ip(server.addr),
                    port=spec.port if spec.port is not None else server.port,
                )
                self._checked[server] = chk
                name = f"health {pool} {server.key}"
                self._tasks.append(asyncio.create_task(self._run(chk, semaphore), name=name))

    async def stop(self) -> None:
        """Cancel every probe task and wait until all are gone."""
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ the loop

    async def _run(self, chk: _Checked, semaphore: asyncio.Semaphore) -> None:
        interval = chk.spec.interval
        delay = self._rng.uniform(0.0, interval)
        while True:
            await asyncio.sleep(delay)
            async with semaphore:
                result = await self._probe_once(chk)
            self._apply(chk, result)
            delay = interval * self._rng.uniform(0.9, 1.1)

    async def _probe_once(self, chk: _Checked) -> ProbeResult:
        started = time.monotonic()
        timeout = chk.spec.timeout
        try:
            async with asyncio.timeout(timeout + GUARD_SECONDS):
                return await chk.probe(chk.addr, chk.port)
        except TimeoutError:
            reason = f"timeout after {timeout * 1000:.0f}ms"
        except Exception as exc:  # a broken probe is a failed check, not a dead task
            reason = f"probe error: {type(exc).__name__}: {exc}"
        return ProbeResult(False, reason, time.monotonic() - started)

    def _apply(self, chk: _Checked, result: ProbeResult) -> None:
        server = chk.server
        now = self._clock()
        self._last[server] = LastResult(result.ok, result.reason, result.duration, now)
        key = (chk.pool, server.key, "ok" if result.ok else "fail")
        self._checks_total[key] = self._checks_total.get(key, 0) + 1
        if not result.ok:
            fkey = (chk.pool, server.key, reason_kind(result.reason))
            self._failures_total[fkey] = self._failures_total.get(fkey, 0) + 1
        if self._on_result is not None:
            try:
                self._on_result(server, result)
            except Exception:
                log.exception("on_result hook failed for %s %s", chk.pool, server.key)
        transition = chk.state.record(result.ok, result.reason, now)
        if transition is not None:
            self._notify(server, transition)

    def _notify(self, server: RealServer, transition: Transition) -> None:
        try:
            self._on_transition(server, transition)
        except Exception:
            log.exception("on_transition failed for %s %s", server.pool, server.key)
