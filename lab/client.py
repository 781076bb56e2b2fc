"""A lab client: runs inside a client namespace and prints one JSON document.

    python -m lab.client get URL [--count N] [--timeout S]     → {"answers": ["s1", ...]}
    python -m lab.client udp HOST PORT [--count N]            → {"answers": ["s1:ping0", ...]}
    python -m lab.client download URL                          → {"bytes": N, "sha256": HEX}
    python -m lab.client probe URL --timeout S --duration S    → {"attempts": [[t, ok], ...]}
    python -m lab.client stream URL [--timeout S]              → {"server", "lines", "in_order",
        "error", "max_gap"}: reads a /stream/SECONDS answer to its end and checks its lines
    python -m lab.client load URL --duration S [--timeout S]   → {"ok", "failed": {why: n}}:
        one request after another (a new connection each) for S seconds; with --rate R,
        R new connections a second on a fixed schedule whatever each one takes (in threads)
    python -m lab.client hold HOST PORT --count N              → holds N connections open
        prints {"held": N} once they are established, then waits until stdin closes or it is
        killed; writes "ping\\n" on every held connection when it reads a line "send", and
        prints {"results": [...]} with what each connection saw (data / reset / closed).

Every request has a timeout; failures are reported per request, never hang.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import socket
import sys
import time
import urllib.error
import urllib.request


def http_get(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return str(resp.read().decode().strip())
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}"
    except (OSError, ValueError) as exc:
        return f"error: {exc.__class__.__name__}: {exc}"


def cmd_get(args: argparse.Namespace) -> dict[str, object]:
    answers = [http_get(args.url, args.timeout) for _ in range(args.count)]
    return {"answers": answers}


def cmd_udp(args: argparse.Namespace) -> dict[str, object]:
    answers = []
    for i in range(args.count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(args.timeout)
            s.connect((args.host, args.port))
            s.send(f"ping{i}".encode())
            try:
                data, peer = s.recvfrom(65535)
                answers.append({"reply": data.decode(), "from": f"{peer[0]}:{peer[1]}"})
            except OSError as exc:
                answers.append({"error": exc.__class__.__name__})
    return {"answers": answers}


def cmd_download(args: argparse.Namespace) -> dict[str, object]:
    h = hashlib.sha256()
    n = 0
    with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


def cmd_probe(args: argparse.Namespace) -> dict[str, object]:
    """Ask again and again, each request with a short timeout, for ``duration`` seconds;
    report each attempt's start (CLOCK_MONOTONIC, shared by all namespaces) and outcome."""
    attempts: list[tuple[float, bool]] = []
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        started = time.monotonic()
        ok = not http_get(args.url, args.timeout).startswith(("error", "http "))
        attempts.append((round(started, 4), ok))
        if not ok:
            # A refused connection returns at once: do not spin.
            time.sleep(max(0.0, args.timeout - (time.monotonic() - started)))
    return {"attempts": attempts}


def cmd_stream(args: argparse.Namespace) -> dict[str, object]:
    """Read a numbered stream; every line must be the previous one plus one."""
    lines, in_order, error, server = 0, True, "", ""
    max_gap, last = 0.0, time.monotonic()
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:
            for raw in resp:
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                name, _, num = raw.decode().strip().partition(" ")
                server = server or name
                lines += 1
                if name != server or int(num) != lines:
                    in_order = False
    except (OSError, ValueError) as exc:
        error = f"{exc.__class__.__name__}: {exc}"
    return {"server": server, "lines": lines, "in_order": in_order, "error": error,
            "max_gap": round(max_gap, 3)}


def cmd_load(args: argparse.Namespace) -> dict[str, object]:
    """New connections for ``duration`` seconds, one after another or at ``rate`` a second;
    failures by kind."""
    ok, failed = 0, dict[str, int]()

    def count(answer: str) -> None:
        nonlocal ok
        if answer.startswith(("error", "http ")):
            kind = answer[:120]
            failed[kind] = failed.get(kind, 0) + 1
        else:
            ok += 1

    start = time.monotonic()
    end = start + args.duration
    if not args.rate:
        while time.monotonic() < end:
            count(http_get(args.url, args.timeout))
        return {"ok": ok, "failed": failed}
    total = int(args.duration * args.rate)
    workers = max(4, int(args.rate * args.timeout) + 4)  # enough for every one in flight
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = []
        for i in range(total):
            time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
            futures.append(pool.submit(http_get, args.url, args.timeout))
        for f in futures:
            count(f.result())
    return {"ok": ok, "failed": failed, "attempts": total}


def cmd_hold(args: argparse.Namespace) -> dict[str, object]:
    conns = []
    for _ in range(args.count):
        s = socket.create_connection((args.host, args.port), timeout=args.timeout)
        conns.append(s)
    print(json.dumps({"held": len(conns),
                      "ports": [c.getsockname()[1] for c in conns]}), flush=True)
    results: list[str] = []
    for line in sys.stdin:
        if line.strip() != "send":
            continue
        results = []
        for c in conns:
            try:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = c.recv(4096)
                results.append("data" if data else "closed")
            except ConnectionResetError:
                results.append("reset")
            except OSError as exc:
                results.append(f"error: {exc.__class__.__name__}")
        print(json.dumps({"results": results}), flush=True)
    for c in conns:
        c.close()
    return {"results": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--count", type=int, default=1)
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("--count", type=int, default=1)
    d = sub.add_parser("download")
    d.add_argument("url")
    pr = sub.add_parser("probe")
    pr.add_argument("url")
    pr.add_argument("--duration", type=float, default=10.0)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--count", type=int, default=1)
    sm = sub.add_parser("stream")
    sm.add_argument("url")
    ld = sub.add_parser("load")
    ld.add_argument("url")
    ld.add_argument("--duration", type=float, default=5.0)
    ld.add_argument("--rate", type=float, default=0.0)
    for p in (g, u, d, pr, h, sm, ld):
        p.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    started = time.monotonic()
    fn = {"get": cmd_get, "udp": cmd_udp, "download": cmd_download, "probe": cmd_probe,
          "hold": cmd_hold, "stream": cmd_stream, "load": cmd_load}[args.cmd]
    result = fn(args)
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
