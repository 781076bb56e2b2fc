"""HTTP GETs from fixed source ports (run in a client namespace; TIME_WAIT tests).

    python -m tests.netns.portclient 198.51.100.10 80 --first 40000 --count 20

One connection per port, in turn, each with a 2 s timeout. Prints {"answers": [...]}: the
body of each answer, or "error: ..." for a connection that failed.
"""

from __future__ import annotations

import argparse
import json
import socket


def get(host: str, port: int, sport: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(2.0)
        try:
            sock.bind(("0.0.0.0", sport))
            sock.connect((host, port))
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            return f"error: {exc}"
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--first", type=int, default=40000)
    ap.add_argument("--count", type=int, default=20)
    args = ap.parse_args()
    if not 0 < args.count <= 1000:
        raise SystemExit("--count must be 1..1000")
    answers = [get(args.host, args.port, args.first + i) for i in range(args.count)]
    print(json.dumps({"answers": answers}))


if __name__ == "__main__":
    main()
