"""Fixtures for namespace tests: a lab network per test, real servers, lbd as a process.

Every namespace a test creates carries a random prefix and is deleted when the test ends,
also on failure. These tests need root; elsewhere they are skipped with that reason (CI runs
as root, so there they run).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.topology import Lab, build
from tests.netns.harness import LabEnv


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("namespace tests need root (CI runs them as root)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (scripts/setup.sh installs it)")


@pytest.fixture
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LabEnv]:
    marker = request.node.get_closest_marker("topology")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    lab = Lab()
    try:
        build(lab, **kwargs)
        e = LabEnv(lab, tmp_path)
        yield e
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for lbd in e.lbds:
                print(f"--- {lbd.host} lbd log ---\n{lbd.log_text()}")
                for what in ("status", "sync"):  # counters say where packets went
                    try:
                        print(f"--- {lbd.host} lbctl {what} ---\n{lbd.ctl(what)}")
                    except Exception as exc:  # a dead lbd answers nothing
                        print(f"--- {lbd.host} lbctl {what}: {exc}")
    finally:
        lab.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
