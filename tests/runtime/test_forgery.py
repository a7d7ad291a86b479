"""An attacker who can publish on a signed group's channels, but has no key, floods them.

Builds on test_hostile_input.py (which sends each kind of bad message a few times): here a
publisher that knows the channels and every node's id, but not ``LEADER_SECRET``, sends
thousands of forged messages of every kind (heartbeats, presence beats, vote requests, votes to
each node's own channel, handovers and leaves in the leader's name), unsigned, signed with wrong
keys, and carrying genuine signatures spliced from captured messages; and it replays every
genuine message it captured, many times, on the channel it was sent on and on the others.

Each test checks: the leader and its term stay (sampled throughout), no forged term leaks into
any node, every forged message is counted as dropped under its reason, exactly, and the nodes
still answer afterwards. The second test floods during a handover: the group still hands over
at once, to one of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from fastapi_leader import LeaderElection
from fastapi_leader.messages import Codec, Kind, Message
from fastapi_leader.transport.base import Names
from tests.helpers.cluster import WAIT, Cluster, LeaderSampler, eventually, first_of
from tests.runtime.test_hostile_input import (
    ATTACKER,
    SECRET,
    Capture,
    assert_alive_and_answering,
    drops,
    expect_drops,
    three_nodes,
)

pytestmark = pytest.mark.redis

WRONG_KEYS = [b"not-the-shared-secret-at-all-123", SECRET.encode()[:-1] + b"?"]
# The flood goes out in pipelined batches: fast enough to be a flood, while every node, all of
# them in this one process, keeps its event loop turns for heartbeats.
BATCH = 200
ROUNDS = 10  # each forged message is sent this many times
PATIENT = {
    "heartbeat_interval": 0.2,
    "lease": 1.6,
    "election_timeout_min": 2.0,
    "election_timeout_max": 2.5,
    "member_expiry": 4.0,
}
REPLAYS = 5  # each captured message is replayed this many times on each channel
# A handover takes milliseconds; this leaves room for the flood's load, and is below the
# shortest election on PATIENT timings.
HANDOVER_BOUND = 1.5


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    """The attacker's plain client."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def forgeries(group: str, nodes: list[LeaderElection], leader: LeaderElection) -> list[Message]:
    """What an attacker would most like the group to believe, of every kind, in the names of
    every node: each of these, if accepted, would move the leader, its term, or the votes."""
    token = leader.fencing_token
    assert token is not None
    high = token + 1000
    ids = [n.node_id for n in nodes]
    seq = itertools.count(time.time_ns() // 1000 + 10**9)  # above any real sequence number
    forged: list[Message] = []

    def add(kind: Kind, sender: str, term: int, target: str | None = None) -> None:
        forged.append(Message(kind, group, sender, term, next(seq), target=target))

    for sender in [ATTACKER, *ids]:
        add(Kind.HEARTBEAT, sender, high)
        add(Kind.VOTE_REQUEST, sender, high)
        add(Kind.PRESENCE, sender, high)
    add(Kind.PRESENCE, leader.node_id, token)  # "the leader stepped down"
    add(Kind.LEAVE, leader.node_id, token)
    for target in [ATTACKER, *ids]:
        add(Kind.HANDOVER, leader.node_id, token, target)
    for voter, candidate in itertools.product([ATTACKER, *ids], [ATTACKER, *ids]):
        add(Kind.VOTE, voter, high, candidate)
    # The largest sequence number under each id: accepted once, it would silence that node.
    forged.extend(Message(Kind.PRESENCE, group, i, token, 2**63 - 1) for i in ids)
    return forged


def wrongly_signed(group: str, message: Message, genuine: list[bytes]) -> Iterator[bytes]:
    """``message`` under signatures that do not verify: wrong keys, and genuine signatures of
    captured messages (one or two) in front of the forged body."""
    body = Codec(group).encode(message)
    for key in WRONG_KEYS:
        yield Codec(group, [key]).encode(message)
    yield Codec(group, WRONG_KEYS, signers=2).encode(message)
    for data in genuine[:2]:
        yield data[:64] + body
        yield data[:64] + data[:64] + body
    yield b"0" * 128 + body


class Flood:
    """Publishes forged payloads and counts what each node must drop, by reason."""

    def __init__(self, client: Redis, cluster: Cluster) -> None:
        self.client = client
        self.cluster = cluster
        self.sent = 0
        self.expected = {n.node_id: Counter[str]() for n in cluster.nodes}
        self.pending: list[tuple[str, bytes, str]] = []

    def add(self, channel: str, data: bytes, reason: str) -> None:
        """Queue ``data`` for ``channel``, to be dropped for ``reason`` by its listeners."""
        self.pending.append((channel, data, reason))

    async def send(self) -> None:
        """Publish what is queued; every node that hears a channel must drop what went there."""
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), BATCH):
            batch = pending[start : start + BATCH]
            async with self.client.pipeline(transaction=False) as pipe:
                for channel, data, _ in batch:
                    pipe.publish(channel, data)
                await pipe.execute()
            self.sent += len(batch)
            for channel, _, reason in batch:
                for node in self.cluster.nodes:
                    if channel in (node.names.broadcast, node.names.own_channel):
                        self.expected[node.node_id][f"dropped_{reason}"] += 1


async def test_flood_of_forged_and_replayed_messages_is_dropped_and_counted(
    redis_url: str, client: Redis
) -> None:
    # Slow timings: the flood (thousands of messages to verify, published from this process)
    # may hold the CPU for a second on a loaded machine, and a leader starved of it may
    # rightly lose its lease; what is tested is that no message of the flood steers anyone.
    async with Cluster(redis_url, secret=SECRET, **PATIENT) as cluster:
        genuine = Codec(cluster.group, [SECRET.encode()])
        # Record an election and a handover as they happen, to replay them later.
        async with Capture(client, Names("fastapi-leader", cluster.group, "-").base) as capture:
            first = await three_nodes(cluster)
            assert await first.resign()
            leader = await cluster.wait_for_single_leader()
            await eventually(lambda: len(capture.frames) >= 40, what="some traffic")
        frames = list(capture.frames)
        kinds = Counter(genuine.decode(data).kind for _, data in frames)
        assert {Kind.VOTE_REQUEST, Kind.VOTE, Kind.HANDOVER, Kind.HEARTBEAT} <= set(kinds), kinds

        token = leader.fencing_token
        broadcast = leader.names.broadcast
        channels = [broadcast, *(n.names.own_channel for n in cluster.nodes)]
        captured = [data for _, data in frames]
        baseline = {n.node_id: drops(n) for n in cluster.nodes}
        flood = Flood(client, cluster)
        for message in forgeries(cluster.group, cluster.nodes, leader):
            # Votes go where real votes go, to the candidate's own channel; the rest everywhere.
            if message.kind is Kind.VOTE:
                targets = [f"{broadcast}:node:{message.target}"]
            else:
                targets = channels
            for channel in targets:
                flood.add(channel, Codec(cluster.group).encode(message), "unsigned")
                for data in wrongly_signed(cluster.group, message, captured):
                    flood.add(channel, data, "bad_signature")
        flood.pending *= ROUNDS
        # Replays: every genuine message, many times, on its own channel and on every other;
        # also with a second, bogus signature in front (still genuine, so still a replay).
        for _ in range(REPLAYS):
            for data in captured:
                for channel in channels:
                    flood.add(channel, data, "replay")
                flood.add(broadcast, b"f" * 64 + data, "replay")

        async with LeaderSampler(cluster) as sampler:
            started = time.monotonic()
            await flood.send()
            took = time.monotonic() - started
            await expect_drops(cluster.nodes, baseline, flood.expected)
            assert cluster.leader() is leader and leader.fencing_token == token
        print(
            f"\nflooded {flood.sent} messages in {took:.2f} s; dropped per node: "
            + "; ".join(f"{k}: {dict(v)}" for k, v in flood.expected.items())
        )
        assert sampler.leaders_seen == [leader.node_id]
        assert not sampler.overlaps
        assert all(n.term == token for n in cluster.nodes), "a forged term leaked in"
        assert all(ATTACKER not in n.members for n in cluster.nodes)
        await assert_alive_and_answering(cluster, leader)
        await expect_drops(cluster.nodes, baseline, flood.expected)  # nothing counted twice


async def test_flood_during_a_handover_cannot_steer_it(redis_url: str, client: Redis) -> None:
    # Patient timings: a node starved by the flood keeps its place, and an election (2 s at
    # the least) cannot pass for a handover under HANDOVER_BOUND.
    async with Cluster(redis_url, secret=SECRET, **PATIENT) as cluster:
        leader = await three_nodes(cluster)
        token = leader.fencing_token
        assert token is not None
        broadcast = leader.names.broadcast
        high = token + 1000
        # Votes for the attacker and for every node in the terms the handover will use, and
        # vote requests and a handover for the attacker far above them: if any were taken, the
        # wrong node would win, or the terms would jump.
        forged: list[Message] = []
        seq = itertools.count(time.time_ns() // 1000 + 10**9)
        ids = [n.node_id for n in cluster.nodes]
        for candidate in [ATTACKER, *ids]:
            forged.append(Message(Kind.VOTE_REQUEST, cluster.group, candidate, high, next(seq)))
            for term, voter in itertools.product(range(token + 1, token + 4), ids):
                forged.append(
                    Message(Kind.VOTE, cluster.group, voter, term, next(seq), target=candidate)
                )
        forged.append(
            Message(Kind.HANDOVER, cluster.group, leader.node_id, token, next(seq), ATTACKER)
        )
        unsigned, wrong = Codec(cluster.group), Codec(cluster.group, WRONG_KEYS[:1])
        baseline = {n.node_id: drops(n) for n in cluster.nodes}
        flood = Flood(client, cluster)
        stop = asyncio.Event()

        async def keep_flooding() -> None:
            while not stop.is_set():  # whole rounds only, so that every count is known
                for message in forged:
                    channel = broadcast
                    if message.kind is Kind.VOTE:
                        channel = f"{broadcast}:node:{message.target}"
                    flood.add(channel, unsigned.encode(message), "unsigned")
                    flood.add(channel, wrong.encode(message), "bad_signature")
                await flood.send()

        async with LeaderSampler(cluster) as sampler:
            flooding = asyncio.create_task(keep_flooding())
            try:
                await eventually(lambda: flood.sent >= 4 * len(forged), what="the flood")
                survivors = [n for n in cluster.nodes if n is not leader]
                started = time.monotonic()
                elected = asyncio.ensure_future(first_of(n.wait_until_leader() for n in survivors))
                assert await leader.resign()
                new_token = await elected
                handover = time.monotonic() - started
                sent = flood.sent
                await eventually(lambda: flood.sent >= sent + 4 * len(forged), what="more flood")
            finally:
                stop.set()
                await asyncio.wait_for(flooding, WAIT)
            new = await cluster.wait_for_single_leader()
        print(f"\nhandover under a flood of {flood.sent} forged messages: {handover * 1000:.0f} ms")
        assert new in survivors and new.fencing_token == new_token
        assert token < new_token < high
        assert handover < HANDOVER_BOUND
        assert not sampler.overlaps, sampler.overlaps
        assert all(n.term == new_token for n in cluster.nodes), "a forged term leaked in"
        assert all(ATTACKER not in n.members for n in cluster.nodes)
        await expect_drops(cluster.nodes, baseline, flood.expected)
