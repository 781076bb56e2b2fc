"""Forged VRRP adverts from a third host on the client link: a running pair ignores them,
counts each by reason, and neither node changes state.

Host "x" (198.51.100.102) on the front bridge runs :mod:`lab.forge_vrrp`, which builds every
packet itself (``IP_HDRINCL``) and sends it to 224.0.0.18. Every forged advert carries
priority 255, so each one would take the VIP if it were accepted; the positive control at the
end shows that an unbroken one is indeed obeyed. The forger's socket is bound to x's eth0
(``SO_BINDTODEVICE``), which is enough to send to 224.0.0.18 without a multicast route.

The counts are exact: every forged packet reaches both LBs (224.0.0.18 is link-local, so the
bridge floods it) and lbd reads every packet its raw socket receives. The one place a packet
could vanish uncounted is the socket's receive buffer; the forger paces itself (1,000 packets
a second) so that it never fills, and if the counts fall short the failure message shows the
kernel's drop counter for the node's raw sockets (``/proc/net/raw``).
"""

from __future__ import annotations

from functools import partial

import pytest

from lab import configs
from lab.topology import CLIENTS, LB_FRONT, VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import Samples, metric, scrape

pytestmark = pytest.mark.topology(pair=True, clients=("c1", "x"))

FORGED = 1000
# lab.forge_vrrp kind → (scope of the counter, reason label). Packet-level checks and unknown
# VRIDs are counted by the interface's runner; the address list is checked by the instance.
WHERE = {
    "ttl": "interface", "checksum": "interface", "version": "interface",
    "vrid": "interface", "length": "interface", "address_list": "front",
}
OTHER_ADDRESSES = "198.51.100.20"  # an address list that is not the front instance's


def states(lbd: Lbd) -> dict[str, str]:
    return {name: v["state"] for name, v in lbd.ctl("vrrp").items()}


def wait_states(lbd: Lbd, state: str, timeout: float = 10) -> None:
    wait_until(lambda: states(lbd) == {"front": state, "back": state}, timeout=timeout,
               what=f"{lbd.host} to be {state} for both instances")


@pytest.fixture
def pair(env: LabEnv) -> tuple[Lbd, Lbd]:
    a = env.lbd(configs.pair("lba", priority=200), "lba")
    wait_states(a, "MASTER")
    b = env.lbd(configs.pair("lbb", priority=100), "lbb")
    wait_states(b, "BACKUP")
    # lbb has heard lba: it is a backup behind a live master, not one that just started.
    wait_until(lambda: b.ctl("vrrp")["front"]["master"] == LB_FRONT["lba"], timeout=5,
               what="lbb to learn lba as the front master")
    return a, b


def forge(env: LabEnv, *, count: int, kinds: str | None = None,
          rate: float = 1000) -> dict[str, int]:
    args = ["--iface", "eth0", "--count", str(count), "--rate", str(rate),
            "--address", VIP, "--other", OTHER_ADDRESSES]
    if kinds is not None:
        args += ["--kinds", kinds]
    out = env.python("x", "lab.forge_vrrp", *args, timeout=60)
    assert out["source"] == CLIENTS["x"]
    sent: dict[str, int] = out["sent"]
    return sent


def dropped(samples: Samples, host: str) -> dict[str, float]:
    """This node's drop counters for the kinds the forger sends, keyed by kind."""
    scopes = {"interface": f"interface:{LB_FRONT[host]}", "front": "front"}
    return {kind: metric(samples, "lbd_vrrp_adverts_dropped_total",
                         scope=scopes[where], reason=kind)
            for kind, where in WHERE.items()}


def transitions(samples: Samples) -> dict[str, float]:
    return {i: metric(samples, "lbd_vrrp_transitions_total", instance=i)
            for i in ("front", "back")}


def raw_socket_drops(env: LabEnv, host: str) -> int:
    """Packets the kernel dropped at the raw sockets of ``host`` (a full receive buffer)."""
    lines = env.lab.sh(host, "cat /proc/net/raw").splitlines()[1:]
    return sum(int(line.split()[-1]) for line in lines if line.strip())


def test_forged_adverts_are_dropped_and_counted_by_reason(env: LabEnv,
                                                          pair: tuple[Lbd, Lbd]) -> None:
    a, b = pair
    nodes = {"lba": a, "lbb": b}
    before = {host: scrape(env, host) for host in nodes}
    expected_states = {"lba": {"front": "MASTER", "back": "MASTER"},
                       "lbb": {"front": "BACKUP", "back": "BACKUP"}}

    sent = forge(env, count=FORGED)
    assert sum(sent.values()) == FORGED and set(sent) == set(WHERE)

    def delta(host: str) -> dict[str, float]:
        now, then = dropped(scrape(env, host), host), dropped(before[host], host)
        return {kind: now[kind] - then[kind] for kind in WHERE}

    def counted_all(host: str) -> bool:
        return delta(host) == sent

    for host in nodes:
        try:
            wait_until(partial(counted_all, host), timeout=10,
                       what=f"{host} to count every forged advert")
        except TimeoutError as exc:
            raise AssertionError(
                f"{host}: sent {sent}, counted {delta(host)}; raw socket drops in the "
                f"kernel: {raw_socket_drops(env, host)}") from exc

    for host, lbd in nodes.items():
        assert lbd.proc is not None and lbd.proc.poll() is None, f"lbd on {host} exited"
        assert states(lbd) == expected_states[host]
        after = scrape(env, host)
        assert transitions(after) == transitions(before[host]), f"{host} changed state"
        assert delta(host) == sent  # exactly: nothing else was counted under these reasons
        for state in ("MASTER", "BACKUP"):
            for instance, want in expected_states[host].items():
                assert metric(after, "lbd_vrrp_state", instance=instance, state=state) == (
                    1.0 if want == state else 0.0)
    # lbb still follows lba, not the forger.
    assert b.ctl("vrrp")["front"]["master"] == LB_FRONT["lba"]


def test_an_unbroken_forged_advert_is_obeyed(env: LabEnv, pair: tuple[Lbd, Lbd]) -> None:
    """Positive control: the same forger, with nothing broken, takes the front instance from
    lba. So the drops above are lbd's checks at work, not packets lost on the way."""
    a, _ = pair
    before = transitions(scrape(env, "lba"))["front"]
    sent = forge(env, count=3, kinds="valid", rate=10)
    assert sent == {"valid": 3}
    wait_until(lambda: transitions(scrape(env, "lba"))["front"] > before, timeout=5,
               what="lba's front instance to leave MASTER for the forger's priority 255")
    assert "instance front: MASTER -> BACKUP (higher_priority)" in a.log_text()

