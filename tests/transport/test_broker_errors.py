"""What cannot work fails at ``start()``, within 5 s, in one line that names the fix.

Each case runs against a real server set up to be wrong in one way: nothing listening, a
password missing or wrong, a replica, a cluster node or a sentinel named by ``redis://``, an
ACL user short of one right, a server that does not know HELLO (as before Redis 6). The tests
assert the first line of the error, which is what a reader sees under uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from redis.asyncio import Redis

from fastapi_leader import LeaderElection, LeaderSettings
from fastapi_leader.transport import BrokerUnavailable
from fastapi_leader.transport.redis import _version, acl_rule
from harness.topologies import _SentinelProcess, wait_until
from tests.conftest import MakeRedisServer
from tests.helpers.cluster import Cluster, eventually

START_BOUND = 5.0  # the promise: a clear error within 5 s of start()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_error(redis_url: str, **settings: object) -> str:
    """Start a node on ``redis_url``; return the first line of the BrokerUnavailable it raises."""
    node = LeaderElection(
        LeaderSettings(redis_url=redis_url, group=f"e-{uuid.uuid4().hex[:8]}", **settings)
    )
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await asyncio.wait_for(node.start(), START_BOUND)
    finally:
        await node.stop()
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


async def start_error_at_a_sentinel(
    make_redis_server: MakeRedisServer, url_of: Callable[[int], str]
) -> tuple[str, str]:
    """Start a node on ``url_of(port)`` of a lone sentinel that monitors a fresh server; return
    that URL and the first line of the error the node's start raises."""
    monitored = make_redis_server()
    sentinel = _SentinelProcess(monitored.binary, _free_port(), monitored.port)
    try:
        with redis.Redis("127.0.0.1", sentinel.port, socket_timeout=2.0) as probe:
            wait_until(probe.ping, 10.0, "the sentinel to start")
        url = url_of(sentinel.port)
        return url, await start_error(url)
    finally:
        sentinel.stop()


async def test_unreachable_server_names_the_url_and_what_to_check() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    line = await start_error(url)
    assert line.startswith(f"Cannot reach Redis at {url}")
    assert "check the host and port in LEADER_REDIS_URL" in line


async def test_missing_password_says_where_the_password_goes(
    make_redis_server: MakeRedisServer,
) -> None:
    server = make_redis_server(extra_args=["--requirepass", "pw"])
    line = await start_error(server.url)
    assert line.startswith(f"Redis at {server.url} requires a password: put it in LEADER_REDIS_URL")
    assert "redis://:PASSWORD@host:port/db" in line


async def test_wrong_password_says_wrongpass_and_hides_it(
    make_redis_server: MakeRedisServer,
) -> None:
    server = make_redis_server(extra_args=["--requirepass", "right"])
    url = f"redis://:not-it-42@{server.host}:{server.port}/0"
    line = await start_error(url)
    assert line.startswith(f"Redis at redis://:***@{server.host}:{server.port}/0 refused the user")
    assert "WRONGPASS" in line
    assert "not-it-42" not in line


async def test_read_only_replica_names_the_primary_or_sentinel(
    make_redis_server: MakeRedisServer,
) -> None:
    primary = make_redis_server()
    replica = make_redis_server(extra_args=["--replicaof", primary.host, str(primary.port)])
    line = await start_error(replica.url)
    assert line.startswith(f"Cannot use Redis at {replica.url}: the server is a read-only replica")
    assert "redis+sentinel://" in line


async def test_redis_scheme_at_a_cluster_node_names_redis_cluster(
    make_redis_server: MakeRedisServer,
) -> None:
    node = make_redis_server(
        extra_args=["--cluster-enabled", "yes", "--cluster-port", str(_free_port())]
    )
    line = await start_error(node.url)
    assert line.startswith(f"Cannot use Redis at {node.url}: this node is part of a Redis Cluster")
    assert "use redis+cluster://host:port" in line


async def test_redis_scheme_at_a_sentinel_names_redis_sentinel(
    make_redis_server: MakeRedisServer,
) -> None:
    url, line = await start_error_at_a_sentinel(
        make_redis_server, lambda port: f"redis://127.0.0.1:{port}/0"
    )
    assert line.startswith(f"Cannot use Redis at {url}: this is a Sentinel")
    assert "redis+sentinel://host:26379[,host:26379...]/service_name" in line


async def test_server_without_hello_is_older_than_6_2(
    make_redis_server: MakeRedisServer,
) -> None:
    # Redis before 6.0 does not know HELLO (and 6.0 not without arguments); the same server
    # with HELLO renamed away answers exactly as such a server does ("unknown command").
    server = make_redis_server(extra_args=["--rename-command", "HELLO", ""])
    line = await start_error(server.url)
    assert line.startswith(f"Cannot use Redis at {server.url}: the server is older than Redis 6.2")


@pytest.mark.parametrize(
    ("version", "old"),
    [("6.0.16", True), ("6.1.0", True), ("6.2.0", False), ("7.0.15", False), ("8.0.1-rc1", False)],
)
def test_versions_below_6_2_are_refused(version: str, old: bool) -> None:
    assert (_version(version) < (6, 2)) is old


# ---- ACL users short of one right ------------------------------------------------------------


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_user(admin: Redis) -> AsyncIterator[object]:
    """``await make_user(settings, drop=[...])``: a user with acl_rule(settings) less ``drop``;
    returns its URL. Users are deleted after the test (FLUSHALL keeps them)."""
    made: list[str] = []

    async def make(settings: LeaderSettings, redis_url: str, drop: list[str]) -> str:
        user, password = f"leader-{uuid.uuid4().hex[:8]}", secrets.token_hex(8)
        rules = [rule for rule in acl_rule(settings) if rule not in drop]
        await admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)
        made.append(user)
        return redis_url.replace("redis://", f"redis://{user}:{password}@")

    yield make
    for user in made:
        await admin.execute_command("ACL", "DELUSER", user)


@pytest.mark.parametrize(
    ("drop", "step"),
    [
        (["+script|load", "+evalsha"], "load the scripts"),
        (["~fastapi-leader:{acl}:leader"], "read the group's keys"),
        (["&fastapi-leader:{acl}", "&fastapi-leader:{acl}:node:*"], "subscribe"),
    ],
    ids=["scripts", "keys", "channels"],
)
async def test_acl_refusal_names_acl_rule(
    redis_url: str, make_user: object, drop: list[str], step: str
) -> None:
    settings = LeaderSettings(redis_url=redis_url, group="acl")
    url = await make_user(settings, redis_url, drop)  # type: ignore[operator]
    node = LeaderElection(LeaderSettings(redis_url=url, group="acl"))
    try:
        with pytest.raises(BrokerUnavailable) as caught:
            await asyncio.wait_for(node.start(), START_BOUND)
    finally:
        await node.stop()
    line = str(caught.value).splitlines()[0]
    assert f"refused to {step} for this user" in line
    assert "NOPERM" in line
    assert "acl_rule(settings)" in line


async def test_a_node_that_cannot_allocate_terms_warns_with_the_reason(
    redis_url: str, make_user: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Everything but INCR: the node starts, stands, and every term allocation is refused.
    settings = LeaderSettings(redis_url=redis_url, group="acl")
    url = await make_user(settings, redis_url, ["+incr"])  # type: ignore[operator]
    caplog.set_level(logging.WARNING, logger="fastapi_leader")
    async with Cluster(redis_url, group="acl") as cluster:
        await cluster.add(redis_url=url)  # no client_name: the rule does not allow SETNAME
        record = await eventually(
            lambda: next(
                (r for r in caplog.records if "could not allocate a term" in r.getMessage()),
                None,
            ),
            what="a warning about term allocation",
        )
    assert record.levelno == logging.WARNING
    assert "allocate_term failed" in record.getMessage()
    assert "can't run this command" in record.getMessage()  # the server's own reason


async def test_sentinel_url_with_a_wrong_service_name_says_what_to_check(
    make_redis_server: MakeRedisServer,
) -> None:
    url, line = await start_error_at_a_sentinel(
        make_redis_server, lambda port: f"redis+sentinel://127.0.0.1:{port}/no-such-service"
    )
    assert line.startswith(f"No sentinel at {url} named a primary for service 'no-such-service'")
    assert "LEADER_SENTINEL_PASSWORD" in line
