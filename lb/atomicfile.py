"""One file written so that a crash leaves the old one or the new one, never a mix: a
temporary file in the same directory, fsync, rename over the old one, fsync of the directory.
Used for the operator state (lb.opstate) and the table snapshot (lb.snapshot_store)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(directory: Path, name: str, parts: list[bytes]) -> int:
    """Write ``parts`` as ``directory/name``: temp file, fsync, rename, fsync of the
    directory. Returns the bytes written."""
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    total = 0
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                total += n
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(directory / name)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return total
