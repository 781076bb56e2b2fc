"""``make lab``: the namespace lab, showing what lbd does.

Builds clients, an lbd pair (conf/node-a.toml and conf/node-b.toml as shipped, with their
control sockets and sync key moved into a temporary directory) and three real servers, then
walks through: the VRRP election, requests and which server answered them, persistence
bindings and the session table, a real server failing its health check, and the scene the
project is judged by — a client in the middle of a session when the master dies: its open
connection goes on through the backup to the same server. Everything is torn down on exit or Ctrl-C.

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
from collections import Counter
from pathlib import Path

from lab.harness import BIN, ENV, Holder, LabEnv, Lbd, shipped_node_config
from lab.topology import VIP, Lab, build, wait_until

URL = f"http://{VIP}/"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"   {line}")


def lbctl(lbd: Lbd, *args: str) -> str:
    return subprocess.run([str(BIN / "lbctl"), "--socket", lbd.socket, *args],
                          capture_output=True, text=True, check=False, timeout=10).stdout


def requests(env: LabEnv, host: str, count: int) -> list[str]:
    answers: list[str] = env.client(host, "get", URL, "--count", str(count),
                                    "--timeout", "2")["answers"]
    return answers


def vrrp_line(lbd: Lbd) -> str:
    states = lbd.ctl("vrrp", check=False) or {}
    return ", ".join(f"{k} {v['state']}" for k, v in sorted(states.items())) or "(down)"


def demo(env: LabEnv) -> None:
    say("Starting three real servers (198.18.0.11-13, HTTP :8080 answering their name)")
    env.start_servers()
    say("Starting the lbd pair: lba (conf/node-a.toml, priority 200), lbb (node-b, 100)")
    a = env.lbd(shipped_node_config("node-a", env.tmp), "lba")
    b = env.lbd(shipped_node_config("node-b", env.tmp), "lbb")
    wait_until(lambda: "MASTER" in vrrp_line(a) and "MASTER" not in vrrp_line(b), timeout=10,
               what="the election")
    show(f"lba: {vrrp_line(a)}")
    show(f"lbb: {vrrp_line(b)}")
    show(lbctl(a, "vrrp"))

    say(f"Client c1 asks {URL} five times (rr scheduler, client-ip persistence)")
    show(" ".join(requests(env, "c1", 5)))
    say("Client c2 asks five times: its own binding, possibly another server")
    show(" ".join(requests(env, "c2", 5)))
    say("lbctl sessions on the master (NAT: client → VIP:80 → server:8080)")
    show(lbctl(a, "sessions"))
    say("lbctl servers")
    show(lbctl(a, "servers"))

    bound = Counter(requests(env, "c1", 1)).most_common(1)[0][0]
    say(f"{bound} starts answering 503: the health check takes it out of rotation")
    (env.tmp / f"{bound}.status").write_text("503")
    wait_until(lambda: any(s["state"] == "DOWN" for s in a.ctl("servers")), timeout=10,
               what="the health check to notice")
    show(lbctl(a, "servers"))
    show("c1 is rescheduled: " + " ".join(requests(env, "c1", 3)))
    (env.tmp / f"{bound}.status").unlink()
    wait_until(lambda: all(s["up"] for s in a.ctl("servers")), timeout=10,
               what="the server to come back")
    show(f"{bound} is healthy again")

    say("The scene: c1 holds a connection open mid-session; the master dies")
    holder = Holder(env, "c1", 1)
    wait_until(lambda: len(a.ctl("sessions")) == len(b.ctl("sessions")), timeout=5,
               what="the backup to have the master's sessions")
    pinned = requests(env, "c1", 1)[0]
    show(f"c1 is pinned to {pinned}; lbb holds {len(b.ctl('sessions'))} synced sessions "
         f"(lbctl sync on lbb: {b.ctl('sync')['records_received']} records received)")
    probe = subprocess.Popen(
        ["ip", "netns", "exec", env.lab.ns("c2"), sys.executable, "-m", "lab.client", "probe",
         URL, "--timeout", "0.05", "--duration", "2"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    time.sleep(0.5)  # let c2's probe run against the healthy master first
    killed = time.monotonic()
    a.stop(signal.SIGKILL)
    show("SIGKILL lba")
    attempts = json.loads(probe.communicate(timeout=30)[0].strip().splitlines()[-1])["attempts"]
    good = [t for t, ok in attempts if ok and t > killed]
    show(f"c2, asking every ~50 ms: first good answer through lbb {good[0] - killed:.2f}s "
         "after the kill" if good else "c2: no good answer within 2 s")
    show(f"c1 sends on the connection it held open: {holder.send()[0]} "
         "(the same TCP connection, now through lbb)")
    holder.close()
    show(f"c1's next requests: {' '.join(requests(env, 'c1', 3))} (still {pinned})")
    show(f"lbb: {vrrp_line(b)}")
    show(lbctl(b, "status"))
    say("lba comes back and preempts (priority 200 > 100)")
    a.start()
    wait_until(lambda: "MASTER" in vrrp_line(a) and "MASTER" not in vrrp_line(b),
               timeout=10, what="lba to preempt")
    show(f"lba: {vrrp_line(a)}")
    show(f"lbb: {vrrp_line(b)}")
    show(" ".join(requests(env, "c1", 3)))


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
