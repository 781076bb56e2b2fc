"""Health checks: pure rise/fall state, asyncio probes, and the monitor that runs them."""

from __future__ import annotations

from lb.health.monitor import HealthMonitor, LastResult, PoolChecks, ProbeFactory
from lb.health.probes import HealthCheckSpec, ProbeFn, ProbeResult, make_probe, reason_kind
from lb.health.state import HealthState, SlowStart, Transition

__all__ = [
    "HealthCheckSpec",
    "HealthMonitor",
    "HealthState",
    "LastResult",
    "PoolChecks",
    "ProbeFactory",
    "ProbeFn",
    "ProbeResult",
    "SlowStart",
    "Transition",
    "make_probe",
    "reason_kind",
]
