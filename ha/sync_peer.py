"""Does the peer run the same virtual servers and pools as this node? (pure)

Each :class:`~ha.sync_codec.Hello` carries the sender's ``Config.service_digest()``. A
mismatch is allowed — during a rolling change the two nodes differ for a while, and records
that name something only one side has are skipped and counted by the replicator — but it is
shown (``lbctl sync``, a gauge) and logged once when it starts, not on every reconnect.
"""

from __future__ import annotations


class PeerConfig:
    """This node's digest against the last one the peer sent."""

    def __init__(self, own: bytes) -> None:
        self.own = own
        self.peer: bytes | None = None
        """The digest of the peer's last Hello (None: no Hello yet)."""
        self._warned = False

    @property
    def match(self) -> bool | None:
        """True/False once the peer said hello, None before."""
        return None if self.peer is None else self.peer == self.own

    def hello(self, digest: bytes) -> bool:
        """The peer said hello with ``digest``. True: a mismatch starts now (log it)."""
        self.peer = digest
        return self._check()

    def reconfigured(self, own: bytes) -> bool:
        """This node's services changed (reload). True: a mismatch starts now (log it)."""
        self.own = own
        return self._check()

    def _check(self) -> bool:
        if self.match is not False:
            self._warned = False
            return False
        if self._warned:
            return False
        self._warned = True
        return True
