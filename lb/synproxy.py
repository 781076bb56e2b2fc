"""The kernel's SYN proxy in front of the TUN for the TCP virtual servers (``[dataplane]
syn_proxy``): only clients that complete a handshake reach lbd.

Under a spoofed SYN flood the data plane's one reader is the bottleneck: the kernel routes
every SYN into the TUN and drops what lbd cannot read in time, legitimate SYNs and the
segments of established flows among them. With the proxy on, the box's own kernel answers
each SYN to a VIP with a SYN cookie (nftables ``synproxy``, no state kept); only a client
whose ACK carries a valid cookie is passed on: the kernel then opens the flow through the
TUN itself (a SYN from the client's address), so lbd schedules it as any other, and
translates the two sequence spaces for the rest of the flow (conntrack's seqadj).

The cost, and why it is off by default: that translation lives in this box's conntrack
only. A flow opened through the proxy does not survive a failover to the peer (the peer's
lbd has the session, not the sequence offset), nor a conntrack flush. Flows opened with the
proxy off are untouched by turning it on.

Pure part: :func:`ruleset` (the nft script). I/O part: :class:`SynProxy`, which loads and
removes it with ``nft`` (pyroute2 has no nftables expressions for ``synproxy`` or
``notrack``; the script is applied atomically, and only at start, reload and stop).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable, Sequence

log = logging.getLogger("lbd")

TABLE = "lbd_synproxy"
"""The nftables table lbd owns (``ip`` family); nothing else in the ruleset is touched."""

NFT = "nft"


def ruleset(client_if: str, targets: Iterable[tuple[str, int]], *, mss: int = 1460) -> str:
    """The nft script that (re)creates :data:`TABLE` for ``targets`` (VIP, port) arriving on
    ``client_if``: their SYNs are not tracked (prerouting, raw priority), and the forward
    hook hands untracked SYNs and unknown ACKs to ``synproxy``; an ACK without a valid cookie
    (``invalid``) is dropped. Empty ``targets``: the table is only removed."""
    wanted = sorted(set(targets))
    lines = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}"]  # create-then-delete: idempotent
    if wanted:
        elems = ", ".join(f"{vip} . {port}" for vip, port in wanted)
        match = f'iifname "{client_if}" ip daddr . tcp dport @targets'
        lines += [
            f"table ip {TABLE} {{",
            "  set targets {",
            "    type ipv4_addr . inet_service",
            f"    elements = {{ {elems} }}",
            "  }",
            "  chain raw_prerouting {",
            "    type filter hook prerouting priority raw; policy accept;",
            f"    {match} tcp flags syn notrack",
            "  }",
            "  chain filter_forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    {match} ct state invalid,untracked synproxy mss {mss} wscale 7 "
            "timestamp sack-perm",
            f"    {match} ct state invalid drop",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


class SynProxy:
    """Loads :func:`ruleset` into this namespace's nftables; :meth:`remove` at stop."""

    def __init__(self) -> None:
        self.loaded = False

    def apply(self, client_if: str, targets: Sequence[tuple[str, int]]) -> None:
        """Replace the table (one nft transaction). Raises RuntimeError with nft's message."""
        _nft(ruleset(client_if, targets))
        self.loaded = bool(targets)
        if self.loaded:
            log.info("syn_proxy: the kernel's SYN proxy answers SYNs to the TCP virtual "
                     "servers on %s (nft table ip %s)", client_if, TABLE)

    def remove(self, *, leftover: bool = False) -> None:
        """Remove the table, if there is one. ``leftover``: at a start with the proxy off, a
        killed lbd's table, quietly and only when nft is there to ask (a box that never used
        the proxy needs no nft)."""
        self.loaded = False
        if leftover and shutil.which(NFT) is None:
            return
        try:
            _nft(ruleset("", ()))
        except RuntimeError as exc:
            if not leftover:
                log.warning("syn_proxy: cannot remove nft table ip %s: %s", TABLE, exc)


def _nft(script: str) -> None:
    try:
        proc = subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {NFT}: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"{NFT} exited {proc.returncode}")
