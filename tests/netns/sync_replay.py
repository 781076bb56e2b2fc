"""Record one genuine sync connection, then replay its bytes (run in a node's namespace).

    python -m tests.netns.sync_replay record 198.19.0.2 7411 --key-file K --out FILE
    python -m tests.netns.sync_replay replay 198.19.0.2 7411 --file FILE

``record`` is a genuine initiator: it knows the shared key, runs the handshake with a fresh
nonce, sends one session record (for a virtual server no node has, so it is counted as
received and skipped, and changes no table), waits for the peer's ``Applied`` and writes
everything it sent to FILE. Prints {"applied": SEQUENCE}. ``replay`` sends FILE's bytes as
they are on a new connection and reads until the peer closes (5 s at most). Prints
{"answered": BYTES, "closed": true|false}: a node that refuses the replay answers nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

from ha.sync_codec import (
    Applied,
    DecodeError,
    Decoder,
    Encoder,
    SessionRecord,
    load_key,
)
from ha.sync_handshake import NONCE_SIZE, Handshake, Keys

UNKNOWN_VIP = 0xC6336463  # 198.51.100.99: no lab config has a virtual server there
TIMEOUT = 5.0


def record(host: str, port: int, key: bytes, out: Path) -> dict[str, object]:
    sent = b""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        hs = Handshake(key, os.urandom(NONCE_SIZE), initiator=True)
        while True:
            data = hs.data_to_send()
            sock.sendall(data)
            sent += data
            if hs.result is not None:
                break
            chunk = sock.recv(4096)
            if not chunk:
                raise SystemExit("the node closed during the handshake")
            hs.feed(chunk)
        if not isinstance(hs.result, Keys):
            raise SystemExit(f"handshake refused: {hs.result}")
        frames = Encoder(hs.result.send).frame([SessionRecord(
            6, 0xC63364C8, 4242, UNKNOWN_VIP, 81, 0xC612000B, 8080, 3, 0.0)])
        sock.sendall(frames)
        sent += frames
        dec = Decoder(hs.result.receive)
        dec.feed(hs.leftover)
        while True:
            for ev in dec.events():
                if isinstance(ev, DecodeError):
                    raise SystemExit(f"refused the node's frames: {ev.reason.value}")
                if isinstance(ev, Applied):
                    out.write_bytes(sent)
                    return {"applied": ev.sequence}
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("the node closed before acknowledging")
            dec.feed(chunk)


def replay(host: str, port: int, data: bytes) -> dict[str, object]:
    answered, closed = 0, False
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                answered += len(chunk)
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return {"answered": answered, "closed": closed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "replay"])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--key-file")
    ap.add_argument("--out")
    ap.add_argument("--file")
    args = ap.parse_args()
    if args.mode == "record":
        if not args.key_file or not args.out:
            raise SystemExit("record needs --key-file and --out")
        key = load_key(Path(args.key_file).read_bytes())
        result = record(args.host, args.port, key, Path(args.out))
    else:
        if not args.file:
            raise SystemExit("replay needs --file")
        result = replay(args.host, args.port, Path(args.file).read_bytes())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
