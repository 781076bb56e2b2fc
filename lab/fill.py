"""Fill a node with N sessions before it starts: write ``<state_dir>/tables.snap`` for it.

    python -m lab.fill CONFIG COUNT [--bindings] [--survive 600]   → one JSON line

lbd loads its table snapshot at start (:mod:`lb.snapshot_store`), before its data plane and
VRRP, so a node can begin with 10⁶ sessions in the time the load takes — where injecting them
through the sync port into a running master took minutes and starved its control socket.
The file is made from the config alone, with the snapshot codec's own writer
(:meth:`lb.table_snapshot.SnapshotWriter.add_rows`), and carries the config's service digest,
so lbd accepts it as its own:

- ``count`` ESTABLISHED TCP sessions, spread round robin over the config's TCP virtual
  servers; each virtual server's clients over its pool's primary servers. Idle age 0, written
  now: a session lives its ``[sessions] tcp_established_timeout`` from the file's writing, and
  :func:`write` refuses a config whose timeout would not outlast ``survive`` seconds.
- Clients are addresses of the clients' subnet outside the lab's hosts (198.51.100.103-252,
  DESIGN.md §5), ports 1024-65535, numbered across the virtual servers so that no two flows
  share a client ip:port (they may reach the same real server): 150 x 64512 flows at most.
- ``bindings``: each client address of a virtual server with client-ip persistence gets its
  binding (in use by its sessions, which all go to the binding's server).

Like any restored table the entries are provisional until the node takes their instance
over (:mod:`ha.replication`): a node that becomes master owns them and syncs them to its peer.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lb.atomicfile import write_atomically
from lb.config import Config, VirtualServerConfig, load_config
from lb.sessions import IPPROTO_TCP, TcpState
from lb.snapshot_store import FILE_NAME
from lb.table_snapshot import NO_BINDING, SnapshotWriter

__all__ = ["CLIENTS", "PORTS", "Filled", "main", "rows", "write"]

CLIENTS = range(int(ipaddress.IPv4Address("198.51.100.103")),
                int(ipaddress.IPv4Address("198.51.100.252")) + 1)
PORTS = range(1024, 65536)
_ESTABLISHED = int(TcpState.ESTABLISHED)


@dataclass(frozen=True, slots=True)
class Filled:
    """What :func:`write` put in the file."""

    path: Path
    sessions: int
    bindings: int
    bytes: int
    seconds: float


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def rows(config: Config, count: int, *, bindings: bool = False
         ) -> tuple[list[tuple[int, ...]], Iterator[tuple[int, ...]]]:
    """The file's binding rows and (lazily) its ``count`` session rows; see the docstring."""
    services = [vs for vs in config.virtual_servers if vs.protocol == "tcp"
                and any(not s.backup for s in config.pools[vs.pool].servers)]
    if not services:
        raise ValueError(f"{config.source}: no TCP virtual server with a primary server")
    if count > len(CLIENTS) * len(PORTS):
        raise ValueError(f"at most {len(CLIENTS) * len(PORTS):,} sessions")
    nports = len(PORTS)
    binding_rows: list[tuple[int, ...]] = []
    plans = []
    start = 0  # flows are numbered across the virtual servers: no two share a client ip:port
    for i, vs in enumerate(services):
        n = count // len(services) + (i < count % len(services))
        servers = [(_ip(s.address), s.port) for s in config.pools[vs.pool].servers
                   if not s.backup]
        first = -1  # the binding row of the service's first client, -1: no bindings
        if bindings and vs.persistence == "client-ip" and n:
            first = len(binding_rows) - start // nports
            mask = (0xFFFFFFFF << (32 - vs.persistence_netmask)) & 0xFFFFFFFF
            timeout_ms = round(vs.persistence_timeout * 1000)
            binding_rows.extend((IPPROTO_TCP, _ip(vs.address), vs.port, CLIENTS[c] & mask,
                                 *servers[c % len(servers)], timeout_ms, 0, 1)
                                for c in range(start // nports, (start + n - 1) // nports + 1))
        plans.append((vs, range(start, start + n), servers, first))
        start += n
    return binding_rows, _session_rows(plans)


def _session_rows(plans: list[tuple[VirtualServerConfig, range, list[tuple[int, int]], int]]
                  ) -> Iterator[tuple[int, ...]]:
    nports = len(PORTS)
    for vs, flows, servers, first in plans:
        vaddr, vport, nservers = _ip(vs.address), vs.port, len(servers)
        for i in flows:
            c = i // nports
            raddr, rport = servers[c % nservers]
            yield (IPPROTO_TCP, CLIENTS[c], vaddr, PORTS[i % nports], vport, raddr, rport,
                   _ESTABLISHED, 0, NO_BINDING if first < 0 else first + c)


def write(config: Config, count: int, *, bindings: bool = False, survive: float = 600.0,
          state_dir: str | Path | None = None) -> Filled:
    """Write ``tables.snap`` with ``count`` sessions into the config's ``[node] state_dir``
    (or ``state_dir``), atomically, replacing what was there."""
    if config.sessions.tcp_established_timeout < survive:
        raise ValueError(f"{config.source}: [sessions] tcp_established_timeout is "
                         f"{config.sessions.tcp_established_timeout:g} s: the sessions would "
                         f"expire before {survive:g} s have passed")
    if count > config.sessions.max_sessions:
        raise ValueError(f"{config.source}: {count:,} sessions exceed [sessions] max_sessions "
                         f"({config.sessions.max_sessions:,})")
    started = time.perf_counter()
    directory = Path(state_dir if state_dir is not None else config.node.state_dir)
    writer = SnapshotWriter(config.service_digest(), time.time(), 0.0)
    binding_rows, session_rows = rows(config, count, bindings=bindings)
    writer.add_rows(binding_rows, session_rows)
    directory.mkdir(parents=True, exist_ok=True)
    size = write_atomically(directory, FILE_NAME, writer.finish())
    return Filled(directory / FILE_NAME, writer.sessions, writer.bindings, size,
                  time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the node's lbd config (its state_dir receives the file)")
    ap.add_argument("count", type=int, help="sessions to write")
    ap.add_argument("--bindings", action="store_true",
                    help="a persistence binding per client of each client-ip virtual server")
    ap.add_argument("--survive", type=float, default=600.0,
                    help="seconds the sessions must outlive the file (checked against the "
                         "config's timeouts); default 600")
    ap.add_argument("--state-dir", help="write here instead of the config's state_dir")
    args = ap.parse_args(argv)
    got = write(load_config(args.config), args.count, bindings=args.bindings,
                survive=args.survive, state_dir=args.state_dir)
    print(json.dumps({"file": str(got.path), "sessions": got.sessions,
                      "bindings": got.bindings, "bytes": got.bytes,
                      "seconds": round(got.seconds, 2)}))


if __name__ == "__main__":
    main()
