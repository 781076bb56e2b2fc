"""Health checks end to end: real servers go in and out of rotation on their own.

Issue 3's namespace tests. Real servers (lab.realserver) are stopped, made to answer 503 or
slowly through their state files, or cut off the network; the real lbd checks them and the
tests watch what ``lbctl --json servers``, the metrics and real clients see. Checks run every
200 ms (rise 2, fall 2), so a server changes state in about a second; every wait has a
generous deadline and asserts on state, never on time.
"""

from __future__ import annotations

import stat
from collections import Counter
from typing import Any

from lab import configs
from lab.topology import SERVERS, VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import Holder, Samples, drops, metric, scrape

URL = f"http://{VIP}/"
WAIT = 15.0  # deadline for a state change that takes about a second


def check(kind: str = "http", *, interval: str = "200ms", timeout: str = "500ms",
          extra: str = "") -> str:
    """The ``health_check`` line of ``[pools.web]``: rise 2, fall 2."""
    keys = f'type = "{kind}", interval = "{interval}", timeout = "{timeout}", rise = 2, fall = 2'
    return f"health_check = {{ {keys}{extra} }}"


HTTP = check(extra=', path = "/"')


def key(name: str) -> str:
    return f"{SERVERS[name]}:8080"


def web_servers(lbd: Lbd) -> dict[str, dict[str, Any]]:
    """``lbctl --json servers`` of pool web, by server name (s1, s2, s3)."""
    names = {key(n): n for n in SERVERS}
    return {names[s["server"]]: s for s in lbd.ctl("servers") if s["pool"] == "web"}


def wait_state(lbd: Lbd, name: str, state: str) -> dict[str, Any]:
    """Wait until server ``name`` of pool web is in ``state`` (UP/DOWN); return its entry."""

    def reached() -> dict[str, Any]:
        entry = web_servers(lbd)[name]
        return entry if entry["state"] == state else {}

    return wait_until(reached, timeout=WAIT, what=f"{name} to be {state}")


def wait_checked(lbd: Lbd) -> None:
    """Wait until every server of pool web has passed a check (servers start UP unchecked)."""
    wait_until(lambda: all(s["reason"] == "ok" and s["up"] for s in web_servers(lbd).values()),
               timeout=WAIT, what="a passed check of every web server")


def answers(env: LabEnv, host: str, count: int) -> Counter[str]:
    return Counter(env.client(host, "get", URL, "--count", str(count), "--timeout", "3")
                   ["answers"])


def start(env: LabEnv, health: str = HTTP, **kwargs: Any) -> Lbd:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr", health=health, **kwargs))
    wait_checked(lbd)
    return lbd


def stop_server(env: LabEnv, name: str) -> None:
    env.lab.stop(env.servers[name])


# ---- HTTP checks ----------------------------------------------------------------------------


def test_stopped_server_leaves_rotation_and_returns(env: LabEnv) -> None:
    lbd = start(env)
    stop_server(env, "s2")
    entry = wait_state(lbd, "s2", "DOWN")
    assert entry["up"] is False
    assert entry["reason"] == "connection refused"
    created = entry["sessions_created"]
    got = answers(env, "c1", 12)
    assert set(got) == {"s1", "s3"} and sum(got.values()) == 12, got
    assert web_servers(lbd)["s2"]["sessions_created"] == created  # not one was sent to s2
    assert f"server {key('s2')} of pool web is DOWN: connection refused" in lbd.log_text()

    env.start_server("s2")
    entry = wait_state(lbd, "s2", "UP")
    assert entry["up"] is True and entry["reason"] == "ok"
    assert answers(env, "c1", 12) == {"s1": 4, "s2": 4, "s3": 4}


def test_http_503_takes_server_down(env: LabEnv) -> None:
    lbd = start(env)
    (env.tmp / "s2.status").write_text("503")
    entry = wait_state(lbd, "s2", "DOWN")
    assert entry["reason"] == "status 503"
    assert "s2" not in answers(env, "c1", 6)
    (env.tmp / "s2.status").unlink()
    wait_state(lbd, "s2", "UP")


def test_server_slower_than_timeout_goes_down(env: LabEnv) -> None:
    lbd = start(env, check(interval="200ms", timeout="300ms"))
    (env.tmp / "s2.delay").write_text("1")
    entry = wait_state(lbd, "s2", "DOWN")
    assert entry["reason"] == "timeout after 300ms"
    (env.tmp / "s2.delay").unlink()
    wait_state(lbd, "s2", "UP")


# ---- backup servers -------------------------------------------------------------------------


BACKUP_POOL = f"""[
  {{ address = "{SERVERS['s1']}", port = 8080 }},
  {{ address = "{SERVERS['s2']}", port = 8080 }},
  {{ address = "{SERVERS['s3']}", port = 8080, backup = true }},
]"""


def test_backup_serves_only_while_no_primary_is_up(env: LabEnv) -> None:
    """c1 is pinned by persistence: to a primary, then to the backup s3 while both primaries
    are down, then back to the first primary that returns. c2 arrives only then."""
    lbd = start(env, web_servers=BACKUP_POOL, persistence="client-ip")
    assert web_servers(lbd)["s3"]["backup"] is True
    first = answers(env, "c1", 4)
    assert len(first) == 1 and "s3" not in first, first

    for name in ("s1", "s2"):
        (env.tmp / f"{name}.status").write_text("503")
    for name in ("s1", "s2"):
        wait_state(lbd, name, "DOWN")
    assert answers(env, "c1", 4) == {"s3": 4}
    on_backup = web_servers(lbd)["s3"]["sessions_created"]

    (env.tmp / "s1.status").unlink()
    wait_state(lbd, "s1", "UP")
    assert answers(env, "c1", 4) == {"s1": 4}  # rebound off the backup
    assert answers(env, "c2", 4) == {"s1": 4}  # a new client goes to the primary
    assert web_servers(lbd)["s3"]["sessions_created"] == on_backup


# ---- what happens to sessions of a server that goes down -----------------------------------


def held_on(lbd: Lbd, holder: Holder, name: str) -> int:
    """Index in ``holder`` of the connection whose session points at server ``name``."""
    ports = {int(s["client"].rsplit(":", 1)[1]): s["server"] for s in lbd.ctl("sessions")
             if s["protocol"] == "tcp"}
    return [ports[p] for p in holder.ports].index(key(name))


def test_reset_on_server_down_resets_its_held_connection(env: LabEnv) -> None:
    lbd = start(env, pool_extra='on_server_down = "reset"')
    holder = Holder(env, "c1", 3)  # rr: one connection on each server
    try:
        i = held_on(lbd, holder, "s2")
        (env.tmp / "s2.status").write_text("503")  # s2 and its end of the connection live on
        entry = wait_state(lbd, "s2", "DOWN")
        assert entry["active_sessions"] == 0
        results = holder.send()
        assert results[i] == "reset", results
        assert [r for j, r in enumerate(results) if j != i] == ["data", "data"], results
        assert drops(scrape(env)).get("no_session", 0) >= 1
    finally:
        holder.close()


def test_keep_on_server_down_keeps_its_held_connection(env: LabEnv) -> None:
    lbd = start(env)  # on_server_down defaults to "keep"
    holder = Holder(env, "c1", 3)
    try:
        held_on(lbd, holder, "s2")
        (env.tmp / "s2.status").write_text("503")
        entry = wait_state(lbd, "s2", "DOWN")
        assert entry["active_sessions"] == 1
        assert holder.send() == ["data", "data", "data"]
    finally:
        holder.close()


# ---- other check types ----------------------------------------------------------------------


def test_script_check(env: LabEnv) -> None:
    script = env.tmp / "check.sh"
    script.write_text(f'#!/bin/sh\ntest -e "{env.tmp}/up-$LBD_SERVER_ADDRESS"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    for addr in SERVERS.values():
        (env.tmp / f"up-{addr}").touch()
    lbd = start(env, check("script", timeout="2s", extra=f', command = "{script}"'))
    (env.tmp / f"up-{SERVERS['s2']}").unlink()
    assert wait_state(lbd, "s2", "DOWN")["reason"] == "exit 1"
    assert web_servers(lbd)["s1"]["up"] and web_servers(lbd)["s3"]["up"]
    (env.tmp / f"up-{SERVERS['s2']}").touch()
    wait_state(lbd, "s2", "UP")


def test_udp_check(env: LabEnv) -> None:
    """The real servers echo ``NAME:ping`` on 5353; a stopped one answers port unreachable
    (or, when the kernel rate-limits its ICMP errors, nothing)."""
    lbd = start(env, check("udp", extra=', port = 5353, payload = "ping", expect = "s"'))
    stop_server(env, "s2")
    entry = wait_state(lbd, "s2", "DOWN")
    assert entry["reason"] in ("port unreachable", "no reply"), entry
    env.start_server("s2")
    wait_state(lbd, "s2", "UP")


def test_icmp_check(env: LabEnv) -> None:
    """s2 is cut off at its bridge port: its echo replies stop (and ARP for it fails)."""
    lbd = start(env, check("icmp"))
    env.lab.link_state("s2", "back", up=False)
    entry = wait_state(lbd, "s2", "DOWN")
    assert entry["reason"] in ("no reply", "host unreachable"), entry
    env.lab.link_state("s2", "back", up=True)
    wait_state(lbd, "s2", "UP")


# ---- no server at all -----------------------------------------------------------------------


def test_no_usable_server_refuses_with_rst(env: LabEnv) -> None:
    lbd = start(env)
    for name in SERVERS:
        (env.tmp / f"{name}.status").write_text("503")
    for name in SERVERS:
        wait_state(lbd, name, "DOWN")
    before = scrape(env)
    r = env.client("c1", "get", URL, "--timeout", "3")
    assert "Connection refused" in r["answers"][0], r  # a RST, not a timeout
    after = scrape(env)
    assert drops(after).get("no_server", 0) >= drops(before).get("no_server", 0) + 1
    assert metric(after, "lbd_resets_sent_total") >= metric(before, "lbd_resets_sent_total") + 1


# ---- metrics --------------------------------------------------------------------------------


def test_health_metrics(env: LabEnv) -> None:
    lbd = start(env)
    stop_server(env, "s2")
    wait_state(lbd, "s2", "DOWN")
    samples = scrape(env)
    for name, up in (("s1", 1), ("s2", 0), ("s3", 1)):
        assert metric(samples, "lbd_server_up", pool="web", server=key(name)) == up, name
    assert metric(samples, "lbd_health_check_duration_seconds_count") > 0
    assert metric(samples, "lbd_health_check_duration_seconds_bucket", le="+Inf") == \
        metric(samples, "lbd_health_check_duration_seconds_count")
    assert metric(samples, "lbd_health_check_failures_total", pool="web", server=key("s2"),
                  reason="connection refused") >= 2
    assert metric(samples, "lbd_health_checks_total", pool="web", server=key("s1"),
                  result="ok") >= 1
    assert metric(samples, "lbd_server_transitions_total", pool="web", server=key("s2"),
                  to="DOWN") == 1

    env.start_server("s2")
    wait_state(lbd, "s2", "UP")
    samples = scrape(env)
    assert metric(samples, "lbd_server_up", pool="web", server=key("s2")) == 1
    assert metric(samples, "lbd_server_transitions_total", pool="web", server=key("s2"),
                  to="UP") == 1


def checks_of(samples: Samples, name: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == "lbd_health_checks_total" and ("server", key(name)) in labels)


def test_reload_keeps_health_state_and_counters(env: LabEnv) -> None:
    """A reload replaces the health monitor: a DOWN server stays DOWN without flapping, and
    the probe counters go on from where they were."""
    lbd = start(env)
    stop_server(env, "s2")
    wait_state(lbd, "s2", "DOWN")
    before = scrape(env)
    lbd.ctl("reload")
    wait_until(lambda: checks_of(scrape(env), "s2") >= checks_of(before, "s2") + 2,
               timeout=WAIT, what="two more checks of s2 after the reload")
    after = scrape(env)
    assert metric(after, "lbd_config_reloads_total") == 1
    for (name, labels), value in before.items():
        if name in ("lbd_health_checks_total", "lbd_health_check_failures_total"):
            assert metric(after, name, **dict(labels)) >= value, (name, labels)
    assert metric(after, "lbd_server_up", pool="web", server=key("s2")) == 0
    assert metric(after, "lbd_server_transitions_total", pool="web", server=key("s2"),
                  to="DOWN") == 1
    assert metric(after, "lbd_server_transitions_total", pool="web", server=key("s2"),
                  to="UP") == 0
