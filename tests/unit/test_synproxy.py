"""The nft script of lb.synproxy (pure): what it matches, and that it only removes when empty."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.metrics import syn_proxy_metrics
from lb.synproxy import STATS, TABLE, SynProxy, parse_stats, ruleset


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
    off = {m.name: m for m in syn_proxy_metrics(lambda: None)()}
    assert list(off) == ["lbd_syn_proxy_enabled"]
    assert off["lbd_syn_proxy_enabled"].samples[0].value == 0
    on = {m.name: m for m in syn_proxy_metrics(lambda: parse_stats(KERNEL_STATS))()}
    assert on["lbd_syn_proxy_enabled"].samples[0].value == 1
    assert on["lbd_syn_proxy_syn_received"].samples[0].name == "lbd_syn_proxy_syn_received_total"
    assert on["lbd_syn_proxy_syn_received"].samples[0].value == 0x11A
    assert {f"lbd_syn_proxy_{n}" for n in STATS} <= set(on)
