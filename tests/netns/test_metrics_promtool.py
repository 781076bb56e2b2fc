"""lbd's /metrics, scraped from a running daemon after real traffic, passes Prometheus's own
linter (``promtool check metrics``) and carries the families the contract names.

promtool comes from the Debian package ``prometheus`` (scripts/setup.sh installs it). When the
package exists but promtool is missing the test fails, so that a machine without it is noticed;
only where apt has no such package is the test skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import configs
from lab.topology import SERVERS, VIP, wait_until
from tests.netns.harness import LabEnv, Lbd

URL = f"http://{VIP}/"
HEALTH = ('health_check = { type = "http", path = "/", interval = "200ms", timeout = "500ms", '
          "rise = 1, fall = 2 }")


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    try:
        policy = subprocess.run(["apt-cache", "policy", "prometheus"], capture_output=True,
                                text=True, timeout=60, check=False).stdout
    except OSError:
        policy = ""
    m = re.search(r"Candidate:\s*(\S+)", policy)
    if m and m.group(1) != "(none)":
        pytest.fail("promtool is missing: install the Debian package 'prometheus' "
                    "(scripts/setup.sh installs it)")
    pytest.skip("promtool is unavailable and apt has no 'prometheus' package")


def raw_metrics(env: LabEnv, host: str = "lba") -> str:
    text: str = env.client(host, "get", "http://127.0.0.1:9641/metrics")["answers"][0]
    return text + "\n"  # the lab client strips the body


def lint(tool: str, text: str, where: Path) -> None:
    where.write_text(text)
    with where.open("rb") as f:
        proc = subprocess.run([tool, "check", "metrics"], stdin=f, capture_output=True,
                              timeout=60, check=False)
    report = (proc.stdout + proc.stderr).decode().strip()
    assert proc.returncode == 0 and not report, \
        f"promtool check metrics ({proc.returncode}) on {where}:\n{report}"


def families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def push_traffic(env: LabEnv) -> None:
    """A few GETs, a UDP round trip, a ping, and a connection to a port without service."""
    got = env.client("c1", "get", URL, "--count", "3", "--timeout", "3")["answers"]
    assert sorted(got) == ["s1", "s2", "s3"], got
    udp = env.client("c1", "udp", VIP, "53", "--count", "2", "--timeout", "3")["answers"]
    assert all(a.get("from") == f"{VIP}:53" for a in udp), udp
    assert "1 received" in env.lab.sh("c1", f"ping -c 1 -W 2 {VIP}")
    refused = env.client("c1", "get", f"http://{VIP}:81/", "--timeout", "3")["answers"]
    assert "Connection refused" in refused[0], refused


def wait_checked(lbd: Lbd) -> None:
    wait_until(lambda: all(s["reason"] == "ok" for s in lbd.ctl("servers")
                           if s["pool"] == "web"),
               timeout=15, what="a passed health check of every web server")


def assert_contract_families(fams: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> None:
    assert all(name.startswith("lbd_") for name in fams), sorted(fams)
    active = fams["lbd_sessions_active"]
    assert {dict(lbl)["virtual_server"] for lbl in active} == {"web", "dns"}
    created = fams["lbd_server_sessions_created_total"]
    for name, addr in SERVERS.items():
        assert created[(("pool", "web"), ("server", f"{addr}:8080"))] >= 1, name
        assert fams["lbd_server_up"][(("pool", "web"), ("server", f"{addr}:8080"))] == 1
    packets = fams["lbd_packets_forwarded_total"]
    assert packets[(("direction", "in"),)] > 0 and packets[(("direction", "out"),)] > 0
    octets = fams["lbd_bytes_forwarded_total"]
    assert octets[(("direction", "in"),)] > 0 and octets[(("direction", "out"),)] > 0
    assert fams["lbd_drops_total"][(("reason", "no_service"),)] >= 1
    assert fams["lbd_drops_total"][(("reason", "exception"),)] == 0
    assert fams["lbd_resets_sent_total"][()] >= 1
    assert fams["lbd_icmp_echo_replies_total"][()] >= 1


def test_standalone_metrics_pass_promtool(env: LabEnv) -> None:
    tool = promtool()
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr", health=HEALTH))
    wait_checked(lbd)
    push_traffic(env)
    text = raw_metrics(env)
    lint(tool, text, env.tmp / "standalone.prom")
    fams = families(text)
    assert_contract_families(fams)
    assert fams["lbd_health_check_duration_seconds_count"][()] > 0


@pytest.mark.topology(pair=True)
def test_pair_master_metrics_pass_promtool(env: LabEnv) -> None:
    """A node of a pair adds the VRRP families; they must pass the linter too."""
    tool = promtool()
    env.start_servers()
    lbd = env.lbd(configs.pair("lba", priority=200), "lba")
    wait_until(lambda: {v["state"] for v in lbd.ctl("vrrp").values()} == {"MASTER"},
               timeout=10, what="lba to be MASTER")
    push_traffic(env)
    text = raw_metrics(env)
    lint(tool, text, env.tmp / "pair.prom")
    fams = families(text)
    assert_contract_families(fams)
    state = fams["lbd_vrrp_state"]
    for instance in ("front", "back"):
        assert state[(("instance", instance), ("state", "MASTER"))] == 1


def query(env: LabEnv, expr: str) -> list[dict[str, object]]:
    from urllib.parse import quote
    body = env.client("lba", "get", f"http://127.0.0.1:9090/api/v1/query?query={quote(expr)}",
                      "--timeout", "3")["answers"][0]
    try:
        doc = json.loads(body)
    except ValueError:
        return []  # not up yet
    result: list[dict[str, object]] = doc.get("data", {}).get("result", [])
    return result


def test_a_real_prometheus_scrapes_lbd(env: LabEnv) -> None:
    """Debian's Prometheus, in lbd's namespace, scrapes it: ``up == 1`` and the families an
    operator graphs first (build info, process CPU/RSS, reload state) are there."""
    tool = promtool()
    prometheus = Path(tool).with_name("prometheus")
    assert prometheus.exists(), f"{prometheus} missing (the Debian package 'prometheus')"
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr", health=HEALTH))
    conf = env.tmp / "prometheus.yml"
    conf.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                    "scrape_configs:\n"
                    "  - job_name: lbd\n"
                    "    static_configs: [{targets: ['127.0.0.1:9641']}]\n")
    env.lab.spawn("lba", [str(prometheus), f"--config.file={conf}",
                          f"--storage.tsdb.path={env.tmp / 'tsdb'}",
                          "--web.listen-address=127.0.0.1:9090"],
                  log=str(env.tmp / "prometheus.log"))
    wait_until(lambda: [r["value"][1] for r in query(env, 'up{job="lbd"}')  # type: ignore[index]
                        ] == ["1"], timeout=30, what="Prometheus to scrape lbd with up == 1")
    for expr in ("lbd_build_info", "lbd_process_resident_memory_bytes",
                 "lbd_process_cpu_seconds_total", "lbd_config_last_reload_successful == 1",
                 'lbd_drops_total{reason="table_full"} == 0', "lbd_server_weight == 1",
                 "lbd_native_modules"):
        assert query(env, expr), expr
    assert "hot-path modules " in lbd.log_text()  # the one line that says which build runs
