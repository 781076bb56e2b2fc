"""One target under atheris (a child of ``python -m tests.fuzz``; libFuzzer ends the process).

    python -m tests.fuzz.atheris_child TARGET ARTIFACT_DIR [libFuzzer flags and corpus dirs]

``lb`` and ``ha`` are instrumented for coverage. A failing input does not stop the run: each
one prints a ``FUZZ-FAILURE <signature>`` line on stderr, and the first input of each
signature is saved in ARTIFACT_DIR with its traceback, so one run reports every distinct bug.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import traceback
from pathlib import Path

import atheris


def main() -> None:
    name, artifacts = sys.argv[1], Path(sys.argv[2])
    with atheris.instrument_imports(include=["lb", "ha"]):
        from tests.fuzz.targets import load

        target = load(name)
    logging.disable(logging.CRITICAL)  # handlers that crash on purpose log their traceback
    seen: set[str] = set()

    def one(data: bytes) -> None:
        try:
            target.check(data)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            signature = f"{type(exc).__name__} at {where}: {str(exc)[:80]}".replace("\n", " ")
            print(f"FUZZ-FAILURE {signature}", file=sys.stderr, flush=True)
            if signature not in seen:
                seen.add(signature)
                artifacts.mkdir(parents=True, exist_ok=True)
                stem = f"{name}-{hashlib.sha1(data).hexdigest()[:12]}"
                (artifacts / f"{stem}.bin").write_bytes(data)
                (artifacts / f"{stem}.txt").write_text(
                    signature + "\n\n" + "".join(traceback.format_exception(exc)))

    atheris.Setup([sys.argv[0], *sys.argv[3:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
