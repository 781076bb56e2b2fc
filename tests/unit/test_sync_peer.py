"""The peer's config digest against ours: shown always, warned once when a mismatch starts."""

from __future__ import annotations

import pytest

from ha.sync_peer import PeerConfig

OURS, THEIRS = b"o" * 16, b"t" * 16


def test_no_match_before_the_peers_hello() -> None:
    assert PeerConfig(OURS).match is None


@pytest.mark.parametrize(("hellos", "match", "warnings"), [
    ([OURS], True, [False]),
    ([THEIRS], False, [True]),
    ([THEIRS, THEIRS, THEIRS], False, [True, False, False]),  # reconnects: logged once
    ([THEIRS, OURS, THEIRS], False, [True, False, True]),  # a new mismatch: logged again
])
def test_a_mismatch_is_warned_once_when_it_starts(hellos: list[bytes], match: bool,
                                                  warnings: list[bool]) -> None:
    peer = PeerConfig(OURS)
    assert [peer.hello(d) for d in hellos] == warnings
    assert peer.match is match


def test_a_reload_is_compared_with_the_peers_last_hello() -> None:
    peer = PeerConfig(OURS)
    assert not peer.reconfigured(THEIRS)  # no hello yet: nothing to compare with
    assert not peer.hello(THEIRS) and peer.match is True
    assert peer.reconfigured(OURS) and peer.match is False
    assert not peer.reconfigured(b"x" * 16)  # still a mismatch: no new warning
