"""A real server for the lab: HTTP and UDP that answer with the server's own name.

    python -m lab.realserver --name s1 --http 8080 --udp 5353 --state-dir DIR

HTTP ``GET /`` answers ``NAME\\n``. Files in the state dir steer it, so that tests can make
a server unhealthy without restarting it: ``NAME.status`` (an HTTP status to answer with,
e.g. 503), ``NAME.delay`` (seconds to wait before answering). ``GET /file/X`` serves
``DIR/X``. ``GET /stream/SECONDS`` streams numbered lines (``NAME 000001``, one every 20 ms)
for that long, so a test can hold a stream across a failover and check every byte arrived in
order. UDP datagrams are answered with ``NAME:`` + the payload.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def make_handler(name: str, state: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lab-realserver"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            delay = _read(state / f"{name}.delay")
            if delay:
                time.sleep(float(delay))
            if self.path.startswith("/file/"):
                self._send_file(state / Path(self.path[len("/file/"):]).name)
                return
            if self.path.startswith("/stream/"):
                self._stream(float(self.path[len("/stream/"):]))
                return
            status = int(_read(state / f"{name}.status") or 200)
            body = f"{name}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, seconds: float) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            end = time.monotonic() + min(seconds, 120.0)
            n = 0
            while time.monotonic() < end:
                n += 1
                self.wfile.write(f"{name} {n:06d}\n".encode())
                self.wfile.flush()
                time.sleep(0.02)

        def _send_file(self, path: Path) -> None:
            try:
                f = path.open("rb")
            except OSError:
                self.send_error(404)
                return
            with f:
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    return Handler


def serve_udp(name: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    prefix = f"{name}:".encode()
    while True:
        data, peer = sock.recvfrom(65535)
        with contextlib.suppress(OSError):
            sock.sendto(prefix + data, peer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--http", type=int, default=8080)
    ap.add_argument("--udp", type=int, default=0)
    ap.add_argument("--state-dir", default=".")
    args = ap.parse_args()
    if args.udp:
        threading.Thread(target=serve_udp, args=(args.name, args.udp), daemon=True).start()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 512
    handler = make_handler(args.name, Path(args.state_dir))
    httpd = ThreadingHTTPServer(("0.0.0.0", args.http), handler)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
