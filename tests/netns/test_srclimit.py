"""Per-source limits (issue 11, item 1): a client over its limit of open or new sessions has
its extra SYNs dropped and counted while another client is served; a spoofed SYN flood with
the default limits leaves real clients connecting.

A refused SYN is dropped, not answered (docs/architecture.md, "Per-source limits"), so a
refused connection is one that does not complete within its client's timeout. Rate bounds are
the token bucket's guarantee (at most the burst plus the refill over the time the client ran),
not a timing assertion.
"""

from __future__ import annotations

from typing import Any

from lab import configs
from lab.topology import VIP, wait_until
from tests.netns.harness import LabEnv
from tests.netns.helpers import Holder, drops, result, scrape, spawn_lab
from tests.netns.test_synflood import FLOOD_RATE, FLOOD_SECONDS, flood_then_load

URL = f"http://{VIP}/"
SERVER_NAMES = {"s1", "s2", "s3"}


def served(answer: Any) -> bool:
    return set(answer["answers"]) <= SERVER_NAMES


def test_a_client_at_its_concurrent_limit_is_refused_while_another_is_served(
        env: LabEnv) -> None:
    env.start_servers()
    lbd = env.lbd(configs.single(web_extra="max_conns_per_source = 4\n"
                                           "max_conn_rate_per_source = 0"))
    holder = Holder(env, "c1", 4)  # c1's four open connections to VIP:80
    assert holder.held == 4
    try:
        refused: Any = env.client("c1", "get", URL, "--timeout", "2.5")
        other: Any = env.client("c2", "get", URL, "--count", "20", "--timeout", "3")
        status = lbd.ctl("status")
        dropped = drops(scrape(env))
        print(f"refused {refused}, other {other}, status {status['source_limits']}, "
              f"drops {dropped}")
        assert refused["answers"][0].startswith("error"), refused  # no answer: timed out
        assert "reset" not in refused["answers"][0].lower(), refused  # dropped, not reset
        assert served(other) and len(other["answers"]) == 20, other
        assert dropped["source_conn_limit"] >= 1  # the SYN and its retransmissions
        assert dropped["source_rate_limit"] == 0
        assert status["source_limits"]["conn_limit_drops"] == dropped["source_conn_limit"]
        web = status["virtual_servers"]["web"]["source_limits"]
        assert web == {"max_conns_per_source": 4, "max_conn_rate_per_source": 0,
                       "conn_rate_period": 1.0}
    finally:
        holder.close()
    # The held connections closed: they no longer count, and c1 is served again.
    wait_until(lambda: served(env.client("c1", "get", URL, "--timeout", "2")), timeout=15,
               what="c1 to be served once its connections closed")


def test_a_client_over_its_rate_is_refused_while_another_is_served(env: LabEnv) -> None:
    env.start_servers()
    burst, period = 5, 60.0  # five new sessions a minute per source, all at once if it likes
    lbd = env.lbd(configs.single(web_extra=f"max_conns_per_source = 0\n"
                                           f"max_conn_rate_per_source = {burst}\n"
                                           f'conn_rate_period = "{period:g}s"'))
    # 20 new connections within a second from c1, each waiting at most 2.5 s.
    load = spawn_lab(env, "c1", "lab.client", "load", URL, "--rate", "20", "--duration", "1",
                     "--timeout", "2.5")
    got: Any = result(load, timeout=30)
    other: Any = env.client("c2", "get", URL, "--count", str(burst), "--timeout", "3")
    status = lbd.ctl("status")
    dropped = drops(scrape(env))
    print(f"load {got}, other {other}, status {status['source_limits']}, drops {dropped}")
    bound = burst + burst * got["seconds"] / period  # the bucket: burst + refill meanwhile
    assert burst <= got["ok"] <= bound, got
    assert not any("reset" in kind.lower() for kind in got["failed"]), got
    assert dropped["source_rate_limit"] >= got["attempts"] - got["ok"]  # each refused SYN
    assert dropped["source_conn_limit"] == 0
    assert served(other) and len(other["answers"]) == burst, other  # c2's own bucket
    assert status["source_limits"]["rate_limit_drops"] == dropped["source_rate_limit"]
    assert status["source_limits"]["tracked"] >= 2  # c1 and c2, each with its bucket


def test_a_spoofed_syn_flood_with_the_default_limits_leaves_real_clients_connecting(
        env: LabEnv) -> None:
    """The flood's sources are 141 addresses of the clients' /24 (.110-.250, not a lab
    client's): none of them goes beyond the defaults at this rate (about 110 SYN/s and 70
    half-open sessions each), so the limits refuse nothing and real clients connect as
    before; the tracker holds at most one entry per spoofed source, plus the real ones."""
    env.start_servers()
    lbd = env.lbd(configs.single(sessions="max_sessions = 20000\nmax_half_open = 10000"))
    flood, load = flood_then_load(env, lambda: lbd.ctl("status")["half_open_evicted"] > 0)
    during = lbd.ctl("status")
    got: Any = result(load)
    sent = result(flood)
    dropped = drops(scrape(env))
    after = lbd.ctl("status")
    print(f"flood {sent}, legit {got}, during {during['source_limits']}, "
          f"after {after['source_limits']}, drops {dropped}")
    assert sent["sent"] > FLOOD_RATE * (FLOOD_SECONDS - 2)
    assert got["ok"] >= 0.95 * got["attempts"], got
    assert not any("reset" in kind.lower() for kind in got["failed"]), got
    assert dropped["source_conn_limit"] == dropped["source_rate_limit"] == 0
    limits = during["source_limits"]
    assert 0 < limits["tracked"] <= 141 + 2 <= limits["capacity"]  # forged + c1, c2
    assert limits["untracked"] == 0
