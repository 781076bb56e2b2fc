"""lbd's log formats (lb.logs) and ``--log-level`` / ``--log-format`` on the command line.

- journal: the syslog priority prefix that ``journalctl -p`` filters on, on every line;
- json: one object per line with time, level, logger, message, node;
- auto: journal exactly when stderr is the stream ``$JOURNAL_STREAM`` names;
- a bad ``--log-level`` is a one-line usage error (exit 2), not a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import pytest

from lb import daemon, logs


def record(level: int, msg: str, *args: object, name: str = "lbd.vrrp",
           exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize(("text", "level"), [
    ("debug", logging.DEBUG), ("INFO", logging.INFO), ("Warning", logging.WARNING),
    ("warn", logging.WARNING), ("error", logging.ERROR), ("critical", logging.CRITICAL),
])
def test_parse_level_takes_names_in_any_case(text: str, level: int) -> None:
    assert logs.parse_level(text) == level


def test_parse_level_refuses_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud': choose debug, info, "
                                         "warning, error, critical"):
        logs.parse_level("loud")


def test_a_bad_log_level_is_a_usage_error_without_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        daemon.main(["--config", os.devnull, "--log-level", "loud"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("lbd: error: argument --log-level: unknown log level "
                                    "'loud': choose debug, info, warning, error, critical")


@pytest.mark.parametrize(("level", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
    (logging.DEBUG, 7),
])
def test_journal_lines_carry_the_syslog_priority(level: int, priority: int) -> None:
    line = logs.make_formatter("journal", "lb-a").format(record(level, "server %s is UP", "s1"))
    assert line == f"<{priority}>server s1 is UP"


def test_every_journal_line_of_a_traceback_keeps_the_priority() -> None:
    text = logs.make_formatter("journal", "lb-a").format(record(logging.ERROR, "failed",
                                                                exc=True))
    lines = text.splitlines()
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


def test_json_is_one_object_per_line_with_the_agreed_fields() -> None:
    fmt = logs.make_formatter("json", "lb-a")
    line = fmt.format(record(logging.WARNING, "server %s of pool %s is DOWN", "s1", "web"))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc.keys() == {"time", "level", "logger", "message", "node"}
    assert doc["level"] == "warning" and doc["logger"] == "lbd.vrrp" and doc["node"] == "lb-a"
    assert doc["message"] == "server s1 of pool web is DOWN"
    assert datetime.fromisoformat(doc["time"]).utcoffset() is not None


def test_json_keeps_a_traceback_inside_its_one_line() -> None:
    line = logs.make_formatter("json", "lb-a").format(record(logging.ERROR, "x", exc=True))
    assert "\n" not in line
    assert json.loads(line)["exception"].endswith("RuntimeError: boom")


def test_text_is_for_a_terminal() -> None:
    line = logs.make_formatter("text", "lb-a").format(record(logging.INFO, "started"))
    assert line.endswith(" lbd[lb-a] INFO started")


def test_auto_is_journal_only_on_the_stream_journal_stream_names(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        st = os.fstat(stream.fileno())
        mine = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert logs.resolve_format("auto", mine, stream) == "journal"
        assert logs.resolve_format("auto", other, stream) == "text"  # stderr redirected
        assert logs.resolve_format("auto", {}, stream) == "text"
        assert logs.resolve_format("auto", {"JOURNAL_STREAM": "junk"}, stream) == "text"
        assert logs.resolve_format("json", mine, stream) == "json"
    assert logs.resolve_format("auto", mine, io.StringIO()) == "text"


def test_configure_sends_records_at_the_level_in_the_format(root_logger: logging.Logger) -> None:
    out = io.StringIO()
    assert logs.configure(logging.WARNING, "json", "lb-b", stream=out, environ={}) == "json"
    logging.getLogger("lbd.sync").info("not shown")
    logging.getLogger("lbd.sync").warning("peer %s gone", "lb-a")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "peer lb-a gone"
    assert len(root_logger.handlers) == 1
