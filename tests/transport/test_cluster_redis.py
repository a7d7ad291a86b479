"""Elections on a Redis Cluster of 3 primaries and 3 replicas (``redis+cluster://``).

Every key and channel of a group carries its hash tag, so a group lives on one slot: its
scripts run on that slot's primary and its messages travel by sharded pub/sub there. Killing
that primary (SIGKILL) makes its replica take over the slot; the group must elect again, with
a larger fencing token. Many groups, spread over every primary, each elect one leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from fastapi_leader import LeaderSettings
from fastapi_leader.transport.base import Names
from fastapi_leader.transport.redis import acl_rule
from harness.topologies import FAILOVER_TIMEOUT, ClusterTopology
from tests.helpers.cluster import WAIT, Cluster, eventually

pytestmark = [pytest.mark.redis, pytest.mark.slow]

# Relaxed timings for the many-groups test: 400 nodes on one election thread, on a 2-core
# machine shared with other work, must not miss their own renewals.
RELAXED = {
    "heartbeat_interval": 0.5,
    "lease": 2.0,
    "election_timeout_min": 2.5,
    "election_timeout_max": 3.5,
    "member_expiry": 5.0,
}
GROUPS = 200
NODES_PER_GROUP = 2


@pytest.fixture(scope="module")
def topology() -> Iterator[ClusterTopology]:
    """One cluster for the tests that do not break it."""
    with ClusterTopology() as cluster:
        yield cluster


def names(group: str) -> Names:
    return Names("fastapi-leader", group, "-")


async def test_cluster_elects_one_leader_over_sharded_pubsub(topology: ClusterTopology) -> None:
    async with Cluster(topology.url) as cluster:
        for _ in range(3):
            await cluster.add()
        leader = await cluster.wait_for_single_leader()
        assert leader.fencing_token is not None and leader.fencing_token >= 1
        group = names(cluster.group)
        primary = topology.primary_of(group.broadcast)
        with redis.Redis("127.0.0.1", primary.port) as admin:
            # The group's channels are shard channels on its slot's primary, its keys there too.
            channels = set(admin.execute_command("PUBSUB", "SHARDCHANNELS", f"*{cluster.group}*"))
            assert group.broadcast.encode() in channels
            assert admin.get(group.leader_key) is not None
            assert int(admin.get(group.term_key)) == leader.fencing_token


async def test_killing_the_slot_primary_elects_a_new_leader_with_a_larger_token() -> None:
    with ClusterTopology() as topology:
        async with Cluster(topology.url) as cluster:
            for _ in range(3):
                await cluster.add()
            leader = await cluster.wait_for_single_leader()
            token = leader.fencing_token
            assert token is not None
            group = names(cluster.group)
            killed_at = time.monotonic()
            old = await asyncio.to_thread(topology.kill_primary_of, group.leader_key)
            await asyncio.to_thread(topology.wait_for_new_primary_of, group.leader_key, old)
            promoted_at = time.monotonic()

            def newer_leader() -> object:
                settled = cluster.settled()
                return (
                    settled
                    if settled is not None and (settled.fencing_token or 0) > token
                    else None
                )

            await eventually(newer_leader, FAILOVER_TIMEOUT + WAIT, "a leader with a newer token")
            elected_at = time.monotonic()
        print(
            f"slot failover {promoted_at - killed_at:.2f} s, "
            f"new leader {elected_at - killed_at:.2f} s after the kill"
        )


@contextlib.asynccontextmanager
async def many_groups(url: str) -> AsyncIterator[list[Cluster]]:
    clusters = [Cluster(url, group=f"g{index}-{uuid.uuid4().hex[:6]}") for index in range(GROUPS)]
    try:
        yield clusters
    finally:
        # Concurrently and bounded: one node's stop that hangs must fail the test, not hang it.
        await asyncio.wait_for(
            asyncio.gather(*(cluster.close() for cluster in clusters), return_exceptions=True),
            60,
        )


@pytest.mark.timeout(300)  # the bounds below: 90 s to start, 90 s to settle, 60 s to stop
async def test_many_groups_over_every_primary_each_elect_one_leader(
    topology: ClusterTopology,
) -> None:
    async with many_groups(topology.url) as clusters:
        # Several groups per process, as a service with many singleton roles runs them: every
        # "process" (node id) here takes part in all the groups.
        for cluster in clusters:
            for node in range(NODES_PER_GROUP):
                cluster.make(f"p{node}", **RELAXED)
        nodes = [node for cluster in clusters for node in cluster.nodes]
        started_at = time.monotonic()

        # In small batches: each start reads the slot map and the command table, on the one
        # election thread that also runs the nodes already started.
        async def start_all() -> None:
            for batch in range(0, len(nodes), 10):
                await asyncio.gather(*(node.start() for node in nodes[batch : batch + 10]))

        await asyncio.wait_for(start_all(), 90)
        print(f"{len(nodes)} nodes started in {time.monotonic() - started_at:.1f} s")
        primaries = {topology.primary_of(names(c.group).leader_key).port for c in clusters}
        assert len(primaries) == 3, "the groups should spread over every primary"

        def all_settled() -> bool:
            return all(cluster.settled() is not None for cluster in clusters)

        await eventually(all_settled, 90, f"one leader in each of {GROUPS} groups")
        print(f"{GROUPS} groups settled {time.monotonic() - started_at:.1f} s after the start")
        for cluster in clusters:
            assert len(cluster.leaders()) == 1


async def test_cluster_runs_under_exactly_the_acl_rule(topology: ClusterTopology) -> None:
    group = f"acl-{uuid.uuid4().hex[:8]}"
    rules = acl_rule(LeaderSettings(redis_url=topology.url, group=group))
    user, password = f"u-{group}", uuid.uuid4().hex
    for server in topology.servers:
        with redis.Redis("127.0.0.1", server.port) as admin:
            admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)
            admin.execute_command("ACL", "LOG", "RESET")
    url = topology.url.replace("redis+cluster://", f"redis+cluster://{user}:{password}@")
    try:
        async with Cluster(url, group=group) as cluster:
            for _ in range(3):
                await cluster.add(redis_url=url)
            leader = await cluster.wait_for_single_leader()
            await leader.stop()  # a handover: release, a new term, acquire
            await cluster.wait_for_single_leader()
        for server in topology.servers:
            with redis.Redis("127.0.0.1", server.port) as admin:
                assert admin.execute_command("ACL", "LOG") == [], "a command was refused"
    finally:
        for server in topology.servers:
            with redis.Redis("127.0.0.1", server.port) as admin:
                admin.execute_command("ACL", "DELUSER", user)


async def test_the_command_line_reads_a_group_on_a_cluster(topology: ClusterTopology) -> None:
    # status reads the keys through the transport's cluster client (routed to the group's
    # slot); check starts as a node would there, then measures the round trip.
    from tests.test_cli import here

    async with Cluster(topology.url) as cluster:
        for _ in range(2):
            await cluster.add()
        leader = await cluster.wait_for_single_leader()
        common = ("--redis-url", topology.url, "--group", cluster.group)
        status = await here("status", "--json", *common)
        assert status.code == 0, status
        assert f'"{leader.node_id}"' in status.out
        check = await here("check", *common)
        assert check.code == 0, check
        assert "started as a node would" in check.out
        assert "Traceback" not in check.err
