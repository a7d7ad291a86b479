"""The fault proxy on a real server: it tells connections apart and does what each fault says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fastapi_leader import LeaderElection, LeaderSettings
from fastapi_leader.testing import RedisServer
from tests.chaos.proxy import FaultProxy


def resp(*args: str) -> bytes:
    return b"".join(
        [f"*{len(args)}\r\n".encode()] + [f"${len(a)}\r\n{a}\r\n".encode() for a in args]
    )


PING = resp("PING")


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    proxy = await FaultProxy(redis_server.port).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def client(url: str) -> Redis:
    return Redis.from_url(url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))


async def ping_raw(port: int, timeout: float = 0.5) -> bytes:
    """PING on a fresh socket; b"" when nothing comes back in time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(PING)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readline(), timeout)
        except asyncio.TimeoutError:
            return b""
    finally:
        writer.close()


async def test_it_tells_the_subscriber_from_the_command_connection(proxy: FaultProxy) -> None:
    election = LeaderElection(LeaderSettings(redis_url=proxy.url, group="proxy", node_id="a"))
    await election.start()
    try:
        await election.wait_until_leader(10)
        assert proxy.open_connections() == {"command": 1, "subscriber": 1}
    finally:
        await election.stop()


async def test_cutting_the_subscriber_leaves_commands_alone(proxy: FaultProxy) -> None:
    commands = client(proxy.url)
    pubsub = commands.pubsub()
    try:
        await pubsub.subscribe("ch")
        assert await commands.ping()
        proxy.cut({"subscriber"}, "reset")
        assert await commands.ping()
        with pytest.raises((RedisConnectionError, OSError)):
            for _ in range(5):  # the reset reaches the reader at its next read
                await pubsub.get_message(timeout=0.2)
        # A new subscriber is reset too, once it says SUBSCRIBE (after its handshake).
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(resp("CLIENT", "SETNAME", "x"))
            assert await asyncio.wait_for(reader.readline(), 1.0) == b"+OK\r\n"
            writer.write(resp("SUBSCRIBE", "again"))
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 1.0)
        finally:
            writer.close()
        proxy.heal()
        fresh = commands.pubsub()
        await fresh.subscribe("ch")
        await fresh.aclose()  # type: ignore[no-untyped-call]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await commands.aclose()


async def test_cutting_commands_leaves_the_subscriber_alone(proxy: FaultProxy) -> None:
    commands = client(proxy.url)
    pubsub = commands.pubsub()
    try:
        await pubsub.subscribe("ch")
        await pubsub.get_message(timeout=0.2)  # the confirmation
        proxy.cut({"command"}, "reset")
        with pytest.raises((RedisConnectionError, OSError)):
            await commands.ping()
        await pubsub.ping()
        reply = await pubsub.get_message(timeout=1.0)
        assert reply is not None and reply["type"] == "pong"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await commands.aclose()


async def test_a_dropped_reply_arrives_when_the_cut_heals(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(PING)
        assert await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
        proxy.cut({"command"}, "drop")
        writer.write(PING)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.3)
        proxy.heal()
        assert await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
    finally:
        writer.close()


async def test_half_open_connections_stay_silent(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(PING)
        assert await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
        proxy.half_open()
        assert await ping_raw(proxy.port, 0.3) == b""  # accepted, never answered
        proxy.heal()
        writer.write(PING)
        with pytest.raises(asyncio.TimeoutError):  # silent for good
            await asyncio.wait_for(reader.readline(), 0.3)
        assert await ping_raw(proxy.port) == b"+PONG\r\n"  # new connections work again
    finally:
        writer.close()


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    commands = client(proxy.url)
    try:
        await commands.ping()
        proxy.delay(0.1, 0.0)
        started = time.monotonic()
        await commands.ping()
        assert time.monotonic() - started >= 0.2
        proxy.heal()
        started = time.monotonic()
        await commands.ping()
        assert time.monotonic() - started < 0.1
    finally:
        await commands.aclose()


async def test_refuse_all_resets_everything(proxy: FaultProxy) -> None:
    commands = client(proxy.url)
    try:
        await commands.ping()
        proxy.refuse_all()
        with pytest.raises((RedisConnectionError, RedisTimeoutError, OSError)):
            await commands.ping()
        proxy.heal()
        assert await commands.ping()
    finally:
        await commands.aclose()
