"""Operator state: what ``lbctl`` changed at run time, in a form that outlives the process.

What an operator sets — a server drained or disabled, a weight, a server added or removed —
is recorded here, per pool and server, and nothing else: health, sessions and ramps are
not operator state. The record is a plain value with a pure, canonical encoding
(:meth:`OperatorState.to_bytes` / :meth:`OperatorState.from_bytes`, UTF-8 JSON with sorted
keys), so that the same bytes can be kept on disk (:func:`save`, :func:`load`) and carried
to the peer over the sync stream (``ha.sync_codec.OperatorStateRecord``): the pair keeps one
operator state, the one changed last on either node (``changed_at``,
:meth:`OperatorState.newer_than`), so a takeover keeps every drain and weight. ``demoted``
(``lbctl demote``) is this node's own and is left out of :meth:`OperatorState.shared`, the
part a peer applies.

Decoding never raises anything but :class:`StateError`, whose message names the first
problem; a record that does not decode is refused whole.

File format (``format`` 1)::

    {"format": 1, "demoted": false, "changed_at": 1764748800000,
     "pools": {"web": {"198.18.0.12:8080": {"admin": "drain", "weight": 3},
                       "198.18.0.14:8080": {"added": true, "weight": 2, "backup": false},
                       "198.18.0.13:8080": {"removed": true}}}}

The I/O (:func:`save`, :func:`load`) is the only part that touches a file: write to a
temporary file in the same directory, fsync it, rename it over the old one, fsync the
directory — a crash leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lb.addr import ip_to_int
from lb.atomicfile import write_atomically
from lb.servers import AdminState

__all__ = ["FILE_NAME", "FORMAT", "MAX_WEIGHT", "OperatorState", "Record", "StateError",
           "load", "parse_endpoint", "save"]

FORMAT = 1
FILE_NAME = "operator-state.json"
MAX_WEIGHT = 65535
_ADMIN = {a.value: a for a in AdminState}


class StateError(ValueError):
    """Operator state that does not decode; the message names the first problem."""


def parse_endpoint(text: str) -> tuple[int, int]:
    """``"ADDR:PORT"`` → (address as int, port); ``ValueError`` when it is not one."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{text!r} is not ADDR:PORT")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range 1..65535")
    try:
        addr = ip_to_int(host)
    except (OSError, ValueError):
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
    return addr, port


@dataclass(frozen=True, slots=True)
class Record:
    """What an operator set for one server of one pool.

    ``admin`` / ``weight``: None = as configured (enabled, the configured weight).
    ``added``: the server is not in the config; ``weight`` (its weight) and ``backup`` say
    how it was added. ``removed``: a configured server the operator removed (nothing else
    applies to it).
    """

    admin: AdminState | None = None
    weight: int | None = None
    added: bool = False
    backup: bool = False
    removed: bool = False

    @property
    def empty(self) -> bool:
        return self == Record()


@dataclass(slots=True)
class OperatorState:
    """Operator records by ``(pool, "ADDR:PORT")``, and whether this node is demoted."""

    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    demoted: bool = False
    changed_at: int = 0
    """Wall-clock milliseconds of the last operator change to ``records``, on this node or
    on the peer: of two states, the later one wins (:meth:`newer_than`)."""

    # ---- edits (each keeps only records that say something) --------------------------------
    def get(self, pool: str, server: str) -> Record:
        return self.records.get((pool, server), Record())

    def put(self, pool: str, server: str, record: Record) -> None:
        if record.empty:
            self.records.pop((pool, server), None)
        else:
            self.records[(pool, server)] = record

    def update(self, pool: str, server: str, **changes: Any) -> Record:
        record = replace(self.get(pool, server), **changes)
        self.put(pool, server, record)
        return record

    def drop_pool(self, pool: str) -> None:
        for key in [k for k in self.records if k[0] == pool]:
            del self.records[key]

    def shared(self) -> OperatorState:
        """The part a peer would apply: the pools' records, not this node's ``demoted``."""
        return OperatorState(dict(self.records), demoted=False, changed_at=self.changed_at)

    def newer_than(self, other: OperatorState) -> bool:
        """Should this state (the peer's) replace ``other`` (ours)? When it was changed
        later; at the same millisecond, the larger encoding wins, so both nodes agree."""
        if self.changed_at != other.changed_at:
            return self.changed_at > other.changed_at
        return self.shared().to_bytes() > other.shared().to_bytes()

    # ---- encoding ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        pools: dict[str, dict[str, dict[str, Any]]] = {}
        for (pool, server), rec in sorted(self.records.items()):
            entry: dict[str, Any] = {}
            if rec.removed:
                entry["removed"] = True
            else:
                if rec.added:
                    entry["added"] = True
                    entry["backup"] = rec.backup
                if rec.admin is not None:
                    entry["admin"] = rec.admin.value
                if rec.weight is not None:
                    entry["weight"] = rec.weight
            pools.setdefault(pool, {})[server] = entry
        return {"format": FORMAT, "demoted": self.demoted, "changed_at": self.changed_at,
                "pools": pools}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, doc: object) -> OperatorState:
        if not isinstance(doc, dict):
            raise StateError("not a JSON object")
        if doc.get("format") != FORMAT:
            raise StateError(f"format is {doc.get('format')!r}, expected {FORMAT}")
        demoted = doc.get("demoted", False)
        if not isinstance(demoted, bool):
            raise StateError("demoted: not true/false")
        changed_at = doc.get("changed_at", 0)
        if type(changed_at) is not int or not 0 <= changed_at < 2**63:
            raise StateError("changed_at: not a non-negative integer")
        pools = doc.get("pools", {})
        if not isinstance(pools, dict):
            raise StateError("pools: not an object")
        state = cls(demoted=demoted, changed_at=changed_at)
        for pool, servers in pools.items():
            if not isinstance(servers, dict):
                raise StateError(f"pools.{pool}: not an object")
            for server, entry in servers.items():
                where = f"pools.{pool}.{server}"
                try:
                    parse_endpoint(server)
                except ValueError as exc:
                    raise StateError(f"{where}: {exc}") from None
                state.put(pool, server, _record(entry, where))
        return state

    @classmethod
    def from_bytes(cls, data: bytes) -> OperatorState:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise StateError(f"not JSON: {exc}") from None
        return cls.from_dict(doc)


def _record(entry: object, where: str) -> Record:
    if not isinstance(entry, dict):
        raise StateError(f"{where}: not an object")
    unknown = set(entry) - {"admin", "weight", "added", "backup", "removed"}
    if unknown:
        raise StateError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("added", "backup", "removed"):
        if not isinstance(entry.get(key, False), bool):
            raise StateError(f"{where}.{key}: not true/false")
    if entry.get("removed", False):
        if len(entry) != 1:
            raise StateError(f"{where}: a removed server carries nothing else")
        return Record(removed=True)
    admin = entry.get("admin")
    if admin is not None and admin not in _ADMIN:
        raise StateError(f"{where}.admin: {admin!r} is not one of {', '.join(_ADMIN)}")
    weight = entry.get("weight")
    if weight is not None and (type(weight) is not int or not 0 <= weight <= MAX_WEIGHT):
        raise StateError(f"{where}.weight: not an integer 0..{MAX_WEIGHT}")
    added = bool(entry.get("added", False))
    if added and weight is None:
        raise StateError(f"{where}: an added server needs its weight")
    if not added and "backup" in entry:
        raise StateError(f"{where}.backup: only for an added server")
    return Record(admin=_ADMIN[admin] if admin is not None else None, weight=weight,
                  added=added, backup=bool(entry.get("backup", False)))


# ---- the file (the only I/O here) -----------------------------------------------------------
def save(directory: str | os.PathLike[str], state: OperatorState) -> Path:
    """Write ``state`` atomically as ``directory/operator-state.json``; returns the path."""
    d = Path(directory)
    write_atomically(d, FILE_NAME, [state.to_bytes() + b"\n"])
    return d / FILE_NAME


def load(directory: str | os.PathLike[str]) -> tuple[OperatorState, str | None]:
    """The saved state, and None; or a fresh state and why the file was not used.

    No file is a fresh start without a problem. A file that does not decode is renamed
    ``operator-state.json.corrupt`` (kept for the operator) and a fresh state returned.
    """
    path = Path(directory) / FILE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return OperatorState(), None
    except OSError as exc:
        return OperatorState(), f"{path}: cannot read: {exc.strerror or exc}"
    try:
        return OperatorState.from_bytes(data), None
    except StateError as exc:
        aside = path.with_name(FILE_NAME + ".corrupt")
        with contextlib.suppress(OSError):
            path.replace(aside)
        return OperatorState(), f"{path}: {exc} (moved aside to {aside.name})"
