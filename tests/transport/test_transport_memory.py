"""MemoryTransport: what is its own. The semantics it shares with RedisTransport are proven by
the contract suite (tests/transport/test_contract.py), run against both."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fastapi_leader.transport import BrokerUnavailable, MemoryBroker, MemoryTransport, Names
from tests.transport.recording import RecordingSink, every_command

GROUP = "g"


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
    for command in every_command(a):
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
