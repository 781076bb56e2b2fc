"""Schedulers: which real server takes a new session.

Every scheduler sits behind the same small interface (:class:`Scheduler`):

* ``update(servers)`` -- the caller hands over the candidate set (``candidates(pool.servers)``)
  whenever health, admin state or weights change, and gets back how many positions changed
  (table slots for ``maglev`` and ``sh``; ``0`` for the table-less schedulers);
* ``pick(caddr, cport)`` -- choose a server for a *new* session among the servers of the last
  update that :meth:`RealServer.accepts_new` right now (``max_conns`` and weight 0 are checked
  at pick time because ``active`` moves between updates), or ``None`` when none does.

The module is pure: no clock, no I/O, no randomness, no use of Python's salted ``hash()``.
Everything that hashes does so with fixed functions, so two processes (the two nodes of a pair,
or one node before and after a restart) compute the same tables from the same servers.

Schedulers
----------
``rr``
    Round robin in the order given, skipping servers that do not accept new sessions.
``wrr``
    Smooth weighted round robin (nginx): each pick adds every accepting server's weight to its
    running score, takes the highest score (first in order on a tie) and subtracts the total.
    Over one cycle of ``sum(w) / gcd(w)`` picks each server gets exactly ``w / gcd`` picks, and
    the picks are interleaved (weights 5,1,1 give a a b a c a a, not a a a a a b c). Scores of
    servers that survive an update are kept, new servers start at 0.
``lc``
    Least ``active`` sessions; ties go to the first tied server after the previous pick, so
    equal loads are spread round-robin fashion.
``wlc``
    Least ``active / effective_weight``, compared with integers as IPVS does, in the
    shortest-expected-delay form ``(a.active + 1) * b.w < (b.active + 1) * a.w`` so that idle
    servers are filled heavier-first. Ties rotate as in ``lc``.
``sh``
    Source hashing, IPVS style: a power-of-two table of buckets (at least 256, and at least 16
    buckets per unit of gcd-normalised weight, at most 65536) is shared among the servers
    sorted by key in proportion to weight, each within one bucket of its exact share, with
    every server's buckets spread evenly over the table (the turn order below). A client
    address is mixed with a fixed 32-bit finaliser and masked to a bucket. When that bucket's
    server does not accept new sessions the next buckets are tried in order (IPVS's
    ``sh-fallback``). Every change rebuilds the table from scratch, as IPVS does, so the table
    is a function of the set of (key, weight) pairs, like Maglev's below: cheap, but a server
    joining or leaving remaps many clients. Use ``maglev`` for minimal disruption.
``maglev``
    Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), described below.

Maglev
------
The lookup table has ``M`` slots, ``M`` the smallest prime >= 100 x the pool's size (so >= 101):
the number of servers in the pool's configuration (``Maglev(pool_size)``, which
``make_scheduler`` passes through), or the number of servers given when that is larger. So
``M`` stays put while servers fail and recover, and the two nodes, reading the same
configuration, use the same ``M``. (Without ``pool_size`` the table is sized on the servers of
the update, and then any change of their number changes ``M`` and remaps nearly every
client.) Each server's preference list is the permutation
``(offset + j * skip) mod M`` with ``offset = h1(key) mod M`` and ``skip = h2(key) mod (M - 1)
+ 1``, where ``h1`` and ``h2`` are two independent BLAKE2b hashes (distinct personalisation
strings) of the server key ``"ADDR:PORT"``. A client maps to slot ``mix32(caddr) mod M``; the
client *address* alone decides, so a client reaches the same server through either node and
after a restart. When the slot's server does not accept new sessions, the following slots are
tried in order.

Population follows the paper, with weights as the paper suggests ("adjust the relative
frequency of the backends' turns"): servers are sorted by key; each gets a quota of turns,
its share ``M * w / sum(w)`` of the table rounded by largest remainder (so within one slot of
exact, whatever the weights); the turns are interleaved by stride scheduling (a server's k-th
of q turns comes at time ``(2k + 1) / 2q``, ties to the lower key); at each turn the server
claims the next free slot of its permutation. Each turn claims exactly one slot, so the slot
counts are the quotas: equal weights give the paper's within-one balance. (Katran's credit
rounds honour weights the same way, but a heavy server can then stray from its share by up to
the number of servers.)

Every update populates the table from scratch, so the table is a function of ``M`` and the
set of (key, weight) pairs alone (a server of weight 0 counts as absent): not of the order the
servers are given in, nor of the joins, leaves and weight changes that led to that set. The
two nodes of a pair, seeing the same usable servers, therefore send a new client to the same
server -- so a flow the peer takes over before its session was synced (a UDP flow, a
retransmitted SYN) is scheduled onto the server it had -- and a restarted node builds the
table its predecessor had.

The price is some collateral churn, the paper's "near-minimal" disruption: when a server
leaves, its own slots move, and so do a few slots of servers that stay, because the
population's later turns land differently. Measured at 100 slots per server, counting only
slots of servers that stay: for pools of 2 to 20 servers of equal weight (``198.18.0.11:8080``
upwards, all up) with each server leaving in turn, at most 3.8% of ``M`` move, 2.4% on average
(a 10-server pool's leaver has 10% of ``M``); over 90 000 random cases (any subset of such a
pool up, weights 1 to 4, one of them leaving), median 1.3%, 99th percentile 3.4%, worst 8.9%.
The tail comes from servers whose permutations are related (equal or multiple ``skip``) and
shrinks with more slots per server (with random keys, 99th percentile 3.7% at 100 slots per
server, 1.1% at 1000). A join moves the same slots in reverse: a server that leaves and comes
back gets exactly its old slots, and the other servers theirs.

``update`` returns the number of slots whose server changed; when the table size changes
(the first build, a table becoming empty, or more servers than ``pool_size``) every slot's
lookup changes, and the larger of the two sizes is returned.

Server keys must be unique within one update (``ValueError`` otherwise): the tables are built
from keys, and two servers under one key could not be told apart on another node.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

from lb.servers import RealServer

__all__ = [
    "SCHEDULERS",
    "LeastConnections",
    "Maglev",
    "RoundRobin",
    "Scheduler",
    "SourceHash",
    "WeightedLeastConnections",
    "WeightedRoundRobin",
    "client_hash",
    "maglev_permutation",
    "maglev_populate",
    "maglev_table_size",
    "make_scheduler",
]

SCHEDULERS: tuple[str, ...] = ("rr", "wrr", "lc", "wlc", "sh", "maglev")

MAGLEV_SLOTS_PER_SERVER = 100
SH_MIN_BUCKETS = 256
SH_BUCKETS_PER_WEIGHT = 16
SH_MAX_BUCKETS = 65536

_MASK32 = 0xFFFFFFFF


class Scheduler(Protocol):
    """What the data plane asks of a scheduler: a new candidate set, and a pick per session."""

    name: str
    consistent: bool
    """Is a pick a function of the client and the candidate set alone (``sh``, ``maglev``),
    so that both nodes of a pair, seeing the same servers, pick alike?"""

    def update(self, servers: Sequence[RealServer]) -> int:
        """Take ``servers`` as the new candidate set; return how many positions changed."""
        ...

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        """A server that accepts one more new session from ``caddr:cport``, or ``None``."""
        ...


# --------------------------------------------------------------------------- hashing


def client_hash(caddr: int) -> int:
    """A fixed 32-bit mix of an IPv4 address (MurmurHash3's finaliser).

    Spreads neighbouring addresses (one /24 of clients) over a table; identical in every
    process, unlike ``hash()``.
    """
    h = caddr & _MASK32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h


def _key_hash(key: str, person: bytes) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def maglev_table_size(n_servers: int) -> int:
    """The smallest prime >= 100 x ``n_servers`` (0 for no servers)."""
    if n_servers <= 0:
        return 0
    m = MAGLEV_SLOTS_PER_SERVER * n_servers
    while not _is_prime(m):
        m += 1
    return m


def maglev_permutation(key: str, size: int) -> tuple[int, int]:
    """``(offset, skip)`` of the server ``key`` in a table of prime ``size``.

    The server's j-th preferred slot is ``(offset + j * skip) % size``; with ``size`` prime and
    ``0 < skip < size`` this visits every slot once.
    """
    if size < 2:
        raise ValueError(f"maglev table size must be a prime >= 2, got {size}")
    offset = _key_hash(key, b"lbd-maglev-off") % size
    skip = _key_hash(key, b"lbd-maglev-skip") % (size - 1) + 1
    return offset, skip


def _quotas(weights: Sequence[int], size: int) -> list[int]:
    """Split ``size`` positions in proportion to positive ``weights``, each within 1 of exact.

    Largest remainder (Hamilton) apportionment; equal remainders go to the lower index.
    """
    total = sum(weights)
    quotas = [size * w // total for w in weights]
    spare = size - sum(quotas)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(size * weights[i] % total), i))
    for i in by_remainder[:spare]:
        quotas[i] += 1
    return quotas


def _turn_order(weights: Sequence[int], size: int) -> list[int]:
    """``size`` turns (server indices) shared by weight and spread evenly over the sequence.

    Server i takes ``quota_i`` turns; its k-th turn sits at time ``(2k + 1) / (2 quota_i)``
    and turns are taken in time order, lower index first on a tie (stride scheduling). Float
    keys are exact here: Python's division is correctly rounded, so equal fractions give equal
    floats in every process, and distinct ones differ by at least ``1 / (4 q_i q_j)``, far
    above double precision for any table of fewer than millions of slots.
    """
    quotas = _quotas(weights, size)
    turns = [((2 * k + 1) / (2 * q), i) for i, q in enumerate(quotas) for k in range(q)]
    turns.sort()
    return [i for _, i in turns]


def maglev_populate(servers: Sequence[tuple[str, int]], size: int) -> list[int]:
    """Canonical Maglev table for ``(key, weight)`` pairs, as indices into ``servers``.

    ``servers`` must be sorted by key with weights > 0 (the caller, :class:`Maglev`, does that);
    ``size`` must be a prime. Turns come from :func:`_turn_order`, so server i ends with
    exactly its largest-remainder share of the slots.
    """
    n = len(servers)
    if n == 0:
        return []
    weights = [w for _, w in servers]
    if min(weights) <= 0:
        raise ValueError("maglev weights must be > 0")
    perms = [maglev_permutation(key, size) for key, _ in servers]
    nxt = [0] * n
    table = [-1] * size
    for i in _turn_order(weights, size):
        offset, skip = perms[i]
        j = nxt[i]
        slot = (offset + j * skip) % size
        while table[slot] >= 0:
            j += 1
            slot = (offset + j * skip) % size
        table[slot] = i
        nxt[i] = j + 1
    return table


def _by_key(servers: Sequence[RealServer]) -> list[tuple[str, RealServer]]:
    """``(key, server)`` sorted by key, servers of weight <= 0 left out; keys must be unique."""
    keyed = sorted(((s.key, s) for s in servers if s.effective_weight > 0), key=lambda t: t[0])
    for (a, _), (b, _) in itertools.pairwise(keyed):
        if a == b:
            raise ValueError(f"duplicate server key {a}")
    return keyed


def _changed(old: Sequence[str], new: Sequence[str]) -> int:
    if len(old) != len(new):
        return max(len(old), len(new))
    return sum(1 for a, b in zip(old, new, strict=True) if a != b)


def _probe(
    table: Sequence[RealServer], members: Sequence[RealServer], start: int
) -> RealServer | None:
    """The server at ``start``, else at the first following slot (wrapping) that accepts.

    ``members`` are the distinct servers of ``table`` (a server whose share rounds to no slot
    is not one): checking them first keeps a pick cheap when nothing accepts.
    """
    server = table[start]
    if server.accepts_new():
        return server
    if not any(s.accepts_new() for s in members):
        return None
    size = len(table)
    for step in range(1, size):
        server = table[(start + step) % size]
        if server.accepts_new():
            return server
    return None  # pragma: no cover - some slot holds the accepting server found above


# --------------------------------------------------------------------------- schedulers


class RoundRobin:
    """``rr``: each accepting server in turn, in the order given."""

    name = "rr"
    consistent = False

    def __init__(self) -> None:
        self._servers: tuple[RealServer, ...] = ()
        self._next = 0
        self._last: RealServer | None = None

    def update(self, servers: Sequence[RealServer]) -> int:
        self._servers = tuple(servers)
        n = len(self._servers)
        if self._last is not None and self._last in self._servers:
            self._next = (self._servers.index(self._last) + 1) % n
        else:
            self._next = self._next % n if n else 0
        return 0

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        servers = self._servers
        n = len(servers)
        start = self._next
        for step in range(n):
            i = (start + step) % n
            server = servers[i]
            if server.accepts_new():
                self._next = (i + 1) % n
                self._last = server
                return server
        return None


class WeightedRoundRobin:
    """``wrr``: smooth weighted round robin (nginx), exact over ``sum(w) / gcd(w)`` picks."""

    name = "wrr"
    consistent = False

    def __init__(self) -> None:
        self._servers: tuple[RealServer, ...] = ()
        self._score: list[int] = []

    def update(self, servers: Sequence[RealServer]) -> int:
        kept = {id(s): c for s, c in zip(self._servers, self._score, strict=True)}
        self._servers = tuple(servers)
        self._score = [kept.get(id(s), 0) for s in self._servers]
        return 0

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        score = self._score
        best = -1
        best_score = 0
        total = 0
        for i, server in enumerate(self._servers):
            if not server.accepts_new():
                continue
            w = server.effective_weight
            total += w
            score[i] += w
            if best < 0 or score[i] > best_score:
                best = i
                best_score = score[i]
        if best < 0:
            return None
        score[best] -= total
        return self._servers[best]


class LeastConnections:
    """``lc``: fewest ``active`` sessions; ties rotate from just after the previous pick."""

    name = "lc"
    consistent = False

    def __init__(self) -> None:
        self._servers: tuple[RealServer, ...] = ()
        self._start = 0

    def update(self, servers: Sequence[RealServer]) -> int:
        self._servers = tuple(servers)
        self._start = self._start % len(self._servers) if self._servers else 0
        return 0

    @staticmethod
    def _less_loaded(server: RealServer, best: RealServer) -> bool:
        return server.active < best.active

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        servers = self._servers
        n = len(servers)
        start = self._start
        less_loaded = self._less_loaded
        best: RealServer | None = None
        best_i = 0
        for step in range(n):
            i = (start + step) % n
            server = servers[i]
            if server.accepts_new() and (best is None or less_loaded(server, best)):
                best = server
                best_i = i
        if best is not None:
            self._start = (best_i + 1) % n
        return best


class WeightedLeastConnections(LeastConnections):
    """``wlc``: least ``(active + 1) / effective_weight`` in integers; ties rotate."""

    name = "wlc"
    consistent = False

    @staticmethod
    def _less_loaded(server: RealServer, best: RealServer) -> bool:
        return ((server.active + 1) * best.effective_weight
                < (best.active + 1) * server.effective_weight)


class SourceHash:
    """``sh``: IPVS-style source hashing over a weighted table of buckets."""

    name = "sh"
    consistent = True

    def __init__(self) -> None:
        self._table: tuple[RealServer, ...] = ()
        self._keys: tuple[str, ...] = ()
        self._members: tuple[RealServer, ...] = ()
        self._mask = 0

    @property
    def table(self) -> tuple[RealServer, ...]:
        """The bucket table: bucket ``client_hash(caddr) & (len - 1)`` serves ``caddr``."""
        return self._table

    @staticmethod
    def table_size(weights: Sequence[int]) -> int:
        """Buckets for these weights: a power of two >= 256 and >= 16 per normalised weight.

        Capped at 65536: beyond that, shares are approximate to 1/65536 of the clients.
        """
        if not weights:
            return 0
        g = 0
        for w in weights:
            g = math.gcd(g, w)
        want = max(SH_MIN_BUCKETS, SH_BUCKETS_PER_WEIGHT * (sum(weights) // g))
        return min(SH_MAX_BUCKETS, 1 << (want - 1).bit_length())

    def update(self, servers: Sequence[RealServer]) -> int:
        keyed = _by_key(servers)
        weights = [s.effective_weight for _, s in keyed]
        size = self.table_size(weights)
        slots = _turn_order(weights, size) if size else []
        old = self._keys
        self._keys = tuple(keyed[i][0] for i in slots)
        self._table = tuple(keyed[i][1] for i in slots)
        self._members = tuple(dict.fromkeys(self._table))
        self._mask = size - 1
        return _changed(old, self._keys)

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        if not self._table:
            return None
        return _probe(self._table, self._members, client_hash(caddr) & self._mask)


class Maglev:
    """``maglev``: Maglev consistent hashing of the client address (see the module docstring)."""

    name = "maglev"
    consistent = True

    def __init__(self, pool_size: int = 0) -> None:
        self._pool_size = pool_size
        self._table: tuple[RealServer, ...] = ()
        self._keys: tuple[str, ...] = ()
        self._members: tuple[RealServer, ...] = ()
        self._weights: dict[str, int] = {}

    @property
    def table(self) -> tuple[RealServer, ...]:
        """The lookup table: slot ``client_hash(caddr) % len`` serves ``caddr``."""
        return self._table

    def update(self, servers: Sequence[RealServer]) -> int:
        keyed = _by_key(servers)
        names = [k for k, _ in keyed]
        weights = {key: s.effective_weight for key, s in keyed}
        if weights == self._weights:
            # The table is a function of the weights: keep it, follow any replaced objects.
            index = {k: i for i, k in enumerate(names)}
            slots = [index[k] for k in self._keys]
        else:
            size = maglev_table_size(max(self._pool_size, len(keyed)))
            slots = maglev_populate([(k, weights[k]) for k in names], size)
        old_keys = self._keys
        self._weights = weights
        self._keys = tuple(names[i] for i in slots)
        self._table = tuple(keyed[i][1] for i in slots)
        self._members = tuple(dict.fromkeys(self._table))
        return _changed(old_keys, self._keys)

    def pick(self, caddr: int, cport: int) -> RealServer | None:
        table = self._table
        if not table:
            return None
        return _probe(table, self._members, client_hash(caddr) % len(table))


_FACTORIES: dict[str, Callable[[], Scheduler]] = {
    "rr": RoundRobin,
    "wrr": WeightedRoundRobin,
    "lc": LeastConnections,
    "wlc": WeightedLeastConnections,
    "sh": SourceHash,
    "maglev": Maglev,
}


def make_scheduler(name: str, *, pool_size: int = 0) -> Scheduler:
    """A fresh scheduler for ``name`` (one of :data:`SCHEDULERS`); ``ValueError`` otherwise.

    ``pool_size``, the number of servers in the pool's configuration, sizes the ``maglev``
    table; the other schedulers do not need it.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduler {name!r} (expected one of {', '.join(SCHEDULERS)})"
        ) from None
    if factory is Maglev:
        return Maglev(pool_size)
    return factory()
