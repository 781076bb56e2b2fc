"""Fuzz targets: every parser of outside input, driven two ways.

Each ``target_*.py`` module defines one :class:`tests.fuzz.targets.Target`: a ``check(data)``
that runs one input and raises (an ``AssertionError`` for a broken invariant, anything else
for a crash), seed inputs, and a hypothesis strategy that generates inputs of the same shape.

- ``pytest tests/fuzz`` runs every target with a small hypothesis budget (CI), replays the
  seeds and the regression corpus in ``tests/fuzz/corpus/<target>/``.
- ``make fuzz`` (``python -m tests.fuzz``) runs each target under atheris, coverage-guided,
  with a large budget in a child process, and prints inputs run, time, coverage and failures.
"""
