"""Compile lbd's pure hot-path modules with mypyc into ``lbd-native/`` (lb/native.py).

    python scripts/build_native.py [--out DIR] [--if-stale | --dry-run] [MODULE ...]

Needs mypy (mypyc comes with it), setuptools, a C compiler and the Python headers; run it with
the interpreter that will import the result (the extension ABI is that interpreter's). The
build runs on a copy of the sources in a temporary directory, so the checkout gets no C files,
no ``build/`` and above all no extension module beside a ``.py``; the result is swapped into
``--out`` (default: ``lbd-native/`` beside ``lb/``) whole, with a manifest of the SHA-256 of
every source it was built from. ``--if-stale`` does nothing when ``--out`` already holds a
build of exactly this source; ``--dry-run`` only lists the source files a build would hash.
Prints one line: what it built, or why it did nothing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["LBD_NATIVE"] = "pure"  # this process only reads lb.native's format

from mypy.version import __version__ as mypy_version  # noqa: E402  (mypyc's version)

from lb import native  # noqa: E402  (after the path and the mode are set)

# What Forwarder.handle runs per packet and per new flow; each one measured to pay with
# bench.hotpath (docs/benchmarks.md: servers, schedulers and persistence took ~1 µs off a SYN,
# source_limits ~0.5 µs more).
MODULES = ("lb.packet", "lb.wheel", "lb.sessions", "lb.forwarder", "lb.servers",
           "lb.schedulers", "lb.persistence", "lb.source_limits")
GROUP = "lb._compiled"  # one shared library: calls between the modules stay native


def imports(root: Path, module: str) -> set[str]:
    """The ``lb``/``ha`` modules ``module`` imports (anywhere in the file, typing-only too)."""
    tree = ast.parse((root / (native.module_file(module) + ".py")).read_bytes())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name.split(".")[0] in native.PACKAGES and \
                    (root / (native.module_file(name) + ".py")).is_file():
                found.add(name)
    return found


def closure(root: Path, modules: list[str]) -> list[str]:
    """``modules`` and every ``lb``/``ha`` module they import, transitively, as file paths."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(imports(root, m))
    return sorted(native.module_file(m) + ".py" for m in seen)


def compile_in(work: Path, modules: list[str]) -> None:
    """mypyc + setuptools build_ext --inplace, in ``work`` (a copy of the sources)."""
    script = (
        "import sys\n"
        "from setuptools import setup\n"
        "from mypyc.build import mypycify\n"
        f"exts = mypycify({[native.module_file(m) + '.py' for m in modules]!r}, "
        f"group_name={GROUP!r}, opt_level='3')\n"
        "setup(name='lbd-native', py_modules=[], ext_modules=exts,\n"
        "      script_args=['-q', 'build_ext', '--inplace'])\n"
    )
    path = os.pathsep.join([str(work), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "LBD_NATIVE": "pure", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"build_native: mypyc failed:\n{proc.stdout}{proc.stderr}")


def build(out: Path, modules: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="lbd-native-") as tmp:
        work = Path(tmp) / "src"
        work.mkdir()
        for name in ("pyproject.toml", *native.PACKAGES):
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, work / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            else:
                shutil.copy2(src, work / name)
        sources = closure(work, modules)  # hashed from the copy: what is compiled is hashed
        compile_in(work, modules)
        stage = Path(tmp) / "out"
        group = f"{GROUP}__mypyc"
        for m in [*modules, group]:
            rel = native.module_file(m) + native.ext_suffix()
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(work / rel, stage / rel)
        manifest = {
            "format": native.FORMAT,
            "ext_suffix": native.ext_suffix(),
            "python": sys.version.split()[0],
            "mypy": mypy_version,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "modules": modules,
            "group": group,
            "sources": {rel: native.digest(work / rel) for rel in sources},
        }
        (stage / native.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        swap_in(stage, out)


def swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` by ``stage`` whole: a reader sees the old build or the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    new, old = out.with_name(out.name + ".new"), out.with_name(out.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(stage, new)
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / native.NATIVE_DIR)
    ap.add_argument("--if-stale", action="store_true",
                    help="do nothing when --out holds a build of exactly this source")
    ap.add_argument("--dry-run", action="store_true",
                    help="list the source files a build would hash, build nothing")
    ap.add_argument("modules", nargs="*", default=list(MODULES))
    args = ap.parse_args()
    if args.dry_run:
        print("\n".join(closure(ROOT, args.modules)))
        return
    if args.if_stale and args.out.resolve() == (ROOT / native.NATIVE_DIR).resolve():
        current = native.compare(ROOT)
        if current.build == "compiled" and list(current.modules) == args.modules:
            print(f"build_native: {args.out} is up to date")
            return
    start = time.monotonic()
    build(args.out, args.modules)
    print(f"build_native: compiled {', '.join(args.modules)} into {args.out} "
          f"in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
