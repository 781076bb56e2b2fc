"""A measuring prototype of the multi-worker data plane (docs/architecture.md, "The data plane
in worker processes"): N forked processes, each one queue of a multi-queue TUN with its own
``Forwarder`` and tables, steered by client address (``lb.steering``).

This is **not** lbd's data plane and not a mode of it: no VRRP, sync, health checks, control
socket or metrics; the servers are taken as up and the session tables of a worker die with
it. It exists to answer the question the design leaves to measurement before anyone builds
the control process around it: on this box, what do a second and a third worker buy in new
connections per second, 64-byte UDP and 4-stream TCP, measured in the same run as lbd, the
kernel and HAProxy (``python -m bench --systems lbd,lbd-2w,haproxy``)? The forwarding code
is lbd's own, compiled or pure as lbd would run it; only the shell around it is this file.

    python -m bench.workers --config lbd.toml --workers 2     (in the LB's namespace, root)

Set-up as lbd's start does it for a standalone node (lb/node.py): the kernel's reply path,
the VIPs routed into the TUN with proxy ARP, then the workers are forked; the parent waits
and, on SIGTERM or SIGINT, stops them. The TUN (and every route through it) goes with the
last fd.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import uvloop

from ha.ownership import AddressOwner
from lb.addr import int_to_ip, ip_to_int
from lb.config import Config, VrrpAddress, load_config
from lb.dataplane import DataPlane
from lb.forwarder import Forwarder, ServiceCounts
from lb.kernel import Kernel
from lb.node import session_table
from lb.persistence import PersistenceTable
from lb.services import Service, build_services
from lb.steering import Steering
from lb.tun import open_tun


async def _set_up(cfg: Config) -> Kernel:
    """The kernel's side, as lbd's start does it; the Kernel stays open while the workers run
    (closing it restores the sysctls it changed, ip_forward among them)."""
    dp = cfg.dataplane
    kernel = await Kernel.open(route_table=dp.route_table, rule_priority=dp.rule_priority)
    try:
        await kernel.remove_leftovers()
        tun_index = await kernel.set_link_up(dp.tun, dp.tun_queue)
        await kernel.prepare(tun=dp.tun, client_if=dp.client_interface,
                             server_if=dp.server_interface, rps_cpus=dp.rps_cpus,
                             arp_interfaces=set())
        services = build_services(cfg)
        await kernel.install_reply_path(tun_index, dp.server_interface,
                                        {int_to_ip(s.addr) for s in services.servers()})
        owner = AddressOwner(kernel, tun_index)
        await owner.take(dp.client_interface,
                         {VrrpAddress(vc.address) for vc in cfg.virtual_servers},
                         garp_count=1, garp_interval=0.05)
    except BaseException:
        await kernel.close()
        raise
    return kernel


def _worker(cfg: Config, fd: int) -> None:
    """One queue's data plane until SIGTERM: lbd's forwarder, tables of its own."""
    services = build_services(cfg)
    services.follow(lambda instance: True)
    sessions = session_table(cfg, ServiceCounts())
    persistence: PersistenceTable[Service] = PersistenceTable()
    forwarder = Forwarder(services, sessions, persistence)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        plane = DataPlane(fd, forwarder, batch=cfg.dataplane.batch)
        plane.start(loop)

        def expire() -> None:
            now = time.monotonic()
            sessions.expire(now)
            persistence.expire(now)
            handle[0] = loop.call_later(cfg.sessions.expiry_tick, expire)

        handle = [loop.call_later(cfg.sessions.expiry_tick, expire)]
        await stop.wait()
        handle[0].cancel()
        plane.stop()
        print(f"bench.workers: worker {os.getpid()}: read {plane.rx_packets} in "
              f"{plane.wakeups} wake-ups, forwarded "
              f"{forwarder.packets_in} in / {forwarder.packets_out} out, "
              f"{len(sessions)} sessions, drops {dict(forwarder.drops)}, "
              f"errors {forwarder.errors}", file=sys.stderr, flush=True)

    uvloop.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if not cfg.standalone or cfg.sync is not None:
        print("bench.workers: a standalone config (no [vrrp], no [sync])", file=sys.stderr)
        return 2
    fds = [open_tun(cfg.dataplane.tun, multi_queue=True) for _ in range(args.workers)]
    steering = Steering(ip_to_int(vc.address) for vc in cfg.virtual_servers)
    steering.attach(fds[0])
    kernel = asyncio.run(_set_up(cfg))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    children = []
    for fd in fds:
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
            for other in fds:
                if other != fd:
                    os.close(other)
            _worker(cfg, fd)
            os._exit(0)
        children.append(pid)
    print(f"bench.workers: {len(children)} workers on {cfg.dataplane.tun}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    steering.close()
    asyncio.run(kernel.close())
    return 0


if __name__ == "__main__":
    sys.exit(main())
