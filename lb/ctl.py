"""lbctl — talk to a running lbd over its control socket.

    lbctl [--socket PATH] [--json] COMMAND [ARGS]     (lbctl COMMAND --help for each)

Read: ``status``, ``servers``, ``vrrp``, ``sync``, ``sessions`` and ``persistence`` (both
with ``--virtual NAME``, ``--server ADDR:PORT``, ``--client ADDR[:PORT]``, ``--limit N``;
sessions also ``--state STATE``). Change: ``drain|enable|disable POOL ADDR:PORT``,
``weight POOL ADDR:PORT N``, ``add-server POOL ADDR:PORT [--weight N] [--backup]``,
``remove-server POOL ADDR:PORT``, ``kill-sessions POOL ADDR:PORT``, ``demote``,
``promote``, ``reload``.

Exit status: 0 done, 1 the daemon refused the command (the reason on stderr), 2 a usage
error, 3 the daemon is not running (no socket, nobody listening, no answer).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lb.control import request
from lb.version import version_line

DEFAULT_SOCKET = "/run/lbd/control.sock"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3

_ENDPOINT = "ADDR:PORT"


def _pool_server(p: argparse.ArgumentParser) -> None:
    p.add_argument("pool", metavar="POOL", help="pool name, as in [pools.NAME]")
    p.add_argument("server", metavar=_ENDPOINT, help="the server, e.g. 198.18.0.11:8080")


def _filters(p: argparse.ArgumentParser, *, state: bool) -> None:
    p.add_argument("--virtual", metavar="NAME", help="only this virtual server")
    p.add_argument("--server", metavar=_ENDPOINT, help="only towards this real server")
    p.add_argument("--client", metavar="ADDR[:PORT]", help="only this client")
    if state:
        p.add_argument("--state", metavar="STATE",
                       help="only this state (ESTABLISHED, SYN_RECV, ..., UDP)")
    p.add_argument("--limit", metavar="N", type=int, help="at most N entries")


def _weight(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a weight is >= 0")
    return value


# command -> (help, how to declare its arguments, how to turn them into the request's args)
_Spec = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace],
                                                                        list[str]]]


def _no_args(p: argparse.ArgumentParser) -> None:
    del p


def _none(ns: argparse.Namespace) -> list[str]:
    del ns
    return []


def _ps(ns: argparse.Namespace) -> list[str]:
    return [ns.pool, ns.server]


def _listing(ns: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for name in ("virtual", "server", "client", "state", "limit"):
        value = getattr(ns, name, None)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out


def _add_args(p: argparse.ArgumentParser) -> None:
    _pool_server(p)
    p.add_argument("--weight", type=_weight, metavar="N",
                   help="its weight (default: 1, or the configured one)")
    p.add_argument("--backup", action="store_true",
                   help="a backup server (serves while no primary can)")


def _add(ns: argparse.Namespace) -> list[str]:
    out = [ns.pool, ns.server]
    if ns.weight is not None:
        out += ["--weight", str(ns.weight)]
    if ns.backup:
        out.append("--backup")
    return out


def _weight_args(p: argparse.ArgumentParser) -> None:
    _pool_server(p)
    p.add_argument("weight", metavar="N", type=_weight, help="the new weight (0: no new "
                   "sessions)")


COMMANDS: dict[str, _Spec] = {
    "status": ("node, roles, sessions, sync at a glance", _no_args, _none),
    "servers": ("real servers: health, admin state, weight, sessions", _no_args, _none),
    "vrrp": ("VRRP instances: state, priority", _no_args, _none),
    "sync": ("the state-sync link to the peer", _no_args, _none),
    "sessions": ("the session table, with the time left before each expires",
                 lambda p: _filters(p, state=True), _listing),
    "persistence": ("client-IP persistence bindings", lambda p: _filters(p, state=False),
                    _listing),
    "drain": ("no new sessions for a server, except persistent clients", _pool_server, _ps),
    "enable": ("a drained or disabled server takes new sessions again", _pool_server, _ps),
    "disable": ("no new sessions at all for a server", _pool_server, _ps),
    "weight": ("set a server's weight (kept across restarts)", _weight_args,
               lambda ns: [ns.pool, ns.server, str(ns.weight)]),
    "add-server": ("add a server to a pool (kept across restarts)", _add_args, _add),
    "remove-server": ("remove a server from a pool; its sessions drain or are reset as the "
                      "pool's on_server_down says", _pool_server, _ps),
    "kill-sessions": ("remove every session of a server now", _pool_server, _ps),
    "demote": ("give every VRRP instance this node masters to the peer and stay BACKUP",
               _no_args, _none),
    "promote": ("undo demote: the configured priorities are back", _no_args, _none),
    "reload": ("re-read the config file (refused: old config kept, exit 1)", _no_args,
               _none),
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lbctl", description="Control a running lbd.",
        epilog="exit status: 0 done, 1 refused by lbd, 2 usage error, 3 lbd not running")
    ap.add_argument("--version", action="version", version=version_line())
    ap.add_argument("--socket", default=DEFAULT_SOCKET, help="control socket path "
                    f"(default {DEFAULT_SOCKET})")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (text, declare, _) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print one JSON document")
        declare(p)
    return ap


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(_cell(r.get(c)).ljust(w)
                               for c, w in zip(columns, widths, strict=True)))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render(command: str, result: Any) -> str:
    if command == "sessions":
        return _table(result, ["protocol", "client", "virtual", "server", "state",
                               "expires_in"])
    if command == "persistence":
        return _table(result, ["virtual_server", "client", "server", "sessions",
                               "expires_in"])
    if command == "servers":
        return _table(result, ["pool", "server", "up", "state", "admin", "weight",
                               "active_sessions", "reason"])
    if command == "vrrp":
        rows = [{"instance": k, **v} for k, v in result.items()]
        return _table(rows, ["instance", "state", "priority", "vrid"])
    if isinstance(result, dict):
        return "\n".join(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
                         for k, v in result.items())
    return str(result)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)  # a usage error exits 2 here
    args = COMMANDS[ns.command][2](ns)
    try:
        answer = request(ns.socket, ns.command, args)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"lbctl: lbd is not running (nothing listens on {ns.socket}: "
              f"{exc.strerror or exc})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except PermissionError as exc:
        print(f"lbctl: cannot reach lbd at {ns.socket}: {exc.strerror or exc} "
              "(run as root or as a member of the socket's group)", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except OSError as exc:
        print(f"lbctl: cannot reach lbd at {ns.socket}: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ValueError as exc:  # closed without a (JSON) answer: not lbd, or it died
        print(f"lbctl: cannot reach lbd at {ns.socket}: no valid answer: {exc}",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    if not answer.get("ok"):
        print(f"lbctl: {answer.get('error', 'failed')}", file=sys.stderr)
        return EXIT_REFUSED
    result = answer.get("result")
    print(json.dumps(result, indent=2) if ns.json else render(ns.command, result))
    if isinstance(result, dict) and result.get("saved") is False:
        print(f"lbctl: warning: done, but {result.get('save_error', 'not saved')}",
              file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
