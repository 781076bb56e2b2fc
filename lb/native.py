"""Which build of the hot-path modules runs: compiled by mypyc, or the pure-Python source.

``scripts/build_native.py`` (``make native``) compiles a few pure modules (``lb.packet``,
``lb.forwarder``, …) with mypyc into a directory of their own, ``lbd-native/`` beside the
``lb`` and ``ha`` packages (the checkout's root, or site-packages in production), with a
manifest of what it compiled and the SHA-256 of every source file the compiled code was built
from (the compiled modules and every ``lb``/``ha`` module they import, transitively: mypyc
bakes their types and constants in). The rule, applied once when ``lb`` (or ``ha``) is first
imported:

- The compiled modules are used only if that manifest matches the tree exactly: every hashed
  source file is there with the same digest, the extension suffix is this interpreter's, and
  every compiled file is present. Then ``lbd-native/lb`` (and ``lbd-native/ha``) go first on
  the package's ``__path__``, so ``import lb.forwarder`` finds the extension there and every
  other module still comes from the source directory.
- Anything else (no build, a stale one, an edited source, another Python) falls back to pure
  Python, all of it: the compiled modules call each other natively, so half a build is not
  an option.
- ``LBD_NATIVE`` overrides: ``pure`` (or ``0``) forces pure Python, ``require`` makes a missing
  or stale build an ImportError (CI and the test run on compiled modules use it), ``auto`` or
  unset is the rule above.
- An extension module inside a package's *source* directory would win the import over the
  ``.py`` beside it whatever this module decides (a stray in-place ``mypyc lb/x.py``): that is
  refused with an ImportError naming the file, so edited source never runs as stale code.

:data:`status` says what was chosen and why; lbd logs it at start and exports it
(``lbd_native_modules``). Standard library only: this runs before anything else of lbd.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import json
import os
from dataclasses import dataclass
from pathlib import Path

NATIVE_DIR = "lbd-native"
MANIFEST = "manifest.json"
FORMAT = 1
ENV = "LBD_NATIVE"
PACKAGES = ("lb", "ha")
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Status:
    """The build chosen: ``compiled`` with the modules it covers, or ``pure`` and why."""

    build: str  # "compiled" | "pure"
    modules: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.build == "compiled":
            return f"hot-path modules compiled by mypyc: {', '.join(self.modules)}"
        return f"hot-path modules pure Python ({self.reason})"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ext_suffix() -> str:
    """The file suffix of this interpreter's extension modules (``.cpython-311-…so``)."""
    return importlib.machinery.EXTENSION_SUFFIXES[0]


def stray_extensions(root: Path) -> list[Path]:
    """Extension modules inside the packages' source directories, where they would shadow
    the ``.py`` beside them."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for pkg in PACKAGES if (root / pkg).is_dir()
                  for p in (root / pkg).rglob("*") if p.name.endswith(suffixes))


def module_file(module: str) -> str:
    """``lb.packet`` → ``lb/packet`` (the path under a root, without suffix)."""
    return module.replace(".", "/")


def check(root: Path, mode: str = "auto") -> Status:
    """Decide, for the packages under ``root`` and their build in ``root/lbd-native``."""
    stray = stray_extensions(root)
    if stray:
        names = ", ".join(str(p) for p in stray)
        raise ImportError(f"{names}: a compiled module inside the source tree shadows the .py "
                          f"beside it; delete it (compiled modules belong in {NATIVE_DIR}/, "
                          "see lb/native.py)")
    if mode in ("pure", "0"):
        return Status("pure", (), f"{ENV}={mode}")
    if mode not in ("auto", "require", ""):
        raise ImportError(f"{ENV}={mode!r}: expected auto, pure or require")
    status = compare(root)
    if mode == "require" and status.build != "compiled":
        raise ImportError(f"{ENV}=require but the compiled modules cannot be used: "
                          f"{status.reason}; run make native")
    return status


def compare(root: Path) -> Status:
    """The manifest in ``root/lbd-native`` against the sources under ``root``."""
    native = root / NATIVE_DIR
    try:
        manifest = json.loads((native / MANIFEST).read_text())
    except FileNotFoundError:
        return Status("pure", (), f"no build in {native}")
    except (OSError, ValueError) as e:
        return Status("pure", (), f"unreadable {native / MANIFEST}: {e}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return Status("pure", (), f"{native / MANIFEST}: not a format {FORMAT} manifest")
    if manifest.get("ext_suffix") != ext_suffix():
        return Status("pure", (), f"built for {manifest.get('ext_suffix')}, "
                                  f"this Python loads {ext_suffix()}")
    modules = manifest.get("modules")
    sources = manifest.get("sources")
    if not isinstance(modules, list) or not isinstance(sources, dict):
        return Status("pure", (), f"{native / MANIFEST}: malformed")
    for rel, want in sorted(sources.items()):
        try:
            if digest(root / rel) != want:
                return Status("pure", (), f"stale build: {rel} changed since it was compiled")
        except OSError:
            return Status("pure", (), f"stale build: {rel} is gone")
    for name in [*modules, manifest.get("group", "")]:
        if not (native / (module_file(name) + ext_suffix())).is_file():
            return Status("pure", (), f"incomplete build: {name} missing in {native}")
    return Status("compiled", tuple(modules), "")


@functools.cache
def status() -> Status:
    """The build this process uses, decided once (at the first ``import lb``)."""
    return check(SOURCE_ROOT, os.environ.get(ENV, "auto"))


def activate(package: str, path: list[str]) -> None:
    """Called by ``lb/__init__.py`` and ``ha/__init__.py`` with their ``__path__``: put the
    package's compiled directory first when the build is used."""
    if status().build == "compiled":
        compiled = SOURCE_ROOT / NATIVE_DIR / package
        if compiled.is_dir() and str(compiled) not in path:
            path.insert(0, str(compiled))
