"""Client-IP persistence: IPVS persistent templates, HAProxy's stick table on the source.

A :class:`Binding` says "clients of ``client_net`` on virtual server ``service`` go to
``server``". The data plane computes ``client_net = caddr & prefix_mask(netmask)`` for a new
flow, looks the binding up, checks ``binding.server.accepts_bound()`` itself (rescheduling is
the caller's decision: :meth:`PersistenceTable.rebind`), and hands the binding to
``SessionTable.create``, which attaches it for as long as the session lives.

Lifetime, precisely. A binding is *alive* while ``refs > 0`` (sessions use it). With
``refs == 0`` it expires at ``max(idle_since, last_used) + timeout``: ``timeout`` seconds after
its last session ended or after it was last used (bound, attached), whichever is later. It is
considered absent from that instant on (``now >= expiry``): :meth:`PersistenceTable.lookup`
removes it, and :meth:`PersistenceTable.expire` removes it no later than one ``tick`` after the
expiry, provided it is called every tick.

Expiry uses a :class:`lb.wheel.TimingWheel` with lazy re-filing: attaching or releasing never
touches the wheel; a sweep that finds a binding still in use (due again one ``timeout`` later),
or used since it was filed, files it again at its new expiry. A binding is therefore always
filed no later than its true expiry, and each is touched O(1) times per ``timeout``.

Pure: time is always the ``now`` argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final, Generic, Protocol, TypeVar

from lb.servers import RealServer
from lb.wheel import UNFILED, TimingWheel

__all__ = [
    "Binding",
    "PersistenceObserver",
    "PersistenceTable",
    "prefix_mask",
]

S = TypeVar("S")

_INF: Final = float("inf")


def prefix_mask(bits: int) -> int:
    """The IPv4 netmask of a ``/bits`` prefix as an int: ``prefix_mask(24) == 0xFFFFFF00``."""
    if not 0 <= bits <= 32:
        raise ValueError(f"prefix length must be 0..32, not {bits}")
    return (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF


class Binding(Generic[S]):
    """One persistence entry: clients of ``client_net`` on ``service`` go to ``server``.

    ``refs`` counts the sessions that use the binding; ``idle_since`` is when it last dropped
    to zero; ``last_used`` when it was last bound or attached. See the module docstring for
    the lifetime rule. ``service`` is opaque (the data plane's virtual-server runtime).
    """

    __slots__ = (
        "_slot",
        "client_net",
        "idle_since",
        "last_used",
        "refs",
        "server",
        "service",
        "timeout",
    )

    def __init__(
        self,
        service: S,
        client_net: int,
        server: RealServer,
        timeout: float,
        now: float,
    ) -> None:
        self.service = service
        self.client_net = client_net
        self.server = server
        self.timeout = timeout
        self.refs = 0
        self.idle_since = now
        self.last_used = now
        self._slot = UNFILED  # owned by the table's TimingWheel; UNFILED when not in it

    def attach(self, now: float) -> None:
        """A session starts using this binding."""
        self.refs += 1
        self.last_used = max(self.last_used, now)

    def release(self, now: float) -> None:
        """A session that used this binding ended."""
        self.refs -= 1
        if self.refs == 0:
            self.idle_since = now

    @property
    def expires_at(self) -> float:
        """When the binding expires if nothing uses it again; +inf while sessions use it."""
        if self.refs > 0:
            return _INF
        return max(self.idle_since, self.last_used) + self.timeout

    @property
    def in_table(self) -> bool:
        """Still held by its table (False once unbound, expired, or never stored)."""
        return self._slot != UNFILED

    def __repr__(self) -> str:
        return (
            f"Binding(client_net={self.client_net:#010x}, server={self.server.key}, "
            f"refs={self.refs}, timeout={self.timeout})"
        )


class PersistenceObserver(Protocol[S]):
    """Sees every mutation of a :class:`PersistenceTable` (feeds the peer-sync stream).

    Attach/release (reference counting) are not events: the peer derives them from the
    sessions it receives.
    """

    def binding_added(self, b: Binding[S]) -> None: ...

    def binding_changed(self, b: Binding[S]) -> None: ...

    def binding_removed(self, b: Binding[S], reason: str) -> None: ...


def _due(b: Binding[S], now: float) -> float:
    """When the wheel should look at ``b`` again: its expiry, or a ``timeout`` on if in use."""
    if b.refs > 0:
        return now + b.timeout
    return max(b.idle_since, b.last_used) + b.timeout


def _key(service: object, client_net: int) -> int:
    # A live binding holds its service, so the service's id() cannot be reused meanwhile.
    return (id(service) << 32) | client_net


class PersistenceTable(Generic[S]):
    """Bindings by (service, client_net), expired by a timing wheel of ``tick`` seconds.

    Counters are plain ints: ``bound_total``, ``installed_total``, ``expired_total``,
    ``removed_total`` (every removal, expiry included), ``full_drops`` (binds refused because
    the table held ``max_bindings``).
    """

    def __init__(
        self,
        tick: float = 1.0,
        observer: PersistenceObserver[S] | None = None,
        max_bindings: int = 1 << 20,
    ) -> None:
        self._wheel: TimingWheel[Binding[S]] = TimingWheel(tick, _due)
        self.tick = tick
        self.observer = observer
        self.max_bindings = max_bindings
        self._map: dict[int, Binding[S]] = {}
        self.bound_total = 0
        self.installed_total = 0
        self.expired_total = 0
        self.removed_total = 0
        self.full_drops = 0

    # --- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[Binding[S]]:
        """The bindings in the table (do not mutate the table while iterating)."""
        return iter(self._map.values())

    def lookup(self, service: S, client_net: int, now: float) -> Binding[S] | None:
        """The binding for this client network, or None; an expired one is removed."""
        b = self._map.get(_key(service, client_net))
        if b is None:
            return None
        if b.refs == 0 and max(b.idle_since, b.last_used) + b.timeout <= now:
            self._wheel.discard(b)
            self._drop(b, "expired")
            self.expired_total += 1
            return None
        return b

    # --- mutations -----------------------------------------------------------------------

    def bind(
        self, service: S, client_net: int, server: RealServer, timeout: float, now: float
    ) -> Binding[S]:
        """Bind ``client_net`` to ``server``; updates the existing binding if there is one.

        When the table is full the binding returned is *detached*: usable by sessions (its
        reference counting is harmless) but not stored, so later flows are scheduled afresh.
        ``full_drops`` counts those.
        """
        b = self.lookup(service, client_net, now)
        if b is not None:
            changed = b.server is not server or b.timeout != timeout
            b.server = server
            b.last_used = max(b.last_used, now)
            shorter = timeout < b.timeout
            b.timeout = timeout
            if shorter:
                self._wheel.file_earlier(b, max(b.idle_since, b.last_used) + timeout)
            if changed and self.observer is not None:
                self.observer.binding_changed(b)
            return b
        b = Binding(service, client_net, server, timeout, now)
        if len(self._map) >= self.max_bindings:
            self.full_drops += 1
            return b
        self._map[_key(service, client_net)] = b
        self._wheel.file(b, now + timeout)
        self.bound_total += 1
        if self.observer is not None:
            self.observer.binding_added(b)
        return b

    def attach(self, b: Binding[S], now: float) -> None:
        """A session starts using ``b`` (``SessionTable.create`` calls ``b.attach`` itself)."""
        b.attach(now)

    def release(self, b: Binding[S], now: float) -> None:
        """A session using ``b`` ended (``SessionTable.remove`` calls ``b.release`` itself)."""
        b.release(now)

    def rebind(self, b: Binding[S], server: RealServer, now: float) -> None:
        """Point ``b`` at another server (its old one can no longer take bound clients)."""
        if b.server is server:
            return
        b.server = server
        b.last_used = max(b.last_used, now)
        if b.in_table and self.observer is not None:
            self.observer.binding_changed(b)

    def unbind(self, b: Binding[S], reason: str) -> None:
        """Remove ``b`` from the table now (sessions using it keep it). Idempotent."""
        if self._wheel.discard(b):
            self._drop(b, reason)

    def install(
        self,
        service: S,
        client_net: int,
        server: RealServer,
        timeout: float,
        last_used: float,
        now: float,
    ) -> Binding[S] | None:
        """Create or update a binding received from the peer; None when the table is full.

        ``last_used`` is in this node's clock (the sync layer converts ages). Fires
        ``binding_added``, or ``binding_changed`` when the server or timeout changed.
        """
        b = self.lookup(service, client_net, now)
        if b is None:
            if len(self._map) >= self.max_bindings:
                self.full_drops += 1
                return None
            b = Binding(service, client_net, server, timeout, last_used)
            self._map[_key(service, client_net)] = b
            self._wheel.file(b, last_used + timeout)
            self.installed_total += 1
            if self.observer is not None:
                self.observer.binding_added(b)
            return b
        changed = b.server is not server or b.timeout != timeout
        b.server = server
        b.timeout = timeout
        b.last_used = max(b.last_used, last_used)
        self._wheel.file_earlier(b, max(b.idle_since, b.last_used) + timeout)
        if changed and self.observer is not None:
            self.observer.binding_changed(b)
        return b

    def expire(self, now: float, budget: int = 1000,
               keep: Callable[[Binding[S]], bool] | None = None) -> int:
        """Remove bindings expired at ``now``; touch at most ``budget``. Returns how many.

        A due binding that ``keep`` says to keep (the peer owns it) is filed again
        one timeout later instead.

        Call it every ``tick``: a binding is then removed no later than expiry + tick, and
        never before its expiry. With the budget spent, the next call resumes where it
        stopped.
        """
        due = self._wheel.sweep(now, budget)
        n = 0
        for b in due:
            if keep is not None and keep(b):
                self._wheel.file(b, now + b.timeout)
                continue
            self._drop(b, "expired")
            n += 1
        self.expired_total += n
        return n

    def refresh(self, owned: Callable[[S], bool], now: float) -> int:
        """Mark the bindings of the services ``owned`` says as just used (a takeover adopts
        the peer's bindings with fresh idle clocks). Returns how many it touched."""
        n = 0
        for b in self._map.values():
            if owned(b.service):
                b.last_used = max(b.last_used, now)
                n += 1
        return n

    # --- internals -----------------------------------------------------------------------

    def _drop(self, b: Binding[S], reason: str) -> None:
        """Take ``b``, already out of the wheel, out of the table."""
        del self._map[_key(b.service, b.client_net)]
        self.removed_total += 1
        if self.observer is not None:
            self.observer.binding_removed(b, reason)
