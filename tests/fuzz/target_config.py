"""Fuzz target: configuration files through the loader.

Input: a mode byte, then the document.

- Mode even: the rest is a file's bytes, through ``loads_config`` (UTF-8, tomllib, then
  ``parse_config``): seeds are ``conf/*.toml``, so mutations start from real files.
- Mode odd: the rest is JSON for a decoded document handed to ``parse_config`` directly, so
  that values TOML cannot spell (null, mixed nesting) and whole-table swaps get tried too;
  bytes that are not JSON are skipped.

Invariant: the result is a :class:`Config` whose every float is finite, or a
:class:`ConfigError` whose every line reads ``SOURCE: key.path: problem`` (syntax and encoding
errors ``SOURCE: problem``); never any other exception.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from lb.config import Config, ConfigError, loads_config, parse_config
from tests.fuzz import wire
from tests.fuzz.targets import Target

SOURCE = "fuzz.toml"
CONF = Path(__file__).resolve().parents[2] / "conf"


def _floats(value: object, path: str = "config") -> None:
    """Every float in the model is finite (durations become timers and sleeps)."""
    if isinstance(value, float):
        assert math.isfinite(value), f"{path} is {value}"
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _floats(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _floats(v, f"{path}.{k}")
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            _floats(v, f"{path}[{i}]")


def check(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            try:
                doc = json.loads(data[1:])
            except (ValueError, RecursionError):
                return
            if not isinstance(doc, dict):
                return
            config = parse_config(doc, SOURCE)
        else:
            config = loads_config(data[1:], SOURCE)
    except ConfigError as exc:
        assert exc.errors, "ConfigError without errors"
        for line in exc.errors:
            assert line.startswith(f"{SOURCE}: "), f"error without the file: {line!r}"
            assert line[len(SOURCE) + 2 :].strip(), f"error without a problem: {line!r}"
        return
    assert isinstance(config, Config)
    _floats(config)


# --- seeds and generation ----------------------------------------------------------------------

def conf_files() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CONF.glob("*.toml"))]


def seeds() -> list[bytes]:
    files = conf_files()
    docs = [json.dumps(tomllib.loads(f.decode())).encode() for f in files]
    return [b"\x00" + f for f in files] + [b"\x01" + d for d in docs]


_scalar: st.SearchStrategy[Any] = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.sampled_from(["", " ", "eth0", "web", "198.51.100.10", "198.18.0.1/24", "1.2.3.4:80",
                       "100ms", "2s", "10m", "1.5h", "0s", "9" * 400 + "s", "/x", "/bin/true a",
                       "client-ip", "rr", "http", "all", "ff,ffffffff", "1" * 5000, "'"])
    | st.text(max_size=12)
)
_value: st.SearchStrategy[Any] = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)


_digits = st.text("0123456789", min_size=1, max_size=6) | st.integers(300, 5000).map(
    lambda n: "9" * n)


def _like(old: object) -> st.SearchStrategy[Any]:
    """A value of the same kind as ``old`` with its parts stretched: durations, ports, prefix
    lengths and numbers from tiny to thousands of digits."""
    if isinstance(old, bool):
        return st.booleans() | _value
    if isinstance(old, int):
        return st.integers() | st.integers(-(2**64), 2**64) | _value
    if not isinstance(old, str):
        return _value
    host, sep, _ = old.rpartition(":")
    address = old.partition("/")[0]
    parts = [
        st.builds(lambda n, u: n + u, _digits | st.from_regex(r"[0-9]+\.[0-9]+", fullmatch=True),
                  st.sampled_from(["ms", "s", "m", "h", "", "us"])),
        st.builds(lambda n: f"{host if sep else old}:{n}", _digits),
        st.builds(lambda n: f"{address}/{n}", _digits),
        st.text(max_size=20),
    ]
    return st.one_of(parts)


def _paths(doc: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _edited_doc(draw: st.DrawFn) -> bytes:
    """A real config with a few values replaced, keys added or removed."""
    doc = tomllib.loads(draw(st.sampled_from(conf_files())).decode())
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent: Any = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["like", "like", "set", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(_value)
        elif action == "like":
            parent[path[-1]] = draw(_like(parent[path[-1]]))
        else:
            parent[path[-1]] = draw(_value)
    return b"\x01" + json.dumps(doc).encode()


def tokens() -> list[bytes]:
    """Every word of the example files (keys, section names, values) and the units."""
    words = set(re.findall(rb"[A-Za-z_][A-Za-z0-9_.-]*|[0-9][0-9./:]*", b"\n".join(conf_files())))
    return sorted(words | {b"ms", b"s", b"m", b"h", b'"', b"=", b"[", b"]", b"{", b"}", b"\n"})


def inputs() -> st.SearchStrategy[bytes]:
    text = wire.mutated(st.sampled_from(seeds()[:3]), max_edits=6)
    return _edited_doc() | text


TARGET = Target("config", check, seeds, inputs, max_len=8192, tokens=tokens)
