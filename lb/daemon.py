"""lbd — the daemon's command line.

    lbd --config FILE           run in the foreground (as systemd runs it)
    lbd --check --config FILE   validate FILE; exit 0, or 1 with the errors on stderr

SIGHUP reloads the config without dropping sessions (a bad file is refused and the old one
kept); SIGTERM and SIGINT stop cleanly and remove everything lbd installed in the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from lb.config import Config, ConfigError, load_config
from lb.node import Node
from lb.version import version_line

log = logging.getLogger("lbd")


async def serve(config: Config) -> int:
    node = Node(config)
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
    try:
        await node.start()
    except Exception as exc:
        log.error("start failed: %s", exc)
        await node.stop()
        return 1
    await stop.wait()
    await node.stop()
    # Stopped cleanly: a repeated SIGTERM (an impatient supervisor) during the loop's own
    # teardown must not turn exit status 0 into death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lbd", description="Userspace L4 load balancer.")
    ap.add_argument("--version", action="version", version=version_line())
    ap.add_argument("--config", required=True, help="TOML config file")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    ap.add_argument("--log-level", default="INFO")
    ns = ap.parse_args(argv)
    try:
        config = load_config(ns.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if ns.check:
        print(f"{ns.config}: OK")
        return 0
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s lbd[{config.node.name}] %(levelname)s %(message)s")
    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
