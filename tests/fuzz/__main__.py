"""Run the fuzz targets with a large budget and print one line per target.

    python -m tests.fuzz [--inputs N] [--engine atheris|hypothesis] [--seed S] [TARGET ...]

atheris (the default): each target runs coverage-guided in a child process, starting from its
seeds; its log, final corpus and failing inputs go to ``build/fuzz/<target>/``. hypothesis:
each target's generator runs in this process (no coverage feedback; for machines without
atheris). The exit status is 1 when any target failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from tests.fuzz.targets import MODULES, Target, load

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    inputs: int
    seconds: float
    failures: int  # failing inputs
    distinct: int  # distinct failure signatures
    coverage: str  # libFuzzer's final "cov: N ft: M", or "-"


def run_atheris(target: Target, budget: int, seed: int, out: Path) -> Result:
    shutil.rmtree(out, ignore_errors=True)
    corpus, artifacts = out / "corpus", out / "failures"
    corpus.mkdir(parents=True)
    for i, data in enumerate(target.seeds()):
        (corpus / f"seed-{i:03d}").write_bytes(data)
    flags = [f"-runs={budget}", f"-seed={seed}", f"-max_len={target.max_len}", "-timeout=30",
             "-print_final_stats=1"]
    if tokens := target.tokens():
        dictionary = out / "dictionary.txt"
        dictionary.write_text("".join(
            '"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in tokens))
        flags.append(f"-dict={dictionary}")
    with tempfile.TemporaryDirectory(prefix="lbd-fuzz-") as tmp:
        cmd = [sys.executable, "-m", "tests.fuzz.atheris_child", target.name, str(artifacts),
               *flags, str(corpus)]
        started = time.monotonic()
        with (out / "log.txt").open("w") as log:
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False,
                           env={**os.environ, "TMPDIR": tmp})
        seconds = time.monotonic() - started
    text = (out / "log.txt").read_text(errors="replace")
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    failures = re.findall(r"^FUZZ-FAILURE (.*)$", text, re.MULTILINE)
    if not runs:
        print(text[-3000:], file=sys.stderr)
    return Result(target.name, int(runs[-1]) if runs else 0, seconds, len(failures),
                  len(set(failures)), f"cov {cov[-1][0]} ft {cov[-1][1]}" if cov else "-")


def run_hypothesis(target: Target, budget: int, seed: int) -> Result:
    count = [0]

    @settings(max_examples=budget, database=None, deadline=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck))
    @given(target.inputs())
    def fuzz(data: bytes) -> None:
        count[0] += 1
        target.check(data)

    started = time.monotonic()
    failed = 0
    try:
        fuzz()
    except Exception as exc:  # the shrunk failure, printed by hypothesis above
        print(f"{target.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        failed = 1
    return Result(target.name, count[0], time.monotonic() - started, failed, failed, "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--inputs", type=int, default=100_000, help="per target")
    parser.add_argument("--engine", choices=["atheris", "hypothesis"], default="atheris")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer -seed (hypothesis: 0 "
                        "derandomizes)")
    args = parser.parse_args(argv)
    for name in args.targets:
        if name not in MODULES:
            parser.error(f"no target {name!r} (targets: {', '.join(MODULES)})")
    results = []
    for name in args.targets or list(MODULES):
        if args.engine == "atheris":
            result = run_atheris(load(name), args.inputs, args.seed,
                                 ROOT / "build" / "fuzz" / name)
        else:
            result = run_hypothesis(load(name), args.inputs, args.seed)
        results.append(result)
        print(f"{result.target:15} {result.inputs:>9} inputs {result.seconds:8.1f} s  "
              f"{result.failures:>6} failures ({result.distinct} distinct)  {result.coverage}",
              flush=True)
    if any(r.failures for r in results):
        print(f"failing inputs: {ROOT / 'build' / 'fuzz'}/*/failures/", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
