"""The NAT data plane end to end: real clients, one lbd, three real servers.

Issue 2's namespace tests: scheduling spread, least-connection, persistence, UDP, port
mapping, a byte-identical 100 MB download, expiry, a full table, ICMP, RST for unknown ports
and 1,000 malformed packets.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lab import configs
from lab.topology import VIP, wait_until
from tests.netns.harness import LabEnv
from tests.netns.helpers import Holder, drops, metric, scrape

URL = f"http://{VIP}/"


def answers(env: LabEnv, host: str, count: int) -> Counter[str]:
    return Counter(env.client(host, "get", URL, "--count", str(count))["answers"])


def test_rr_spreads_new_connections_exactly(env: LabEnv) -> None:
    env.start_servers()
    env.lbd(configs.single(scheduler="rr"))
    assert answers(env, "c1", 30) == {"s1": 10, "s2": 10, "s3": 10}


def test_port_mapping_vip80_to_8080(env: LabEnv) -> None:
    """The servers listen on 8080 only; clients reach them on VIP:80."""
    env.start_servers()
    env.lbd(configs.single(scheduler="rr"))
    assert " 0.0.0.0:80 " not in env.lab.sh("s1", "ss -ltnH")
    assert answers(env, "c1", 3) == {"s1": 1, "s2": 1, "s3": 1}
    sessions = env.lbds[0].ctl("sessions")
    assert {s["virtual"] for s in sessions} == {f"{VIP}:80"}
    assert {s["server"].split(":")[1] for s in sessions} == {"8080"}


def server_loads(env: LabEnv) -> dict[str, int]:
    return {s["server"]: s["active_sessions"] for s in env.lbds[0].ctl("servers")
            if s["pool"] == "web"}


def test_lc_prefers_least_loaded(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="lc"))
    lbd.ctl("disable", "web", "198.18.0.12:8080")
    lbd.ctl("disable", "web", "198.18.0.13:8080")
    holder = Holder(env, "c1", 3)  # all three land on s1, the only enabled server
    try:
        lbd.ctl("enable", "web", "198.18.0.12:8080")
        lbd.ctl("enable", "web", "198.18.0.13:8080")
        assert server_loads(env)["198.18.0.11:8080"] == 3
        # s1 carries 3 sessions: the next four go to the idle s2 and s3, two each.
        assert answers(env, "c2", 4) == {"s2": 2, "s3": 2}
    finally:
        holder.close()


def test_wlc_follows_weights_with_held_connections(env: LabEnv) -> None:
    env.start_servers()
    web = """[
  { address = "198.18.0.11", port = 8080, weight = 3 },
  { address = "198.18.0.12", port = 8080, weight = 1 },
  { address = "198.18.0.13", port = 8080, weight = 1 },
]"""
    env.lbd(configs.single(scheduler="wlc", web_servers=web))
    holder = Holder(env, "c1", 5)
    try:
        assert server_loads(env) == {"198.18.0.11:8080": 3, "198.18.0.12:8080": 1,
                                     "198.18.0.13:8080": 1}
    finally:
        holder.close()


def test_persistence_pins_client(env: LabEnv) -> None:
    env.start_servers()
    env.lbd(configs.single(scheduler="rr", persistence="client-ip"))
    first = answers(env, "c1", 20)
    second = answers(env, "c2", 20)
    assert len(first) == 1 and sum(first.values()) == 20
    assert len(second) == 1 and sum(second.values()) == 20
    # rr gave c1 the first server and c2 the next one: the bindings differ.
    assert first.keys() != second.keys()
    status = env.lbds[0].ctl("status")
    assert status["persistence"] == 2
    # A node without [vrrp] masters no VRRP instance: it says it is standalone instead.
    assert status["masters"] == [] and status["standalone"] is True


def test_persistence_netmask_24_pins_the_subnet(env: LabEnv) -> None:
    env.start_servers()
    env.lbd(configs.single(scheduler="rr", persistence="client-ip", netmask=24))
    first = answers(env, "c1", 10)
    second = answers(env, "c2", 10)
    assert len(first) == 1 and first == Counter({next(iter(first)): 10})
    assert second == Counter({next(iter(first)): 10})
    assert env.lbds[0].ctl("status")["persistence"] == 1


def test_udp_round_trip_replies_from_vip(env: LabEnv) -> None:
    env.start_servers()
    env.lbd(configs.single())
    r = env.client("c1", "udp", VIP, "53", "--count", "6")
    replies = r["answers"]
    assert all(a.get("from") == f"{VIP}:53" for a in replies), replies
    names = Counter(a["reply"].split(":")[0] for a in replies)
    assert names == {"s1": 2, "s2": 2, "s3": 2}
    assert all(a["reply"].endswith(f"ping{i}") for i, a in enumerate(replies))


def test_icmp_port_unreachable_translated_back(env: LabEnv) -> None:
    """A server's ICMP error about a session reaches the client as if from the VIP, so the
    client's connected UDP socket sees 'connection refused'."""
    env.start_servers()
    env.lbd(configs.single(udp_port=5454))  # nothing listens on 5454
    r = env.client("c1", "udp", VIP, "53", "--count", "2", "--timeout", "2")
    assert [a.get("error") for a in r["answers"]] == ["ConnectionRefusedError"] * 2


def test_ping_vip_and_rst_for_unknown_port(env: LabEnv) -> None:
    env.start_servers()
    env.lbd(configs.single())
    out = env.lab.sh("c1", f"ping -c 3 -i 0.2 -W 2 {VIP}")
    assert "3 received" in out
    r = env.client("c1", "get", f"http://{VIP}:81/", "--timeout", "3")
    assert "Connection refused" in r["answers"][0]  # a RST, not a timeout
    samples = scrape(env)
    assert drops(samples).get("no_service", 0) >= 1
    assert metric(samples, "lbd_resets_sent_total") >= 1
    assert metric(samples, "lbd_icmp_echo_replies_total") >= 3


@pytest.mark.topology(offload_off=[("lba", "eth0"), ("lba", "eth1")])
def test_100mb_download_is_byte_identical(env: LabEnv) -> None:
    """Transmit checksum offload is off on the LB's veths, so the kernel finishes our partial
    checksums in software and the receivers verify every segment: a wrong incremental update
    would show up as loss and stall, or as corrupted bytes."""
    big = env.tmp / "big.bin"
    digest = hashlib.sha256()
    with big.open("wb") as f:
        for i in range(100):
            chunk = hashlib.sha256(str(i).encode()).digest() * (1 << 15)  # 1 MiB
            digest.update(chunk)
            f.write(chunk)
    env.start_servers()
    env.lbd(configs.single())
    r = env.client("c1", "download", f"http://{VIP}/file/big.bin", "--timeout", "30",
                   timeout=300)
    assert r["bytes"] == 100 * (1 << 20)
    assert r["sha256"] == digest.hexdigest()


def test_sessions_expire(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(sessions='udp_timeout = "1s"\nexpiry_tick = "100ms"'))
    env.client("c1", "udp", VIP, "53")
    assert [s["protocol"] for s in lbd.ctl("sessions")] == ["udp"]
    wait_until(lambda: lbd.ctl("sessions") == [], timeout=10, what="the UDP session to expire")
    assert metric(scrape(env), "lbd_sessions_expired_total") == 1


def test_full_table_drops_new_flows_keeps_existing(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(sessions="max_sessions = 3"))
    holder = Holder(env, "c1", 3)
    try:
        r = env.client("c2", "get", URL, "--timeout", "1")
        assert r["answers"][0].startswith("error"), r
        assert drops(scrape(env)).get("table_full", 0) >= 1
        assert holder.send() == ["data", "data", "data"]
        assert len(lbd.ctl("sessions")) == 3
    finally:
        holder.close()


def test_malformed_packets_dropped_and_counted(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single())
    env.lab.sh("c1", f"ping -c 1 -W 2 {VIP}")  # resolve the VIP's MAC
    sent = env.python("c1", "lab.malformed", VIP, "--count", "1000")["sent"]
    assert sum(sent.values()) == 1000
    seen_by_lbd = sum(n for kind, n in sent.items() if not kind.startswith("ip_"))

    def counted() -> bool:
        d = drops(scrape(env))
        return sum(d.get(r, 0.0) for r in ("truncated", "bad_l4", "fragment", "bad_length",
                                         "bad_ihl")) >= float(seen_by_lbd)

    wait_until(counted, timeout=10, what="lbd to count the malformed packets")
    assert lbd.proc is not None and lbd.proc.poll() is None
    assert metric(scrape(env), "lbd_drops_total", reason="exception") == 0
    assert answers(env, "c1", 3) == {"s1": 1, "s2": 1, "s3": 1}


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(configs.single().replace("@SOCKET@", str(tmp_path / "s.sock")))
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('scheduler = "rr"', 'scheduler = "fastest"', 1))
    lbd = str(Path(sys.executable).parent / "lbd")
    # The file alone: this runs in the root namespace, which has not the lab's eth0/eth1
    # (the host checks of `lbd --check` are tested in tests/unit/test_hostcheck.py).
    only = ["--check", "--config-only", "--config"]
    assert subprocess.run([lbd, *only, str(good)], check=False).returncode == 0
    proc = subprocess.run([lbd, *only, str(bad)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 1
    assert "virtual_servers.web.scheduler" in proc.stderr and str(bad) in proc.stderr


def test_path_mtu_discovery_through_the_balancer(env: LabEnv) -> None:
    """The client side of the LB has a smaller MTU than the servers know about. The LB's
    kernel answers the server's too-big replies with 'fragmentation needed' addressed to the
    VIP; lbd translates it back to the real server, which lowers its path MTU, and the
    download completes instead of stalling in a PMTU black hole."""
    data = hashlib.sha256(b"pmtu").digest() * (1 << 15)  # 1 MiB
    (env.tmp / "pmtu.bin").write_bytes(data)
    env.lab.sh("lba", "ip link set eth0 mtu 1280")
    env.start_servers()
    env.lbd(configs.single())
    r = env.client("c1", "download", f"http://{VIP}/file/pmtu.bin", "--timeout", "10",
                   timeout=60)
    assert r["sha256"] == hashlib.sha256(data).hexdigest()
    assert drops(scrape(env)).get("icmp_no_session", 0) == 0
    routes = " ".join(env.lab.sh(s, "ip route show cache") for s in ("s1", "s2", "s3"))
    assert "mtu 1280" in routes
