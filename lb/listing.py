"""Views of the session and persistence tables for the control socket, built in chunks.

A table of 10⁶ sessions takes seconds to render and encode; done in one go it would stall
the event loop that also sends VRRP adverts. :func:`chunks` walks a snapshot of the table
(taken with one ``list()``, a C-level copy of references: about 10 ms per 10⁶ entries on the
2-core lab box) and hands out lists of rendered items: at most ``emit`` items, and at most
``scan`` entries looked at, per chunk, yielding to the loop after each. The control server
encodes and writes each chunk before asking for the next (:class:`lb.control.Stream`).

Entries removed from the table after the snapshot are skipped when reached; entries added
after it are not shown. Filters are pure predicates built from the request
(:func:`session_filter`, :func:`binding_filter`); ``limit`` stops the walk early.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from lb.addr import endpoint, int_to_ip
from lb.opstate import parse_endpoint
from lb.persistence import Binding
from lb.services import Service
from lb.sessions import Session, TcpState

__all__ = ["EMIT_CHUNK", "SCAN_CHUNK", "Filter", "binding_filter", "chunks",
           "render_binding", "render_session", "session_filter"]

EMIT_CHUNK = 200  # rendered items per chunk (about 4 ms of rendering and encoding)
SCAN_CHUNK = 5_000  # entries looked at per chunk (filters that match little)
PROTO_NAMES = {6: "tcp", 17: "udp"}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Filter:
    """What a listing keeps; every field None = no condition."""

    virtual: str | None = None  # virtual server name
    server: tuple[int, int] | None = None  # (addr, port)
    client: int | None = None  # address
    client_port: int | None = None
    state: str | None = None  # TcpState name or "UDP" (sessions only)

    @classmethod
    def parse(cls, opts: dict[str, Any]) -> Filter:
        """From control options (``virtual``, ``server``, ``client``, ``state``); raises
        ValueError naming the bad one."""
        server = parse_endpoint(opts["server"]) if "server" in opts else None
        client = client_port = None
        if "client" in opts:
            text = str(opts["client"])
            if ":" in text:
                client, client_port = parse_endpoint(text)
            else:
                client, _ = parse_endpoint(text + ":1")
        state = opts.get("state")
        if state is not None:
            state = str(state).upper()
            if state != "UDP" and state not in TcpState.__members__:
                names = ", ".join([*TcpState.__members__, "UDP"])
                raise ValueError(f"state {opts['state']!r} is not one of {names}")
        return cls(virtual=opts.get("virtual"), server=server, client=client,
                   client_port=client_port, state=state)


def _state_name(s: Session) -> str:
    return TcpState(s.state).name if s.proto == 6 else "UDP"


def session_filter(f: Filter) -> Callable[[Session], bool]:
    def keep(s: Session) -> bool:
        if not s.in_table:
            return False
        if f.virtual is not None and s.service.name != f.virtual:
            return False
        if f.server is not None and (s.server.addr, s.server.port) != f.server:
            return False
        if f.client is not None and (s.caddr != f.client or (
                f.client_port is not None and s.cport != f.client_port)):
            return False
        return f.state is None or _state_name(s) == f.state

    return keep


def binding_filter(f: Filter) -> Callable[[Binding[Service]], bool]:
    def keep(b: Binding[Service]) -> bool:
        if not b.in_table:
            return False
        svc = b.service
        if f.virtual is not None and svc.name != f.virtual:
            return False
        if f.server is not None and (b.server.addr, b.server.port) != f.server:
            return False
        return f.client is None or f.client & svc.persistence_mask == b.client_net

    return keep


def render_session(s: Session, deadline: float, now: float) -> dict[str, Any]:
    return {
        "protocol": PROTO_NAMES.get(s.proto, str(s.proto)),
        "client": endpoint(s.caddr, s.cport),
        "virtual": endpoint(s.vaddr, s.vport),
        "server": endpoint(s.raddr, s.rport),
        "state": _state_name(s),
        "virtual_server": s.service.name,
        "expires_in": round(max(0.0, deadline - now), 1),
        "owned": s.service.owned,
    }


def render_binding(b: Binding[Service], now: float) -> dict[str, Any]:
    svc = b.service
    bits = bin(svc.persistence_mask).count("1")
    expires = b.expires_at
    return {
        "virtual_server": svc.name,
        "virtual": endpoint(svc.vaddr, svc.vport),
        "client": f"{int_to_ip(b.client_net)}/{bits}",
        "server": b.server.key,
        "sessions": b.refs,
        "expires_in": None if expires == float("inf") else round(max(0.0, expires - now), 1),
    }


async def chunks(entries: Iterable[T], keep: Callable[[T], bool],
                 render: Callable[[T], dict[str, Any]], limit: int | None = None, *,
                 emit: int = EMIT_CHUNK, scan: int = SCAN_CHUNK,
                 ) -> AsyncIterator[list[dict[str, Any]]]:
    """Rendered entries that ``keep`` accepts, ``limit`` at most, a chunk at a time."""
    snapshot = list(entries)
    out: list[dict[str, Any]] = []
    looked = 0
    shown = 0
    for entry in snapshot:
        if limit is not None and shown >= limit:
            break
        looked += 1
        if keep(entry):
            out.append(render(entry))
            shown += 1
        if len(out) >= emit or looked >= scan:
            yield out
            out = []
            looked = 0
            await asyncio.sleep(0)
    if out:
        yield out
