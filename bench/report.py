"""Figures, the checks made on them, and how they are shown: a text table and a JSON document.

A :class:`Figure` holds one measured quantity for each system it was measured on ("lbd",
"kernel", "haproxy", and "lbd-pure" when asked for: lbd forced to pure-Python modules); a
:class:`Check` compares lbd against a peer (a ratio) or against an absolute bound, with the
target the issue sets. Pure: no I/O besides building strings.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Final, Literal

SYSTEMS: Final = ("lbd", "kernel", "haproxy", "lbd-pure", "lbd-2w", "lbd-offload")
ALWAYS_SHOWN: Final = SYSTEMS[:3]  # the others: a column only in a run that measured them

Op = Literal[">=", "<="]


@dataclass(frozen=True, slots=True)
class Check:
    """``subject / peer  OP  target`` (a ratio), or ``subject  OP  target`` when ``peer`` is
    None. A check without a target only shows the ratio. ``subject``: lbd, or a variant of
    it measured in the same run (lbd-offload: with the kernel fast path)."""

    peer: str | None
    op: Op = ">="
    target: float | None = None
    subject: str = "lbd"


@dataclass(slots=True)
class Figure:
    """One quantity measured on several systems. ``values`` misses a system not measured;
    ``errors`` says why a system that should have been measured was not."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    checks: tuple[Check, ...] = ()
    values: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_sample(self, system: str, value: float) -> None:
        """One more measurement; the figure's value is the median of a system's samples."""
        got = self.samples.setdefault(system, [])
        got.append(value)
        self.values[system] = statistics.median(got)

    def spread(self) -> str:
        """``system min-max`` for each system measured more than once ("" if none was)."""
        parts = [f"{system} {_num(min(v))}..{_num(max(v))}"
                 for system in SYSTEMS if len(v := self.samples.get(system, [])) > 1]
        return ", ".join(parts)

    def outcome(self, check: Check) -> tuple[float | None, bool | None]:
        """The checked number (a ratio, or lbd's value) and whether it meets the target;
        (None, None) when a value is missing."""
        mine = self.values.get(check.subject)
        if mine is None:
            return None, None
        if check.peer is None:
            number = mine
        else:
            theirs = self.values.get(check.peer)
            if theirs is None or theirs <= 0:
                return None, None
            number = mine / theirs
        if check.target is None:
            return number, None
        ok = number >= check.target if check.op == ">=" else number <= check.target
        return number, ok


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def _cell(fig: Figure, system: str) -> str:
    if system in fig.values:
        return _num(fig.values[system])
    if system in fig.errors:
        return "error"
    return "-"


def _check_cells(fig: Figure, check: Check) -> list[str]:
    number, ok = fig.outcome(check)
    sign = "≥" if check.op == ">=" else "≤"
    if check.target is None:
        target = ""
    elif check.peer is None:
        target = f"{sign} {_num(check.target)} {fig.unit}"
    else:
        target = f"{sign} {check.target:.2f}x"
    label = check.subject if check.peer is None else f"{check.subject}/{check.peer}"
    shown = "-" if number is None else (
        f"{number:.2f}x" if check.peer else f"{_num(number)}")
    result = "" if check.target is None else "n/a" if ok is None else "PASS" if ok else "FAIL"
    return [f"{label} {shown}", target, result]


def table(figures: list[Figure]) -> str:
    """The figures as an aligned text table, one row per check."""
    shown = [s for s in SYSTEMS if s in ALWAYS_SHOWN
             or any(s in fig.values or s in fig.errors for fig in figures)]
    header = ["figure", "unit", *shown, "ratio", "target", "result"]
    rows: list[list[str]] = []
    for fig in figures:
        base = [fig.title, fig.unit, *(_cell(fig, s) for s in shown)]
        if not fig.checks:
            rows.append([*base, "", "", ""])
        for i, check in enumerate(fig.checks):
            lead = base if i == 0 else [""] * len(base)
            rows.append([*lead, *_check_cells(fig, check)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = set(range(2, 2 + len(shown)))

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    why: dict[tuple[str, str], list[str]] = {}  # (system, message) -> figures
    for fig in figures:
        for system, msg in fig.errors.items():
            why.setdefault((system, msg), []).append(fig.title)
    problems = []
    for (system, msg), titles in why.items():
        problems.append(f"  {system} — {'; '.join(titles)}:")
        problems += [f"      {ln}" for ln in msg.splitlines()]
    notes = [f"  {fig.title}: {note}" for fig in figures for note in fig.notes]
    notes += [f"  {fig.title}: range over rounds: {spread}"
              for fig in figures if (spread := fig.spread())]
    if notes:
        out += ["", "notes:", *notes]
    if problems:
        out += ["", "problems:", *problems]
    return "\n".join(out)


def as_json(figures: list[Figure], meta: dict[str, Any]) -> dict[str, Any]:
    """The figures as one JSON-able document."""
    docs = []
    for fig in figures:
        checks = []
        for check in fig.checks:
            number, ok = fig.outcome(check)
            checks.append({"against": check.peer or "absolute", "op": check.op,
                           "target": check.target, "value": number, "pass": ok})
        docs.append({"key": fig.key, "title": fig.title, "unit": fig.unit,
                     "higher_is_better": fig.higher_is_better,
                     **{s: fig.values.get(s) for s in SYSTEMS},
                     "samples": fig.samples,
                     "errors": fig.errors, "notes": fig.notes, "checks": checks})
    return {**meta, "figures": docs}
