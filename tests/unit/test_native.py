"""Compiled or pure (lb/native.py): the compiled hot-path modules run only when built from
exactly the source in the tree; anything else falls back to pure Python.

The rule is checked on made-up trees (a manifest, sources, empty stand-ins for the extension
files) and end to end on a copy of this checkout with its real build (``make native``): the
copy imports the compiled ``lb.forwarder``, and after one edit to ``lb/forwarder.py`` the
``.py``. ``make unit`` runs this whole directory twice, with ``LBD_NATIVE=require`` and
``LBD_NATIVE=pure``; the first test says which one this process is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import lb.forwarder
from lb import native
from lb.native import NATIVE_DIR, Status, check, ext_suffix

ROOT = Path(__file__).resolve().parents[2]


def test_this_process_runs_the_build_it_reports() -> None:
    status = native.status()
    running = "pure" if (lb.forwarder.__file__ or "").endswith(".py") else "compiled"
    assert running == status.build
    mode = os.environ.get(native.ENV, "auto")
    if mode == "require":
        assert status.build == "compiled"
        assert status.modules == tuple(json.loads(
            (ROOT / NATIVE_DIR / native.MANIFEST).read_text())["modules"])
    elif mode == "pure":
        assert status.build == "pure"


def make_tree(root: Path, modules: tuple[str, ...] = ("lb.fast",)) -> None:
    """A package ``lb`` with sources and a build of them, as build_native.py lays it out."""
    (root / "lb").mkdir()
    (root / "lb/__init__.py").write_text("")
    (root / "lb/fast.py").write_text("X = 1\n")
    (root / "lb/helper.py").write_text("Y = 2\n")
    out = root / NATIVE_DIR
    group = "lb._compiled__mypyc"
    for m in [*modules, group]:
        f = out / (native.module_file(m) + ext_suffix())
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    sources = {rel: native.digest(root / rel) for rel in ("lb/fast.py", "lb/helper.py")}
    (out / native.MANIFEST).write_text(json.dumps({
        "format": native.FORMAT, "ext_suffix": ext_suffix(), "modules": list(modules),
        "group": group, "sources": sources}))


def edit_manifest(root: Path, **changes: object) -> None:
    path = root / NATIVE_DIR / native.MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_build_of_exactly_this_source_is_used(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert check(tmp_path) == Status("compiled", ("lb.fast",), "")
    assert check(tmp_path, "require").build == "compiled"


@pytest.mark.parametrize(("spoil", "reason"), [
    (lambda r: (r / "lb/fast.py").write_text("X = 3\n"), "stale build: lb/fast.py changed"),
    (lambda r: (r / "lb/helper.py").write_text("Y = 3\n"),  # imported, not compiled
     "stale build: lb/helper.py changed"),
    (lambda r: (r / "lb/helper.py").unlink(), "stale build: lb/helper.py is gone"),
    (lambda r: edit_manifest(r, ext_suffix=".cpython-399-x.so"), "built for .cpython-399-x.so"),
    (lambda r: (r / NATIVE_DIR / ("lb/fast" + ext_suffix())).unlink(),
     "incomplete build: lb.fast missing"),
    (lambda r: edit_manifest(r, format=0), "not a format 1 manifest"),
    (lambda r: (r / NATIVE_DIR / native.MANIFEST).write_text("{"), "unreadable"),
    (lambda r: shutil.rmtree(r / NATIVE_DIR), "no build in"),
], ids=["edited", "dependency-edited", "source-gone", "other-python", "incomplete",
        "format", "garbled", "missing"])
def test_anything_but_a_fresh_build_falls_back_to_pure(
        tmp_path: Path, spoil: Callable[[Path], object], reason: str) -> None:
    make_tree(tmp_path)
    spoil(tmp_path)
    status = check(tmp_path)
    assert status.build == "pure" and status.modules == ()
    assert reason in status.reason
    with pytest.raises(ImportError, match="LBD_NATIVE=require"):
        check(tmp_path, "require")


def test_pure_can_be_forced(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert check(tmp_path, "pure") == Status("pure", (), "LBD_NATIVE=pure")
    with pytest.raises(ImportError, match="expected auto, pure or require"):
        check(tmp_path, "yes")


def test_an_extension_module_in_the_source_tree_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "lb/sub").mkdir()
    for stray in (tmp_path / "lb" / ("fast" + ext_suffix()),
                  tmp_path / "lb/sub" / ("mod" + ext_suffix())):
        stray.write_bytes(b"")
        for mode in ("auto", "pure"):  # it would shadow the .py whatever was chosen
            with pytest.raises(ImportError, match=r"shadows the \.py"):
                check(tmp_path, mode)
        stray.unlink()
    assert check(tmp_path).build == "compiled"


def test_status_describes_itself_in_one_line() -> None:
    assert Status("compiled", ("lb.a", "lb.b"), "").describe() == \
        "hot-path modules compiled by mypyc: lb.a, lb.b"
    assert Status("pure", (), "no build in x").describe() == \
        "hot-path modules pure Python (no build in x)"


def run_in(root: Path, mode: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (native.ENV, "PYTHONPATH")}
    if mode is not None:
        env[native.ENV] = mode
    code = ("import lb.forwarder, ha.replication, lb.native; "
            "print(lb.native.status().build, lb.forwarder.__file__)")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_real_build_and_its_fallback_end_to_end(tmp_path: Path) -> None:
    if not (ROOT / NATIVE_DIR / native.MANIFEST).exists():
        if os.environ.get(native.ENV) == "require":
            pytest.fail("LBD_NATIVE=require and no build: run make native")
        pytest.skip("no compiled build in this checkout (make native)")
    if native.compare(ROOT).build != "compiled":
        pytest.skip(f"this checkout's build is not fresh: {native.compare(ROOT).reason}")
    for name in ("lb", "ha", NATIVE_DIR):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    fresh = run_in(tmp_path, None)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.split() == ["compiled", str(tmp_path / NATIVE_DIR / "lb" /
                                                    ("forwarder" + ext_suffix()))]
    with (tmp_path / "lb/forwarder.py").open("a") as f:
        f.write("# a developer's edit\n")
    edited = run_in(tmp_path, None)
    assert edited.returncode == 0, edited.stderr
    assert edited.stdout.split() == ["pure", str(tmp_path / "lb/forwarder.py")]
    required = run_in(tmp_path, "require")
    assert required.returncode != 0
    assert "stale build: lb/forwarder.py changed since it was compiled" in required.stderr


def test_a_build_hashes_the_compiled_modules_and_what_they_import() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts/build_native.py"), "--dry-run",
                          "lb.forwarder"], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    # forwarder imports services, which imports config and schedulers: mypyc saw their types
    assert {"lb/forwarder.py", "lb/sessions.py", "lb/services.py", "lb/config.py",
            "lb/schedulers.py", "lb/packet.py"} <= set(out)
    assert "lb/daemon.py" not in out and "lb/native.py" not in out
    assert out == sorted(out)
