"""What lbd installs in the kernel, and that it takes it all away: at SIGTERM, and at the
start after a SIGKILL. Reload keeps sessions; a bad file is refused and the old one kept."""

from __future__ import annotations

import signal

from lab import configs
from lab.topology import VIP, wait_until
from tests.netns.harness import LabEnv
from tests.netns.helpers import Holder, metric, scrape


def plumbing(env: LabEnv, host: str = "lba") -> dict[str, str]:
    return {
        "rules": env.lab.sh(host, "ip rule show priority 4711"),
        "table": env.lab.sh(host, "ip route show table 4711"),
        "vip_route": env.lab.sh(host, f"ip route show {VIP}"),
        "proxy": env.lab.sh(host, "ip neigh show proxy"),
        "tun": (env.lab.sh(host, "ip -o link show").count("lbtun0") and "lbtun0") or "",
    }


SYSCTLS = ("net.ipv4.ip_forward", "net.ipv4.conf.all.send_redirects",
           "net.ipv4.tcp_early_demux", "net.ipv4.udp_early_demux")


def sysctls(env: LabEnv, host: str = "lba") -> list[str]:
    return env.lab.sh(host, "sysctl -n " + " ".join(SYSCTLS)).split()


def test_sigterm_removes_everything(env: LabEnv) -> None:
    env.start_servers()
    host_before = sysctls(env)
    lbd = env.lbd(configs.single())
    assert sysctls(env) == ["1", "0", "0", "0"]  # what lbd sets: each differs from the default
    assert host_before == ["0", "1", "1", "1"]
    p = plumbing(env)
    assert p["rules"].count("lookup 4711") == 3  # one reply rule per real server
    assert "dev lbtun0" in p["table"] and "dev lbtun0" in p["vip_route"]
    assert VIP in p["proxy"] and p["tun"]
    # The kernel's work for packets lbd writes back is spread over the CPUs (RPS on the TUN).
    rps = env.lab.sh("lba", "cat /sys/class/net/lbtun0/queues/rx-0/rps_cpus").strip()
    assert int(rps.replace(",", ""), 16) != 0
    assert lbd.stop() == 0
    assert all(not v.strip() for v in plumbing(env).values()), plumbing(env)
    assert sysctls(env) == host_before  # and the sysctls it changed are put back
    assert "sysctls restored" in lbd.log_text()


def test_restart_cleans_up_after_sigkill(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single())
    lbd.stop(signal.SIGKILL)
    left = plumbing(env)
    assert left["rules"] and left["proxy"]  # what a killed lbd leaves behind
    lbd.start()
    assert "removed" in lbd.log_text() and "leftover" in lbd.log_text()
    p = plumbing(env)
    assert p["rules"].count("lookup 4711") == 3 and p["proxy"].count(VIP) == 1
    assert set(env.client("c1", "get", f"http://{VIP}/", "--count", "3")["answers"]) == {
        "s1", "s2", "s3"}
    assert lbd.stop() == 0
    assert all(not v.strip() for v in plumbing(env).values())


def test_reload_keeps_sessions_and_refuses_bad_config(env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(scheduler="rr"))
    holder = Holder(env, "c1", 3)
    try:
        before = {(s["client"], s["server"]) for s in lbd.ctl("sessions")}
        assert len(before) == 3
        # A good change: s3 leaves the web pool. SIGHUP reloads without dropping anyone.
        text = lbd.config.read_text()
        lbd.config.write_text(text.replace(
            '  { address = "198.18.0.13", port = 8080 },\n', "", 1))
        lbd.kill(signal.SIGHUP)
        wait_until(lambda: metric(scrape(env), "lbd_config_reloads_total") == 1, timeout=10,
                   what="the reload")
        servers = {s["server"] for s in lbd.ctl("servers") if s["pool"] == "web"}
        assert servers == {"198.18.0.11:8080", "198.18.0.12:8080"}
        assert {(s["client"], s["server"]) for s in lbd.ctl("sessions")} == before
        assert holder.send() == ["data", "data", "data"]
        # A bad file is refused with file, key and problem; the old config stays in force.
        lbd.config.write_text(text.replace('scheduler = "rr"', 'scheduler = "best"', 1))
        answer = lbd.ctl("reload", check=False)
        assert answer is None
        wait_until(lambda: metric(scrape(env), "lbd_config_reload_failures_total") == 1,
                   timeout=10, what="the refused reload to be counted")
        assert "virtual_servers.web.scheduler" in lbd.log_text()
        names = env.client("c2", "get", f"http://{VIP}/", "--count", "4")["answers"]
        assert sorted(names) == ["s1", "s1", "s2", "s2"]
    finally:
        holder.close()
