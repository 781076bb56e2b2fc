"""``make lab``: the namespace lab, showing what lbd does.

Builds two clients, an active-active lbd pair (conf/aa-node-a.toml and conf/aa-node-b.toml as
shipped, with their control sockets and sync key moved into a temporary directory) and three
real servers, then walks through: the VRRP election (node a masters VIP A and the servers'
gateway, node b masters VIP B), both VIPs answering at once from their own node, persistence
bindings and the session tables (each node's own sessions and its copy of the peer's), a real
server failing its health check, and the scene the project is judged by — clients in the
middle of a session on each VIP when node a dies: their open connections go on through node
b to the same servers; then node a comes back and takes VIP A back, once it has node b's
table, under a connection opened meanwhile. Everything is torn down on exit or Ctrl-C.

    python -m lab            run the demo and exit
    python -m lab --stay     keep the lab up afterwards until Ctrl-C (explore with lbctl)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.harness import BIN, ENV, Holder, LabEnv, Lbd, shipped_node_config
from lab.topology import VIP, VIP_B, Lab, build, wait_until

URL = f"http://{VIP}/"
URL_B = f"http://{VIP_B}/"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"   {line}")


def lbctl(lbd: Lbd, *args: str) -> str:
    return subprocess.run([str(BIN / "lbctl"), "--socket", lbd.socket, *args],
                          capture_output=True, text=True, check=False, timeout=10).stdout


def requests(env: LabEnv, host: str, count: int, url: str = URL) -> list[str]:
    answers: list[str] = env.client(host, "get", url, "--count", str(count),
                                    "--timeout", "2")["answers"]
    return answers


def vrrp_line(lbd: Lbd) -> str:
    states = lbd.ctl("vrrp", check=False) or {}
    return ", ".join(f"{k} {v['state']}" for k, v in sorted(states.items())) or "(down)"


def created(lbd: Lbd) -> str:
    vss = lbd.ctl("status")["virtual_servers"]
    return ", ".join(f"{name} {v['sessions_created']}" for name, v in sorted(vss.items()))


def demo(env: LabEnv) -> None:
    say("Starting three real servers (198.18.0.11-13, HTTP :8080 answering their name)")
    env.start_servers()
    say("Starting the active-active pair: lba (conf/aa-node-a.toml), lbb (conf/aa-node-b.toml)")
    a = env.lbd(shipped_node_config("aa-node-a", env.tmp), "lba")
    b = env.lbd(shipped_node_config("aa-node-b", env.tmp), "lbb")
    own = {"lba": "back MASTER, front-a MASTER, front-b BACKUP",
           "lbb": "back BACKUP, front-a BACKUP, front-b MASTER"}
    wait_until(lambda: vrrp_line(a) == own["lba"] and vrrp_line(b) == own["lbb"], timeout=20,
               what="the election")
    wait_until(lambda: a.ctl("sync")["connected"] and b.ctl("sync")["connected"], timeout=10,
               what="the sync connections")
    wait_until(lambda: all(s["up"] for lbd in (a, b) for s in lbd.ctl("servers")),
               timeout=15, what="the health checks")
    show(f"lba: {vrrp_line(a)}   (VIP A {VIP} and the servers' gateway)")
    show(f"lbb: {vrrp_line(b)}   (VIP B {VIP_B})")
    show(lbctl(a, "vrrp"))

    say("Both VIPs at once: c1 asks VIP A five times, c2 asks VIP B five times "
        "(maglev, client-ip persistence)")
    show("c1 -> VIP A: " + " ".join(requests(env, "c1", 5, URL)))
    show("c2 -> VIP B: " + " ".join(requests(env, "c2", 5, URL_B)))
    say("Sessions created per virtual server: each node forwarded its own VIP's clients")
    show(f"lba: {created(a)}")
    show(f"lbb: {created(b)}")
    say("lbctl sessions on lba: its own (VIP A) and its synced copy of lbb's (VIP B), from "
        "which it forwards VIP B's replies: the servers' one gateway is lba")
    show(lbctl(a, "sessions"))
    say("lbctl sync on lba")
    show(lbctl(a, "sync"))
    say("lbctl servers")
    show(lbctl(a, "servers"))

    bound = requests(env, "c1", 1, URL)[0]
    say(f"{bound} starts answering 503: the health check takes it out of rotation")
    (env.tmp / f"{bound}.status").write_text("503")
    wait_until(lambda: any(s["state"] == "DOWN" for s in a.ctl("servers")), timeout=10,
               what="the health check to notice")
    show(lbctl(a, "servers"))
    show("c1 is rescheduled: " + " ".join(requests(env, "c1", 3, URL)))
    (env.tmp / f"{bound}.status").unlink()
    wait_until(lambda: all(s["up"] for lbd in (a, b) for s in lbd.ctl("servers")),
               timeout=10, what="the server to come back")
    show(f"{bound} is healthy again")

    say("The scene: c1 holds a connection open to VIP A, c2 one to VIP B; lba dies")
    held_a, held_b = Holder(env, "c1", 1, vip=VIP), Holder(env, "c2", 1, vip=VIP_B)
    wait_until(lambda: established(a) >= 2 and established(b) >= 2, timeout=5,
               what="both nodes to have both held connections")
    pin_a, pin_b = requests(env, "c1", 1, URL)[0], requests(env, "c2", 1, URL_B)[0]
    show(f"c1 is pinned to {pin_a} on VIP A, c2 to {pin_b} on VIP B; lbb holds "
         f"{len(b.ctl('sessions'))} sessions, its own and its copy of lba's")
    probe = subprocess.Popen(
        ["ip", "netns", "exec", env.lab.ns("c1"), sys.executable, "-m", "lab.client", "probe",
         URL, "--timeout", "0.05", "--duration", "2"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    time.sleep(0.5)  # a demo's pause: let the probe run against the healthy lba first
    killed = time.monotonic()
    a.stop(signal.SIGKILL)
    show("SIGKILL lba")
    attempts = json.loads(probe.communicate(timeout=30)[0].strip().splitlines()[-1])["attempts"]
    good = [t for t, ok in attempts if ok and t > killed]
    show(f"c1, asking VIP A every ~50 ms: first good answer through lbb {good[0] - killed:.2f}s "
         "after the kill" if good else "c1: no good answer within 2 s")
    show(f"c1 sends on its held connection to VIP A: {held_a.send()[0]} "
         "(the same TCP connection, now through lbb)")
    show(f"c2 sends on its held connection to VIP B: {held_b.send()[0]} "
         "(its replies came through lba, the gateway; now through lbb)")
    held_a.close()  # a held connection answers one request (HTTP/1.0)
    held_b.close()
    show(f"c1's next requests to VIP A: {' '.join(requests(env, 'c1', 3, URL))} "
         f"(still {pin_a})")
    show(f"c2's next requests to VIP B: {' '.join(requests(env, 'c2', 3, URL_B))} "
         f"(still {pin_b})")
    show(f"lbb: {vrrp_line(b)}")
    show(lbctl(b, "status"))

    say("lba comes back: it takes VIP A and the gateway back only once it has lbb's table; "
        "c1 and c2 open connections through lbb before the handback")
    held_a, held_b = Holder(env, "c1", 1, vip=VIP), Holder(env, "c2", 1, vip=VIP_B)
    start = len(a.log_text())
    a.start()
    wait_until(lambda: vrrp_line(a) == own["lba"] and vrrp_line(b) == own["lbb"],
               timeout=20, what="lba to take its instances back")
    show(f"lba: {vrrp_line(a)}")
    show(f"lbb: {vrrp_line(b)}")
    for line in a.log_text()[start:].splitlines():
        if "snapshot from the peer applied" in line or "-> MASTER" in line:
            show("lba log: " + line.split(" ", 3)[-1])
    show(f"c1 sends on the connection opened through lbb: {held_a.send()[0]}")
    show(f"c2 sends on the one it opened to VIP B: {held_b.send()[0]}")
    held_a.close()
    held_b.close()
    show(f"c1 -> VIP A: {' '.join(requests(env, 'c1', 3, URL))}")
    show(f"c2 -> VIP B: {' '.join(requests(env, 'c2', 3, URL_B))}")
    show(f"lba: {created(a)}")


def established(lbd: Lbd) -> int:
    return sum(1 for s in lbd.ctl("sessions") if s["state"] == "ESTABLISHED")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m lab")
    ap.add_argument("--stay", action="store_true", help="keep the lab up until Ctrl-C")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the lab builds network namespaces: run it as root", file=sys.stderr)
        return 1
    lab = Lab()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        say(f"Building the lab (namespaces {lab.prefix}-*)")
        build(lab, pair=True)
        with tempfile.TemporaryDirectory(prefix="lbd-lab-") as tmp:
            env = LabEnv(lab, Path(tmp))
            demo(env)
            if args.stay:
                say("The lab stays up; Ctrl-C tears it down. Try:")
                for lbd in env.lbds:
                    show(f"{BIN / 'lbctl'} --socket {lbd.socket} status   # {lbd.host}")
                show(f"ip netns exec {lab.ns('c1')} curl {URL}")
                signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        say("Tearing down")
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
