"""A cluster under a Redis ACL user that has exactly :func:`acl_rule`'s rights, and no more.

The user may touch only its group's two keys and its channels, with only the commands a node
sends. The cluster must elect, hand over and fail over without one command being refused
(``ACL LOG`` stays empty), and the user must be refused everything of another group: its keys,
its channels, and the same through a script.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoPermissionError, ResponseError

from fastapi_leader import LeaderSettings
from fastapi_leader.testing import RedisServer
from fastapi_leader.transport.redis import acl_rule
from tests.helpers.cluster import WAIT, Cluster, LeaderSampler, first_of

HANDOVER_BOUND = 0.5  # well under one election timeout (0.5 to 0.7 s)

# What the README and acl_rule's docstring show for the group "billing".
DOCUMENTED_RULE = (
    "resetkeys ~fastapi-leader:{billing}:leader ~fastapi-leader:{billing}:term "
    "resetchannels &fastapi-leader:{billing} &fastapi-leader:{billing}:node:* "
    "-@all +hello +ping +script|load +evalsha +get +set +incr +pexpire +del +publish "
    "+subscribe +unsubscribe"
)


# ---- the rule itself -------------------------------------------------------------------------


def test_rule_for_the_default_url_is_the_documented_one() -> None:
    assert " ".join(acl_rule(LeaderSettings(group="billing"))) == DOCUMENTED_RULE


@pytest.mark.parametrize(
    ("redis_url", "extra"),
    [
        pytest.param("redis://h:6379/0?client_name=web-1", ["+client|setname"], id="client-name"),
        pytest.param("redis://h:6379/3", ["+select"], id="database-3"),
        pytest.param("unix:///run/redis.sock?db=2", ["+select"], id="unix-database-2"),
        pytest.param("rediss://u:p@h:6380", [], id="tls-no-database"),
    ],
)
def test_rule_allows_what_the_url_makes_redis_py_send(redis_url: str, extra: list[str]) -> None:
    rule = acl_rule(LeaderSettings(group="billing", redis_url=redis_url))
    assert rule == DOCUMENTED_RULE.split() + extra


def test_rule_follows_the_prefix_and_group() -> None:
    rule = acl_rule(LeaderSettings(group="g-1", channel_prefix="acme.leader"))
    assert rule[:6] == [
        "resetkeys",
        "~acme.leader:{g-1}:leader",
        "~acme.leader:{g-1}:term",
        "resetchannels",
        "&acme.leader:{g-1}",
        "&acme.leader:{g-1}:node:*",
    ]


@pytest.mark.parametrize(
    ("redis_url", "extra"),
    [
        pytest.param("redis+cluster://h:7000,h:7001", [], id="cluster"),
        pytest.param("redis+cluster://h:7000?client_name=web-1", ["+client|setname"], id="name"),
    ],
)
def test_rule_on_a_cluster_names_the_sharded_pubsub_commands(
    redis_url: str, extra: list[str]
) -> None:
    rule = acl_rule(LeaderSettings(group="billing", redis_url=redis_url))
    commands = DOCUMENTED_RULE.split()
    sharded = ["+spublish", "+ssubscribe", "+sunsubscribe", "+cluster|slots", "+command"]
    assert rule == commands[: commands.index("+publish")] + sharded + extra


def test_rule_on_sentinel_selects_the_database_of_the_path() -> None:
    rule = acl_rule(LeaderSettings(group="billing", redis_url="redis+sentinel://h:26379/svc/2"))
    assert rule == [*DOCUMENTED_RULE.split(), "+select"]


# ---- a cluster under it ----------------------------------------------------------------------


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.execute_command("ACL", "LOG", "RESET")
    yield client
    await client.aclose()


@pytest.fixture
async def acl_user(admin: Redis) -> AsyncIterator[tuple[str, str]]:
    """A user name and password; the user is deleted after the test (FLUSHALL keeps users)."""
    user, password = f"leader-{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    yield user, password
    await admin.execute_command("ACL", "DELUSER", user)


def user_url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@{server.host}:{server.port}/0"


async def test_cluster_elects_hands_over_and_fails_over_under_exactly_the_rule(
    redis_server: RedisServer, redis_url: str, admin: Redis, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    async with Cluster(user_url(redis_server, user, password)) as cluster:
        rule = acl_rule(cluster.settings())
        assert "+client|setname" in rule  # the cluster's nodes name their connections
        await admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *rule)

        for _ in range(3):
            await cluster.add()
        async with LeaderSampler(cluster) as sampler:
            first = await cluster.wait_for_single_leader()
            # Every connection of every node is this user's: nothing ran with more rights.
            connections = [
                c for c in await admin.client_list() if c["name"].startswith(cluster.group)
            ]
            assert len(connections) == 2 * len(cluster.nodes), connections
            assert {c["user"] for c in connections} == {user}

            # Handover: a successor within a few round trips.
            token = first.fencing_token
            assert token is not None
            survivors = [n for n in cluster.nodes if n is not first]
            started = time.monotonic()
            elected = asyncio.ensure_future(first_of(n.wait_until_leader() for n in survivors))
            assert await first.resign()
            assert await elected > token
            assert time.monotonic() - started < HANDOVER_BOUND
            second = await cluster.wait_for_single_leader()
            assert second is not first

            # Failover: the leader stops, another takes over.
            await second.stop()
            third = await cluster.wait_for_single_leader()
            assert third is not second
        assert not sampler.overlaps, sampler.overlaps
        print(f"\nunder the ACL rule: {first.node_id} -> {second.node_id} -> {third.node_id}")

    denied = await admin.execute_command("ACL", "LOG")
    assert denied == [], f"the rule refused commands the library sends: {denied}"


async def test_the_user_cannot_touch_another_groups_keys_or_channels(
    redis_server: RedisServer, redis_url: str, admin: Redis, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    mine = LeaderSettings(group="billing", redis_url=redis_url)
    await admin.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", *acl_rule(mine)
    )
    # Another group whose name starts like ours: a sloppy pattern ("billing*") would match it.
    other_keys = ["fastapi-leader:{billing2}:leader", "fastapi-leader:{billing2}:term"]
    await admin.set(other_keys[0], "n9:1")
    client = Redis.from_url(user_url(redis_server, user, password))
    try:
        # Its own keys and channels work, so the refusals below are about the names.
        await client.set("fastapi-leader:{billing}:term", 1)
        assert await client.get("fastapi-leader:{billing}:term") == b"1"
        assert await client.publish("fastapi-leader:{billing}", b"hello") == 0
        assert await client.publish("fastapi-leader:{billing}:node:n1", b"hello") == 0

        for key in other_keys:
            with pytest.raises(NoPermissionError):
                await client.get(key)
            with pytest.raises(NoPermissionError):
                await client.set(key, "mallory:999")
            with pytest.raises(NoPermissionError):
                await client.delete(key)
        for channel in ["fastapi-leader:{billing2}", "fastapi-leader:{billing2}:node:n1"]:
            with pytest.raises(NoPermissionError):
                await client.publish(channel, b"forged")
        # A script can do no more than its caller: reading the other group's key fails inside.
        sha = await client.script_load("return redis.call('GET', KEYS[1])")
        with pytest.raises(ResponseError, match=r"(?i)no permission|NOPERM"):
            await client.evalsha(sha, 1, other_keys[0])
        # Commands a node never sends.
        for command in (
            ["KEYS", "*"],
            ["FLUSHALL"],
            ["CONFIG", "GET", "*"],
            ["EVAL", "return 1", "0"],
            ["PSUBSCRIBE", "fastapi-leader:*"],
            ["CLIENT", "LIST"],
            ["ACL", "WHOAMI"],
        ):
            with pytest.raises(NoPermissionError):
                await client.execute_command(*command)
        assert await admin.get(other_keys[0]) == b"n9:1"  # untouched
    finally:
        await client.aclose()

    subscriber = Redis.from_url(user_url(redis_server, user, password))
    pubsub = subscriber.pubsub()
    try:
        assert await confirmed(pubsub, "fastapi-leader:{billing}:node:n1")
        with pytest.raises(NoPermissionError):
            await confirmed(pubsub, "fastapi-leader:{billing2}")
    finally:
        await pubsub.aclose()
        await subscriber.aclose()


async def confirmed(pubsub: PubSub, channel: str) -> bool:
    """SUBSCRIBE and read the server's answer: a confirmation, or the error it raises."""
    await pubsub.subscribe(channel)

    async def answer() -> bool:
        while True:
            frame = await pubsub.get_message(timeout=1.0)
            if frame is not None and frame["type"] == "subscribe":
                return bool(frame["channel"] == channel.encode())

    return await asyncio.wait_for(answer(), WAIT)
