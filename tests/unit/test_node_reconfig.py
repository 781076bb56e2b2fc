"""The node's reconfiguration path: reloads and operator changes run one at a time, and
operator state is saved and loaded under [node] state_dir. No kernel, no sockets: the
node is driven in-process (its kernel-facing steps are skipped when it has none)."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest

from lb import opstate
from lb.config import parse_config
from lb.control import CommandError
from lb.node import Node
from lb.servers import AdminState

CONFIG = """
[node]
name = "t"
state_dir = "@STATE@"
[dataplane]
client_interface = "lo"
server_interface = "lo"
[virtual_servers.web]
address = "198.51.100.10"
port = 80
pool = "web"
scheduler = "maglev"
[pools.web]
health_check = { type = "tcp", interval = "30s" }
servers = [{ address = "198.18.0.11", port = 8080 }, { address = "198.18.0.12", port = 8080 }]
"""


def make_node(tmp_path: Path) -> Node:
    path = tmp_path / "lbd.toml"
    text = CONFIG.replace("@STATE@", str(tmp_path / "state"))
    path.write_text(text)
    return Node(parse_config(tomllib.loads(text), str(path)))


def health_tasks() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("health "))


def test_two_concurrent_reloads_leave_exactly_one_monitor(tmp_path: Path) -> None:
    node = make_node(tmp_path)

    async def main() -> None:
        node._start_health()
        assert health_tasks() == 2
        # a SIGHUP and an lbctl reload at the same moment
        results = await asyncio.gather(node.reload(), node.reload(),
                                       node.control_handlers()["reload"]([]))
        assert list(results[:2]) == [[], []]
        assert health_tasks() == 2  # one monitor, two servers: nothing left running
        assert node.reloads == 3
        assert node.monitor is not None
        await node.monitor.stop()
        assert health_tasks() == 0

    asyncio.run(main())


def test_operator_changes_queue_behind_a_reload(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    handlers = node.control_handlers()
    order: list[str] = []

    async def main() -> None:
        node._start_health()

        async def reload() -> None:
            await node.reload()
            order.append("reload")

        async def drain() -> None:
            await handlers["drain"](["web", "198.18.0.12:8080"])
            order.append("drain")

        await asyncio.gather(reload(), drain(), node.reload())
        assert node.monitor is not None
        await node.monitor.stop()

    asyncio.run(main())
    assert order == ["reload", "drain"]
    (s2,) = [s for s in node.services.servers() if s.key == "198.18.0.12:8080"]
    assert s2.admin is AdminState.DRAIN  # the later reload kept the operator's drain


def test_operator_state_is_saved_and_loaded_at_start(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    handlers = node.control_handlers()

    async def change() -> None:
        answer = await handlers["weight"](["web", "198.18.0.11:8080", "4"])
        assert answer["saved"] is True
        await handlers["add-server"](["web", "198.18.0.13:8080", "--weight", "2"])
        await handlers["disable"](["web", "198.18.0.12:8080"])
        if node.monitor is not None:
            await node.monitor.stop()

    asyncio.run(change())
    saved = opstate.load(tmp_path / "state")
    assert saved[1] is None and len(saved[0].records) == 3

    again = make_node(tmp_path)
    asyncio.run(again._load_operator_state())
    view = {s.key: (s.weight, s.admin.value, s.up) for s in again.services.servers()}
    assert view == {"198.18.0.11:8080": (4, "enabled", True),
                    "198.18.0.12:8080": (1, "disabled", True),
                    "198.18.0.13:8080": (2, "enabled", True)}


def test_a_corrupt_state_file_is_a_fresh_start(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / opstate.FILE_NAME).write_text("{garbage")
    node = make_node(tmp_path)
    asyncio.run(node._load_operator_state())
    assert all(s.admin is AdminState.ENABLED for s in node.services.servers())
    assert any("operator state not used, starting fresh" in r.getMessage()
               for r in caplog.records)
    assert opstate.load(tmp_path / "state") == (opstate.OperatorState(), None)


@pytest.mark.parametrize(("command", "args", "error"), [
    ("weight", ["web", "198.18.0.11:8080"], "usage"),
    ("weight", ["web", "198.18.0.11:8080", "x"], "not an integer"),
    ("weight", ["web", "198.18.0.11:8080", "-1"], "out of range"),
    ("weight", ["nope", "198.18.0.11:8080", "1"], "no pool"),
    ("drain", ["web", "198.18.0.99:8080"], "has no server"),
    ("add-server", ["web", "198.18.0.11:8080"], "already has"),
    ("add-server", ["web", "198.18.0.13:8080", "--colour", "red"], "unknown option"),
    ("remove-server", ["web"], "usage"),
    ("sessions", ["--virtual", "nope"], "no virtual server"),
    ("sessions", ["--limit", "many"], "not an integer"),
    ("demote", [], "standalone"),
])
def test_refused_commands(tmp_path: Path, command: str, args: list[str], error: str) -> None:
    node = make_node(tmp_path)

    async def main() -> None:
        result = node.control_handlers()[command](args)
        if asyncio.iscoroutine(result):
            await result

    with pytest.raises(CommandError, match=error):
        asyncio.run(main())


def test_a_reload_applies_new_per_source_limits_and_status_shows_them(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    web = node.status()["virtual_servers"]["web"]
    assert web["source_limits"] == {"max_conns_per_source": 10000,
                                    "max_conn_rate_per_source": 1000, "conn_rate_period": 1.0}
    limits = node.status()["source_limits"]
    assert limits == {"tracked": 0, "idle": 0, "capacity": 1048576 // 4,
                      "conn_limit_drops": 0, "rate_limit_drops": 0, "untracked": 0,
                      "evicted": 0}
    path = tmp_path / "lbd.toml"
    path.write_text(path.read_text().replace(
        'scheduler = "maglev"',
        'scheduler = "maglev"\nmax_conns_per_source = 3\nmax_conn_rate_per_source = 0'))

    async def main() -> None:
        assert await node.reload() == []
        if node.monitor is not None:
            await node.monitor.stop()

    asyncio.run(main())
    assert node.status()["virtual_servers"]["web"]["source_limits"] == {
        "max_conns_per_source": 3, "max_conn_rate_per_source": 0, "conn_rate_period": 1.0}
    (svc,) = node.services.services
    assert svc.source_limits is not None and svc.source_limits.max_conns == 3
