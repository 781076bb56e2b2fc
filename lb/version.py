"""lbd's version: written here once; pyproject.toml reads it (setuptools ``dynamic`` attr).

A constant rather than ``importlib.metadata``: it is right in a checkout that was never
installed, or whose installed metadata belongs to another checkout.
"""

from __future__ import annotations

VERSION = "0.1.0"


def version_line() -> str:
    """What ``lbd --version`` and ``lbctl --version`` print: ``lbd`` and the version."""
    return f"lbd {VERSION}"
