"""The [prometheus] extra: metrics through a real handover, one registry per node (as one
process per node would have), the folding of one process's nodes, and GET /metrics.

The multiprocess mode under ``uvicorn --workers 2`` is tested in tests/e2e/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from fastapi_leader import Cause, LeaderElection, MemoryBroker, MemoryTransport, Role
from fastapi_leader import events as ev
from fastapi_leader.prometheus import PrometheusObserver, metrics_router
from fastapi_leader.transport.base import Names
from tests.helpers.cluster import WAIT, Cluster, eventually


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster(broker=MemoryBroker()) as cluster:
        yield cluster


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def observed_node(cluster: Cluster) -> tuple[LeaderElection, CollectorRegistry]:
    settings = cluster.settings()
    assert cluster.broker is not None and settings.node_id is not None
    names = Names(settings.channel_prefix, settings.group, settings.node_id)
    registry = CollectorRegistry()
    node = LeaderElection(
        settings,
        transport=MemoryTransport(cluster.broker, names),
        observer=PrometheusObserver(registry),
    )
    cluster.nodes.append(node)
    return node, registry


async def test_metrics_follow_a_handover(cluster: Cluster) -> None:
    nodes = dict(observed_node(cluster) for _ in range(3))
    for node in nodes:
        await node.start()
    group = cluster.group
    old = await cluster.wait_for_single_leader()

    def leaders() -> list[LeaderElection]:
        return [n for n, r in nodes.items() if value(r, "fastapi_leader_is_leader", group=group)]

    await eventually(lambda: leaders() == [old], what="is_leader on the leader alone")
    reg = nodes[old]
    token = old.fencing_token
    assert token is not None
    await eventually(
        lambda: value(reg, "fastapi_leader_members", group=group) == 3, what="three members"
    )
    assert value(reg, "fastapi_leader_term", group=group) == token
    assert value(reg, "fastapi_leader_connected", group=group) == 1
    assert value(
        reg,
        "fastapi_leader_elections_total",
        group=group,
        trigger="election_timeout",
        outcome="won",
    )
    await eventually(
        lambda: value(reg, "fastapi_leader_renew_duration_seconds_count", group=group) >= 3,
        what="renewals timed",
    )

    await old.resign()
    new = await cluster.wait_for_single_leader()
    await eventually(lambda: leaders() == [new], what="is_leader moved")
    changes = "fastapi_leader_leadership_changes_total"
    assert value(reg, changes, group=group, change="lost", reason="resigned") == 1
    assert value(nodes[new], changes, group=group, change="gained", reason="named_successor") == 1
    gap = value(nodes[new], "fastapi_leader_leaderless_seconds_sum", group=group)
    assert value(nodes[new], "fastapi_leader_leaderless_seconds_count", group=group) == 1
    assert 0 <= gap < 1.0  # a handover: round trips, not a timeout

    await new.stop()
    assert value(nodes[new], "fastapi_leader_is_leader", group=group) == 0
    assert value(nodes[new], "fastapi_leader_connected", group=group) == 0


def test_one_process_nodes_fold_into_one_series() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    assert PrometheusObserver(registry).metrics is observer.metrics  # no duplicated series

    def at(node_id: str) -> dict[str, object]:
        return {"group": "g", "node_id": node_id, "at": 0.0}

    observer.joined(ev.ElectionEvent(**at("a")))  # type: ignore[arg-type]
    observer.joined(ev.ElectionEvent(**at("b")))  # type: ignore[arg-type]
    observer.role_changed(
        ev.RoleChange(
            **at("a"),  # type: ignore[arg-type]
            old=Role.CANDIDATE,
            new=Role.LEADER,
            term=4,
            cause=Cause.WON,
            reason="won",
        )
    )
    observer.connection_lost(ev.ConnectionLost(**at("b")))  # type: ignore[arg-type]
    assert value(registry, "fastapi_leader_is_leader", group="g") == 1
    assert value(registry, "fastapi_leader_term", group="g") == 4
    assert value(registry, "fastapi_leader_connected", group="g") == 0  # the fewest
    assert value(registry, "fastapi_leader_connection_losses_total", group="g") == 1
    observer.message_dropped(ev.MessageDropped(**at("b"), reason="replay"))  # type: ignore[arg-type]
    assert value(registry, "fastapi_leader_dropped_messages_total", group="g", reason="replay") == 1
    observer.left(ev.ElectionEvent(**at("a")))  # type: ignore[arg-type]
    assert value(registry, "fastapi_leader_is_leader", group="g") == 0


async def test_metrics_router_serves_the_text_format(cluster: Cluster) -> None:
    node, registry = observed_node(cluster)
    await node.start()
    await node.wait_until_leader(timeout=WAIT)
    app = FastAPI()
    app.include_router(metrics_router(registry=registry))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert f'fastapi_leader_is_leader{{group="{cluster.group}"}} 1.0' in response.text
    assert "# TYPE fastapi_leader_elections_total counter" in response.text
