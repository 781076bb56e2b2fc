"""lb.steering on a real multi-queue TUN: both directions of each NAT flow, and an ICMP
error about it, reach the same queue, the one lb.steering.queue_of names for the client,
and the clients spread over every queue. Packets sent through a raw socket in a namespace
of the test's own (lab.steer_probe), read from each queue's fd."""

from __future__ import annotations

import json
import socket
import sys
from collections import defaultdict

import pytest

from lab.harness import ENV
from lab.topology import Lab
from lb.steering import queue_of


@pytest.mark.parametrize("queues", [2, 3])
def test_each_flow_and_its_replies_reach_one_queue(queues: int) -> None:
    lab = Lab()
    try:
        lab.add_ns("lb")
        out = lab.sh("lb", f"env PYTHONPATH={ENV['PYTHONPATH']} {sys.executable} -m "
                     f"lab.steer_probe --queues {queues} --clients 60")
    finally:
        lab.close()
    got = json.loads(out.strip().splitlines()[-1])
    assert got["queues"] == queues
    by_client: dict[str, dict[str, int]] = defaultdict(dict)
    for kind, client, _ident, queue in got["packets"]:
        assert queue is not None, f"{kind} of {client} was not read from any queue"
        by_client[client][kind] = queue
    assert len(by_client) == 60
    for client, seen in by_client.items():
        expected = queue_of(int.from_bytes(socket.inet_aton(client), "big"), queues)
        assert seen == dict.fromkeys(("to_vip", "reply", "icmp_to_vip"), expected), client
    assert {q for seen in by_client.values() for q in seen.values()} == set(range(queues))
