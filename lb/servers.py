"""Runtime state of real servers: what schedulers choose from and sessions count against.

A ``RealServer`` is created from config for each server of a pool (or added at run time) and
shared by every virtual server that uses that pool. Its fields are plain attributes so that the
data plane can read and bump them without indirection; everything that decides *whether* a
server may take a new session lives in :meth:`RealServer.accepts_new`.

Who writes what: the pool builder (:mod:`lb.services`) writes what comes from config
(``config_weight``, ``backup``, ``max_conns``, ``index``); the session table counts ``active``;
the runtime state — ``up``, ``admin``, ``weight`` and ``effective_weight`` — is written by its
one owner, :class:`lb.runtime.ServerRuntime`, which refreshes the schedulers that depend on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lb.addr import endpoint


class AdminState(enum.Enum):
    """Operator state, set through the runtime API (``lbctl enable|drain|disable``)."""

    ENABLED = "enabled"
    DRAIN = "drain"  # no new sessions, except clients already bound by persistence
    DISABLED = "disabled"  # no new sessions at all; persistence bindings are rescheduled


@dataclass(slots=True, eq=False)
class RealServer:
    """One real server of one pool. Identity is the object; ``key`` names it in APIs."""

    pool: str
    addr: int  # IPv4 as int
    port: int
    weight: int  # weight in force: the configured one, or the one an operator set; 0 = no new
    backup: bool = False
    max_conns: int = 0  # 0 = unlimited
    # --- runtime state ---
    up: bool = True  # health; True until a check says otherwise (no check = always up)
    admin: AdminState = AdminState.ENABLED
    effective_weight: int = -1  # weight in force now (slow start ramps it); -1 = same as weight
    active: int = 0  # sessions currently in the table that point at this server
    created_total: int = 0  # sessions ever created towards this server
    index: int = field(default=0)  # position in its pool, stable for the life of the config
    config_weight: int = -1  # the weight the config (or add-server) gave; -1 = same as weight

    def __post_init__(self) -> None:
        if self.effective_weight < 0:
            self.effective_weight = self.weight
        if self.config_weight < 0:
            self.config_weight = self.weight

    @property
    def key(self) -> str:
        """``ADDR:PORT``, how operators and the control socket name a server."""
        return endpoint(self.addr, self.port)

    def usable(self) -> bool:
        """Healthy and administratively enabled: may receive new sessions (weight permitting)."""
        return self.up and self.admin is AdminState.ENABLED

    def accepts_new(self) -> bool:
        """May a scheduler hand this server one more new session right now?"""
        if not (self.up and self.admin is AdminState.ENABLED and self.effective_weight > 0):
            return False
        return self.max_conns == 0 or self.active < self.max_conns

    def accepts_bound(self) -> bool:
        """May a client bound to this server by persistence open one more session?"""
        if not self.up or self.admin is AdminState.DISABLED:
            return False
        return self.max_conns == 0 or self.active < self.max_conns


def candidates(servers: list[RealServer] | tuple[RealServer, ...]) -> list[RealServer]:
    """The servers a scheduler should choose among: usable primaries, else usable backups.

    A primary with weight 0 (drained) takes nothing new and so does not hold the backups back:
    backups serve while no primary can take a new session (keepalived's sorry-server,
    HAProxy's ``backup``).
    """
    primaries = [s for s in servers if not s.backup and s.usable() and s.effective_weight > 0]
    if primaries:
        return primaries
    return [s for s in servers if s.backup and s.usable() and s.effective_weight > 0]
