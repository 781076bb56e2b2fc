"""Small helpers shared by namespace tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from lab.topology import VIP
from tests.netns.harness import ENV, LabEnv

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(env: LabEnv, host: str = "lba", port: int = 9641) -> Samples:
    """Scrape lbd's /metrics from inside ``host``: {(sample name, sorted labels): value}."""
    r: Any = env.client(host, "get", f"http://127.0.0.1:{port}/metrics")
    text = r["answers"][0]
    out: Samples = {}
    for fam in text_string_to_metric_families(text + "\n"):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Samples, name: str,
           **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def drops(samples: Samples) -> dict[str, float]:
    return {dict(lbl)["reason"]: v for (n, lbl), v in samples.items() if n == "lbd_drops_total"}


class Holder:
    """Connections held open through the VIP by a client process."""

    def __init__(self, env: LabEnv, host: str, count: int, port: int = 80) -> None:
        cmd = ["ip", "netns", "exec", env.lab.ns(host), sys.executable, "-m", "lab.client",
               "hold", VIP, str(port), "--count", str(count), "--timeout", "3"]
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
