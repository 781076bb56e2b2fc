"""Every fuzz target on a small budget (CI): its seeds, its regression corpus, and
``LBD_FUZZ_EXAMPLES`` generated inputs (default 1500), derandomized and without a database so
that a run is reproducible and leaves nothing behind. ``make fuzz`` runs the large budget.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz.targets import MODULES, load

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("LBD_FUZZ_EXAMPLES", "1500"))


@pytest.mark.parametrize("name", list(MODULES))
def test_seeds(name: str) -> None:
    target = load(name)
    for data in target.seeds():
        target.check(data)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*/*")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression_corpus(path: Path) -> None:
    """Inputs that once failed, named after the bug (see docs/fuzzing.md)."""
    load(path.parent.name).check(path.read_bytes())


@pytest.mark.parametrize("name", list(MODULES))
def test_generated(name: str) -> None:
    target = load(name)

    @settings(max_examples=EXAMPLES, database=None, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(target.inputs())
    def fuzz(data: bytes) -> None:
        target.check(data)

    fuzz()
