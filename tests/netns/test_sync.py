"""The scene: a client in the middle of a persistent session when the master dies.

Two lbd nodes with [sync]: the master streams sessions and persistence bindings to the
backup. After a SIGKILL of the master, the client's open TCP connection goes on through the
backup to the same real server, and its next connections are still pinned there. A restarted
master waits for the table before it preempts (gated takeover), so nothing breaks then either.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lab import configs
from lab.topology import CLIENTS, LB_SYNC, SERVERS, VIP, wait_until
from tests.netns.harness import LabEnv, Lbd
from tests.netns.helpers import Holder, cut_vrrp, metric, result, scrape, spawn_lab
from tests.netns.test_vrrp import states, wait_states

pytestmark = pytest.mark.topology(pair=True)
URL = f"http://{VIP}/"
NAME_OF = {f"{addr}:8080": name for name, addr in SERVERS.items()}


def synced_config(env: LabEnv, node: str, priority: int, sessions: str = "",
                  dataplane: tuple[str, ...] = ()) -> str:
    """One node of the synced pair; ``dataplane``: more ``[dataplane]`` keys."""
    key = env.tmp / "sync.key"
    if not key.exists():
        key.write_text("a shared secret for the lab pair\n")
    text = configs.pair(node, priority=priority, sync=True, sessions=sessions,
                        persistence="client-ip").replace("@KEYFILE@", str(key))
    return configs.with_dataplane(text, *dataplane) if dataplane else text


def start_synced_pair(env: LabEnv, sessions: str = "",
                      dataplane: tuple[str, ...] = ()) -> tuple[Lbd, Lbd]:
    env.start_servers()
    a = env.lbd(synced_config(env, "lba", 200, sessions, dataplane), "lba")
    wait_states(a, "MASTER")
    b = env.lbd(synced_config(env, "lbb", 100, sessions, dataplane), "lbb")
    wait_states(b, "BACKUP")
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["connected"], timeout=10,  # type: ignore[misc]
                   what=f"{lbd.host}'s sync connections")
    return a, b


def web_sessions(lbd: Lbd) -> set[tuple[str, str]]:
    return {(s["client"], s["server"]) for s in lbd.ctl("sessions")
            if s["virtual"].endswith(":80") and s["state"] == "ESTABLISHED"}


def answers(env: LabEnv, count: int) -> Counter[str]:
    got: Any = env.client("c1", "get", URL, "--count", str(count), "--timeout", "2")
    return Counter(got["answers"])


def test_client_mid_session_survives_master_death(env: LabEnv) -> None:
    a, b = start_synced_pair(env)
    holder = Holder(env, "c1", 1)  # the client's open connection, mid-session
    try:
        (client, server), = web_sessions(a)
        wait_until(lambda: (client, server) in web_sessions(b), timeout=5,
                   what="the session to reach the backup")
        # lba knows lbb applied it: nothing left unacknowledged.
        wait_until(lambda: a.ctl("sync")["unacked"] == 0, timeout=5,
                   what="lbb to acknowledge the session")
        assert answers(env, 3) == {NAME_OF[server]: 3}  # persistence pins c1 to that server
        a.stop(signal.SIGKILL)
        wait_states(b, "MASTER", timeout=5)
        # The same TCP connection goes on through lbb to the same server ...
        assert holder.send() == ["data"]
        # ... and the client's new connections are still pinned there.
        assert answers(env, 5) == {NAME_OF[server]: 5}
        assert b.ctl("sync")["records_received"] > 0
    finally:
        holder.close()


SHORT_TIMEOUTS = """tcp_established_timeout = "3s"
tcp_fin_timeout = "1s"
tcp_time_wait_timeout = "1s"
tcp_close_timeout = "1s"
"""


def client_sessions(lbd: Lbd, client: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = lbd.ctl("sessions", "--client", client)
    return found


def test_a_live_session_outlives_its_timeout_on_the_peer_and_an_ended_one_leaves(
        env: LabEnv) -> None:
    """Issue 8 item 3. With a 3 s established timeout, a stream that lives 25 s on the master
    (its own packets keep it there) stays on the backup for three timeouts and more although
    the master sends no per-packet records — the backup holds the master's copies while the
    master's stream is up — so a SIGKILL then still finds it. A flow that ends on the master
    disappears from the backup (the master's removal, not the backup's clock)."""
    a, b = start_synced_pair(env, sessions=SHORT_TIMEOUTS)
    c1, c2 = CLIENTS["c1"], CLIENTS["c2"]
    long = spawn_lab(env, "c1", "lab.client", "stream", f"{URL}stream/25", "--timeout", "3")
    short = spawn_lab(env, "c2", "lab.client", "stream", f"{URL}stream/1", "--timeout", "3")
    wait_until(lambda: len(client_sessions(b, c1)) == 1, timeout=5,
               what="the long stream's session on lbb")
    received = b.ctl("sync")["records_received"]
    assert result(short, timeout=10)["error"] == ""
    # The short stream ended on lba (FIN both ways, TIME_WAIT 1 s): its copy leaves lbb.
    wait_until(lambda: client_sessions(b, c2) == [] and client_sessions(a, c2) == [],
               timeout=10, what="the ended flow to leave both tables")
    # Three established timeouts and more with the long stream alive: present at every look.
    looks, end = 0, time.monotonic() + 10
    while time.monotonic() < end:
        assert len(client_sessions(b, c1)) == 1, "the live stream's copy expired on lbb"
        looks += 1
    # No per-packet records: the stream carries 50 lines/s (500+ segments in 10 s), while lbb
    # received a few records (the short flow's states and removal, no refresh of the live one).
    records = b.ctl("sync")["records_received"] - received
    assert records <= 12, f"{records} records for two flows: per-packet sync?"
    a.stop(signal.SIGKILL)
    got = result(long, timeout=20)
    assert got["error"] == "" and got["in_order"] and got["lines"] >= 25 * 25, got
    print(f"\nidle refresh: {looks} looks over 10 s, {records} records; stream {got}")


def test_restarted_master_waits_for_the_table_before_preempting(env: LabEnv) -> None:
    a, b = start_synced_pair(env)
    a.stop(signal.SIGKILL)
    wait_states(b, "MASTER", timeout=5)
    holder = Holder(env, "c1", 1)  # opened through lbb while lba is down
    try:
        (client, server), = web_sessions(b)
        a.start()
        wait_states(a, "MASTER", timeout=15)
        wait_states(b, "BACKUP", timeout=5)
        assert (client, server) in web_sessions(a)  # it had the table before it took over
        assert "snapshot from the peer applied" in a.log_text()
        assert holder.send() == ["data"]
        assert answers(env, 3) == {NAME_OF[server]: 3}
    finally:
        holder.close()


def test_forged_sync_frames_are_refused(env: LabEnv) -> None:
    """A node with the wrong key cannot feed the backup: its handshake is refused, counted."""
    a, b = start_synced_pair(env)
    a.stop(signal.SIGKILL)
    wrong = Path(env.tmp / "wrong.key")
    wrong.write_text("not the shared secret at all!\n")
    a.config.write_text(a.config.read_text().replace(str(env.tmp / "sync.key"), str(wrong)))
    a.start()
    wait_until(lambda: b.ctl("sync")["errors"].get("handshake_proof", 0) >= 1, timeout=10,
               what="lbb to refuse lba's handshake")
    assert "handshake proof does not match" in b.log_text()
    # lba keeps trying, ever more slowly, and each node logs the refusal once, not per try
    wait_until(lambda: a.ctl("sync")["retry_delay"] > 1, timeout=10, what="lba to back off")
    assert b.log_text().count("handshake proof does not match") <= 2  # once per direction
    assert states(b)["front"] in {"MASTER", "BACKUP"}
    assert b.proc is not None and b.proc.poll() is None


def test_split_brain_heals_and_the_backup_takes_the_masters_table(env: LabEnv) -> None:
    a, b = start_synced_pair(env)
    holder = Holder(env, "c1", 1)
    try:
        (client, server), = web_sessions(a)
        snapshots = b.ctl("sync")["snapshots_received"]
        connects = a.ctl("sync")["connects"]
        cut_vrrp(env, True)
        wait_states(b, "MASTER", timeout=5)  # both masters now; each ignores the other's stream
        cut_vrrp(env, False)
        wait_states(b, "BACKUP", timeout=5)
        # The demoted node asked for a fresh snapshot (a SnapshotRequest on the stream it
        # receives on, which stays up); its table is the master's again, and a failover now
        # keeps the client's connection.
        wait_until(lambda: b.ctl("sync")["snapshots_received"] > snapshots
                   and b.ctl("sync")["peer_snapshot_done"]
                   and (client, server) in web_sessions(b), timeout=10,
                   what="lbb to take lba's table again")
        assert b.ctl("sync")["snapshot_requests_sent"] >= 1
        assert a.ctl("sync")["snapshot_requests_received"] >= 1
        assert a.ctl("sync")["connects"] == connects  # asked for, not reconnected
        a.stop(signal.SIGKILL)
        wait_states(b, "MASTER", timeout=5)
        assert holder.send() == ["data"]
    finally:
        holder.close()


def test_a_replayed_connection_is_refused_and_installs_nothing(env: LabEnv) -> None:
    """Record a genuine connection to lba (right key, one record), replay its bytes: lba has
    seen its CHALLENGE's nonce, lbb never did but its own fresh nonce makes the recorded
    CONFIRM wrong. Both refuse before any frame, and the real pair is not disturbed."""
    a, b = start_synced_pair(env)
    recorded = env.tmp / "recorded.bin"
    b_connects = b.ctl("sync")["connects"]
    got = env.python("lbb", "tests.netns.sync_replay", "record", LB_SYNC["lba"], "7411",
                     "--key-file", str(env.tmp / "sync.key"), "--out", str(recorded))
    assert got["applied"] >= 1  # the genuine connection's record was applied ...
    # The recording connection, genuine, replaced lbb's real one on lba (the newest wins):
    # lbb reconnects once. Wait for that before counting what the replays disturb.
    wait_until(lambda: b.ctl("sync")["connects"] == b_connects + 1
               and a.ctl("sync")["connected"] and b.ctl("sync")["connected"],
               timeout=10, what="lbb to reconnect after the recording")
    before = a.ctl("sync")
    assert before["skipped"].get("unknown_service", 0) >= 1  # ... and changed no table
    sessions = len(a.ctl("sessions"))
    connects = (a.ctl("sync")["connects"], b.ctl("sync")["connects"])
    b_received = b.ctl("sync")["records_received"]

    got = env.python("lbb", "tests.netns.sync_replay", "replay", LB_SYNC["lba"], "7411",
                     "--file", str(recorded))
    assert got == {"answered": 0, "closed": True}
    wait_until(lambda: a.ctl("sync")["errors"].get("handshake_nonce_reused", 0) == 1,
               timeout=5, what="lba to refuse the replayed challenge")
    got = env.python("lba", "tests.netns.sync_replay", "replay", LB_SYNC["lbb"], "7411",
                     "--file", str(recorded))
    assert got == {"answered": 0, "closed": True}  # the CONFIRM came with it: no RESPONSE
    wait_until(lambda: b.ctl("sync")["errors"].get("handshake_proof", 0) == 1,
               timeout=5, what="lbb to refuse the replayed confirm")

    after = a.ctl("sync")
    # (records_received may grow: the recording connection, genuine, replaced the real peer's
    # inbound connection — the newest one wins — and the peer's reconnect sent its snapshot)
    assert after["skipped"] == before["skipped"]
    assert len(a.ctl("sessions")) == sessions
    assert b.ctl("sync")["records_received"] == b_received
    assert "a replayed connection" in a.log_text()
    assert (a.ctl("sync")["connects"], b.ctl("sync")["connects"]) == connects
    assert a.ctl("sync")["connected"] and b.ctl("sync")["connected"]


def test_a_config_mismatch_is_shown_and_logged_once(env: LabEnv) -> None:
    """lbb reloads with another scheduler for dns: allowed, but both nodes show it (lbctl sync,
    metric) and log it once; reloading back makes them match again."""
    a, b = start_synced_pair(env)
    assert a.ctl("sync")["peer_config_match"] is True
    assert metric(scrape(env, "lba"), "lbd_sync_peer_config_match") == 1
    same = b.config.read_text()
    block = 'protocol = "udp"\npool = "dns"\nscheduler = "rr"'
    assert block in same
    b.config.write_text(same.replace(block, block.replace('"rr"', '"wrr"')))
    b.ctl("reload")
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["peer_config_match"] is False,  # type: ignore[misc]
                   timeout=5, what=f"{lbd.host} to see the mismatch")
    assert metric(scrape(env, "lba"), "lbd_sync_peer_config_match") == 0
    assert a.ctl("sync")["connected"] and b.ctl("sync")["connected"]
    for lbd in (a, b):
        assert lbd.log_text().count("has other virtual servers or pools") == 1
    b.config.write_text(same)
    b.ctl("reload")
    for lbd in (a, b):
        wait_until(lambda lbd=lbd: lbd.ctl("sync")["peer_config_match"] is True,  # type: ignore[misc]
                   timeout=5, what=f"{lbd.host} to see the configs match again")
