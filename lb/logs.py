"""How lbd writes its log lines: for a terminal, for the journal, or for a log shipper.

- ``text``: ``TIME lbd[NODE] LEVEL message``, for a human at a terminal.
- ``journal``: ``<N>message`` with N the syslog priority (sd-daemon(3)), so that
  ``journalctl -p warning`` finds warnings; journald adds the time and the unit itself.
  Every line of a multi-line message carries the prefix, or journald would file the
  continuation lines at the default priority.
- ``json``: one object per line with ``time`` (RFC 3339, UTC), ``level``, ``logger``,
  ``message``, ``node`` (and ``exception`` when there is one), for log shippers.
- ``auto`` (the default): ``journal`` when stderr is the stream systemd named in
  ``$JOURNAL_STREAM`` (systemd.exec(5)), else ``text``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal, TextIO, TypeAlias, get_args

__all__ = [
    "FORMATS",
    "LEVELS",
    "LogFormat",
    "configure",
    "make_formatter",
    "parse_level",
    "resolve_format",
]

LogFormat: TypeAlias = Literal["auto", "text", "journal", "json"]
FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}

# syslog(3) priorities of Python's levels; journald reads them from the "<N>" prefix.
_SYSLOG = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
           (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def parse_level(text: str) -> int:
    """A level name, any case (``warn`` too): raises ValueError with the choices."""
    name = text.strip().lower()
    level = LEVELS.get("warning" if name == "warn" else name)
    if level is None:
        raise ValueError(f"unknown log level {text!r}: choose {', '.join(LEVELS)}")
    return level


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _SYSLOG:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


def resolve_format(requested: LogFormat, environ: Mapping[str, str], stream: TextIO) -> LogFormat:
    """``auto`` becomes ``journal`` when ``stream`` is the journal stream, else ``text``."""
    if requested != "auto":
        return requested
    return "journal" if _is_journal(environ.get("JOURNAL_STREAM", ""), stream) else "text"


def _is_journal(journal_stream: str, stream: TextIO) -> bool:
    """systemd.exec(5): ``$JOURNAL_STREAM`` is ``DEVICE:INODE`` of the journal connection;
    compare it with the stream's, as a child with redirected stderr inherits the variable."""
    dev, _, ino = journal_stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO), or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<N>message`` on every line of the message."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "node": self.node,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def make_formatter(fmt: LogFormat, node: str) -> logging.Formatter:
    """The formatter of a resolved format (``auto`` counts as ``text``)."""
    if fmt == "journal":
        return JournalFormatter("%(message)s")
    if fmt == "json":
        return JsonFormatter(node)
    return logging.Formatter(f"%(asctime)s lbd[{node}] %(levelname)s %(message)s")


def configure(level: int, fmt: LogFormat, node: str, *, stream: TextIO | None = None,
              environ: Mapping[str, str] | None = None) -> LogFormat:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) in ``fmt``;
    returns the format chosen."""
    out = sys.stderr if stream is None else stream
    chosen = resolve_format(fmt, os.environ if environ is None else environ, out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(make_formatter(chosen, node))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return chosen
