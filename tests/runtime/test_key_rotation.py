"""Rotating the group's secret on a running cluster (real Redis), one node at a time.

A node given ``secret=NEW, previous_secret=OLD`` signs its messages under both keys and accepts
either, so it and the nodes still on ``OLD`` alone hear each other; once every node has ``NEW``,
``previous_secret`` is removed node by node, and the nodes on ``NEW`` alone hear the others too.
At every step of this rolling rotation, every node hears every other, one leader is agreed on,
and not one message is dropped. A node that knows neither key is heard by nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from fastapi_leader import LeaderElection
from fastapi_leader.messages import Codec, MessageRejected
from tests.helpers.cluster import Cluster, LeaderSampler, always, eventually

pytestmark = pytest.mark.redis

OLD = "old-key-of-the-group-0123456789"
NEW = "new-key-of-the-group-9876543210"
UNKNOWN = "a-key-nobody-else-has-000000000"
ELECTION_TIMEOUT_MAX = 0.7  # the default

ON_OLD: dict[str, Any] = {"secret": OLD}
ROLLING: dict[str, Any] = {"secret": NEW, "previous_secret": OLD}
ON_NEW: dict[str, Any] = {"secret": NEW}


def drops(node: LeaderElection) -> Counter[str]:
    return Counter({k: v for k, v in node.counters.items() if k.startswith("dropped_")})


async def everyone_hears_everyone(cluster: Cluster) -> LeaderElection:
    """Wait until every running node counts every running node as a member and all agree on
    one leader; return the leader."""
    running = {n.node_id for n in cluster.running}
    await eventually(
        lambda: all(set(n.members) == running for n in cluster.running),
        what=f"every one of {sorted(running)} to hear all the others",
    )
    return await cluster.wait_for_single_leader()


async def replace(cluster: Cluster, node: LeaderElection, **settings: Any) -> LeaderElection:
    """A rolling restart of ``node`` under the same id, with new settings."""
    await node.stop()
    return await cluster.add(node.node_id, **settings)


async def test_rolling_key_rotation_never_splits_the_group(redis_url: str) -> None:
    async with Cluster(redis_url) as cluster:
        for _ in range(3):
            await cluster.add(**ON_OLD)
        await everyone_hears_everyone(cluster)
        steps: list[str] = []

        async with LeaderSampler(cluster) as sampler:
            # Step 1: every node in turn gets the new key, keeping the old one as previous.
            for node_id in ("n1", "n2", "n3"):
                node = next(n for n in cluster.running if n.node_id == node_id)
                await replace(cluster, node, **ROLLING)
                leader = await everyone_hears_everyone(cluster)
                steps.append(f"{node_id} rolling, {leader.node_id} leads")
                if node_id == "n1":
                    # Mixed group: the rolling node must lead the old ones, too. Restart them
                    # (still on the old key) while it is alone: it leads, and they join it.
                    rolling = next(n for n in cluster.running if n.node_id == "n1")
                    old = [n for n in cluster.running if n is not rolling]
                    for node in old:
                        await node.stop()
                    assert await rolling.wait_until_leader(timeout=10) is not None
                    for node in old:
                        await cluster.add(node.node_id, **ON_OLD)
                    assert await everyone_hears_everyone(cluster) is rolling
                    steps.append("n1 (new and old key) leads n2 and n3 (old key only)")
            # Step 2: previous_secret is removed, node by node.
            for node_id in ("n1", "n2", "n3"):
                node = next(n for n in cluster.running if n.node_id == node_id)
                await replace(cluster, node, **ON_NEW)
                leader = await everyone_hears_everyone(cluster)
                steps.append(f"{node_id} on the new key, {leader.node_id} leads")
        print("\n" + "\n".join(steps))
        assert not sampler.overlaps, sampler.overlaps
        for node in cluster.nodes:
            assert drops(node) == Counter(), f"{node.node_id} dropped {drops(node)}"


class Listener:
    """Counts the messages on the group's broadcast channel that verify under ``key``."""

    def __init__(self, client: Redis, channel: str, codec: Codec) -> None:
        self.codec = codec
        self.count = 0
        self._channel = channel
        self._pubsub: PubSub = client.pubsub()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        await self._pubsub.subscribe(self._channel)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            frame = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if frame is None:
                continue
            with contextlib.suppress(MessageRejected):
                self.codec.decode(frame["data"])
                self.count += 1

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._pubsub.aclose()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_node_with_only_an_unknown_key_is_ignored_and_dropped(
    redis_url: str, client: Redis
) -> None:
    async with Cluster(redis_url) as cluster:
        group = [await cluster.add(**ROLLING) for _ in range(3)]
        leader = await everyone_hears_everyone(cluster)
        token = leader.fencing_token
        baseline = {n.node_id: drops(n) for n in group}
        stranger_codec = Codec(cluster.group, [UNKNOWN.encode()])

        async with (
            Listener(client, leader.names.broadcast, stranger_codec) as stranger_said,
            LeaderSampler(cluster) as sampler,
        ):
            stranger = await cluster.add("stranger", secret=UNKNOWN)
            # It beats, and stands for election when it hears no leader: at least a presence
            # beat and two candidacies. Nobody may take any of it.
            await eventually(lambda: stranger_said.count >= 4, what="the stranger to speak")
            await always(
                lambda: cluster.settled(among=group) is leader and leader.fencing_token == token,
                ELECTION_TIMEOUT_MAX,
                "the leader, as every group member sees it",
            )
            assert all("stranger" not in n.members for n in group)
            # It hears nobody either: not the leader, and none of the group's beats.
            assert stranger.leader_id is None and set(stranger.members) <= {"stranger"}
            assert stranger.counters["dropped_bad_signature"] > 0
            await stranger.stop()  # its goodbye is one more message to drop
            said = stranger_said.count

            def dropped_all() -> bool:
                return all(
                    drops(n) - baseline[n.node_id] == Counter(dropped_bad_signature=said)
                    for n in group
                )

            await eventually(dropped_all, what=f"each member to drop the stranger's {said}")
        print(f"\nthe stranger said {said} things; each member dropped them all")
        assert sampler.leaders_seen == [leader.node_id]
        assert not stranger.is_leader
