"""lbctl — talk to a running lbd over its control socket.

    lbctl [--socket PATH] [--json] status|sessions|servers|vrrp|sync
    lbctl [--socket PATH] drain|enable|disable POOL ADDR:PORT
    lbctl [--socket PATH] reload
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lb.control import request
from lb.version import version_line

DEFAULT_SOCKET = "/run/lbd/control.sock"
COMMANDS = ("status", "sessions", "servers", "vrrp", "sync", "drain", "enable", "disable",
            "reload")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(w)
                               for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def render(command: str, result: Any) -> str:
    if command == "sessions":
        return _table(result, ["protocol", "client", "virtual", "server", "state"])
    if command == "servers":
        return _table(result, ["pool", "server", "up", "state", "active_sessions", "reason"])
    if command == "vrrp":
        rows = [{"instance": k, **v} for k, v in result.items()]
        return _table(rows, ["instance", "state", "priority", "vrid"])
    if isinstance(result, dict):
        return "\n".join(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
                         for k, v in result.items())
    return str(result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lbctl", description="Control a running lbd.")
    ap.add_argument("--version", action="version", version=version_line())
    ap.add_argument("--socket", default=DEFAULT_SOCKET, help="control socket path")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("args", nargs="*")
    ns = ap.parse_args(argv)
    try:
        answer = request(ns.socket, ns.command, ns.args)
    except OSError as exc:
        print(f"lbctl: cannot reach lbd at {ns.socket}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # closed without a (JSON) answer: not lbd, or it died
        print(f"lbctl: cannot reach lbd at {ns.socket}: no valid answer: {exc}",
              file=sys.stderr)
        return 2
    if not answer.get("ok"):
        print(f"lbctl: {answer.get('error', 'failed')}", file=sys.stderr)
        return 1
    result = answer.get("result")
    print(json.dumps(result, indent=2) if ns.json else render(ns.command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
