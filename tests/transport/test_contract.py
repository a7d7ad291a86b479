"""The transport contract: one suite, run against every transport.

The election relies on these semantics and nothing else (see
:class:`fastapi_leader.transport.base.Transport`); the memory transport claims to share them
with Redis, and this suite proves it by running the same tests on both. Each transport is a
:class:`Backend` in :data:`BACKENDS`; a new one (a Cluster or Sentinel form of the Redis
transport) is one more entry there: a backend whose ``make`` builds that transport (for a form
of :class:`RedisTransport` reached by another URL, ``RedisBackend`` with that URL).

What only one transport has (Redis's connections, TTLs read on the server, outages of a real
server; the memory broker's cut and reconnect) stays in tests/transport/test_transport_redis.py and
tests/transport/test_transport_memory.py.

"Not heard" is checked without sleeping: a marker is broadcast after the message that must not
arrive; both transports deliver in publish order, so once the marker is in, the message would
be too. Expiry is waited for with a sleep past the TTL counted from when the command returned:
the key is gone by then on any server, however slow the round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import pytest
from redis.asyncio import Redis

from fastapi_leader.transport import (
    BrokerUnavailable,
    MemoryBroker,
    MemoryTransport,
    Names,
    RedisTransport,
)
from fastapi_leader.transport.base import Transport

from .recording import RecordingSink

GROUP = "g"
# A lease that the test lets expire, and the margin past it that the test waits.
SHORT_TTL = 0.1
EXPIRY_MARGIN = 0.05
# A lease that must outlive the test's checks, even on a loaded machine.
LONG_TTL = 30.0


class Backend(Protocol):
    """One transport under contract: how to build a node of it, and how its keys are lost."""

    def make(self, node_id: str, group: str = GROUP) -> Transport:
        """A new, unstarted transport for ``node_id`` in ``group``."""
        ...

    async def lose_keys(self) -> None:
        """Drop every key, as a Redis restart without persistence does."""
        ...


class MemoryBackend:
    """The in-process transport, all nodes on one broker."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()

    def make(self, node_id: str, group: str = GROUP) -> Transport:
        return MemoryTransport(self.broker, Names("fl-test", group, node_id))

    async def lose_keys(self) -> None:
        self.broker.flush()


class RedisBackend:
    """A Redis transport (:class:`RedisTransport` unless ``transport`` says which) on a real
    Redis-protocol server reached at ``url``."""

    def __init__(
        self, url: str, transport: Callable[[str, Names], Transport] = RedisTransport
    ) -> None:
        self.url = url
        self.transport = transport

    def make(self, node_id: str, group: str = GROUP) -> Transport:
        return self.transport(self.url, Names("fl-test", group, node_id))

    async def lose_keys(self) -> None:
        async with Redis.from_url(self.url) as client:
            await client.flushall()


# name -> how to build the backend from the test's fixtures; add a transport here, e.g.
#     "sentinel": lambda request: RedisBackend(request.getfixturevalue("sentinel_url")),
# (a transport whose keys live on several servers also says how to lose them: lose_keys).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "memory": lambda request: MemoryBackend(),
    "redis": lambda request: RedisBackend(request.getfixturevalue("redis_url")),
}

Node = tuple[Transport, RecordingSink]
MakeNode = Callable[..., Awaitable[Node]]


# Every transport but the memory one talks to a server: ``-m "not redis"`` leaves it out.
IN_PROCESS = {"memory"}


@pytest.fixture(
    params=[
        pytest.param(name, marks=() if name in IN_PROCESS else pytest.mark.redis)
        for name in BACKENDS
    ]
)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each transport in turn."""
    name: str = request.param
    return BACKENDS[name](request)


@pytest.fixture
async def make_node(backend: Backend) -> AsyncIterator[MakeNode]:
    """``await make_node("a")``: a started transport for node "a" and its sink; every one is
    closed after the test."""
    transports: list[Transport] = []

    async def make(node_id: str, group: str = GROUP) -> Node:
        transport = backend.make(node_id, group)
        transports.append(transport)
        sink = RecordingSink()
        await transport.start(sink)
        return transport, sink

    yield make
    for transport in transports:
        await transport.close()


async def past(ttl: float, since: float) -> None:
    """Sleep until ``ttl`` (plus a margin) has passed since ``since``: time passing is what is
    tested, nothing is waited for."""
    await asyncio.sleep(max(0.0, since + ttl + EXPIRY_MARGIN - time.monotonic()))


# -- pub/sub ---------------------------------------------------------------------------------


async def test_broadcast_reaches_every_node_including_the_sender(make_node: MakeNode) -> None:
    (a, a_sink), (_, b_sink) = await make_node("a"), await make_node("b")

    await a.publish(b"hello")

    await a_sink.wait_for_message(b"hello")
    await b_sink.wait_for_message(b"hello")


async def test_own_channel_is_heard_only_by_its_node(make_node: MakeNode) -> None:
    a, a_sink = await make_node("a")
    _, b_sink = await make_node("b")
    _, c_sink = await make_node("c")

    await a.publish(b"for-b", to="b")
    await a.publish(b"marker")

    for sink in (a_sink, b_sink, c_sink):
        await sink.wait_for_message(b"marker")
    assert b_sink.messages == [b"for-b", b"marker"]
    assert a_sink.messages == [b"marker"]
    assert c_sink.messages == [b"marker"]


async def test_messages_arrive_in_publish_order(make_node: MakeNode) -> None:
    a, _ = await make_node("a")
    _, b_sink = await make_node("b")
    sent = [str(i).encode() for i in range(200)]

    for data in sent:
        await a.publish(data)

    await b_sink.wait_until(lambda: len(b_sink.messages) == len(sent))
    assert b_sink.messages == sent


async def test_groups_do_not_hear_each_other(make_node: MakeNode) -> None:
    other, _ = await make_node("z", group="other-group")
    a, a_sink = await make_node("a")

    await other.publish(b"other")
    await other.publish(b"for-a", to="a")
    await a.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"marker"]


async def test_groups_have_their_own_keys(make_node: MakeNode) -> None:
    other, _ = await make_node("z", group="other-group")
    a, _ = await make_node("a")

    assert await other.allocate_term(0) == 1
    assert await other.acquire(1, LONG_TTL, b"z-won") is True
    assert await a.allocate_term(0) == 1
    assert await a.acquire(1, LONG_TTL, b"a-won") is True


# -- the four operations ---------------------------------------------------------------------


async def test_allocate_term_is_monotonic_and_honours_the_floor(make_node: MakeNode) -> None:
    a, _ = await make_node("a")
    b, _ = await make_node("b")

    assert await a.allocate_term(0) == 1
    assert await a.allocate_term(0) == 2
    assert await b.allocate_term(0) == 3
    assert await a.allocate_term(10) == 11
    assert await b.allocate_term(5) == 12


async def test_acquire_is_set_if_not_exists_and_announces_only_on_success(
    make_node: MakeNode,
) -> None:
    a, a_sink = await make_node("a")
    b, _ = await make_node("b")

    assert await a.acquire(1, LONG_TTL, b"a-won") is True
    assert await b.acquire(2, LONG_TTL, b"b-won") is False
    assert await a.acquire(3, LONG_TTL, b"a-again") is False
    await b.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"marker"]


async def test_acquire_succeeds_after_the_lease_expires(make_node: MakeNode) -> None:
    a, _ = await make_node("a")
    b, _ = await make_node("b")
    assert await a.acquire(1, SHORT_TTL, b"a-won")
    acquired_at = time.monotonic()

    await past(SHORT_TTL, acquired_at)

    assert await b.acquire(2, LONG_TTL, b"b-won") is True
    assert await a.renew(1, LONG_TTL, b"a-renewed") is False


async def test_acquire_refuses_a_term_older_than_the_counter(make_node: MakeNode) -> None:
    a, _ = await make_node("a")
    b, _ = await make_node("b")
    old = await a.allocate_term(0)
    newer = await b.allocate_term(0)

    assert await a.acquire(old, LONG_TTL, b"a-won") is False
    assert await b.acquire(newer, LONG_TTL, b"b-won") is True


async def test_renew_only_by_the_holder_extends_the_ttl(make_node: MakeNode) -> None:
    a, a_sink = await make_node("a")
    b, _ = await make_node("b")
    # Long enough that the renewal lands before it ends, however loaded the machine.
    first_ttl = 1.0
    assert await a.acquire(1, first_ttl, b"a-won")
    acquired_at = time.monotonic()

    assert await a.renew(1, LONG_TTL, b"a-renewed") is True
    assert await b.renew(1, LONG_TTL, b"b-renewed") is False
    assert await a.renew(2, LONG_TTL, b"wrong-term") is False
    await past(first_ttl, acquired_at)

    assert await b.acquire(2, LONG_TTL, b"b-won") is False  # still held: the TTL was extended
    await b.publish(b"marker")
    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"a-renewed", b"marker"]


async def test_renew_fails_once_the_lease_has_expired(make_node: MakeNode) -> None:
    a, _ = await make_node("a")
    assert await a.acquire(1, SHORT_TTL, b"a-won")
    acquired_at = time.monotonic()

    await past(SHORT_TTL, acquired_at)

    assert await a.renew(1, LONG_TTL, b"a-renewed") is False


async def test_release_only_by_the_holder_and_announces(make_node: MakeNode) -> None:
    a, a_sink = await make_node("a")
    b, _ = await make_node("b")
    assert await a.acquire(1, LONG_TTL, b"a-won")

    assert await b.release(1, b"b-left") is False
    assert await a.release(1, b"a-left") is True
    assert await a.release(1, b"a-left-twice") is False
    assert await b.acquire(2, LONG_TTL, b"b-won") is True
    await b.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"a-left", b"b-won", b"marker"]


async def test_release_without_announce_publishes_nothing(make_node: MakeNode) -> None:
    a, a_sink = await make_node("a")
    assert await a.acquire(1, LONG_TTL, b"a-won")

    assert await a.release(1, None) is True
    await a.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"marker"]


async def test_acquire_rejects_a_non_positive_ttl(make_node: MakeNode) -> None:
    a, _ = await make_node("a")

    with pytest.raises(ValueError, match="ttl"):
        await a.acquire(1, 0, b"a-won")


# -- lost keys, close ------------------------------------------------------------------------


async def test_lost_keys_end_the_lease_and_restart_the_terms(
    backend: Backend, make_node: MakeNode
) -> None:
    a, _ = await make_node("a")
    b, _ = await make_node("b")
    assert await a.allocate_term(0) == 1
    assert await a.acquire(1, LONG_TTL, b"a-won")

    await backend.lose_keys()

    assert await a.renew(1, LONG_TTL, b"a-renewed") is False
    assert await b.acquire(2, LONG_TTL, b"b-won") is True
    assert await b.allocate_term(0) == 1
    assert await b.allocate_term(7) == 8


async def test_close_is_idempotent_and_then_commands_fail(make_node: MakeNode) -> None:
    a, a_sink = await make_node("a")
    b, b_sink = await make_node("b")

    await a.close()
    await a.close()
    await b.publish(b"marker")

    await b_sink.wait_for_message(b"marker")
    assert a_sink.messages == []
    with pytest.raises(BrokerUnavailable, match="closed"):
        await a.publish(b"x")
