"""Elections through Sentinel (``redis+sentinel://``): a primary, a replica, 3 sentinels.

The nodes find the primary through the sentinels, and find it again when it dies and the
sentinels promote the replica, or when the sentinels announce a new primary (``+switch-master``)
while the old one still runs, as after a ``SENTINEL FAILOVER``. The replica may have missed the
last term increments (the replication is asynchronous): the next term must still be larger than
every one issued before, because the nodes carry the highest term they have seen and allocation
never goes below it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from fastapi_leader.testing import RedisServer
from fastapi_leader.transport.base import Names
from fastapi_leader.transport.redis import RedisTransport, _parse_switch_master
from harness.topologies import FAILOVER_TIMEOUT, SERVICE, SentinelTopology
from tests.helpers.cluster import WAIT, Cluster, LeaderSampler, eventually
from tests.transport.recording import RecordingSink

# Polls of CLIENT LIST: often enough to time a move to within a few tens of milliseconds.
_POLL = 0.02


def named(url: str, client_name: str) -> str:
    """``url`` with redis-py's ``client_name`` option: the node's connections to the primary
    then carry that name in ``CLIENT LIST`` (the sentinels' connections do not)."""
    return f"{url}{'&' if '?' in url else '?'}client_name={client_name}"


async def connections(server: RedisServer, names: set[str]) -> list[dict[str, Any]]:
    """The ``CLIENT LIST`` entries of ``server`` that carry one of ``names``."""
    async with Redis(host="127.0.0.1", port=server.port, socket_timeout=2.0) as admin:
        return [c for c in await admin.client_list() if c.get("name") in names]


async def on_server(server: RedisServer, names: set[str]) -> bool:
    """Whether every one of ``names`` has both its connections (commands and subscriber) on
    ``server``."""
    found = await connections(server, names)
    subscribers = {c["name"] for c in found if "P" in c.get("flags", "")}
    commands = {c["name"] for c in found if "P" not in c.get("flags", "")}
    return subscribers == names and commands == names


async def until(condition: Any, timeout: float, what: str) -> float:
    """Poll the coroutine function ``condition`` until it returns true; the time it took."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(_POLL)
    return time.monotonic() - started


async def listeners(topology: SentinelTopology, count: int) -> bool:
    """Whether ``count`` clients, together, are subscribed to the sentinels (the sentinels
    themselves subscribe only on the servers they monitor)."""
    subscribed = 0
    for sentinel in topology.sentinels:
        async with Redis(
            host="127.0.0.1", port=sentinel.port, password=sentinel.password, socket_timeout=2.0
        ) as admin:
            subscribed += sum(int(c.get("sub", 0)) > 0 for c in await admin.client_list())
    return subscribed == count


async def sentinel_failover(topology: SentinelTopology, index: int = 0) -> None:
    """``SENTINEL FAILOVER main`` on sentinel ``index``: the replica is promoted while the old
    primary runs on (the sentinels make it a replica a moment later)."""
    sentinel = topology.sentinels[index]
    async with Redis(
        host="127.0.0.1", port=sentinel.port, password=sentinel.password, socket_timeout=2.0
    ) as admin:
        await admin.execute_command("SENTINEL", "FAILOVER", SERVICE)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"main 127.0.0.1 6379 127.0.0.1 6380", ("127.0.0.1", 6380)),
        (b"main 10.0.0.1 6379 redis-b.internal 6380", ("redis-b.internal", 6380)),
        (b"other 127.0.0.1 6379 127.0.0.1 6380", None),  # another service of these sentinels
        (b"mainx 127.0.0.1 6379 127.0.0.1 6380", None),
        (b"main 127.0.0.1 6379 127.0.0.1", None),
        (b"main 127.0.0.1 6379 127.0.0.1 6380 extra", None),
        (b"main 127.0.0.1 6379 127.0.0.1 port", None),
        (b"main 127.0.0.1 6379 127.0.0.1 70000", None),
        (b"main 127.0.0.1 6379 127.0.0.1 -1", None),
        (b"main 127.0.0.1 x 127.0.0.1 6380", None),
        (b"main  127.0.0.1 6379 127.0.0.1 6380", None),
        (b"main 127.0.0.1 6379 127.0.0.1 \xd9\xa6", None),  # a digit, but not ASCII
        (b"\xff main", None),
        (b"", None),
        ("main 127.0.0.1 6379 127.0.0.1 6380", None),  # not bytes: not from redis-py's reader
        (None, None),
    ],
)
def test_switch_master_messages_are_read_strictly(data: object, expected: object) -> None:
    assert _parse_switch_master(data, SERVICE) == expected


def newer_leader(cluster: Cluster, than: int) -> object:
    """The settled leader if its fencing token is above ``than``."""
    leader = cluster.settled()
    if leader is not None and (leader.fencing_token or 0) > than:
        return leader
    return None


@pytest.mark.redis
@pytest.mark.slow
async def test_sentinel_elects_and_a_new_leader_follows_the_promoted_replica() -> None:
    # Sentinels with a password of their own: LEADER_SENTINEL_PASSWORD.
    with SentinelTopology(sentinel_password="sentinels-own") as topology:
        async with Cluster(topology.url, sentinel_password="sentinels-own") as cluster:
            for _ in range(3):
                await cluster.add()
            leader = await cluster.wait_for_single_leader()
            token = leader.fencing_token
            assert token is not None
            # Each node listens to +switch-master on a sentinel, with the sentinels' password.
            await until(lambda: listeners(topology, 3), WAIT, "3 nodes listening to sentinels")
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


@pytest.mark.redis
@pytest.mark.slow
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


@pytest.mark.redis
@pytest.mark.slow
async def test_manual_failover_moves_both_connections_while_the_old_primary_still_runs() -> None:
    # After SENTINEL FAILOVER the old primary keeps running, and takes writes until the
    # sentinels make it a replica: no error tells the nodes to leave it. +switch-master does.
    # One topology for all of it (one costs 7 s to set up): a group of 3, and a transport of
    # its own whose sentinel stops before the failover.
    with SentinelTopology() as topology:
        old, new = topology.primary, topology.replica
        assert old is not None and new is not None
        sink = RecordingSink()
        transport = RedisTransport(
            named(topology.url, "watcher"), Names("fastapi-leader", "watch", "w1")
        )
        await transport.start(sink)
        try:
            async with Cluster(topology.url) as cluster:
                ids = ["n1", "n2", "n3"]
                names = {cluster.client_name(node_id) for node_id in ids}
                for node_id in ids:
                    url = named(topology.url, cluster.client_name(node_id))
                    await cluster.add(node_id, redis_url=url)
                first = await eventually(lambda: transport._watched, WAIT, "a sentinel heard")

                # Messages that name no new primary of this service change nothing.
                for data in (
                    b"other 127.0.0.1 1 127.0.0.1 2",  # another service of these sentinels
                    b"main 127.0.0.1 1 127.0.0.1",
                    b"main garbage",
                    f"main 127.0.0.1 {new.port} 127.0.0.1 {old.port}".encode(),  # where it is
                ):
                    await transport._switch_announced(data, first)
                assert transport.switch_messages_ignored == 3
                assert transport.switches_followed == 0

                # The sentinel it listens to goes away: it listens to another one.
                stopped = next(s for s in topology.sentinels if s.port == first[1])
                await asyncio.to_thread(stopped.stop)
                await eventually(
                    lambda: transport._watched not in (None, first),
                    WAIT,
                    "another sentinel heard",
                )

                leader = await cluster.wait_for_single_leader()
                token = leader.fencing_token
                assert token is not None
                everyone = {*names, "watcher"}
                assert await on_server(old, everyone)
                live = next(i for i, s in enumerate(topology.sentinels) if s is not stopped)
                async with LeaderSampler(cluster) as sampler:
                    started = time.monotonic()
                    await sentinel_failover(topology, live)
                    await until(
                        lambda: on_server(new, everyone),
                        FAILOVER_TIMEOUT,
                        "both connections of every node on the promoted replica",
                    )
                    moved = time.monotonic() - started
                    # Moved on the announcement, not on an error: the old primary still runs as
                    # a primary (the sentinels demote it at least 8 s after the switch).
                    role = await asyncio.to_thread(lambda: topology.info(old).get("role"))
                    assert role == "master"
                    assert await connections(old, everyone) == []
                    group = Names("fastapi-leader", cluster.group, "-")
                    async with Redis(host="127.0.0.1", port=new.port) as admin:

                        async def leader_key_on_new_primary() -> bool:
                            # The replica was promoted about a second before the announcement
                            # and renewals meanwhile went to the old primary: the lease may have
                            # lapsed on the new one, and the group then elects again.
                            leader = cluster.settled(same_term=False)
                            if leader is None or leader.fencing_token is None:
                                return False
                            holder = await admin.get(group.leader_key)
                            expected = f"{leader.node_id}:{leader.fencing_token}".encode()
                            return holder == expected and cluster.settled(same_term=False) is leader

                        await until(
                            leader_key_on_new_primary,
                            WAIT,
                            "one leader agreed on, its lease on the new primary",
                        )
                    settled = cluster.settled(same_term=False)
                    assert settled is not None and settled.fencing_token is not None
                    assert settled.fencing_token >= token
                    after = (settled.node_id, settled.fencing_token)
                assert sampler.overlaps == []

                # The transport followed once, never reported a loss, and works there.
                assert transport.switches_followed == 1
                assert sink.lost == 0
                await transport.publish(b"after the switch")
                await sink.wait_for_message(b"after the switch")
        finally:
            await transport.close()
    print(
        f"SENTINEL FAILOVER to both connections of 4 nodes on the new primary: {moved:.2f} s; "
        f"leader {leader.node_id} (term {token}) -> {after[0]} (term {after[1]})"
    )
