"""RedisTransport against real, private Redis-protocol servers (never the machine's own Redis):
what is its own (its connections, the keys and TTLs on the server, outages of the server). The
semantics every transport shares are the contract suite's (tests/transport/test_contract.py).

"Not heard" is checked without sleeping: a marker is broadcast after the message that must not
arrive; Redis delivers in publish order, so once the marker is in, the message would be too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from fastapi_leader.testing import RedisServer
from fastapi_leader.transport import BrokerUnavailable, Names, RedisTransport
from tests.transport.recording import WAIT, RecordingSink, every_command

pytestmark = pytest.mark.redis

GROUP = "g"


Node = tuple[RedisTransport, RecordingSink]
MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def make_node() -> AsyncIterator[MakeNode]:
    """``await make_node(url, "a")``: a started transport for node "a" and its sink; closed
    after the test."""
    transports: list[RedisTransport] = []

    async def make(url: str, node_id: str, *, start: bool = True, **options: Any) -> Node:
        transport = RedisTransport(url, Names("fl-test", GROUP, node_id), **options)
        transports.append(transport)
        sink = RecordingSink()
        if start:
            await transport.start(sink)
        return transport, sink

    yield make
    for transport in transports:
        await transport.close()


@pytest.fixture
async def plain_client(redis_url: str) -> AsyncIterator[Redis]:
    """A separate client for checking keys behind the transports' backs."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _wait_until_gone(client: Redis, key: str) -> None:
    """Poll until ``key`` has expired on the server (bounded)."""
    deadline = time.monotonic() + WAIT
    while await client.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire"
        await asyncio.sleep(0.01)


async def _our_connections(server: RedisServer) -> int:
    """Connections to ``server`` other than the one this function opens."""
    async with Redis.from_url(server.url) as client:
        clients = await client.client_list()
        return len(clients) - 1


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- connections -----------------------------------------------------------------------------


async def test_uses_exactly_two_connections(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, _ = await make_node(server.url, "a")
    await a.allocate_term(0)

    assert await _our_connections(server) == 2

    await a.close()
    # The server notices closed sockets on its own schedule: poll, bounded.
    deadline = time.monotonic() + WAIT
    while await _our_connections(server) != 0:
        assert time.monotonic() < deadline, "connections left open after close()"
        await asyncio.sleep(0.01)


# -- the keys on the server (the operations' semantics: the contract suite) -----------------


async def test_acquire_sets_the_holder_and_the_ttl_on_the_server(
    redis_url: str, make_node: MakeNode, plain_client: Redis
) -> None:
    a, _ = await make_node(redis_url, "a")
    b, _ = await make_node(redis_url, "b")

    assert await a.acquire(1, 5.0, b"a-won") is True
    assert await b.acquire(2, 5.0, b"b-won") is False

    assert await plain_client.get(a.names.leader_key) == b"a:1"
    assert 4000 < await plain_client.pttl(a.names.leader_key) <= 5000


async def test_the_leader_key_expires_on_the_server_and_the_next_holder_is_written(
    redis_url: str, make_node: MakeNode, plain_client: Redis
) -> None:
    a, _ = await make_node(redis_url, "a")
    b, _ = await make_node(redis_url, "b")
    assert await a.acquire(1, 0.05, b"a-won")

    await _wait_until_gone(plain_client, a.names.leader_key)

    assert await b.acquire(2, 5.0, b"b-won") is True
    assert await plain_client.get(a.names.leader_key) == b"b:2"


async def test_a_refused_acquire_writes_no_key(
    redis_url: str, make_node: MakeNode, plain_client: Redis
) -> None:
    a, _ = await make_node(redis_url, "a")
    b, _ = await make_node(redis_url, "b")
    old = await a.allocate_term(0)
    await b.allocate_term(0)

    assert await a.acquire(old, 5.0, b"a-won") is False
    assert await plain_client.get(a.names.leader_key) is None


async def test_renew_sets_the_ttl_on_the_server_only_for_the_holder(
    redis_url: str, make_node: MakeNode, plain_client: Redis
) -> None:
    a, _ = await make_node(redis_url, "a")
    b, _ = await make_node(redis_url, "b")
    assert await a.acquire(1, 1.0, b"a-won")

    assert await b.renew(1, 30.0, b"b-renewed") is False
    assert await a.renew(2, 30.0, b"wrong-term") is False
    assert await plain_client.pttl(a.names.leader_key) <= 1000
    assert await a.renew(1, 30.0, b"a-renewed") is True
    assert await plain_client.pttl(a.names.leader_key) > 29000


async def test_release_deletes_the_key_only_for_the_holder(
    redis_url: str, make_node: MakeNode, plain_client: Redis
) -> None:
    a, _ = await make_node(redis_url, "a")
    b, _ = await make_node(redis_url, "b")
    assert await a.acquire(1, 5.0, b"a-won")

    assert await b.release(1, b"b-left") is False
    assert await plain_client.get(a.names.leader_key) == b"a:1"
    assert await a.release(1, b"a-left") is True
    assert await plain_client.exists(a.names.leader_key) == 0


# -- faults ----------------------------------------------------------------------------------


async def test_redis_restart_is_reported_and_everything_works_again(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, a_sink = await make_node(server.url, "a")
    b, b_sink = await make_node(server.url, "b")
    assert await a.allocate_term(0) == 1

    await asyncio.to_thread(server.restart)

    await a_sink.wait_until(lambda: a_sink.restored == 1)
    await b_sink.wait_until(lambda: b_sink.restored == 1)
    assert (a_sink.lost, b_sink.lost) == (1, 1)
    await b.publish(b"back")
    await a_sink.wait_for_message(b"back")
    await b_sink.wait_for_message(b"back")


async def test_first_command_after_a_redis_restart_succeeds(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    # Regression: with redis-py's maintenance notifications on, the pool reused the dead
    # connection and the first command after a restart failed.
    server = make_redis_server()
    a, a_sink = await make_node(server.url, "a")
    b, b_sink = await make_node(server.url, "b")
    assert await a.allocate_term(0) == 1
    assert await b.acquire(1, 5.0, b"b-won")

    await asyncio.to_thread(server.restart)

    # The new server is empty, its script cache too.
    assert await a.allocate_term(0) == 1
    assert await b.acquire(2, 5.0, b"b-won-again") is True
    await a_sink.wait_until(lambda: a_sink.restored == 1)
    await b_sink.wait_until(lambda: b_sink.restored == 1)
    assert await _our_connections(server) == 4


async def test_killed_subscriber_connection_is_reported_and_resubscribed(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, a_sink = await make_node(server.url, "a")
    async with Redis.from_url(server.url) as killer:
        killed = await killer.client_kill_filter(_type="pubsub")
    assert killed == 1

    await a_sink.wait_until(lambda: a_sink.restored == 1)
    assert a_sink.lost == 1
    await a.publish(b"after")
    await a_sink.wait_for_message(b"after")


async def test_killed_command_connection_reconnects_on_the_next_command(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, a_sink = await make_node(server.url, "a")
    assert await a.allocate_term(0) == 1
    async with Redis.from_url(server.url) as killer:
        # SKIPME is the default: the killer's own (normal) connection survives.
        killed = await killer.client_kill_filter(_type="normal")
    assert killed == 1

    assert await a.allocate_term(0) == 2
    await a.publish(b"still-subscribed")
    await a_sink.wait_for_message(b"still-subscribed")
    assert a_sink.lost == 0


async def test_commands_fail_fast_while_redis_is_down_then_recover(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, a_sink = await make_node(server.url, "a", command_timeout=0.5)
    server.stop()

    for command in every_command(a):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1"):
            await command()
        assert time.monotonic() - started < 1.0
    await a_sink.wait_until(lambda: a_sink.lost == 1)

    await asyncio.to_thread(server.start)

    assert await a.allocate_term(0) == 1
    await a_sink.wait_until(lambda: a_sink.restored == 1)
    await a.publish(b"back")
    await a_sink.wait_for_message(b"back")


async def test_commands_against_a_frozen_redis_time_out(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, _ = await make_node(server.url, "a", command_timeout=0.5)
    server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="renew failed"):
            await a.renew(1, 1.0, b"x")
        assert 0.4 < time.monotonic() - started < 1.0
    finally:
        server.resume()

    assert await a.allocate_term(0) == 1


async def test_frozen_redis_is_detected_as_lost_and_restored_after_resume(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, a_sink = await make_node(server.url, "a")
    server.pause()
    try:
        started = time.monotonic()
        await a_sink.wait_until(lambda: a_sink.lost == 1)
        detected_after = time.monotonic() - started
    finally:
        server.resume()

    assert detected_after < 3.0
    await a_sink.wait_until(lambda: a_sink.restored == 1)
    await a.publish(b"back")
    await a_sink.wait_for_message(b"back")
    assert a_sink.lost == 1


async def test_start_against_a_closed_port_fails_fast_without_the_password(
    make_node: MakeNode,
) -> None:
    url = f"redis://user:secretpw@127.0.0.1:{_closed_port()}/0"
    a, sink = await make_node(url, "a", start=False)

    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        await a.start(sink)

    assert time.monotonic() - started < 2.0
    assert "secretpw" not in str(raised.value)
    assert "secretpw" not in repr(a)
    assert "redis://user:***@127.0.0.1" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:secretpw@127.0.0.1:6390/0",
        "redis://:secretpw@127.0.0.1:6390",
        "unix:///tmp/redis.sock?db=0&password=secretpw",
        "redis://user:secret/pw@127.0.0.1:6390/0",  # an unescaped "/" must not fool redaction
    ],
)
def test_the_password_is_never_shown(url: str) -> None:
    try:
        shown = repr(RedisTransport(url, Names("fl-test", GROUP, "a")))
    except ValueError as error:
        shown = str(error)

    assert "secret" not in shown
    assert "***" in shown


async def test_close_is_idempotent_and_quiet_even_when_redis_is_gone(
    make_redis_server: Callable[..., RedisServer], make_node: MakeNode
) -> None:
    server = make_redis_server()
    a, _ = await make_node(server.url, "a")
    never_started, _ = await make_node(server.url, "b", start=False)
    server.stop()

    await a.close()
    await a.close()
    await never_started.close()

    with pytest.raises(BrokerUnavailable, match="closed"):
        await a.publish(b"x")


async def test_an_outage_warns_once_not_per_retry(
    make_redis_server: Callable[..., RedisServer],
    make_node: MakeNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fastapi_leader.transport.redis")
    server = make_redis_server()
    _, a_sink = await make_node(server.url, "a")
    server.stop()

    deadline = time.monotonic() + WAIT
    while sum("Resubscribing" in record.getMessage() for record in caplog.records) < 3:
        assert time.monotonic() < deadline, "the reader stopped retrying"
        await asyncio.sleep(0.05)
    await asyncio.to_thread(server.start)
    await a_sink.wait_until(lambda: a_sink.restored == 1)

    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert a_sink.lost == 1


async def _pings(server: RedisServer) -> int:
    async with Redis.from_url(server.url) as client:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))


@pytest.mark.parametrize(("idle_before_ping", "pinged"), [(0.5, True), (30.0, False)])
async def test_a_quiet_subscriber_is_pinged_only_after_its_configured_silence(
    make_redis_server: Callable[..., RedisServer],
    make_node: MakeNode,
    idle_before_ping: float,
    pinged: bool,
) -> None:
    # The economy profile's leader beats every 3 s: its followers must not PING in between
    # (five PINGs per beat were most of its idle commands), while the defaults' silence of
    # half a second still finds a dead connection fast.
    server = make_redis_server()
    await make_node(server.url, "a", idle_before_ping=idle_before_ping)
    before = await _pings(server)
    # A window, not a synchronisation: three times the shorter silence, far below the longer.
    await asyncio.sleep(2.5)
    assert (await _pings(server) > before) is pinged
