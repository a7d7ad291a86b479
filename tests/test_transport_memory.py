"""MemoryTransport: the same semantics as RedisTransport, in one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from fastapi_leader.transport import BrokerUnavailable, MemoryBroker, MemoryTransport, Names

GROUP = "g"
WAIT = 10.0
# Leases that expire while the test waits a little longer.
SHORT_TTL = 0.05
PAST_SHORT_TTL = 0.1


class RecordingSink:
    """Records what a transport reports, and lets a test await a condition on it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lost = 0
        self.restored = 0
        self._changed = asyncio.Event()

    def message_received(self, data: bytes) -> None:
        self.messages.append(data)
        self._changed.set()

    def connection_lost(self) -> None:
        self.lost += 1
        self._changed.set()

    def connection_restored(self) -> None:
        self.restored += 1
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_for_message(self, data: bytes) -> None:
        await self.wait_until(lambda: data in self.messages)


Node = tuple[MemoryTransport, RecordingSink]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def nodes(broker: MemoryBroker) -> AsyncIterator[dict[str, Node]]:
    """Started nodes "a", "b" and "c" on one broker; closed after the test."""
    started: dict[str, Node] = {}
    for node_id in "abc":
        transport = MemoryTransport(broker, Names("fl-test", GROUP, node_id))
        sink = RecordingSink()
        await transport.start(sink)
        started[node_id] = (transport, sink)
    yield started
    for transport, _ in started.values():
        await transport.close()


# -- pub/sub ---------------------------------------------------------------------------------


async def test_broadcast_reaches_every_node_after_publish_returns(nodes: dict[str, Node]) -> None:
    a, _ = nodes["a"]

    await a.publish(b"hello")

    # Delivery is scheduled, never done inside publish (as with a real broker).
    assert all(sink.messages == [] for _, sink in nodes.values())
    for _, sink in nodes.values():
        await sink.wait_for_message(b"hello")


async def test_own_channel_is_heard_only_by_its_node(nodes: dict[str, Node]) -> None:
    a, a_sink = nodes["a"]

    await a.publish(b"for-b", to="b")
    await a.publish(b"marker")

    for _, sink in nodes.values():
        await sink.wait_for_message(b"marker")
    assert nodes["b"][1].messages == [b"for-b", b"marker"]
    assert a_sink.messages == [b"marker"]
    assert nodes["c"][1].messages == [b"marker"]


async def test_messages_arrive_in_publish_order(nodes: dict[str, Node]) -> None:
    a, _ = nodes["a"]
    _, b_sink = nodes["b"]
    sent = [str(i).encode() for i in range(200)]

    for data in sent:
        await a.publish(data)

    await b_sink.wait_until(lambda: len(b_sink.messages) == len(sent))
    assert b_sink.messages == sent


async def test_groups_do_not_hear_each_other(broker: MemoryBroker, nodes: dict[str, Node]) -> None:
    other = MemoryTransport(broker, Names("fl-test", "other-group", "z"))
    other_sink = RecordingSink()
    await other.start(other_sink)
    a, a_sink = nodes["a"]

    await other.publish(b"other")
    await a.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"marker"]
    await other.close()


# -- the four operations ---------------------------------------------------------------------


async def test_allocate_term_is_monotonic_and_honours_the_floor(nodes: dict[str, Node]) -> None:
    a, _ = nodes["a"]
    b, _ = nodes["b"]

    assert await a.allocate_term(0) == 1
    assert await a.allocate_term(0) == 2
    assert await b.allocate_term(0) == 3
    assert await a.allocate_term(10) == 11
    assert await b.allocate_term(5) == 12


async def test_acquire_is_set_if_not_exists_and_announces_only_on_success(
    nodes: dict[str, Node],
) -> None:
    a, a_sink = nodes["a"]
    b, _ = nodes["b"]

    assert await a.acquire(1, 5.0, b"a-won") is True
    assert await b.acquire(2, 5.0, b"b-won") is False
    assert await a.acquire(3, 5.0, b"a-again") is False
    await b.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"marker"]


async def test_acquire_succeeds_after_the_lease_expires(nodes: dict[str, Node]) -> None:
    a, _ = nodes["a"]
    b, _ = nodes["b"]
    assert await a.acquire(1, SHORT_TTL, b"a-won")

    await asyncio.sleep(PAST_SHORT_TTL)

    assert await b.acquire(2, 5.0, b"b-won") is True
    assert await a.renew(1, 5.0, b"a-renewed") is False


async def test_acquire_refuses_a_term_older_than_the_counter(nodes: dict[str, Node]) -> None:
    a, _ = nodes["a"]
    b, _ = nodes["b"]
    old = await a.allocate_term(0)
    newer = await b.allocate_term(0)

    assert await a.acquire(old, 5.0, b"a-won") is False
    assert await b.acquire(newer, 5.0, b"b-won") is True


async def test_renew_only_by_the_holder_extends_the_ttl(nodes: dict[str, Node]) -> None:
    a, a_sink = nodes["a"]
    b, _ = nodes["b"]
    assert await a.acquire(1, SHORT_TTL, b"a-won")

    assert await b.renew(1, 5.0, b"b-renewed") is False
    assert await a.renew(2, 5.0, b"wrong-term") is False
    assert await a.renew(1, 5.0, b"a-renewed") is True
    await asyncio.sleep(PAST_SHORT_TTL)

    assert await b.acquire(2, 5.0, b"b-won") is False  # still held: the TTL was extended
    await b.publish(b"marker")
    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"a-renewed", b"marker"]


async def test_release_only_by_the_holder_and_announces(nodes: dict[str, Node]) -> None:
    a, a_sink = nodes["a"]
    b, _ = nodes["b"]
    assert await a.acquire(1, 5.0, b"a-won")

    assert await b.release(1, b"b-left") is False
    assert await a.release(1, b"a-left") is True
    assert await a.release(1, b"a-left-twice") is False
    assert await b.acquire(2, 5.0, b"b-won") is True
    await b.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"a-left", b"b-won", b"marker"]


async def test_release_without_announce_publishes_nothing(nodes: dict[str, Node]) -> None:
    a, a_sink = nodes["a"]
    assert await a.acquire(1, 5.0, b"a-won")

    assert await a.release(1, None) is True
    await a.publish(b"marker")

    await a_sink.wait_for_message(b"marker")
    assert a_sink.messages == [b"a-won", b"marker"]


async def test_acquire_rejects_a_non_positive_ttl(nodes: dict[str, Node]) -> None:
    a, _ = nodes["a"]

    with pytest.raises(ValueError, match="ttl"):
        await a.acquire(1, 0, b"a-won")


# -- faults ----------------------------------------------------------------------------------


async def test_disconnected_node_hears_nothing_and_its_commands_fail(
    broker: MemoryBroker, nodes: dict[str, Node]
) -> None:
    a, a_sink = nodes["a"]
    b, b_sink = nodes["b"]

    broker.disconnect("a")
    broker.disconnect("a")  # a second cut is not a second outage
    await b.publish(b"while-cut")
    await a_sink.wait_until(lambda: a_sink.lost == 1)
    for command in (
        lambda: a.publish(b"x"),
        lambda: a.allocate_term(0),
        lambda: a.acquire(1, 1.0, b"x"),
        lambda: a.renew(1, 1.0, b"x"),
        lambda: a.release(1, b"x"),
    ):
        with pytest.raises(BrokerUnavailable, match="disconnected"):
            await command()

    broker.reconnect("a")
    await a_sink.wait_until(lambda: a_sink.restored == 1)
    await b.publish(b"after")
    await a_sink.wait_for_message(b"after")
    await b_sink.wait_for_message(b"after")
    assert a_sink.messages == [b"after"]
    assert (a_sink.lost, a_sink.restored) == (1, 1)
    assert await a.allocate_term(0) == 1


async def test_a_message_in_flight_at_a_cut_is_lost(
    broker: MemoryBroker, nodes: dict[str, Node]
) -> None:
    _, a_sink = nodes["a"]
    b, _ = nodes["b"]

    await b.publish(b"in-flight")
    broker.disconnect("a")
    broker.reconnect("a")  # back before the delivery came due: still lost (at most once)
    await a_sink.wait_until(lambda: a_sink.restored == 1)
    await b.publish(b"after")

    await a_sink.wait_for_message(b"after")
    assert a_sink.messages == [b"after"]


async def test_flush_drops_every_key_like_a_redis_restart(
    broker: MemoryBroker, nodes: dict[str, Node]
) -> None:
    a, _ = nodes["a"]
    b, _ = nodes["b"]
    assert await a.allocate_term(0) == 1
    assert await a.acquire(1, 5.0, b"a-won")

    broker.flush()

    assert await a.renew(1, 5.0, b"a-renewed") is False
    assert await b.acquire(2, 5.0, b"b-won") is True
    assert await b.allocate_term(0) == 1
    assert await b.allocate_term(7) == 8


async def test_start_while_disconnected_fails(broker: MemoryBroker) -> None:
    transport = MemoryTransport(broker, Names("fl-test", GROUP, "late"))
    broker.disconnect("late")

    with pytest.raises(BrokerUnavailable):
        await transport.start(RecordingSink())

    broker.reconnect("late")
    await transport.start(RecordingSink())
    await transport.close()


async def test_two_live_nodes_cannot_share_an_id(
    broker: MemoryBroker, nodes: dict[str, Node]
) -> None:
    twin = MemoryTransport(broker, Names("fl-test", GROUP, "a"))

    with pytest.raises(RuntimeError, match="already started"):
        await twin.start(RecordingSink())


async def test_close_is_idempotent_and_drops_pending_deliveries(nodes: dict[str, Node]) -> None:
    a, a_sink = nodes["a"]
    b, b_sink = nodes["b"]

    await b.publish(b"pending")
    await a.close()
    await a.close()
    await b.publish(b"marker")

    await b_sink.wait_for_message(b"marker")
    assert b_sink.messages == [b"pending", b"marker"]
    assert a_sink.messages == []
    with pytest.raises(BrokerUnavailable, match="closed"):
        await a.publish(b"x")
