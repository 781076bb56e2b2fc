"""``make install DESTDIR=<tmp>`` (scripts/install.sh): the production layout, in a temporary
root, and nothing outside it.

One real install (a venv, pip from the local project, ~8 s), run twice so that the second
run proves an upgrade keeps the operator's config and key. The first installs pure Python
(``NATIVE=0``); in the run of the unit tests on the compiled modules (``LBD_NATIVE=require``,
``make unit``) the second compiles the hot path as production does by default (~25 s more),
otherwise it is pure Python too. Then:

- the hot path: pure after the first install, compiled after the second when it compiled,
  from site-packages/lbd-native, with no extension module among the sources and mypy only a
  build tool (not in the venv);
- the layout and modes: venv in /opt/lbd without test tools, /usr/local/bin symlinks to its
  entry points, the unit, /etc/lbd with the example config and a 0600 generated key,
  /var/lib/lbd 0750;
- the installed ``lbd --version`` and ``lbctl --version`` run, from the venv, not from the
  checkout; the installed example config passes ``lbd --check --config-only``;
- no file carries the staging path (shebangs, activate, pyvenv.cfg, byte code);
- the unit's commands resolve, inside the root, to what was installed, and
  ``systemd-analyze verify`` says nothing about the unit as installed;
- the real /opt/lbd, /etc/lbd, … were not created, and the checkout got no build droppings
  (both checked by the fixture, around the two installs).
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ha.sync_codec import MIN_KEY, load_key
from lb import native
from lb.version import VERSION

ROOT = Path(__file__).resolve().parents[2]
REAL = ["/opt/lbd", "/etc/lbd", "/usr/local/bin/lbd", "/usr/local/bin/lbctl",
        "/etc/systemd/system/lbd.service", "/var/lib/lbd"]
TEST_TOOLS = ["pytest", "hypothesis", "scapy", "ruff", "mypy"]
EDITED = "# the operator's own config\n"
COMPILE = os.environ.get(native.ENV) == "require"  # the second install compiles the hot path


def install(dest: Path, compile_: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PREFIX", "BINDIR", "UNITDIR", "SYSCONFDIR", "STATEDIR", "MAKEFLAGS",
                        "MAKELEVEL", "NATIVE", native.ENV}}
    return subprocess.run(["make", "--no-print-directory", "install", f"DESTDIR={dest}",
                           f"NATIVE={int(compile_)}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def checkout_droppings() -> list[str]:
    """What a pip build in the checkout would leave there."""
    return sorted(p.name for p in [ROOT / "build", *ROOT.glob("*.egg-info")] if p.exists())


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """The root, and what the first and the second install said."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    before = {p: os.path.lexists(p) for p in REAL}
    droppings = checkout_droppings()
    d = tmp_path_factory.mktemp("root")
    first = install(d, False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (d / "etc/lbd/lbd.toml").read_text() == (ROOT / "conf/single.toml").read_text()
    key = (d / "etc/lbd/sync.key").read_bytes()
    (d / "etc/lbd/lbd.toml").write_text(EDITED)
    second = install(d, COMPILE)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "kept /etc/lbd/lbd.toml" in second.stdout
    assert (d / "etc/lbd/sync.key").read_bytes() == key
    assert (d / "etc/lbd/lbd.toml").read_text() == EDITED
    assert {p: os.path.lexists(p) for p in REAL} == before
    assert checkout_droppings() == droppings
    yield d, first.stdout, second.stdout


@pytest.fixture(scope="module")
def dest(installs: tuple[Path, str, str]) -> Path:
    return installs[0]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_layout_and_modes(dest: Path) -> None:
    venv = dest / "opt/lbd"
    for cmd in ("lbd", "lbctl"):
        link = dest / "usr/local/bin" / cmd
        assert link.is_symlink() and str(link.readlink()) == f"/opt/lbd/bin/{cmd}"
        script = venv / "bin" / cmd
        assert script.read_text().splitlines()[0] == "#!/opt/lbd/bin/python"
        assert mode(script) & 0o111
    assert mode(dest / "etc/systemd/system/lbd.service") == 0o644
    assert mode(dest / "etc/lbd") == 0o755
    examples = sorted(p.name for p in (dest / "etc/lbd/examples").iterdir())
    assert examples == sorted(p.name for p in (ROOT / "conf").glob("*.toml"))
    key = dest / "etc/lbd/sync.key"
    assert mode(key) == 0o600
    assert len(load_key(key.read_bytes())) >= MIN_KEY
    state = dest / "var/lib/lbd"
    assert state.is_dir() and mode(state) == 0o750
    assert (venv / "share/doc/lbd/README.md").is_file()
    assert (venv / "share/doc/lbd/operations.md").is_file()  # the unit's Documentation=
    assert not (venv.parent / "lbd.new").exists() and not (venv.parent / "lbd.old").exists()


def test_the_venv_has_lbd_and_no_test_tools(dest: Path) -> None:
    site = next((dest / "opt/lbd/lib").glob("python3*/site-packages"))
    names = {p.name.lower() for p in site.iterdir()}
    assert "lb" in names and "ha" in names and "uvloop" in names
    assert not [t for t in TEST_TOOLS if t in names], sorted(names)


def test_the_hot_path_is_compiled_by_default_and_pure_on_request(
        installs: tuple[Path, str, str], tmp_path: Path) -> None:
    dest, first, second = installs
    assert "hot-path modules pure Python (no build in " in first
    site = next((dest / "opt/lbd/lib").glob("python3*/site-packages"))
    assert native.stray_extensions(site) == []
    where = subprocess.run([str(dest / "opt/lbd/bin/python"), "-c",
                            "import lb.forwarder; print(lb.forwarder.__file__)"],
                           cwd=tmp_path, env={**os.environ, native.ENV: "auto"},
                           capture_output=True, text=True, check=True).stdout.strip()
    if not COMPILE:
        assert "hot-path modules pure Python" in second
        assert not (site / native.NATIVE_DIR).exists()
        assert where == str(site / "lb/forwarder.py")
        return
    assert "hot-path modules compiled by mypyc: lb.packet" in second
    assert where == str(site / native.NATIVE_DIR / "lb" / ("forwarder" + native.ext_suffix()))
    manifest = (site / native.NATIVE_DIR / native.MANIFEST).read_text()
    assert str(dest) not in manifest and "/opt/lbd" not in manifest  # relative paths only


def test_installed_commands_run_from_the_venv(dest: Path, tmp_path: Path) -> None:
    py = dest / "opt/lbd/bin/python"
    for cmd in ("lbd", "lbctl"):
        out = subprocess.run([str(py), str(dest / "opt/lbd/bin" / cmd), "--version"],
                             cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        assert out == f"lbd {VERSION}\n"
    where = subprocess.run([str(py), "-c", "import lb; print(lb.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(dest / "opt/lbd/lib/"))
    example = dest / "etc/lbd/examples/single.toml"
    check = subprocess.run([str(py), str(dest / "opt/lbd/bin/lbd"), "--check", "--config-only",
                            "--config", str(example)], cwd=tmp_path, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stderr


def test_no_installed_file_names_the_staging_root(dest: Path) -> None:
    needle = str(dest).encode()
    tainted = [str(p.relative_to(dest)) for p in dest.rglob("*")
               if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
    assert tainted == []


def unit_commands(unit: Path) -> list[str]:
    out = []
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in ("ExecStart", "ExecStartPre", "ExecReload", "ExecStop"):
            out.append(shlex.split(value.lstrip("-@+!"))[0])
    return out


def test_the_unit_runs_what_was_installed(dest: Path) -> None:
    commands = unit_commands(dest / "etc/systemd/system/lbd.service")
    assert commands == ["/usr/local/bin/lbd", "/usr/local/bin/lbctl"]
    for cmd in commands:
        target = (dest / cmd.lstrip("/")).readlink()
        assert (dest / target.relative_to("/")).is_file()
    text = (dest / "etc/systemd/system/lbd.service").read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    assert "--config /etc/lbd/lbd.toml" in text


def test_systemd_analyze_verify_is_clean(dest: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    units = Path("/usr/lib/systemd/system")
    if not (units / "sysinit.target").exists():
        pytest.skip(f"no systemd units in {units} to verify against")
    # A root with the host's units (for the targets lbd.service depends on) and, as
    # installed, the unit, its symlinks and the entry points they lead to.
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    for rel in ("etc/systemd/system/lbd.service", "usr/local/bin/lbd", "usr/local/bin/lbctl",
                "opt/lbd/bin/lbd", "opt/lbd/bin/lbctl"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dest / rel, root / rel, follow_symlinks=False)
    proc = subprocess.run([analyze, "verify", "--man=no", f"--root={root}",
                           "/etc/systemd/system/lbd.service"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
