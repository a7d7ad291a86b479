"""Hostile input on the live channels of a running 3-node cluster on a real Redis server.

A plain redis client publishes junk and forged messages onto the group's broadcast channel
(``<prefix>:{<group>}``) and onto nodes' own channels (``<prefix>:{<group>}:node:<id>``). Every test
checks that no node crashes (its tasks are alive and it still hears the group and hands over),
that what must be dropped is counted in ``node.counters["dropped_<reason>"]`` exactly, and that
the leader stays in place unless the protocol lets the message move it.

Without a secret, the group trusts whoever can publish on its channels; what forged messages can
then do (documented by the tests named ``test_unsigned_...``):

- a vote request, a handover naming the attacker, a leave for the leader: nothing lasting. A live
  leader is never voted out, and a follower that drops the leader on a forged handover or leave
  hears it again on its next heartbeat. A forged message does consume one of the impersonated
  sender's sequence numbers: the genuine message with that number is dropped as a replay.
- a heartbeat with a higher term: the leader steps down (it reads the heartbeat as proof that
  someone else holds the key) and the group re-elects, one election timeout later, above the
  forged term. A term beyond ``MAX_TERM`` (2**53) is dropped as malformed, so one message cannot
  push the group out of the range of terms it can allocate.
- not tested, and not preventable without a secret: a message forged with the sequence number
  2**63 - 1 under a node's id makes every node drop that node's genuine messages for good.

With a secret, every unsigned, badly signed or replayed message is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from fastapi_leader import LeaderElection
from fastapi_leader.core import MAX_TERM
from fastapi_leader.messages import Codec, Kind, Message
from fastapi_leader.transport.base import Names
from tests.helpers.cluster import WAIT, Cluster, LeaderSampler, always, eventually, first_of

pytestmark = pytest.mark.redis

SECRET = "a-shared-secret-of-32-characters"
ELECTION_TIMEOUT_MAX = 0.7  # the default
HANDOVER_BOUND = 0.5
ATTACKER = "mallory"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    """The attacker's plain client."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


# ---- building payloads ----------------------------------------------------------------------


def fields(group: str, **changes: Any) -> dict[str, Any]:
    """The JSON object of a valid heartbeat of ``group``, with ``changes`` applied
    (a value of ``...`` removes the field)."""
    obj: dict[str, Any] = {"v": 1, "k": "hb", "g": group, "n": ATTACKER, "t": 1, "s": 1}
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


def raw(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def message(group: str, kind: Kind, *, sender: str = ATTACKER, **rest: Any) -> Message:
    options: dict[str, Any] = {"term": 1, "seq": time.time_ns() // 1000, **rest}
    return Message(kind=kind, group=group, sender=sender, **options)


def junk(group: str) -> dict[str, list[bytes]]:
    """Payloads that the codec (or the core) must drop, by the reason they are counted under."""
    nested = b'{"v":' + b"[" * 1000 + b"]" * 1000 + b"}"  # deep, yet under the size limit
    assert len(nested) <= 2048
    valid_foreign = Codec("another-group").encode(
        message("another-group", Kind.HEARTBEAT, term=10**6)
    )
    return {
        "malformed": [
            b"",
            b"\x00\x01\x02 garbage \xff\xfe",
            b"hello",
            b"{\xff\xfe\xfd}",  # invalid UTF-8
            b'{"v":1,"k":"hb","g":"' + group.encode() + b'","n":"\xc3\x28","t":1,"s":1}',
            b"{",
            b"{}",
            b"null",
            b"[1, 2, 3]",  # JSON arrays
            raw([fields(group)]),
            nested,
            # Wrong JSON types in every field.
            raw(fields(group, v="1")),
            raw(fields(group, v=1.0)),
            raw(fields(group, v=True)),
            raw(fields(group, k=5)),
            raw(fields(group, k="zz")),
            raw(fields(group, g=5)),
            raw(fields(group, g=None)),
            raw(fields(group, n=5)),
            raw(fields(group, n="")),
            raw(fields(group, n="x" * 65)),
            raw(fields(group, t="7")),
            raw(fields(group, t=1.5)),
            raw(fields(group, t=-1)),
            raw(fields(group, t=True)),
            raw(fields(group, t=2**64)),
            raw(fields(group, s=None)),
            raw(fields(group, s=[1])),
            raw(fields(group, s=...)),
            raw(fields(group, c="n1")),  # a heartbeat names no target
            raw(fields(group, k="vg")),  # a vote without one
            raw(fields(group, k="vg", c=5)),
            raw(fields(group, u={"x": 1})),
            raw(fields(group, x=1)),  # an unknown field
            # Well-formed, but with terms no group can use (dropped by the core): a leader
            # must not step down for them, nor the group's terms run out.
            raw(fields(group, t=2**63 - 1)),
            raw(fields(group, t=MAX_TERM + 1)),
            raw(fields(group, k="rv", t=2**62)),
        ],
        "oversized": [
            b"x" * (1 << 20),  # 1 MB
            raw(fields(group, u="http://x/" + "a" * (1 << 20))),
            b'{"a":' * 50_000 + b"1" + b"}" * 50_000,  # deeply nested and large
            b"{" + b" " * 3000 + b"}",
        ],
        "foreign_group": [valid_foreign, raw(fields("another-group"))],
        "version": [raw(fields(group, v=2)), raw(fields(group, v=0)), raw(fields(group, v=999))],
    }


# ---- checking -------------------------------------------------------------------------------


def drops(node: LeaderElection) -> Counter[str]:
    return Counter({k: v for k, v in node.counters.items() if k.startswith("dropped_")})


async def expect_drops(
    nodes: Iterable[LeaderElection],
    baseline: dict[str, Counter[str]],
    expected: dict[str, Counter[str]],
) -> None:
    """Wait until every node has dropped exactly ``expected`` more messages than at
    ``baseline``, by reason."""
    nodes = list(nodes)

    def counted() -> bool:
        return all(drops(n) == baseline[n.node_id] + expected[n.node_id] for n in nodes)

    try:
        await eventually(counted, what="the drops to be counted")
    except AssertionError:
        actual = {n.node_id: drops(n) - baseline[n.node_id] for n in nodes}
        raise AssertionError(f"dropped {actual}, expected {expected}") from None


async def assert_alive_and_answering(cluster: Cluster, leader: LeaderElection) -> None:
    """No node crashed: its tasks run, it still hears the group, and the leader can hand over
    at once."""
    # The sender and the reader run on the election thread's loop, the callbacks on ours.
    thread_loops = {n._thread.loop for n in cluster.nodes if n._thread is not None}
    tasks = set(asyncio.all_tasks()).union(*(asyncio.all_tasks(loop) for loop in thread_loops))
    names = {t.get_name(): t for t in tasks}
    for node in cluster.nodes:
        assert node.running
        for role in ("sender", "callbacks", "reader"):
            task = names.get(f"fastapi-leader {role} {node.node_id}")
            assert task is not None and not task.done(), f"{role} of {node.node_id} is gone"
    heard = {n.node_id: n.counters["messages_received"] for n in cluster.nodes}
    await eventually(
        lambda: all(n.counters["messages_received"] > heard[n.node_id] + 2 for n in cluster.nodes),
        what="every node to hear the group again",
    )
    survivors = [n for n in cluster.nodes if n is not leader]
    started = time.monotonic()
    elected = asyncio.ensure_future(first_of(n.wait_until_leader() for n in survivors))
    assert await leader.resign()
    await elected
    assert time.monotonic() - started < HANDOVER_BOUND


async def three_nodes(cluster: Cluster) -> LeaderElection:
    for _ in range(3):
        await cluster.add()
    return await cluster.wait_for_single_leader()


def leader_above(cluster: Cluster, term: int) -> LeaderElection | None:
    """The leader all nodes agree on, once its fencing token is above ``term``."""
    leader = cluster.settled(same_term=False)
    return leader if leader is not None and (leader.fencing_token or 0) > term else None


def channels(cluster: Cluster) -> tuple[str, dict[str, str]]:
    """The broadcast channel, and each node's own channel."""
    node = cluster.nodes[0]
    return node.names.broadcast, {n.node_id: n.names.own_channel for n in cluster.nodes}


async def next_message(pubsub: PubSub) -> bytes:
    """The next message a plain subscriber receives (subscription confirmations skipped)."""

    async def read() -> bytes:
        while True:
            frame = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if frame is not None:
                data: bytes = frame["data"]
                return data

    return await asyncio.wait_for(read(), WAIT)


async def publish(client: Redis, channel: str, payloads: Iterable[bytes]) -> None:
    for payload in payloads:
        await client.publish(channel, payload)


# ---- no secret ------------------------------------------------------------------------------


async def test_junk_is_dropped_counted_and_harmless(redis_url: str, client: Redis) -> None:
    async with Cluster(redis_url) as cluster:
        leader = await three_nodes(cluster)
        token = leader.fencing_token
        broadcast, own = channels(cluster)
        follower = next(n for n in cluster.nodes if n is not leader)
        baseline = {n.node_id: drops(n) for n in cluster.nodes}
        expected = {n.node_id: Counter[str]() for n in cluster.nodes}
        payloads = junk(cluster.group)

        async with LeaderSampler(cluster) as sampler:
            for reason, items in payloads.items():
                await publish(client, broadcast, items)
                for node in cluster.nodes:
                    expected[node.node_id][f"dropped_{reason}"] += len(items)
                # On the nodes' own channels too: only the owner hears those.
                for target in (leader, follower):
                    await publish(client, own[target.node_id], items)
                    expected[target.node_id][f"dropped_{reason}"] += len(items)
            await expect_drops(cluster.nodes, baseline, expected)
            assert cluster.leader() is leader and leader.fencing_token == token
        assert sampler.leaders_seen == [leader.node_id]
        assert all(n.term == token for n in cluster.nodes), "a dropped term leaked in"
        await assert_alive_and_answering(cluster, leader)
        await expect_drops(cluster.nodes, baseline, expected)  # nothing counted twice


async def test_unsigned_forged_vote_request_is_ignored_while_a_leader_lives(
    redis_url: str, client: Redis
) -> None:
    async with Cluster(redis_url) as cluster:
        leader = await three_nodes(cluster)
        token = leader.fencing_token
        assert token is not None
        broadcast, _ = channels(cluster)
        codec = Codec(cluster.group)
        votes: PubSub = client.pubsub()
        await votes.subscribe(leader.names.node_channel(ATTACKER))
        forged_term = token + 1000
        async with LeaderSampler(cluster) as sampler:
            await client.publish(
                broadcast,
                codec.encode(message(cluster.group, Kind.VOTE_REQUEST, term=forged_term)),
            )
            # Documented side effect: every node has now seen the forged term ...
            await eventually(lambda: all(n.term == forged_term for n in cluster.nodes))
            # ... but nobody votes while the leader lives, and the leader stays.
            await always(
                lambda: cluster.leader() is leader and leader.fencing_token == token,
                2 * ELECTION_TIMEOUT_MAX,
                "the leader",
            )
        assert sampler.leaders_seen == [leader.node_id]
        # Nothing but our marker ever reached the attacker's channel: no node voted.
        await client.publish(leader.names.node_channel(ATTACKER), b"marker")
        assert await next_message(votes) == b"marker"
        await votes.aclose()
        await assert_alive_and_answering(cluster, leader)
        # The next leadership carries a token above the forged term: fencing still grows.
        new = await cluster.wait_for_single_leader(same_term=False)
        assert new.fencing_token is not None and new.fencing_token > forged_term


async def test_unsigned_forged_handover_and_leave_for_the_leader_leave_it_in_place(
    redis_url: str, client: Redis
) -> None:
    async with Cluster(redis_url) as cluster:
        leader = await three_nodes(cluster)
        token = leader.fencing_token
        assert token is not None
        broadcast, _ = channels(cluster)
        codec = Codec(cluster.group)
        # The attacker reads the leader's sequence number off the channel, and forges the next
        # two, so that its messages are not simply dropped as old ones.
        beats: PubSub = client.pubsub()
        await beats.subscribe(broadcast)
        # (and its incarnation: a start of a node id has its own sequence).
        seq = None
        while seq is None:
            heard = codec.decode(await next_message(beats))
            if heard.sender == leader.node_id and heard.kind is Kind.HEARTBEAT:
                seq, incarnation = heard.seq, heard.incarnation
        await beats.aclose()
        baseline = {n.node_id: drops(n) for n in cluster.nodes}
        common = {"sender": leader.node_id, "term": token, "incarnation": incarnation}
        async with LeaderSampler(cluster) as sampler:
            await client.publish(
                broadcast,
                codec.encode(
                    message(cluster.group, Kind.HANDOVER, target=ATTACKER, seq=seq + 1, **common)
                ),
            )
            await client.publish(
                broadcast, codec.encode(message(cluster.group, Kind.LEAVE, seq=seq + 2, **common))
            )
            # The followers forget the leader until its next heartbeat; it never stops leading.
            await always(
                lambda: cluster.leader() is leader and leader.fencing_token == token,
                2 * ELECTION_TIMEOUT_MAX,
                "the leader",
            )
            assert all(n.leader_id == leader.node_id for n in cluster.nodes)
        assert sampler.leaders_seen == [leader.node_id]
        # For each forged sequence number, whichever of the forged and the genuine message came
        # second was dropped as a replay, on every node.
        expected = {n.node_id: Counter({"dropped_replay": 2}) for n in cluster.nodes}
        await expect_drops(cluster.nodes, baseline, expected)
        await assert_alive_and_answering(cluster, leader)


async def test_unsigned_forged_heartbeat_with_a_higher_term_costs_one_election(
    redis_url: str, client: Redis
) -> None:
    async with Cluster(redis_url) as cluster:
        leader = await three_nodes(cluster)
        token = leader.fencing_token
        assert token is not None
        broadcast, _ = channels(cluster)
        forged_term = token + 10**6
        async with LeaderSampler(cluster) as sampler:
            sent_at = time.monotonic()
            await client.publish(
                broadcast,
                Codec(cluster.group).encode(
                    message(cluster.group, Kind.HEARTBEAT, term=forged_term)
                ),
            )
            # The protocol lets this through: the leader steps down, the followers follow the
            # attacker until its lease would have run out, then elect a real node again.
            await eventually(lambda: leader.counters["demotions"] == 1)
            new = await eventually(
                lambda: leader_above(cluster, forged_term), what="a leader above the forged term"
            )
            recovered = time.monotonic() - sent_at
        print(f"\nre-elected {recovered * 1000:.0f} ms after a forged heartbeat")
        assert not sampler.overlaps, sampler.overlaps
        assert recovered < 3.0
        await assert_alive_and_answering(cluster, new)


# ---- with a secret --------------------------------------------------------------------------


class Capture:
    """Records every message on the group's channels (broadcast and every node's own)."""

    def __init__(self, client: Redis, base: str) -> None:
        self.client = client
        self.base = base
        self.frames: list[tuple[str, bytes]] = []
        self._pubsub: PubSub = client.pubsub()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Capture:
        await self._pubsub.subscribe(self.base)
        await self._pubsub.psubscribe(f"{self.base}:node:*")
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            frame = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if frame is not None and frame["type"] in ("message", "pmessage"):
                self.frames.append((frame["channel"].decode(), frame["data"]))

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._pubsub.aclose()


async def test_with_a_secret_unsigned_forged_and_replayed_messages_are_dropped(
    redis_url: str, client: Redis
) -> None:
    async with Cluster(redis_url, secret=SECRET) as cluster:
        genuine = Codec(cluster.group, [SECRET.encode()])
        base = Names("fastapi-leader", cluster.group, "-").base  # the hash-tagged stem
        # Record an election and a handover as they happen, to replay them later.
        async with Capture(client, base) as capture:
            first = await three_nodes(cluster)
            assert await first.resign()
            leader = await cluster.wait_for_single_leader()
            await eventually(lambda: len(capture.frames) > 30, what="some traffic")
        kinds = Counter(genuine.decode(data).kind for _, data in capture.frames)
        assert kinds[Kind.VOTE_REQUEST] >= 2 and kinds[Kind.VOTE] >= 2, kinds
        assert kinds[Kind.HANDOVER] == 1 and kinds[Kind.HEARTBEAT] >= 2, kinds

        token = leader.fencing_token
        assert token is not None
        broadcast, _ = channels(cluster)
        by_id = {n.node_id: n for n in cluster.nodes}
        group = cluster.group
        forged = [  # what an attacker without the key would like the group to believe
            message(group, Kind.HEARTBEAT, term=token + 1000),
            message(group, Kind.VOTE_REQUEST, term=token + 1000),
            message(group, Kind.HANDOVER, sender=leader.node_id, term=token, target=ATTACKER),
            message(group, Kind.LEAVE, sender=leader.node_id, term=token),
        ]
        wrong_key = Codec(group, [b"not-the-shared-secret-at-all-123"])
        unsigned = [Codec(group).encode(m) for m in forged]
        bad_signature = (
            [wrong_key.encode(m) for m in forged]
            + [
                b"0" * 64 + Codec(group).encode(forged[0]),
                b"\xff" * 64 + Codec(group).encode(forged[0]),  # not even hex
                b"garbage",  # in a signed group, anything not starting with "{" claims a signature
                genuine.encode(forged[0])[:-1] + b"}}",  # a genuine signature over other bytes
            ]
        )
        # Signed with the group's key (as by a node of another deployment sharing it): the
        # codec's other checks still apply.
        keyholder = [
            genuine.encode(message("another-group", Kind.HEARTBEAT, term=token + 1000)),
            b"x" * (1 << 20),
        ]
        baseline = {n.node_id: drops(n) for n in cluster.nodes}
        expected = {n.node_id: Counter[str]() for n in cluster.nodes}

        def everyone(reason: str, count: int) -> None:
            for node in cluster.nodes:
                expected[node.node_id][f"dropped_{reason}"] += count

        async with LeaderSampler(cluster) as sampler:
            await publish(client, broadcast, unsigned)
            everyone("unsigned", len(unsigned))
            await publish(client, broadcast, bad_signature)
            everyone("bad_signature", len(bad_signature))
            await publish(client, broadcast, keyholder)
            everyone("foreign_group", 1)
            everyone("oversized", 1)
            # Every genuine message recorded so far, replayed where it was first sent.
            for channel, data in capture.frames:
                await client.publish(channel, data)
                if channel == broadcast:
                    everyone("replay", 1)
                else:
                    target = channel.rsplit(":", 1)[1]
                    expected[by_id[target].node_id]["dropped_replay"] += 1
            await expect_drops(cluster.nodes, baseline, expected)
            assert cluster.leader() is leader and leader.fencing_token == token
        assert sampler.leaders_seen == [leader.node_id]
        assert all(n.term == token for n in cluster.nodes), "a forged term leaked in"
        assert "dropped_replay" in expected[leader.node_id]
        await assert_alive_and_answering(cluster, leader)
        await expect_drops(cluster.nodes, baseline, expected)
