"""Pure health bookkeeping: rise/fall counting and the slow-start ramp.

Nothing here reads a clock or does I/O; the caller passes ``now`` (seconds on any monotonic
scale) with every input. :class:`HealthState` is fed one probe result at a time and answers with
a :class:`Transition` exactly once per change of state, the way keepalived and HAProxy count:

- a server that is UP goes DOWN after ``fall`` consecutive failed checks;
- a server that is DOWN comes UP after ``rise`` consecutive successful checks;
- any result of the other kind resets the run being counted.

:class:`SlowStart` computes the weight in force while a server that just came UP is ramped
from almost nothing to its configured weight (HAProxy's ``slowstart``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["HealthState", "SlowStart", "Transition"]


@dataclass(frozen=True, slots=True)
class Transition:
    """A server changed health state.

    ``up`` is the new state, ``reason`` the reason of the check that decided it (``"ok"`` for a
    rise, the probe's failure reason for a fall) and ``at`` the ``now`` of that check.
    """

    up: bool
    reason: str
    at: float


class HealthState:
    """Rise/fall counter of one server.

    ``initial_up`` is the state before any check: lbd starts servers UP so that a fresh node
    serves at once; a caller that wants a server to prove itself first passes ``False``.
    """

    __slots__ = ("_fall", "_rise", "_run", "_since", "_up")

    def __init__(self, rise: int, fall: int, *, initial_up: bool, now: float = 0.0) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1 (rise={rise}, fall={fall})")
        self._rise = rise
        self._fall = fall
        self._up = initial_up
        self._run = 0  # consecutive results against the current state
        self._since = now

    @property
    def up(self) -> bool:
        """Current state."""
        return self._up

    @property
    def since(self) -> float:
        """``now`` of the last transition (or of construction)."""
        return self._since

    @property
    def run(self) -> int:
        """Consecutive results counted towards the next transition (0 = none pending)."""
        return self._run

    def record(self, ok: bool, reason: str, now: float) -> Transition | None:
        """Feed one check result; return the transition it causes, if any."""
        if ok == self._up:
            # A result that agrees with the current state breaks any run against it.
            self._run = 0
            return None
        self._run += 1
        needed = self._rise if ok else self._fall
        if self._run < needed:
            return None
        self._up = ok
        self._run = 0
        self._since = now
        return Transition(up=ok, reason=reason, at=now)


class SlowStart:
    """The slow-start ramp of effective weight after a server comes UP (pure functions)."""

    __slots__ = ()

    @staticmethod
    def weight_at(base_weight: int, up_since: float, now: float, duration: float) -> int:
        """Weight in force ``now`` for a server UP since ``up_since``.

        Linear like HAProxy: ``ceil(base * elapsed / duration)``, at least 1 as soon as the
        server is up, the full ``base_weight`` once ``duration`` has elapsed. A base weight of
        0 stays 0; ``duration <= 0`` means no slow start.
        """
        if base_weight <= 0:
            return 0
        if duration <= 0:
            return base_weight
        elapsed = now - up_since
        if elapsed >= duration:
            return base_weight
        if elapsed <= 0:
            return 1
        return max(1, min(base_weight, math.ceil(base_weight * elapsed / duration)))

    @staticmethod
    def ramping(up_since: float, now: float, duration: float) -> bool:
        """Is a server UP since ``up_since`` still on its ramp at ``now``?"""
        return duration > 0 and now - up_since < duration
