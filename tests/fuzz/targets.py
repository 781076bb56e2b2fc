"""The fuzz targets by name, and what a target is."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True, slots=True)
class Target:
    """One parser under fuzz.

    ``check`` runs one input and raises on a failure (``AssertionError``: an invariant broke;
    anything else: the parser crashed). ``seeds`` are valid inputs that start atheris off on
    every path; ``inputs`` generates inputs for hypothesis (structured, then mutated).
    ``max_len`` bounds atheris's inputs; ``tokens`` become its dictionary (words that its
    mutations insert: key names, units).
    """

    name: str
    check: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    inputs: Callable[[], st.SearchStrategy[bytes]]
    max_len: int = 4096
    tokens: Callable[[], list[bytes]] = list


MODULES = {
    "forwarder": "tests.fuzz.target_forwarder",
    "vrrp": "tests.fuzz.target_vrrp",
    "sync": "tests.fuzz.target_sync",
    "handshake": "tests.fuzz.target_handshake",
    "control": "tests.fuzz.target_control",
    "control_server": "tests.fuzz.target_control_server",
    "config": "tests.fuzz.target_config",
}
"""Target name → the module that defines ``TARGET``."""


def load(name: str) -> Target:
    """Import the target's module (so that atheris can instrument what it imports first)."""
    target: Target = importlib.import_module(MODULES[name]).TARGET
    return target
