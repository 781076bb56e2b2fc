"""The kernel fast path (``[dataplane] offload = "conntrack"``): lbd schedules each new flow
and hands the rest of it to the kernel's conntrack NAT.

Without it every packet of every flow crosses the TUN twice (read by lbd, rewritten, written
back), which is what bounds lbd at one core: ~3 us of Python and two syscalls per packet.
With it lbd still sees the first packet of a flow (a SYN; a UDP flow's first datagram): it
schedules it exactly as before (session, persistence, limits, sync to the peer), then, before
writing that packet back, creates the flow's conntrack entry with a destination NAT to the
server it chose (one ctnetlink message, :mod:`lb.ctnetlink`). The kernel translates every
later packet of the flow in both directions itself; they never reach the TUN. That is the
division of work IPVS and Katran make: the scheduling decision in one place, the per-packet
rewrite in the kernel's forwarding path.

What the kernel is given (:func:`ruleset`, one nftables table, :data:`TABLE`):

- the packets lbd writes into the TUN, and the clients' first SYNs to the TCP virtual
  servers, are not tracked (``notrack``): lbd's entry is created from the SYN, so no entry of
  the kernel's own may take its tuple first;
- empty ``nat`` chains, which register the kernel's NAT hooks (without one no entry's NAT
  is applied);
- a server's reply that belongs to an offloaded flow is marked (:data:`REPLY_MARK`) so that
  lbd's reply rules (``ip rule ... lookup route_table``, which would lead it into the TUN)
  skip it: those rules carry ``fwmark 0/REPLY_MARK`` while offload is on;
- lbd's entries (ct mark bit :data:`CT_MARK`) report only two events: ASSURED (the
  handshake completed: lbd's session becomes ESTABLISHED, which the peer learns by sync) and
  DESTROY (the kernel ended the flow: lbd removes the session).

The session table stays the truth for everything else: ``lbctl sessions``, the sync stream,
persistence, per-source limits and the half-open index see the same sessions as before. A
session lbd removes itself (a server reset, ``lbctl kill-sessions``, a SYN reusing the ports,
eviction) has its entry deleted too. Anything the kernel's conntrack refuses (a TCP segment
it judges invalid, a reply that reaches the other node of an active-active pair) falls back to
the TUN and is forwarded by lbd from the session: the fast path can lose speed, never a
flow. Flows lbd did not open itself (copies adopted at a takeover, flows picked up
mid-stream) stay on lbd's path.

The kernel keeps an entry as long as lbd would keep the session: lbd sets the network
namespace's conntrack timeouts from ``[sessions]`` (restored at stop) and window tracking off
(``tcp_be_liberal``, as lbd has none). A session whose deadline passes while it is offloaded
is kept, and lbd asks the kernel whether the entry still exists (GET): a lost DESTROY event
costs a session at most one timeout.

Pure part: :func:`ruleset`, :class:`Offloads` (which flows are in the kernel, what each
event means for the session table). I/O part: :class:`ConntrackOffload` (the netlink
socket, the nft table, the flush of leftover entries).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_
import logging
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable
from typing import Any, Final

from pyroute2 import NFCTSocket  # the flush: control plane, pyroute2's encoder

from lb.ctnetlink import (
    CT_TCP_CLOSE,
    CT_TCP_CLOSE_WAIT,
    CT_TCP_ESTABLISHED,
    CT_TCP_FIN_WAIT,
    CT_TCP_LAST_ACK,
    CT_TCP_SYN_RECV,
    CT_TCP_SYN_SENT,
    CT_TCP_TIME_WAIT,
    DESTROYED,
    ENTRY,
    ERROR,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    MAX_REQUEST,
    NETLINK_NETFILTER,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_UPDATE,
    CtMessage,
    pack_delete,
    pack_get,
    pack_new,
    parse,
)
from lb.sessions import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Session,
    SessionTable,
    SessionTimeouts,
    TcpState,
)
from lb.synproxy import NFT, run_nft

log = logging.getLogger("lbd")

TABLE: Final = "lbd_offload"
"""The nftables table lbd owns for the fast path (``ip`` family)."""

CT_MARK: Final = 0x8000_0000
"""The ct mark bit of lbd's entries; the low 31 bits number them (:class:`Offloads`)."""

REPLY_MARK: Final = 0x4000_0000
"""The packet mark of a server's reply on an offloaded flow (skips lbd's reply rules)."""

def ruleset(client_if: str, tun: str, tcp_targets: Iterable[tuple[str, int]]) -> str:
    """The nft script that (re)creates :data:`TABLE`: see the module docstring. Without
    ``tcp_targets`` no SYN is untracked (UDP virtual servers only)."""
    wanted = sorted(set(tcp_targets))
    lines = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}",
             f"table ip {TABLE} {{"]
    if wanted:
        elems = ", ".join(f"{vip} . {port}" for vip, port in wanted)
        lines += ["  set tcp_targets {", "    type ipv4_addr . inet_service",
                  f"    elements = {{ {elems} }}", "  }"]
    lines += ["  chain raw_prerouting {",
              "    type filter hook prerouting priority raw; policy accept;",
              f'    iifname "{tun}" notrack']
    if wanted:
        lines.append(f'    iifname "{client_if}" ip daddr . tcp dport @tcp_targets '
                     "tcp flags & (syn | ack) == syn notrack")
    lines += ["  }",
              "  chain nat_prerouting {",
              "    type nat hook prerouting priority dstnat; policy accept;",
              "  }",
              "  chain nat_postrouting {",
              "    type nat hook postrouting priority srcnat; policy accept;",
              "  }",
              "  chain mangle_prerouting {",
              "    type filter hook prerouting priority mangle; policy accept;",
              f"    ct mark & {CT_MARK:#x} == {CT_MARK:#x} ct direction reply "
              f"meta mark set meta mark | {REPLY_MARK:#x}",
              # (once per entry is enough: the mask stays; until ASSURED covers the first
              # packets of both directions)
              f"    ct mark & {CT_MARK:#x} == {CT_MARK:#x} ct status & assured == 0 "
              "ct event set assured, destroy",
              "  }",
              "}"]
    return "\n".join(lines) + "\n"


def conntrack_sysctls(t: SessionTimeouts) -> dict[str, str]:
    """The namespace's conntrack settings that make the kernel keep an entry as long as lbd
    would keep its session (``net.netfilter.`` keys)."""
    tcp = {"syn_sent": t.tcp_syn, "syn_recv": t.tcp_syn, "established": t.tcp_established,
           "fin_wait": t.tcp_fin, "close_wait": t.tcp_fin, "last_ack": t.tcp_fin,
           "time_wait": t.tcp_time_wait, "close": t.tcp_close}
    out = {f"nf_conntrack_tcp_timeout_{k}": str(max(1, round(v))) for k, v in tcp.items()}
    out["nf_conntrack_udp_timeout"] = str(max(1, round(t.udp)))
    out["nf_conntrack_udp_timeout_stream"] = str(max(1, round(t.udp)))
    # The kernel would cap an entry with unacknowledged data or retransmissions at 300 s;
    # lbd's sessions know no such cap (and the idle clock lbd reads from the entry's
    # remaining time assumes the state's own timeout).
    longest = str(max(1, round(max(t.tcp_established, t.tcp_fin, t.tcp_time_wait))))
    out["nf_conntrack_tcp_timeout_unacknowledged"] = longest
    out["nf_conntrack_tcp_timeout_max_retrans"] = longest
    out["nf_conntrack_tcp_be_liberal"] = "1"  # lbd tracks no windows either
    out["nf_conntrack_tcp_loose"] = "1"  # flows lbd forwards mid-stream (after a takeover)
    return out


_SYN_RECV, _ESTABLISHED = int(TcpState.SYN_RECV), int(TcpState.ESTABLISHED)
_STATE_OF: Final[dict[int, int]] = {
    CT_TCP_SYN_SENT: _SYN_RECV, CT_TCP_SYN_RECV: _SYN_RECV, CT_TCP_ESTABLISHED: _ESTABLISHED,
    CT_TCP_FIN_WAIT: int(TcpState.FIN_WAIT), CT_TCP_CLOSE_WAIT: int(TcpState.CLOSE_WAIT),
    CT_TCP_LAST_ACK: int(TcpState.LAST_ACK), CT_TCP_TIME_WAIT: int(TcpState.TIME_WAIT),
    CT_TCP_CLOSE: int(TcpState.CLOSE)}
"""lbd's session state for the kernel's TCP conntrack state (which has a few more)."""


class Offloads:
    """Which flows are in the kernel, and what a kernel message means for the session table
    (pure: sessions and ``now`` in, table calls out; the caller sends what they ask for).

    ``flows`` maps a session's forward key to its entry's ct mark: lbd's bit and a serial
    number, which tells a new entry of a reused tuple from the old one whose DESTROY may
    still be on its way (the serial wraps after 2^31 entries). Requests carry the mark as
    their sequence number, so an error names the entry it was about too. A flow stays in
    ``flows`` until the kernel ends it (DESTROY, or a GET that finds nothing), lbd removes
    its session, or lbd forwards a packet of it after all (:meth:`returned`: the kernel
    refused it; the caller then deletes the entry). ``owned`` says whether a session is
    this node's own (a DESTROY of an entry whose flow the peer now forwards leaves the
    session, the peer's copy, alone).
    """

    def __init__(self, sessions: SessionTable[Any],
                 owned: Callable[[Session], bool] = lambda s: True) -> None:
        self.sessions = sessions
        self.owned = owned
        self.flows: dict[int, int] = {}
        self._serial = 0
        # counters
        self.offloaded_total = 0
        self.failed_total = 0  # NEWs the kernel refused or that were not sent
        self.established_total = 0
        self.closed_total = 0  # sessions removed because the kernel ended their flow
        self.returned_total = 0  # flows lbd forwarded itself after all (entry deleted)
        self.checks_total = 0  # GETs sent for a session whose deadline passed

    def __len__(self) -> int:
        return len(self.flows)

    def take(self, s: Session) -> int:
        """``s`` goes to the kernel: returns its entry's ct mark."""
        self._serial = (self._serial + 1) & (CT_MARK - 1) or 1
        mark = CT_MARK | self._serial
        self.flows[s.fkey] = mark
        self.offloaded_total += 1
        return mark

    def not_sent(self, s: Session) -> None:
        """The NEW for ``s`` could not be sent: the flow stays on lbd's path."""
        if self.flows.pop(s.fkey, None) is not None:
            self.offloaded_total -= 1
            self.failed_total += 1

    def _ended(self, fkey: int, now: float) -> None:
        """The kernel no longer has flow ``fkey``'s entry: its session ends with it."""
        del self.flows[fkey]
        s = self.sessions.lookup(fkey)
        if s is not None and self.owned(s):
            self.closed_total += 1
            self.sessions.remove(s, "conntrack", now)

    def on_message(self, m: CtMessage, now: float) -> None:
        """Apply one decoded kernel message."""
        if m.kind == ERROR:
            if self.flows.get(m.fkey) != m.seq:  # about another entry of the tuple
                return
            if m.request == IPCTNL_MSG_CT_NEW:
                del self.flows[m.fkey]
                self.offloaded_total -= 1
                self.failed_total += 1
            elif m.request == IPCTNL_MSG_CT_GET and m.errno == errno_.ENOENT:
                self._ended(m.fkey, now)  # its DESTROY was lost, or is still coming
            return
        if not m.mark & CT_MARK or self.flows.get(m.fkey) != m.mark:
            return  # not lbd's, or an older entry of a reused tuple
        if m.kind == DESTROYED:
            self._ended(m.fkey, now)
            return
        s = self.sessions.lookup(m.fkey)
        if m.kind != ENTRY or s is None or not self.owned(s):
            return  # (the peer's copy: the peer's account of the flow is the one that counts)
        state = s.state
        if s.proto == IPPROTO_TCP:
            state = _STATE_OF.get(m.tcp_state, 0) or state
        if m.timeout >= 0:
            # The kernel refreshes the entry on every packet: its idle time is what its
            # state's timeout (lbd's, conntrack_sysctls) has used up. The session's idle
            # clock follows it, which is what the table snapshot and the peer's copy read;
            # set before the state, whose change the peer is told of.
            idle = self.sessions.timeout_of[state] - m.timeout
            s.last_seen = max(s.last_seen, now - (idle if idle > 0 else 0))
        if state != s.state:
            if state == _ESTABLISHED and s.state == _SYN_RECV:
                self.established_total += 1
            self.sessions.adopt_state(s, state, now)

    def returned(self, s: Session) -> bool:
        """lbd forwarded a packet of ``s``, which the kernel should have (it refused it):
        True when ``s`` was offloaded; the flow is lbd's again and its entry must go."""
        if self.flows.pop(s.fkey, None) is None:
            return False
        self.returned_total += 1
        return True

    def removed(self, s: Session) -> bool:
        """lbd removed ``s``: True when its entry must be deleted from the kernel."""
        return self.flows.pop(s.fkey, None) is not None

    def keep(self, s: Session) -> int:
        """The deadline of ``s`` passed: its entry's mark when the kernel still has the
        flow (keep it; the caller asks the kernel, GET, with that sequence number), else
        0 (lbd's timers govern it)."""
        mark = self.flows.get(s.fkey, 0)
        if mark:
            self.checks_total += 1
        return mark

    def stats(self) -> dict[str, int]:
        return {"flows": len(self.flows), "offloaded": self.offloaded_total,
                "failed": self.failed_total, "established": self.established_total,
                "closed": self.closed_total, "returned": self.returned_total,
                "checks": self.checks_total}


class ConntrackOffload:
    """The I/O shell: creates entries as the forwarder opens flows, reads the kernel's
    answers and events, loads and removes the nft table.

    One netlink socket sends NEW, DELETE and GET (the kernel processes each within the
    ``send``: an entry exists before the packet that opened its flow is written back),
    receives the refusals, and is subscribed to the update and destroy events: one reader
    on the loop. The DESTROY of an entry lbd deleted itself does arrive (the kernel echoes
    events to the requester as to any listener) and is dropped: its flow is no longer in
    ``flows``, or holds a newer mark. A DELETE waits in ``_out`` for the next NEW (a reused
    port: one ``send`` for both) or the end of the loop iteration, whichever comes first.
    """

    RCVBUF = 8 << 20
    RETRY = 0.1  # seconds before a failed send of queued requests is tried again

    def __init__(self, sessions: SessionTable[Any], timeouts: SessionTimeouts,
                 clock: Callable[[], float]) -> None:
        self.table = Offloads(sessions, owned=lambda s: bool(s.service.owned))
        self.clock = clock
        self._timeout_syn = max(1, round(timeouts.tcp_syn))
        self._timeout_udp = max(1, round(timeouts.udp))
        self._sock: socket.socket | None = None
        self._out = bytearray(MAX_REQUEST * 64)
        self._out_view = memoryview(self._out)
        self._pending = 0  # bytes of DELETEs and GETs waiting in _out
        self._retrying = False
        self._in = bytearray(1 << 16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.loaded = False
        # False while the servers' replies reach the peer (it masters their gateway: an
        # active-active split): an entry here would see one direction only, which conntrack
        # judges invalid, so every packet would come back to lbd anyway. Set by the node.
        self.replies_here = True
        self.send_errors = 0
        self.events_lost = 0  # the socket overflowed (ENOBUFS): events were lost
        self.bad_messages = 0

    # ---- life cycle -------------------------------------------------------------------------
    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             NETLINK_NETFILTER)
        with contextlib.suppress(OSError):  # SO_RCVBUFFORCE: root may exceed rmem_max
            sock.setsockopt(socket.SOL_SOCKET, 33, self.RCVBUF)
        sock.bind((0, (1 << (NFNLGRP_CONNTRACK_UPDATE - 1))
                   | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))))
        self._sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._drain)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._loop = None

    @staticmethod
    def apply(client_if: str, tun: str, tcp_targets: Iterable[tuple[str, int]]) -> None:
        """Load (or replace, atomically) :data:`TABLE`. Blocking: call in a thread."""
        try:
            run_nft(ruleset(client_if, tun, tcp_targets))
        except RuntimeError as exc:
            raise RuntimeError(f"nft refused the offload table: {exc}") from exc

    @staticmethod
    def remove(*, leftover: bool = False) -> None:
        """Remove :data:`TABLE` and every entry lbd created. ``leftover`` (at a start with
        offload off): only if a killed lbd left the table (and nft is there to ask),
        quietly. Blocking."""
        if leftover:
            if shutil.which(NFT) is None or subprocess.run(
                    [NFT, "list", "table", "ip", TABLE], capture_output=True, timeout=10,
                    check=False).returncode != 0:
                return  # no table: nothing of an earlier lbd's in conntrack either
            log.info("removing the offload table an earlier lbd left")
        try:
            run_nft(f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
        except RuntimeError as exc:
            log.warning("offload: cannot remove nft table ip %s: %s", TABLE, exc)
        had = ConntrackOffload.flush_entries()
        if leftover and had:
            log.info("removed %d conntrack entries an earlier lbd left", had)

    @staticmethod
    def flush_entries() -> int:
        """Delete every conntrack entry that carries lbd's ct mark bit (one killed before
        it could clean up left them); returns how many there were. Blocking."""
        ct = NFCTSocket()
        try:
            had = sum(1 for _ in ct.dump(mark=CT_MARK, mark_mask=CT_MARK))
            if had:
                ct.flush(mark=CT_MARK, mark_mask=CT_MARK)
            return had
        except Exception as exc:  # no conntrack module loaded: nothing to flush
            log.debug("conntrack flush: %s", exc)
            return 0
        finally:
            ct.close()

    # ---- the data plane's calls ---------------------------------------------------------------
    def opened(self, s: Session, flags: int) -> None:
        """The forwarder made ``s`` for a flow's first packet (not yet written back)."""
        proto = s.fkey >> 96
        if self._sock is None or not s.service.owned or not self.replies_here:
            return
        srv = s.server
        if self._pending + MAX_REQUEST > len(self._out):
            self.send_pending()
            if self._pending + MAX_REQUEST > len(self._out):  # the kernel takes nothing
                self.send_errors += 1
                return
        out, pending = self._out, self._pending
        end = pending
        if proto == IPPROTO_TCP:
            if not flags & 0x02 or flags & 0x10:  # a SYN opens it; a flow picked up stays
                return
            mark = self.table.take(s)
            end = pack_new(out, end, s.fkey, srv.addr, srv.port, self._timeout_syn, mark,
                           CT_TCP_SYN_SENT)
        elif proto == IPPROTO_UDP:
            # The datagram was tracked on its way into the TUN: that entry (no NAT) holds
            # the tuple until it is deleted; the DELETE goes in the same send.
            mark = self.table.take(s)
            end = pack_delete(out, end, s.fkey)
            end = pack_new(out, end, s.fkey, srv.addr, srv.port, self._timeout_udp, mark, 0)
        else:
            return
        self._pending = 0
        if not self._send(end):
            self.table.not_sent(s)
            if pending:  # the DELETEs queued before it must not be lost with it
                self._pending = pending
                self._retry()

    def removed(self, s: Session, reason: str) -> None:
        """The session table removed ``s``: delete its entry unless the kernel ended it."""
        if self.table.removed(s) and reason != "conntrack":
            self._queue(pack_delete, s.fkey, 0)

    def seen(self, s: Session, flags: int) -> None:
        """The forwarder forwarded a packet of ``s`` itself (not a flow's first). For an
        offloaded TCP flow that is a packet the kernel refused (a retransmitted SYN is not:
        SYNs are untracked, so they always reach lbd): the flow is lbd's from now on, and
        its entry goes. (UDP: only datagrams that were queued before the entry existed.)"""
        if s.fkey >> 96 == IPPROTO_TCP and flags & 0x12 != 0x02 and self.table.returned(s):
            self._queue(pack_delete, s.fkey, 0)

    def keep(self, s: Session) -> bool:
        mark = self.table.keep(s)
        if not mark:
            return False
        self._queue(pack_get, s.fkey, mark)
        return True

    def _queue(self, pack: Any, fkey: int, seq: int) -> None:
        """Add a DELETE or GET to ``_out``, sent with the next NEW or when the loop's
        current callbacks are done."""
        if self._sock is None:
            return
        if self._pending + MAX_REQUEST > len(self._out):
            self.send_pending()
            if self._pending + MAX_REQUEST > len(self._out):  # the kernel takes nothing
                self.send_errors += 1
                return
        if not self._pending and self._loop is not None:
            self._loop.call_soon(self.send_pending)
        self._pending = pack(self._out, self._pending, fkey, seq)

    def send_pending(self) -> None:
        end = self._pending
        if not end:
            return
        if self._send(end):
            self._pending = 0
        else:  # kept: a DELETE lost would leave an entry translating a flow lbd forgot
            self._retry()

    def _retry(self) -> None:
        if not self._retrying and self._loop is not None:
            self._retrying = True
            self._loop.call_later(self.RETRY, self._retried)

    def _retried(self) -> None:
        self._retrying = False
        self.send_pending()

    def _send(self, end: int) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send(self._out_view[:end])
        except OSError:
            self.send_errors += 1
            return False
        return True

    def _drain(self) -> None:
        """Read what the kernel sent (bounded per wake-up) and apply it."""
        sock = self._sock
        if sock is None:
            return
        now = self.clock()
        buf = self._in
        on_message = self.table.on_message
        for _ in range(256):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno_.ENOBUFS:
                    self.events_lost += 1
                    continue
                return
            try:
                for m in parse(buf, n):
                    on_message(m, now)
            except Exception:  # a malformed message loses nothing else
                self.bad_messages += 1

    def stats(self) -> dict[str, int]:
        return {**self.table.stats(), "send_errors": self.send_errors,
                "events_lost": self.events_lost, "bad_messages": self.bad_messages}
