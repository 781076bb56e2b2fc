"""``lbd --version`` and ``lbctl --version`` (DESIGN.md §4): one line, ``lbd `` and the version,
exit 0, even without the ``--config`` or command they otherwise require."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from lb import ctl, daemon
from lb.version import VERSION

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("main", [daemon.main, ctl.main], ids=["lbd", "lbctl"])
def test_version_prints_one_line_and_exits_0(main: Callable[[list[str]], int],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out == f"lbd {VERSION}\n"


def test_the_package_version_is_read_from_the_one_constant() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"]
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lb.version.VERSION"}
