"""``lbd --check`` beyond the single key: the config as a whole, and the host it will run on.

:func:`lb.config.parse_config` judges every key on its own. This module judges what only
makes sense together (two listeners on one port, a sync peer that is this node, a health
check that times out after its next probe is due) and what only this machine can answer
(does the interface exist, can the key be read, is the listen address ours). ``lbd`` runs
the same checks at start, so it refuses to start for exactly what ``lbd --check`` calls an
error.

A finding is an **error** when lbd would fail to start or would run wrong, a **warning** when
it runs but probably not as meant. Exit status of ``lbd --check`` (:func:`exit_status`):
0 nothing found, 1 any error, 4 warnings only.

:func:`check_config` is pure. :func:`check_host` reads the host only through a
:class:`Host` (injected: tests pass a fake; :class:`LocalHost` is the real one), and never
takes a port or changes anything.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ha.sync_codec import load_key
from lb.config import Config, Endpoint

__all__ = [
    "EXIT_ERRORS",
    "EXIT_OK",
    "EXIT_WARNINGS",
    "Finding",
    "Host",
    "LocalHost",
    "check",
    "check_config",
    "check_host",
    "exit_status",
]

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_WARNINGS = 4  # 2 is a usage error (argparse); 3 is lbctl's "lbd is not running"

Severity = Literal["error", "warning"]
ANY = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: where in the file (``key.path``) and what."""

    severity: Severity
    path: str
    problem: str

    def render(self, source: str) -> str:
        """``FILE: key.path: problem``, and ``warning:`` before the problem of a warning."""
        tag = "warning: " if self.severity == "warning" else ""
        return f"{source}: {self.path}: {tag}{self.problem}"


class Host(Protocol):
    """What the host checks ask of the machine."""

    def interface_exists(self, name: str) -> bool: ...

    def has_ipv4_address(self, name: str) -> bool: ...

    def is_local_address(self, address: str) -> bool: ...

    def read_file(self, path: str) -> bytes:
        """The file's bytes; raises OSError."""
        ...

    def file_mode(self, path: str) -> int:
        """``st_mode`` of the file; raises OSError."""
        ...


def exit_status(findings: list[Finding]) -> int:
    if any(f.severity == "error" for f in findings):
        return EXIT_ERRORS
    return EXIT_WARNINGS if findings else EXIT_OK


def check(config: Config, host: Host) -> list[Finding]:
    """Everything: :func:`check_config` then :func:`check_host`, errors first."""
    found = [*check_config(config), *check_host(config, host)]
    return sorted(found, key=lambda f: f.severity != "error")


# --- the config as a whole (pure) ------------------------------------------------------------


def _overlap(a: Endpoint, b: Endpoint) -> bool:
    """Would listening on both ``a`` and ``b`` take the same port twice?"""
    return a.port == b.port and (a.host == b.host or ANY in (a.host, b.host))


def _show(e: Endpoint) -> str:
    return f"{e.host}:{e.port}"


def _duration(seconds: float) -> str:
    """As the file would write it: ``"500ms"``, ``"2s"``."""
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def check_config(config: Config) -> list[Finding]:
    return list(_config_findings(config))


def _config_findings(cfg: Config) -> Iterator[Finding]:
    sync, metrics = cfg.sync, cfg.metrics.listen
    if sync is not None and metrics is not None and _overlap(metrics, sync.listen):
        yield Finding("error", "metrics.listen",
                      f"{_show(metrics)} takes the port of sync.listen {_show(sync.listen)}")
    if sync is not None:
        if sync.peer == sync.listen:
            yield Finding("error", "sync.peer",
                          f"{_show(sync.peer)} is sync.listen: the peer is the other node")
        elif sync.peer.host == sync.listen.host:
            yield Finding("warning", "sync.peer",
                          f"{sync.peer.host} is also the host of sync.listen: the peer is "
                          "normally the other node")
    for name, pool in cfg.pools.items():
        hc = pool.health_check
        if hc is not None and hc.timeout > hc.interval:
            yield Finding("warning", f"pools.{name}.health_check.timeout",
                          f"{_duration(hc.timeout)} is longer than the interval "
                          f"{_duration(hc.interval)}: a probe still waits when the "
                          "next one is due")


# --- the host --------------------------------------------------------------------------------


def check_host(config: Config, host: Host) -> list[Finding]:
    return list(_host_findings(config, host))


def _host_findings(cfg: Config, host: Host) -> Iterator[Finding]:
    dp = cfg.dataplane
    for key, ifname in (("client_interface", dp.client_interface),
                        ("server_interface", dp.server_interface)):
        if not host.interface_exists(ifname):
            yield Finding("error", f"dataplane.{key}", f"interface {ifname!r} not found")
    for inst in cfg.vrrp_instances:
        where = f"vrrp.instances.{inst.name}"
        if not host.interface_exists(inst.interface):
            yield Finding("error", f"{where}.interface",
                          f"interface {inst.interface!r} not found")
        elif not host.has_ipv4_address(inst.interface):
            yield Finding("error", f"{where}.interface",
                          f"interface {inst.interface!r} has no IPv4 address")
        for i, tracked in enumerate(inst.track_interfaces):
            if not host.interface_exists(tracked.interface):
                yield Finding("warning", f"{where}.track_interfaces[{i}]",
                              f"interface {tracked.interface!r} not found: the instance "
                              "will count it as down")
    listens = [("metrics.listen", cfg.metrics.listen)]
    if cfg.sync is not None:
        listens.append(("sync.listen", cfg.sync.listen))
    for key, ep in listens:
        if ep is not None and ep.host != ANY and not host.is_local_address(ep.host):
            yield Finding("error", key,
                          f"{ep.host} is not an address of this host: lbd cannot listen on it")
    if cfg.sync is not None:
        peer = cfg.sync.peer
        if peer.host != cfg.sync.listen.host and host.is_local_address(peer.host):
            yield Finding("warning", "sync.peer",
                          f"{peer.host} is an address of this host: the peer is normally "
                          "the other node")
        yield from _key_findings(cfg.sync.key_file, host)


def _key_findings(path: str, host: Host) -> Iterator[Finding]:
    try:
        load_key(host.read_file(path))
        mode = host.file_mode(path)
    except OSError as exc:
        yield Finding("error", "sync.key_file", f"cannot read {path}: {exc.strerror or exc}")
        return
    except ValueError as exc:
        yield Finding("error", "sync.key_file", f"{path}: {exc}")
        return
    if stat.S_IMODE(mode) & 0o077:
        yield Finding("warning", "sync.key_file",
                      f"{path} is mode {stat.S_IMODE(mode):04o}: other users can read the "
                      "shared secret (chmod 600)")


# --- the real host ---------------------------------------------------------------------------

_SIOCGIFADDR = 0x8915
_IFREQ = struct.Struct("16s16x")


def _try_udp(action: Callable[[socket.socket], object]) -> OSError | None:
    """Run ``action`` on a fresh, unbound UDP socket; the error it raised, if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            action(s)
        except OSError as exc:
            return exc
    return None


class LocalHost:
    """This machine, in this network namespace. Reads only; binds only to port 0."""

    def interface_exists(self, name: str) -> bool:
        try:
            socket.if_nametoindex(name)
        except OSError:
            return False
        return True

    def has_ipv4_address(self, name: str) -> bool:
        ifreq = _IFREQ.pack(name.encode()[:15])
        return _try_udp(lambda s: fcntl.ioctl(s.fileno(), _SIOCGIFADDR, ifreq)) is None

    def is_local_address(self, address: str) -> bool:
        failed = _try_udp(lambda s: s.bind((address, 0)))
        # Anything but "not ours" (EADDRNOTAVAIL) cannot be judged from here.
        return failed is None or failed.errno != errno.EADDRNOTAVAIL

    def read_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def file_mode(self, path: str) -> int:
        return Path(path).stat().st_mode
