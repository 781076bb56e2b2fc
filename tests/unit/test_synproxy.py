"""The nft script of lb.synproxy (pure): what it matches, and that it only removes when empty."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.metrics import syn_proxy_metrics
from lb.synproxy import ENGAGE, RELEASE, STATS, TABLE, AutoProxy, SynProxy, parse_stats, ruleset


def test_the_script_proxies_only_the_tcp_targets_on_the_client_interface() -> None:
    text = ruleset("eth0", [("198.51.100.11", 443), ("198.51.100.10", 80),
                            ("198.51.100.10", 80)])
    assert "elements = { 198.51.100.10 . 80, 198.51.100.11 . 443 }" in text
    assert text.count('iifname "eth0" ip daddr . tcp dport @targets') == 3
    assert "tcp flags syn notrack" in text
    assert "ct state invalid,untracked synproxy mss 1460 wscale 7 timestamp sack-perm" in text
    assert "ct state invalid drop" in text
    # Replaces the table in one transaction: created (if absent), deleted, created again.
    lines = text.splitlines()
    assert lines[:2] == [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}"]


def test_no_targets_only_removes_the_table() -> None:
    assert ruleset("eth0", []) == f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"


KERNEL_STATS = (
    "entries\t\tsyn_received\tcookie_invalid\tcookie_valid\tcookie_retrans\tconn_reopened\n"
    "00000000\t0000001a\t00000002\t00000010\t00000001\t00000000\n"
    "00000000\t00000100\t00000000\t00000003\t00000000\t00000004\n"
)


@pytest.mark.parametrize(("text", "expected"), [
    (KERNEL_STATS, {"syn_received": 0x11A, "cookie_valid": 0x13, "cookie_invalid": 2,
                    "cookie_retrans": 1, "conn_reopened": 4}),
    ("", dict.fromkeys(STATS, 0)),
    # A kernel that lists fewer columns: the missing ones are 0.
    ("entries\tsyn_received\n0\tff\n", {**dict.fromkeys(STATS, 0), "syn_received": 255}),
    # Rows that are not hex, or have the wrong width, are skipped, not half-counted.
    ("entries\tsyn_received\tcookie_valid\nzz\t10\t10\n0\t1\n0\t2\t3\n",
     {**dict.fromkeys(STATS, 0), "syn_received": 2, "cookie_valid": 3}),
])
def test_the_kernel_counters_are_summed_over_cpus(text: str, expected: dict[str, int]) -> None:
    assert parse_stats(text) == expected


def test_stats_only_while_loaded_and_only_from_a_readable_file(tmp_path: Path) -> None:
    stats_file = tmp_path / "synproxy"
    stats_file.write_text(KERNEL_STATS)
    proxy = SynProxy(str(stats_file))
    assert proxy.stats() is None  # not loaded: nothing to report
    proxy.loaded = True
    assert proxy.stats() == parse_stats(KERNEL_STATS)
    stats_file.unlink()
    assert proxy.stats() is None


def test_the_metrics_name_every_counter_and_say_whether_the_proxy_is_on() -> None:
    off = {m.name: m for m in syn_proxy_metrics(
        lambda: {"enabled": False, "engaged": False, "engagements": 0})()}
    assert list(off) == ["lbd_syn_proxy_enabled", "lbd_syn_proxy_engaged",
                         "lbd_syn_proxy_engagements"]
    assert off["lbd_syn_proxy_enabled"].samples[0].value == 0
    on = {m.name: m for m in syn_proxy_metrics(
        lambda: {"enabled": True, "engaged": True, "engagements": 2,
                 **parse_stats(KERNEL_STATS)})()}
    assert on["lbd_syn_proxy_enabled"].samples[0].value == 1
    assert on["lbd_syn_proxy_engaged"].samples[0].value == 1
    assert on["lbd_syn_proxy_engagements"].samples[0].value == 2
    assert on["lbd_syn_proxy_syn_received"].samples[0].name == "lbd_syn_proxy_syn_received_total"
    assert on["lbd_syn_proxy_syn_received"].samples[0].value == 0x11A
    assert {f"lbd_syn_proxy_{n}" for n in STATS} <= set(on)


def test_armed_the_table_keeps_only_the_synproxy_rule() -> None:
    """Armed ("auto", not engaged): no SYN is untracked, nothing is dropped, but the rule is
    there, so conntrack tracks every flow and the proxy's hooks stay registered."""
    text = ruleset("eth0", [("198.51.100.10", 80)], engaged=False)
    assert "notrack" not in text and "drop" not in text
    assert "ct state invalid,untracked synproxy mss 1460" in text
    assert "raw_prerouting" not in text


def stats(syn: int, valid: int) -> dict[str, int]:
    return {**dict.fromkeys(STATS, 0), "syn_received": syn, "cookie_valid": valid}


# (now, lbd's half-open sessions, kernel's syn_received, cookie_valid) -> action
AUTO_SCRIPT: list[tuple[float, int, int, int, str | None]] = [
    (0.0, 10, 0, 0, None),            # calm
    (1.0, 999, 0, 0, None),           # just below the threshold
    (2.0, 1000, 0, 0, ENGAGE),        # a flood lbd sees
    (3.0, 0, 50_000, 40, None),       # the kernel answers it: lbd sees nothing now
    (4.0, 0, 100_000, 80, None),      # still 50k unanswered SYN/s: stays engaged
    (5.0, 0, 100_100, 180, None),     # calm from here: 0 unanswered/s (100 SYNs, 100 ACKs)
    (10.0, 0, 100_200, 280, None),    # calm for 5 s of a 10 s hold
    (14.9, 0, 104_000, 300, None),    # 3,780 unanswered over 4.9 s: 771/s, calm still
    (15.0, 0, 104_000, 300, RELEASE),  # calm for the hold
    (16.0, 1000, 104_000, 300, ENGAGE),  # and again
]


def test_auto_engages_on_lbds_half_open_count_and_releases_on_the_kernels_calm() -> None:
    auto = AutoProxy(half_open=1000, hold=10.0)
    for now, half_open, syn, valid, expected in AUTO_SCRIPT:
        assert auto.tick(now, half_open, stats(syn, valid)) == expected, now
    assert auto.engaged and auto.engagements == 2


def test_auto_the_leftovers_of_a_flood_do_not_engage_it_again() -> None:
    """After a release lbd's table still holds the half-open sessions the flood made before
    the proxy engaged (until their SYN timeout): only half-open sessions still coming
    engage, more than at the last look or evictions for new ones."""
    auto = AutoProxy(half_open=100, hold=1.0)
    assert auto.tick(0.0, 5000, stats(0, 0)) == ENGAGE
    assert auto.tick(1.0, 5000, stats(0, 0)) is None
    assert auto.tick(2.0, 5000, stats(0, 0)) == RELEASE
    assert auto.tick(3.0, 5000, stats(0, 0)) is None   # the same leftovers
    assert auto.tick(4.0, 4000, stats(0, 0)) is None   # expiring
    assert auto.tick(5.0, 4000, stats(0, 0), evicted=7) == ENGAGE  # a table at its cap
    assert auto.engagements == 2


def test_auto_a_burst_restarts_the_calm_and_unreadable_counters_never_release() -> None:
    auto = AutoProxy(half_open=100, hold=2.0)
    assert auto.tick(0.0, 100, stats(0, 0)) == ENGAGE
    assert auto.tick(1.0, 0, stats(10, 10)) is None     # calm from 1.0
    assert auto.tick(2.0, 0, stats(500, 10)) is None    # 490 unanswered/s: not calm
    assert auto.tick(3.0, 0, stats(500, 10)) is None    # calm from 3.0
    assert auto.tick(4.0, 0, None) is None              # no counters: no decision
    assert auto.tick(4.5, 0, stats(500, 10)) is None
    assert auto.tick(5.0, 0, stats(500, 10)) is None    # 3.0 + 2.0 but the gap reset it
    assert auto.tick(6.0, 0, stats(500, 10)) is None
    assert auto.tick(7.0, 0, stats(500, 10)) == RELEASE


def test_undo_returns_to_the_state_before_a_failed_action() -> None:
    auto = AutoProxy(half_open=1, hold=1.0)
    assert auto.tick(0.0, 5, None) == ENGAGE
    auto.undo()
    assert not auto.engaged
    assert auto.tick(1.0, 5, None) == ENGAGE  # tried again on the next tick
