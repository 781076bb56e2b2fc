"""lbd — the daemon's command line.

    lbd --config FILE                 run in the foreground (as systemd runs it)
    lbd --check --config FILE         validate FILE and this host; exit 0 ok, 1 errors,
                                      4 warnings only (lb.hostcheck)
    lbd --check --config-only ...     validate FILE alone (a machine without its interfaces)
    lbd --version

lbd runs the same checks at start and refuses to start on an error. SIGHUP (or
``lbctl reload``) reloads the config without dropping sessions (a bad file is refused and the
old one kept); SIGTERM and SIGINT stop cleanly and remove everything lbd installed in the
kernel. Under systemd (``Type=notify``) lbd reports READY, STATUS, RELOADING, STOPPING and
pings the watchdog, see :class:`Supervisor`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import uvloop

from lb import logs, native
from lb.config import Config, ConfigError, load_config
from lb.hostcheck import EXIT_ERRORS, LocalHost, check, check_config, exit_status
from lb.node import Node
from lb.sdnotify import Notifier, watchdog_period
from lb.version import version_line

log = logging.getLogger("lbd")

STATUS_EVERY = 5.0
"""Seconds between two looks at whether the STATUS= line changed."""


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """What :class:`Supervisor` needs of the event loop (a test passes a fake)."""

    def call_later(self, delay: float, callback: Callable[[], object], /) -> Cancellable: ...


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def status_text(status: Mapping[str, Any]) -> str:
    """``Node.status()`` as the one line ``systemctl status`` shows, e.g.
    ``front=MASTER back=MASTER; 1200 sessions; sync connected``."""
    roles = " ".join(f"{name}={inst.get('state', '?')}"
                     for name, inst in (status.get("vrrp") or {}).items())
    sync = status.get("sync") or {}
    if not sync.get("configured", True):
        link = "no sync"
    else:
        link = "sync connected" if sync.get("connected") else "sync not connected"
    return f"{roles or 'standalone'}; {status.get('sessions', 0)} sessions; {link}"


class Supervisor:
    """lbd's side of the systemd contract (DESIGN.md §4), driven from the event loop.

    One timer: each tick pings the watchdog (when systemd set one) and, once lbd is ready,
    sends STATUS= if the line changed. The ping is a loop callback, not a thread: a loop that
    stalls stops pinging, and systemd restarts lbd. Without ``$NOTIFY_SOCKET`` nothing runs.
    """

    def __init__(self, notifier: Notifier, *, watchdog: float | None,
                 status_every: float = STATUS_EVERY,
                 monotonic_usec: Callable[[], int] = _monotonic_usec) -> None:
        self.notifier = notifier
        self.watchdog = watchdog
        self.period = min(watchdog, status_every) if watchdog else status_every
        self._monotonic_usec = monotonic_usec
        self._status: Callable[[], Mapping[str, Any]] | None = None
        self._note = ""
        self._last = ""
        self._loop: Timers | None = None
        self._timer: Cancellable | None = None

    def start(self, loop: Timers) -> None:
        """Begin ticking; called before the node starts, so a slow start is pinged too."""
        if not self.notifier.enabled:
            return
        self._loop = loop
        self.notifier.notify(STATUS="starting")
        self._tick()

    def ready(self, status: Callable[[], Mapping[str, Any]]) -> None:
        """The node forwards, VRRP and sync are up: READY=1 and the first STATUS= line."""
        self._status = status
        self.notifier.notify(READY=1, STATUS=self._line())

    def reloading(self) -> None:
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=self._monotonic_usec(),
                             STATUS="reloading")

    def reloaded(self, errors: list[str]) -> None:
        """Back to READY=1 whatever the outcome (a refused reload keeps the old config
        running); the STATUS= line says a refusal until the next reload succeeds."""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        self._note = f"; last reload refused: {errors[0]}{more}" if errors else ""
        self.notifier.notify(READY=1, STATUS=self._line())

    def stopping(self, why: str = "stopping") -> None:
        self._status = None
        self.notifier.notify(STOPPING=1, STATUS=why)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.notifier.close()

    def _line(self) -> str:
        """The STATUS= line now (remembered, so that a tick sends only a changed one)."""
        self._last = (status_text(self._status()) if self._status else "") + self._note
        return self._last

    def _tick(self) -> None:
        fields: dict[str, str | int] = {}
        if self.watchdog:
            fields["WATCHDOG"] = 1
        if self._status is not None:
            previous = self._last
            if self._line() != previous:
                fields["STATUS"] = self._last
        self.notifier.notify(**fields)
        assert self._loop is not None
        self._timer = self._loop.call_later(self.period, self._tick)


class SupervisedNode(Node):
    """A node whose every reload, by SIGHUP or by ``lbctl reload``, is announced to the
    service manager: RELOADING=1 before, READY=1 after."""

    def __init__(self, config: Config, supervisor: Supervisor) -> None:
        super().__init__(config)
        self.supervisor = supervisor

    async def reload(self) -> list[str]:
        self.supervisor.reloading()
        errors = ["reload failed with an internal error"]
        try:
            errors = await super().reload()
        finally:
            self.supervisor.reloaded(errors)
        return errors


async def serve(config: Config, supervisor: Supervisor | None = None) -> int:
    sup = supervisor or Supervisor(Notifier.from_environ(),
                                   watchdog=watchdog_period(os.environ, os.getpid()))
    node = SupervisedNode(config, sup)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[list[str]]] = set()

    def on_hup() -> None:
        task = loop.create_task(node.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    sup.start(loop)
    try:
        await node.start()
    except Exception as exc:
        log.error("start failed: %s", exc)
        sup.stopping(f"start failed: {exc}")
        await node.stop()
        sup.close()
        return 1
    sup.ready(node.status)
    await stop.wait()
    sup.stopping()
    await node.stop()
    sup.close()
    # Stopped cleanly: a repeated SIGTERM (an impatient supervisor) during the loop's own
    # teardown must not turn exit status 0 into death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


def _log_level(text: str) -> int:
    try:
        return logs.parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lbd", description="Userspace L4 load balancer.")
    ap.add_argument("--version", action="version", version=version_line())
    ap.add_argument("--config", required=True, help="TOML config file")
    ap.add_argument("--check", action="store_true",
                    help="validate the config and this host, then exit: "
                         "0 ok, 1 errors, 4 warnings only")
    ap.add_argument("--config-only", action="store_true",
                    help="with --check: judge the file alone, not this host")
    ap.add_argument("--log-level", type=_log_level, default=logging.INFO,
                    metavar="|".join(logs.LEVELS), help="default: info")
    ap.add_argument("--log-format", choices=logs.FORMATS, default="auto",
                    help="auto (default): journal under systemd, else text")
    ns = ap.parse_args(argv)
    if ns.config_only and not ns.check:
        ap.error("--config-only needs --check")
    if ns.check:
        return check_command(ns.config, host_checks=not ns.config_only)
    logs.configure(ns.log_level, ns.log_format, "-")
    try:
        config = load_config(ns.config)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return 1
    logs.configure(ns.log_level, ns.log_format, config.node.name)
    findings = check(config, LocalHost())
    for f in findings:
        log.log(logging.ERROR if f.severity == "error" else logging.WARNING, "%s",
                f.render(config.source))
    if exit_status(findings) == EXIT_ERRORS:
        return 1
    log.info("%s", native.status().describe())  # which build of the hot path runs
    return uvloop.run(serve(config))


def check_command(path: str, *, host_checks: bool = True) -> int:
    """``lbd --check``: findings on stderr, ``FILE: OK`` on stdout unless an error."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_ERRORS
    findings = check(config, LocalHost()) if host_checks else check_config(config)
    for f in findings:
        print(f.render(config.source), file=sys.stderr)
    status = exit_status(findings)
    if status != EXIT_ERRORS:
        warned = f" ({len(findings)} warnings)" if findings else ""
        print(f"{path}: OK{warned}")
    return status


if __name__ == "__main__":
    sys.exit(main())
