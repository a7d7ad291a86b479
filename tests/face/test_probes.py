"""Health probes (fastapi_leader.probes): liveness fails only for what a restart cures,
readiness never waits for leadership, /leaderz answers 200 on the leader alone.

Nodes run in this process on the in-memory broker, behind their apps' lifespans.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from fastapi_leader import (
    LeaderElection,
    MemoryBroker,
    MemoryTransport,
    ProbeResult,
    leader_lifespan,
    liveness,
    probe_router,
    readiness,
)
from fastapi_leader.transport.base import Names
from tests.face.test_integration import serve
from tests.helpers.cluster import WAIT, Cluster, eventually


def node(cluster: Cluster, **settings: object) -> LeaderElection:
    node_settings = cluster.settings(**settings)
    assert cluster.broker is not None and node_settings.node_id is not None
    names = Names(node_settings.channel_prefix, node_settings.group, node_settings.node_id)
    election = LeaderElection(node_settings, transport=MemoryTransport(cluster.broker, names))
    cluster.nodes.append(election)
    return election


def app_for(election: LeaderElection) -> FastAPI:
    app = FastAPI(lifespan=leader_lifespan(election))
    app.include_router(probe_router(leaderz="/leaderz", margin=0.5))
    return app


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster(broker=MemoryBroker()) as cluster:
        yield cluster


async def test_probes_answer_on_leader_and_follower(cluster: Cluster) -> None:
    first, second = node(cluster), node(cluster)
    async with serve(app_for(first)) as a, serve(app_for(second)) as b:
        leader = await cluster.wait_for_single_leader()
        leader_client, follower_client = (a, b) if leader is first else (b, a)
        for client in (a, b):
            for path in ("/livez", "/readyz"):
                response = await client.get(path)
                assert response.status_code == 200, response.text
                assert response.json()["status"] == "ok"
                assert response.headers["cache-control"] == "no-store"
        assert (await leader_client.get("/leaderz")).status_code == 200
        refused = await follower_client.get("/leaderz")
        assert refused.status_code == 503
        assert refused.headers["x-leader-id"] == leader.node_id
        # Not in the app's OpenAPI unless asked.
        assert "/livez" not in (await a.get("/openapi.json")).json()["paths"]


async def test_readiness_is_the_election_running_not_leadership(cluster: Cluster) -> None:
    election = node(cluster)
    assert readiness(election) == ProbeResult(False, {"election": "not running"})
    assert liveness(election).ok  # nothing to restart for
    await election.start()
    assert readiness(election).ok and not election.is_leader  # ready before leading
    await election.stop()
    assert not readiness(election).ok


async def test_liveness_fails_while_the_election_thread_is_wedged(cluster: Cluster) -> None:
    election = node(cluster)
    async with serve(app_for(election)) as client:
        await election.wait_until_leader(timeout=WAIT)
        thread = election._thread
        assert thread is not None

        async def wedge() -> None:
            time.sleep(1.5)  # noqa: ASYNC251 - the fault under test: the election thread stuck

        wedged = asyncio.wrap_future(thread.submit(wedge()))
        failing = await eventually(
            lambda: not liveness(election, margin=0.5).ok, what="liveness to fail"
        )
        assert failing
        response = await client.get("/livez")
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert checks["election_thread"].startswith("has not run for")
        await wedged
        # The runtime comes back, steps down from the lease that ran out, and is live again.
        await eventually(lambda: liveness(election, margin=0.5).ok, what="liveness back")
        assert (await client.get("/livez")).status_code == 200


async def test_liveness_fails_when_the_app_loop_is_stuck_past_its_limit(cluster: Cluster) -> None:
    election = node(cluster, loop_stall_limit=1.0)
    await election.start()
    seen: list[ProbeResult] = []

    def probe_from_another_thread() -> None:  # a sidecar server would do this
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            result = liveness(election)
            if not result.ok:
                seen.append(result)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=probe_from_another_thread)
    watcher.start()
    time.sleep(1.8)  # noqa: ASYNC251 - the stall under test: this loop, past its 1 s limit
    await asyncio.to_thread(watcher.join)
    (result,) = seen
    assert result.checks["app_loop"].startswith("stuck for")
    await eventually(lambda: liveness(election).ok, what="liveness back")


async def test_a_probe_router_without_the_lifespan_says_what_to_add() -> None:
    app = FastAPI()
    app.include_router(probe_router())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="leader_lifespan"):
            await client.get("/readyz")
