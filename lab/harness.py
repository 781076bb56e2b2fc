"""What runs in a lab: lbd processes, real servers and clients (used by the lab demo, the
namespace tests and the benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal as _signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lab.fill import write as write_snapshot
from lab.topology import SERVERS, VIP, Lab, build, wait_until
from lb.config import load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"PYTHONPATH": str(REPO)}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc: namespaces share it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Scraped metrics: {(sample name, sorted labels): value}."""


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class Lbd:
    """One lbd process in a namespace."""

    env: LabEnv
    host: str
    config: Path
    socket: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout: float = 20) -> Lbd:
        self.proc = self.env.lab.spawn(self.host, [str(BIN / "lbd"), "--config",
                                                   str(self.config)], log=str(self.log), env=ENV)
        if wait:
            self.wait_answering(timeout)
        return self

    def wait_answering(self, timeout: float = 20) -> None:
        """Until the control socket answers (a start that loads 10⁶ sessions takes seconds)."""
        wait_until(self._alive_and_answering, timeout=timeout,
                   what=f"lbd on {self.host} to answer on its control socket")

    def _alive_and_answering(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"lbd exited {self.proc.returncode}:\n{self.log_text()}")
        return bool(self.ctl("status", check=False))

    def ctl(self, *args: str, check: bool = True) -> Any:
        proc = subprocess.run([str(BIN / "lbctl"), "--socket", self.socket, "--json", *args],
                              capture_output=True, text=True, timeout=20, check=False,
                              env={**os.environ, **ENV})  # this tree's lbctl, like its lbd
        if proc.returncode != 0:
            if check:
                raise AssertionError(f"lbctl {' '.join(args)} failed: {proc.stderr}")
            return None
        return json.loads(proc.stdout)

    def kill(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the process to exit by itself (after a signal sent with ``kill``)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = _signal.SIGTERM) -> int | None:
        assert self.proc is not None
        return self.env.lab.stop(self.proc, sig, timeout=15)

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""


@dataclass
class LabEnv:
    lab: Lab
    tmp: Path
    lbds: list[Lbd] = field(default_factory=list)

    def python(self, host: str, *args: str, timeout: float = 60) -> Any:
        """Run ``python -m ARGS`` in ``host`` and parse the last JSON line it prints."""
        out = self.lab.sh(host, " ".join([sys.executable, "-m", *args]), timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def client(self, host: str, *args: str, timeout: float = 60) -> Any:
        return self.python(host, "lab.client", *args, timeout=timeout)

    def lbd(self, config: str, host: str = "lba", *, start: bool = True,
            fill: int = 0, bindings: bool = False) -> Lbd:
        """An lbd in ``host`` with this config (``@SOCKET@`` placed, a state_dir of the host's
        own unless it names one); ``fill``: its table snapshot gets that many sessions
        first (:mod:`lab.fill`), which it loads as it starts."""
        n = len(self.lbds)
        sock = str(self.tmp / f"{host}-{n}.sock")
        path = self.tmp / f"{host}-{n}.toml"
        text = config.replace("@SOCKET@", sock)
        if "state_dir" not in text and "[node]\n" in text:
            # Operator state lives per host of the lab, never in the machine's /var/lib/lbd;
            # a restarted lbd on the same host finds what it saved.
            state = self.tmp / f"state-{host}"
            text = text.replace("[node]\n", f'[node]\nstate_dir = "{state}"\n', 1)
        path.write_text(text)
        lbd = Lbd(self, host, path, sock, self.tmp / f"{host}-{n}.log")
        self.lbds.append(lbd)
        if fill:
            write_snapshot(load_config(path), fill, bindings=bindings)
        return lbd.start(timeout=20 + fill / 10_000) if start else lbd

    def scrape(self, host: str = "lba", port: int = 9641) -> Samples:
        """lbd's /metrics from inside ``host``: {(sample name, sorted labels): value}."""
        r: Any = self.client(host, "get", f"http://127.0.0.1:{port}/metrics")
        out: Samples = {}
        for fam in text_string_to_metric_families(r["answers"][0] + "\n"):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def start_servers(self, names: tuple[str, ...] = tuple(SERVERS), *, http: int = 8080,
                      udp: int = 5353) -> None:
        for name in names:
            self.start_server(name, http=http, udp=udp)

    def start_server(self, name: str, *, http: int = 8080,
                     udp: int = 5353) -> subprocess.Popen[bytes]:
        proc = self.lab.spawn(name, [sys.executable, "-m", "lab.realserver", "--name", name,
                                     "--http", str(http), "--udp", str(udp),
                                     "--state-dir", str(self.tmp)], env=ENV)
        wait_until(lambda: f":{http} " in self.lab.sh(name, "ss -ltnH"), timeout=10,
                   what=f"{name} to listen on {http}")
        self.servers[name] = proc
        return proc

    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


@contextlib.contextmanager
def pair_env(prefix: str, *, clients: tuple[str, ...] = ("c1", "c2"),
             servers: bool = True) -> Iterator[LabEnv]:
    """The lab of a pair (``build(pair=True)``) with its real servers running (unless
    ``servers`` is False) and a temporary directory for configs, state and logs; everything
    deleted on the way out."""
    lab = Lab()
    try:
        build(lab, pair=True, clients=clients)
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            env = LabEnv(lab, Path(tmp))
            if servers:
                env.start_servers()
            yield env
    finally:
        lab.close()


def shipped_node_config(name: str, tmp: Path) -> str:
    """conf/NAME.toml as shipped, with its control socket left for :meth:`LabEnv.lbd` to place
    and its sync key file in ``tmp``: the lab and the benchmarks run the example configs."""
    text = (REPO / "conf" / f"{name}.toml").read_text()
    text = text.replace("[node]\n", '[node]\ncontrol_socket = "@SOCKET@"\n', 1)
    key = tmp / "sync.key"
    key.write_text("a shared secret for the lab pair\n")
    return re.sub(r'key_file = "[^"]*"', f'key_file = "{key}"', text)


LARGE_TABLES = """
[sessions]
max_sessions = 2200000
max_half_open = 2000000
snapshot_interval = "1h"
"""
"""[sessions] for a pair that holds 10⁶ sessions (lab.fill) and takes SYN loads without
evicting half-open sessions; the table snapshot is loaded at start but not rewritten during
a test or bench (an hour apart)."""


def large_node_config(name: str, tmp: Path) -> str:
    """:func:`shipped_node_config` with :data:`LARGE_TABLES`."""
    return shipped_node_config(name, tmp) + LARGE_TABLES


class Holder:
    """Connections held open through the VIP by a client process."""

    def __init__(self, env: LabEnv, host: str, count: int, port: int = 80,
                 vip: str = VIP) -> None:
        cmd = ["ip", "netns", "exec", env.lab.ns(host), sys.executable, "-m", "lab.client",
               "hold", vip, str(port), "--count", str(count), "--timeout", "3"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, **ENV})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "holder exited before holding its connections"
        first = json.loads(line)
        self.held: int = first["held"]
        self.ports: list[int] = first["ports"]  # local port of each held connection, in order

    def send(self) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("send\n")
        self.proc.stdin.flush()
        results: list[str] = json.loads(self.proc.stdout.readline())["results"]
        return results

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
