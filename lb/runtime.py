"""The one owner of every real server's runtime state (pure: ``now`` is an argument).

A :class:`~lb.servers.RealServer`'s health (``up``), operator state (``admin``), weight in
force (``weight``: the configured one or the one an operator set) and slow-start ramp
(``effective_weight``) are written here and nowhere else. Every input compares what a
scheduler sees of the server — usable or not, backup or not, its effective weight — before
and after, and when that changed refreshes the schedulers of exactly the services whose pool
holds the server (:meth:`lb.services.Pool.refresh`); a change nobody sees refreshes nothing.

Inputs:

- :meth:`ServerRuntime.set_health` — a health transition (from the monitor);
- :meth:`ServerRuntime.set_admin`, :meth:`ServerRuntime.set_weight`,
  :meth:`ServerRuntime.add_server`, :meth:`ServerRuntime.remove_server` — the operator; these
  also update the :class:`~lb.opstate.OperatorState` kept here, which the caller saves;
- :meth:`ServerRuntime.adopt` — a (re)built :class:`~lb.services.ServiceSet`: the operator
  records are applied to it (removed servers taken out, added ones put back, weights set);
- :meth:`ServerRuntime.handle_timer` — the slow-start ramp, once :meth:`get_timer` is due.

Slow start (HAProxy's ``slowstart``): a server that comes UP in a pool with ``slow_start``
seconds starts at effective weight 1 and ramps linearly to its weight
(:meth:`lb.health.state.SlowStart.weight_at`); the ramp is looked at every
``RAMP_TICK_FRACTION`` of the duration (between 50 ms and 1 s), and a step that changes the
effective weight refreshes the pool's schedulers — also ``sh`` and ``maglev``, whose tables
are built from the weights. A fall puts the effective weight back at the weight, ready for
the next rise. One deadline for all ramps: the shell arms one timer.

Removed servers whose sessions still run are kept in :attr:`ServerRuntime.retired` (their
sessions drain, or the caller resets them), so the shell keeps their reply path until
:meth:`ServerRuntime.retired_idle` returns them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lb.addr import endpoint
from lb.health.state import SlowStart
from lb.opstate import MAX_WEIGHT, OperatorState, Record, parse_endpoint
from lb.servers import AdminState, RealServer
from lb.services import Pool, ServiceSet

__all__ = ["RAMP_TICK_FRACTION", "Refused", "ServerRuntime"]

RAMP_TICK_FRACTION = 1 / 20


class Refused(ValueError):
    """An operator request that cannot be applied (unknown pool, server, bad weight)."""


@dataclass(slots=True)
class _Ramp:
    up_since: float
    duration: float
    next_at: float


def _view(s: RealServer) -> tuple[bool, int] | None:
    """What a scheduler sees of a server: nothing while it is not usable (no candidate)."""
    return (s.backup, s.effective_weight) if s.usable() else None


def _tick(duration: float) -> float:
    return max(0.05, min(1.0, duration * RAMP_TICK_FRACTION))


class ServerRuntime:
    """See the module docstring. ``services`` is the model the data plane uses now."""

    def __init__(self, services: ServiceSet, operator: OperatorState | None = None) -> None:
        self.services = services
        self.operator = operator if operator is not None else OperatorState()
        self.retired: list[RealServer] = []
        self._ramps: dict[RealServer, _Ramp] = {}
        self._added: dict[tuple[str, str], RealServer] = {}  # servers add-server made
        self._removed: dict[tuple[str, str], RealServer] = {}  # configured, removed
        self.refreshes = 0  # pool refreshes done (a test can see that nothing was refreshed)

    # ---- lookups ----------------------------------------------------------------------------
    def pool(self, name: str) -> Pool:
        pool = self.services.pools.get(name)
        if pool is None:
            raise Refused(f"no pool {name!r}")
        return pool

    def server(self, pool_name: str, target: str) -> RealServer:
        pool = self.pool(pool_name)
        try:
            addr, port = parse_endpoint(target)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        server = pool.find(addr, port)
        if server is None:
            raise Refused(f"pool {pool_name!r} has no server {target}")
        return server

    def ramping(self, server: RealServer) -> bool:
        return server in self._ramps

    # ---- health -----------------------------------------------------------------------------
    def set_health(self, server: RealServer, up: bool, now: float) -> bool:
        """A health transition; returns whether schedulers were refreshed."""
        if server.up == up:
            return False
        before = _view(server)
        server.up = up
        self._ramps.pop(server, None)
        pool = self.services.pools.get(server.pool)
        duration = pool.slow_start if pool is not None else 0.0
        if up and duration > 0 and server.weight > 1:
            server.effective_weight = SlowStart.weight_at(server.weight, now, now, duration)
            self._ramps[server] = _Ramp(now, duration, now + _tick(duration))
        else:
            server.effective_weight = server.weight
        return self._changed(server, before)

    # ---- the ramp ---------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """The one deadline at which :meth:`handle_timer` is due (None: no ramp running)."""
        return min((r.next_at for r in self._ramps.values()), default=None)

    def handle_timer(self, now: float) -> int:
        """Step every due ramp; returns how many servers' effective weight changed."""
        changed = 0
        for server, ramp in list(self._ramps.items()):
            if now < ramp.next_at:
                continue
            before = _view(server)
            server.effective_weight = SlowStart.weight_at(server.weight, ramp.up_since, now,
                                                          ramp.duration)
            if SlowStart.ramping(ramp.up_since, now, ramp.duration):
                ramp.next_at = now + _tick(ramp.duration)
            else:
                del self._ramps[server]
                server.effective_weight = server.weight
            if self._changed(server, before):
                changed += 1
        return changed

    # ---- the operator -----------------------------------------------------------------------
    def set_admin(self, server: RealServer, admin: AdminState) -> bool:
        before = _view(server)
        server.admin = admin
        self.operator.update(server.pool, server.key,
                             admin=None if admin is AdminState.ENABLED else admin)
        return self._changed(server, before)

    def set_weight(self, server: RealServer, weight: int, now: float) -> bool:
        _check_weight(weight)
        before = _view(server)
        self._apply_weight(server, weight, now)
        rec = self.operator.get(server.pool, server.key)
        if rec.added:
            self.operator.update(server.pool, server.key, weight=weight)
        else:
            self.operator.update(server.pool, server.key,
                                 weight=None if weight == server.config_weight else weight)
        return self._changed(server, before)

    def add_server(self, pool_name: str, target: str, weight: int | None,
                   backup: bool | None, now: float) -> RealServer:
        """A new server in ``pool_name`` (weight 1 and primary unless given), DOWN until it
        rises when the pool has a health check; or a removed configured server back as
        configured (a given ``weight`` then overrides the configured one)."""
        if weight is not None:
            _check_weight(weight)
        pool = self.pool(pool_name)
        try:
            addr, port = parse_endpoint(target)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        key = endpoint(addr, port)
        if pool.find(addr, port) is not None:
            raise Refused(f"pool {pool_name!r} already has server {key}")
        configured = self._removed.get((pool_name, key))
        if configured is not None:
            if backup is not None and backup != configured.backup:
                raise Refused(f"{key} is configured with backup = "
                              f"{str(configured.backup).lower()}: change that in the config")
            del self._removed[(pool_name, key)]
            server = configured
            w = configured.config_weight if weight is None else weight
            self.operator.put(pool_name, key, Record(
                weight=None if w == configured.config_weight else w))
        else:
            w = 1 if weight is None else weight
            server = RealServer(pool=pool_name, addr=addr, port=port, weight=w,
                                backup=bool(backup))
            self.operator.put(pool_name, key, Record(added=True, weight=w,
                                                     backup=bool(backup)))
            self._added[(pool_name, key)] = server
        if server in self.retired:  # its old sessions count against it again
            self.retired.remove(server)
        server.admin = AdminState.ENABLED
        server.up = not pool.checked
        self._ramps.pop(server, None)
        server.index = len(pool.servers)
        self._apply_weight(server, w, now)
        pool.servers.append(server)
        self._refresh(pool)
        return server

    def remove_server(self, server: RealServer) -> None:
        """Take ``server`` out of its pool; its sessions are the caller's (drain or reset)."""
        pool = self.pool(server.pool)
        pool.servers.remove(server)
        for i, s in enumerate(pool.servers):
            s.index = i
        self._ramps.pop(server, None)
        key = (server.pool, server.key)
        if self._added.pop(key, None) is not None:
            self.operator.put(server.pool, server.key, Record())
        else:
            self.operator.put(server.pool, server.key, Record(removed=True))
            self._removed[key] = server
        if server.active > 0:
            self.retired.append(server)
        self._refresh(pool)

    def retired_idle(self) -> list[RealServer]:
        """Removed servers whose last session has ended (forgotten from now on)."""
        idle = [s for s in self.retired if s.active <= 0]
        if idle:
            self.retired = [s for s in self.retired if s.active > 0]
        return idle

    # ---- a (re)built model ------------------------------------------------------------------
    def adopt(self, services: ServiceSet, now: float) -> list[str]:
        """Make ``services`` (fresh from the config) the model, with the operator records
        applied. Returns one line per record that no longer applies and was dropped."""
        self.services = services
        self._removed.clear()
        notes: list[str] = []
        for (pool_name, key), rec in sorted(self.operator.records.items()):
            pool = services.pools.get(pool_name)
            if pool is None:
                notes.append(f"pool {pool_name}: no longer configured, its operator "
                             f"state for {key} is dropped")
                self.operator.put(pool_name, key, Record())
                self._added.pop((pool_name, key), None)
                continue
            addr, port = parse_endpoint(key)
            server = pool.find(addr, port)
            if rec.removed:
                if server is None:
                    notes.append(f"pool {pool_name}: {key} is no longer configured, its "
                                 "removal is dropped")
                    self.operator.put(pool_name, key, Record())
                    self._removed.pop((pool_name, key), None)
                else:
                    pool.servers.remove(server)
                    self._removed[(pool_name, key)] = server
                continue
            if rec.added and server is not None:
                notes.append(f"pool {pool_name}: {key} is configured now, the config "
                             "takes over from add-server")
                self.operator.update(pool_name, key, added=False, backup=False,
                                     weight=None if rec.weight == server.config_weight
                                     else rec.weight)
                self._added.pop((pool_name, key), None)
            elif rec.added:
                old = self._added.get((pool_name, key))
                server = old if old is not None else RealServer(
                    pool=pool_name, addr=addr, port=port, weight=rec.weight or 0)
                assert rec.weight is not None
                server.config_weight = rec.weight
                server.backup = rec.backup
                pool.servers.append(server)
                self._added[(pool_name, key)] = server
            elif server is None:
                notes.append(f"pool {pool_name}: {key} is no longer configured, its "
                             "operator state is dropped")
                self.operator.put(pool_name, key, Record())
        for pool in services.pools.values():
            for i, s in enumerate(pool.servers):
                s.index = i
            members = set(pool.servers)
            for s in [s for s in self._ramps if s.pool == pool.name and s not in members]:
                del self._ramps[s]
            for s in pool.servers:
                rec = self.operator.get(pool.name, s.key)
                s.admin = rec.admin if rec.admin is not None else AdminState.ENABLED
                self._apply_weight(s, rec.weight if rec.weight is not None
                                   else s.config_weight, now)
            self._refresh(pool)
        return notes

    # ---- internals --------------------------------------------------------------------------
    def _apply_weight(self, server: RealServer, weight: int, now: float) -> None:
        server.weight = weight
        ramp = self._ramps.get(server)
        if ramp is not None and SlowStart.ramping(ramp.up_since, now, ramp.duration):
            server.effective_weight = SlowStart.weight_at(weight, ramp.up_since, now,
                                                          ramp.duration)
        else:
            self._ramps.pop(server, None)
            server.effective_weight = weight

    def _changed(self, server: RealServer, before: tuple[bool, int] | None) -> bool:
        if _view(server) == before:
            return False
        pool = self.services.pools.get(server.pool)
        if pool is None or not pool.holds(server):
            return False
        self._refresh(pool)
        return True

    def _refresh(self, pool: Pool) -> None:
        pool.refresh()
        self.refreshes += 1

    def servers(self) -> Iterable[RealServer]:
        return self.services.servers()


def _check_weight(weight: int) -> None:
    if not 0 <= weight <= MAX_WEIGHT:
        raise Refused(f"weight {weight} out of range 0..{MAX_WEIGHT}")
