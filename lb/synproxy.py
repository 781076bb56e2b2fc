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
lbd has the session, not the sequence offset), nor a conntrack flush; and while the proxy
answers SYNs, conntrack must not pick up flows it has not seen from their SYN (that is how
a bare ACK reaches the cookie check), so flows the peer opened are dropped here after a
failover too.

``syn_proxy = "auto"`` pays that cost only during an attack (:class:`AutoProxy`). The table
is loaded *armed* from the start: the ``synproxy`` rule is there (so conntrack tracks every
flow from its SYN, and the kernel's proxy hooks that translate proxied flows stay
registered), but no SYN is untracked, so none reaches it; conntrack picks up flows mid-stream
(``nf_conntrack_tcp_loose = 1``) and never judges them by window (``tcp_be_liberal = 1``),
so the peer's flows after a failover pass. When lbd's half-open sessions reach
``syn_proxy_half_open`` the proxy is *engaged* (SYNs untracked, invalid ACKs dropped,
``loose = 0``) in one transaction: flows conntrack already tracks are untouched. It is
released, back to armed, once the kernel has answered fewer than ``syn_proxy_half_open``
SYNs per second that no ACK completed, for ``syn_proxy_hold``; flows opened through it go on
being translated.

What the proxy does is counted by the kernel, per network namespace, in
``/proc/net/stat/synproxy`` (one row of hex counters per CPU). lbd reads that file at scrape
and status time, sums the rows and exports them as ``lbd_syn_proxy_*_total`` and in
``lbctl status``: ``syn_received`` (SYNs answered with a cookie), ``cookie_valid`` (ACKs
with a valid cookie: clients passed on to lbd), ``cookie_invalid`` (ACKs with a wrong or
stale cookie, dropped), ``cookie_retrans`` (a client's retransmitted ACK), ``conn_reopened``
(a SYN that reused the ports of a flow in TIME_WAIT).

Pure part: :func:`ruleset` (the nft script) and :func:`parse_stats` (the kernel's counters).
I/O part: :class:`SynProxy`, which loads and removes the script with ``nft`` (pyroute2 has
no nftables expressions for ``synproxy`` or ``notrack``; the script is applied atomically,
and only at start, reload and stop) and reads the counters.
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

STATS_FILE = "/proc/net/stat/synproxy"

STATS: tuple[str, ...] = ("syn_received", "cookie_valid", "cookie_invalid", "cookie_retrans",
                          "conn_reopened")
"""The kernel's counters lbd exports, in the order ``lbctl status`` shows them."""

METRIC_HELP: dict[str, str] = {
    "syn_received": "SYNs to the TCP virtual servers answered by the kernel with a SYN cookie",
    "cookie_valid": "ACKs with a valid SYN cookie: handshakes passed on to lbd",
    "cookie_invalid": "ACKs with a wrong or stale SYN cookie, dropped by the kernel",
    "cookie_retrans": "Retransmitted ACKs of handshakes the proxy already passed on",
    "conn_reopened": "SYNs that reopened the ports of a flow in TIME_WAIT",
}


def ruleset(client_if: str, targets: Iterable[tuple[str, int]], *, mss: int = 1460,
            engaged: bool = True) -> str:
    """The nft script that (re)creates :data:`TABLE` for ``targets`` (VIP, port) arriving on
    ``client_if``: their SYNs are not tracked (prerouting, raw priority), and the forward
    hook hands untracked SYNs and unknown ACKs to ``synproxy``; an ACK without a valid cookie
    (``invalid``) is dropped. Not ``engaged`` (armed, ``"auto"``): only the ``synproxy`` rule,
    which no SYN reaches. Empty ``targets``: the table is only removed."""
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
        ]
        if engaged:
            lines += [
                "  chain raw_prerouting {",
                "    type filter hook prerouting priority raw; policy accept;",
                f"    {match} tcp flags syn notrack",
                "  }",
            ]
        lines += [
            "  chain filter_forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    {match} ct state invalid,untracked synproxy mss {mss} wscale 7 "
            "timestamp sack-perm",
        ]
        if engaged:
            lines.append(f"    {match} ct state invalid drop")
        lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


ENGAGE = "engage"
RELEASE = "release"


class AutoProxy:
    """When ``syn_proxy = "auto"`` engages and releases the proxy (pure: fed once a second).

    Engage when lbd's table holds ``half_open`` half-open sessions and they are still
    coming (more than at the last look, or the table evicted some for new ones since): a
    flood lbd itself sees, not the leftovers of one that is over (they wait out their SYN
    timeout). Once engaged, lbd sees no flood any more (the kernel answers it), so release is
    judged by the kernel's counters: SYNs answered with a cookie that no ACK completed
    (``syn_received - cookie_valid``) per second, below ``half_open`` for ``hold`` seconds.
    """

    def __init__(self, half_open: int, hold: float) -> None:
        self.half_open = half_open
        self.hold = hold
        self.engaged = False
        self.engagements = 0
        self._calm_since: float | None = None
        self._last: tuple[float, int] | None = None  # (when, unanswered SYNs so far)
        self._last_half_open = (0, 0)  # (half-open sessions, evictions) at the last look

    def tick(self, now: float, half_open: int, stats: dict[str, int] | None, *,
             evicted: int = 0) -> str | None:
        """:data:`ENGAGE`, :data:`RELEASE` or None, given lbd's half-open sessions, the
        half-open evictions so far and the kernel's counters (:func:`parse_stats`; None when
        unreadable: no release then)."""
        coming = half_open > self._last_half_open[0] or evicted > self._last_half_open[1]
        self._last_half_open = (half_open, evicted)
        rate: float | None = None
        if stats is not None:
            unanswered = stats["syn_received"] - stats["cookie_valid"]
            if self._last is not None and now > self._last[0]:
                rate = max(0, unanswered - self._last[1]) / (now - self._last[0])
            self._last = (now, unanswered)
        if not self.engaged:
            if half_open >= self.half_open and coming:
                self.engaged = True
                self.engagements += 1
                self._calm_since = None
                return ENGAGE
            return None
        if rate is None or rate >= self.half_open:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= self.hold:
            self.engaged = False
            self._calm_since = None
            return RELEASE
        return None

    def undo(self) -> None:
        """The last action could not be applied: back to the state before it (the next tick
        decides again, as if it were the first look)."""
        self.engaged = not self.engaged
        self._calm_since = None
        self._last_half_open = (0, 0)


def parse_stats(text: str) -> dict[str, int]:
    """The counters of :data:`STATS` in ``/proc/net/stat/synproxy`` text, summed over the
    per-CPU rows (hex). A counter the kernel does not list is 0; a row that is not hex is
    skipped (the file's format is the kernel's, not ours to trust blindly)."""
    lines = text.splitlines()
    totals = dict.fromkeys(STATS, 0)
    if not lines:
        return totals
    names = lines[0].split()
    for line in lines[1:]:
        fields = line.split()
        if len(fields) != len(names):
            continue
        try:
            values = [int(field, 16) for field in fields]
        except ValueError:
            continue
        for name, value in zip(names, values, strict=True):
            if name in totals:
                totals[name] += value
    return totals


class SynProxy:
    """Loads :func:`ruleset` into this namespace's nftables; :meth:`remove` at stop."""

    def __init__(self, stats_file: str = STATS_FILE) -> None:
        self.loaded = False
        self.engaged = False
        self.stats_file = stats_file

    def stats(self) -> dict[str, int] | None:
        """The kernel's counters (:func:`parse_stats`) while the proxy is loaded; None when it
        is not, or the kernel has no such file (no synproxy module: nothing was proxied)."""
        if not self.loaded:
            return None
        try:
            with open(self.stats_file, encoding="ascii") as fh:
                return parse_stats(fh.read())
        except (OSError, UnicodeDecodeError):
            return None

    def apply(self, client_if: str, targets: Sequence[tuple[str, int]], *,
              engaged: bool = True) -> None:
        """Replace the table (one nft transaction), engaged or armed (:func:`ruleset`).
        Raises RuntimeError with nft's message; the table in force then stays."""
        run_nft(ruleset(client_if, targets, engaged=engaged))
        was = self.loaded and self.engaged
        self.loaded = bool(targets)
        self.engaged = self.loaded and engaged
        if self.engaged and not was:
            log.info("syn_proxy: the kernel's SYN proxy answers SYNs to the TCP virtual "
                     "servers on %s (nft table ip %s)", client_if, TABLE)
        elif self.loaded and not self.engaged:
            log.info("syn_proxy: armed, not answering SYNs until a flood (nft table ip %s)",
                     TABLE)

    def remove(self, *, leftover: bool = False) -> None:
        """Remove the table, if there is one. ``leftover``: at a start with the proxy off, a
        killed lbd's table, quietly and only when nft is there to ask (a box that never used
        the proxy needs no nft)."""
        self.loaded = self.engaged = False
        if leftover and shutil.which(NFT) is None:
            return
        try:
            run_nft(ruleset("", ()))
        except RuntimeError as exc:
            if not leftover:
                log.warning("syn_proxy: cannot remove nft table ip %s: %s", TABLE, exc)


def run_nft(script: str) -> None:
    """Apply an nft script atomically (all or nothing); RuntimeError says why not."""
    try:
        proc = subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {NFT}: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"{NFT} exited {proc.returncode}")
