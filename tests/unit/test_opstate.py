"""Tests of lb.opstate: the operator state's pure encoding and its atomic file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb import opstate
from lb.opstate import OperatorState, Record, StateError
from lb.servers import AdminState

KEYS = st.tuples(st.sampled_from(["web", "dns", "a.b"]),
                 st.builds(lambda a, p: f"198.18.0.{a}:{p}", st.integers(1, 254),
                           st.integers(1, 65535)))
RECORDS = st.one_of(
    st.just(Record(removed=True)),
    st.builds(Record, admin=st.sampled_from([None, *AdminState]),
              weight=st.one_of(st.none(), st.integers(0, opstate.MAX_WEIGHT))),
    st.builds(lambda w, b, a: Record(added=True, weight=w, backup=b, admin=a),
              st.integers(0, opstate.MAX_WEIGHT), st.booleans(),
              st.sampled_from([None, *AdminState])),
)


@given(st.dictionaries(KEYS, RECORDS, max_size=8), st.booleans())
def test_bytes_round_trip(records: dict[tuple[str, str], Record], demoted: bool) -> None:
    state = OperatorState(demoted=demoted)
    for (pool, server), rec in records.items():
        state.put(pool, server, rec)
    data = state.to_bytes()
    back = OperatorState.from_bytes(data)
    assert back == state and back.to_bytes() == data  # canonical


def test_shared_leaves_out_this_nodes_demotion() -> None:
    state = OperatorState(demoted=True)
    state.put("web", "198.18.0.11:8080", Record(weight=3))
    shared = state.shared()
    assert not shared.demoted and shared.records == state.records


BAD = [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000, "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"format": 2}', "format is 2"),
    (b'{"format": 1, "demoted": "yes"}', "demoted"),
    (b'{"format": 1, "pools": []}', "pools: not an object"),
    (b'{"format": 1, "pools": {"web": {"nope": {}}}}', "not ADDR:PORT"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:0": {}}}}', "port out of range"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"admin": "off"}}}}', "admin"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"weight": -1}}}}', "weight"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"weight": 1.5}}}}', "weight"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"weight": true}}}}', "weight"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"added": true}}}}', "needs its weight"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"backup": true}}}}', "only for an added"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"removed": true, "weight": 2}}}}',
     "nothing else"),
    (b'{"format": 1, "pools": {"web": {"1.2.3.4:80": {"colour": 1}}}}', "unknown keys"),
]


@pytest.mark.parametrize(("data", "problem"), BAD, ids=[p for _, p in BAD])
def test_bad_bytes_are_one_state_error(data: bytes, problem: str) -> None:
    with pytest.raises(StateError, match=problem):
        OperatorState.from_bytes(data)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_state_error(data: bytes) -> None:
    with contextlib.suppress(StateError):  # anything else fails the test
        OperatorState.from_bytes(data)


def test_save_is_atomic_and_load_reads_it_back(tmp_path: Path) -> None:
    state = OperatorState()
    state.put("web", "198.18.0.11:8080", Record(admin=AdminState.DRAIN))
    d = tmp_path / "state"  # created by save
    path = opstate.save(d, state)
    assert path == d / opstate.FILE_NAME
    assert [p.name for p in d.iterdir()] == [opstate.FILE_NAME]  # no temporary left
    assert json.loads(path.read_text())["pools"] == {
        "web": {"198.18.0.11:8080": {"admin": "drain"}}}
    assert opstate.load(d) == (state, None)


def test_no_file_is_a_fresh_start(tmp_path: Path) -> None:
    assert opstate.load(tmp_path) == (OperatorState(), None)


def test_a_corrupt_file_is_moved_aside_and_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / opstate.FILE_NAME).write_bytes(b'{"format": 1, "pools": {"web": 5}}')
    state, problem = opstate.load(tmp_path)
    assert state == OperatorState()
    assert problem is not None and "pools.web: not an object" in problem
    assert "moved aside" in problem
    assert not (tmp_path / opstate.FILE_NAME).exists()
    assert (tmp_path / (opstate.FILE_NAME + ".corrupt")).exists()


def test_the_later_operator_state_wins_and_both_nodes_agree_at_a_tie() -> None:
    ours = OperatorState(changed_at=1000)
    ours.update("web", "198.18.0.11:8080", admin=AdminState.DRAIN)
    theirs = OperatorState(changed_at=2000)
    theirs.update("web", "198.18.0.12:8080", weight=3)
    assert theirs.newer_than(ours) and not ours.newer_than(theirs)
    tie = OperatorState(dict(theirs.records), changed_at=1000)
    assert tie.newer_than(ours) != ours.newer_than(tie)  # exactly one of the two wins
    same = OperatorState(dict(ours.records), demoted=True, changed_at=1000)
    assert not same.newer_than(ours) and not ours.newer_than(same)  # demoted is not shared
    back = OperatorState.from_bytes(theirs.shared().to_bytes())
    assert back.changed_at == 2000 and back.records == theirs.records


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, 2**63])
def test_a_bad_changed_at_is_refused(bad: object) -> None:
    doc = OperatorState().to_dict()
    doc["changed_at"] = bad
    with pytest.raises(StateError, match="changed_at"):
        OperatorState.from_dict(doc)
