"""Elections through Sentinel (``redis+sentinel://``): a primary, a replica, 3 sentinels.

The nodes find the primary through the sentinels, and find it again when it dies and the
sentinels promote the replica. The replica may have missed the last term increments (the
replication is asynchronous): the next term must still be larger than every one issued before,
because the nodes carry the highest term they have seen and allocation never goes below it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fastapi_leader.transport.base import Names
from harness.topologies import FAILOVER_TIMEOUT, SentinelTopology
from tests.helpers.cluster import WAIT, Cluster, eventually

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def newer_leader(cluster: Cluster, than: int) -> object:
    """The settled leader if its fencing token is above ``than``."""
    leader = cluster.settled()
    if leader is not None and (leader.fencing_token or 0) > than:
        return leader
    return None


async def test_sentinel_elects_and_a_new_leader_follows_the_promoted_replica() -> None:
    # Sentinels with a password of their own: LEADER_SENTINEL_PASSWORD.
    with SentinelTopology(sentinel_password="sentinels-own") as topology:
        async with Cluster(topology.url, sentinel_password="sentinels-own") as cluster:
            for _ in range(3):
                await cluster.add()
            leader = await cluster.wait_for_single_leader()
            token = leader.fencing_token
            assert token is not None
            killed_at = time.monotonic()
            await asyncio.to_thread(topology.kill_primary)
            await asyncio.to_thread(topology.wait_for_failover)
            promoted_at = time.monotonic()
            await eventually(
                lambda: newer_leader(cluster, token),
                FAILOVER_TIMEOUT + WAIT,
                "a leader with a newer token on the promoted replica",
            )
            elected_at = time.monotonic()
            assert topology.primary is not None
            names = Names("fastapi-leader", cluster.group, "-")
            with topology.admin(topology.primary) as admin:
                assert admin.get(names.leader_key) is not None  # the lease lives on the new one
        print(
            f"sentinel failover {promoted_at - killed_at:.2f} s, "
            f"new leader {elected_at - killed_at:.2f} s after the kill"
        )


async def test_regression_promoted_replica_that_missed_increments_never_repeats_a_token() -> None:
    with SentinelTopology() as topology:
        assert topology.primary is not None and topology.replica is not None
        async with Cluster(topology.url) as cluster:
            nodes = [await cluster.add() for _ in range(3)]
            first = await cluster.wait_for_single_leader()
            names = Names("fastapi-leader", cluster.group, "-")
            # The replica stops taking in the primary's writes; it has the terms so far.
            await asyncio.to_thread(topology.cut_replication)
            with topology.admin(topology.primary) as admin:
                admin.incrby(names.term_key, 50)  # terms issued meanwhile, lost below
            await first.stop()
            second = await eventually(
                lambda: newer_leader(cluster, (first.fencing_token or 0) + 50),
                WAIT,
                "a leader elected on terms the replica never saw",
            )
            highest = second.fencing_token
            assert highest is not None
            assert all(node.term >= highest for node in nodes if node.running)
            await asyncio.to_thread(topology.kill_primary)
            with topology.admin(topology.replica) as admin:
                stale = int(admin.get(names.term_key) or 0)
            assert stale < highest, "the replica was meant to miss the last increments"
            await asyncio.to_thread(topology.wait_for_failover)
            third = await eventually(
                lambda: cluster.settled(same_term=False),
                FAILOVER_TIMEOUT + WAIT,
                "a leader after the failover",
            )
            # Without the nodes' floor the promoted counter would hand out stale + 1 <= highest.
            assert third.fencing_token is not None and third.fencing_token > highest
