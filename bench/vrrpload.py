"""VRRP under full saturation (issue 10 item 2): the worst gap between a master's adverts at
30 ms, and the false failovers, while iperf3 (4 streams), wrk (new connections) and a 64-byte
UDP flood go through the master for 60 s — and once more with a spoofed 64-byte junk flood at
a VIP port without a virtual server in place of the UDP flood. lab/saturation.py builds the
pair and the load (the same as tests/netns/test_vrrp_load.py, which runs 20 s in CI); tshark
in the backup times the adverts, the transition counters of both nodes count failovers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab import saturation
from lab.harness import pair_env

ADVERT = "30ms"
SECONDS = 60


@dataclass(frozen=True, slots=True)
class Round:
    worst_gap_ms: float
    over_1_5x: int
    adverts: int
    transitions: float
    figures: dict[str, float]


def one_round(junk: bool, seconds: int = SECONDS) -> Round:
    """One loaded run: the UDP flood (``junk`` False) or the junk flood."""
    with pair_env("lbd-vrrpload-", clients=("c1", "c2", "x"), servers=False) as env:
        saturation.start_servers(env, udp=not junk)
        a, b = saturation.start_pair(env, ADVERT, udp=not junk)
        got = saturation.run(env, a, b, advert=ADVERT, seconds=seconds, streams=4,
                             udp=not junk, junk=junk)
    if got.worst_gap is None:
        raise RuntimeError("no adverts captured (is tshark installed?)")
    return Round(got.worst_gap * 1000, got.gaps_over(1.5), len(got.gaps) + 1,
                 sum(got.transitions.values()), got.figures)
