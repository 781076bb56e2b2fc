"""The nft script of lb.synproxy (pure): what it matches, and that it only removes when empty."""

from __future__ import annotations

from lb.synproxy import TABLE, ruleset


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
