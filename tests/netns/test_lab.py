"""``make lab`` is the README's first command: it must run to its end and show the picture
the product is built from (issue 7, item 8): both VIPs answering at once from their own node,
a held connection and a persistent client on each VIP carried through node a's death, then
the handback under connections opened meanwhile."""

from __future__ import annotations

import re
import subprocess
import sys

from lab.harness import ENV, REPO


def test_the_lab_runs_and_shows_the_active_active_scene() -> None:
    proc = subprocess.run([sys.executable, "-m", "lab"], cwd=REPO, capture_output=True,
                          text=True, timeout=240, check=False,
                          env={**ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    assert proc.returncode == 0, out + proc.stderr
    # Each node forwarded its own VIP's clients ...
    assert re.search(r"lba: web-a 5, web-b 0\n\s+lbb: web-a 0, web-b 5", out), out
    # ... the held connections and the persistent clients went on through lbb ...
    assert "held connection to VIP A: data" in out and "held connection to VIP B: data" in out
    for vip in ("A", "B"):
        m = re.search(rf"next requests to VIP {vip}: (\S+) (\S+) (\S+) \(still (\S+)\)", out)
        assert m is not None and len(set(m.groups())) == 1, out
    assert "lbb: back MASTER, front-a MASTER, front-b MASTER" in out
    # ... and the handback waited for the table and broke neither connection.
    log = out[out.index("lba comes back"):]
    assert log.index("snapshot from the peer applied") < log.index("front-a: BACKUP -> MASTER")
    assert "opened through lbb: data" in log and "opened to VIP B: data" in log
    assert "Tearing down" in out
