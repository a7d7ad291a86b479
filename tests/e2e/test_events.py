"""The example's fenced singleton work: every event reaches the work queue, and is recorded as
processed, exactly once, across a stale leader, a worker given up for gone, and a leader killed
while it moves events.

The first tests drive :class:`example_app.work.EventQueues` on a real Redis, playing two leaders
(or two workers) by hand; the last one runs real node processes and kills the leader.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from example_app.work import EventQueues, cancel_and_wait
from fastapi_leader import StaleToken
from fastapi_leader.testing import RedisServer

from .conftest import STEADY, MakeCluster
from .nodes import AppNode, eventually

BASE = "test:example"
# Generous: these bound waits that normally end well within a second.
WAIT = 10.0
# Draining the events left after the kill takes ~5 s here; a loaded box takes longer.
DRAIN_TIMEOUT = 90.0


@pytest.fixture
async def make_queues(redis_url: str) -> AsyncIterator[Callable[[str], EventQueues]]:
    """``make_queues(node_id)``: that node's view of one shared set of queues; closed after."""
    made: list[EventQueues] = []

    def make(node_id: str) -> EventQueues:
        queues = EventQueues(Redis.from_url(redis_url, decode_responses=True), BASE, node_id)
        made.append(queues)
        return queues

    yield make
    for queues in made:
        await queues.close()


async def queued_ids(queues: EventQueues) -> list[str]:
    """Ids of the events in the work queue, in the order workers will take them."""
    items = await queues.redis.lrange(queues.work_key, 0, -1)
    return [json.loads(item)["id"] for item in reversed(items)]


async def until(condition: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition`` every 20 ms until it returns something truthy; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)
    return value


async def test_an_old_leader_woken_from_a_pause_moves_nothing(
    make_queues: Callable[[str], EventQueues],
) -> None:
    old, new = make_queues("node-old"), make_queues("node-new")
    published = [await old.publish(f"event {number}") for number in range(10)]

    assert await old.move(1, batch_size=4) == 4  # term 1 leads, moves a batch, then pauses
    assert await new.move(2, batch_size=4) == 4  # term 2 is elected and moves the next one
    with pytest.raises(StaleToken) as refused:
        await old.move(1, batch_size=4)  # term 1 wakes and runs its job again
    assert (refused.value.token, refused.value.newest) == (1, 2)
    assert await new.move(2, batch_size=100) == 2

    assert await queued_ids(new) == published  # each once, in order
    census = await new.census()
    assert (census.published, census.incoming, census.queued, census.lost) == (10, 0, 10, 0)
    assert census.moved_by == {"node-old": 4, "node-new": 6}
    assert (old.moved, new.moved) == (4, 6)
    # The stream keeps the checkpoint's entry only: moved events are trimmed.
    assert await new.redis.xlen(new.events_key) == 1


async def test_an_event_is_moved_once_however_often_the_job_runs(
    make_queues: Callable[[str], EventQueues],
) -> None:
    leader = make_queues("node-a")
    published = [await leader.publish(str(number)) for number in range(5)]

    moves = await asyncio.gather(*(leader.move(3, batch_size=2) for _ in range(10)))
    more = await leader.move(3, batch_size=2)

    assert sorted(moves) == [0] * 7 + [1, 2, 2] and more == 0
    assert await queued_ids(leader) == published


async def test_a_stale_leader_cannot_hand_back_a_live_workers_event(
    make_queues: Callable[[str], EventQueues],
) -> None:
    old, new, worker = make_queues("node-old"), make_queues("node-new"), make_queues("node-w")
    await worker.redis.sadd(worker.workers_key, worker.node_id)
    await old.publish("held by node-w")
    await old.move(1, batch_size=10)
    await worker.redis.lmove(worker.work_key, worker.processing_key("node-w"), "RIGHT", "LEFT")
    await new.move(2, batch_size=10)

    # The old leader's view of the group is stale: it no longer hears node-w.
    with pytest.raises(StaleToken):
        await old.reclaim(1, live=["node-old"])
    assert await worker.redis.llen(worker.processing_key("node-w")) == 1
    # The current leader hears it: nothing to hand back.
    assert await new.reclaim(2, live=["node-new", "node-w"]) == 0
    assert (await new.census()).in_flight == 1


async def test_the_event_of_a_worker_given_up_for_gone_is_recorded_once(
    make_queues: Callable[[str], EventQueues], caplog: pytest.LogCaptureFixture
) -> None:
    leader, slow, fast = make_queues("node-l"), make_queues("node-slow"), make_queues("node-fast")
    event_id = await leader.publish("one event")
    await leader.move(1, batch_size=10)
    # node-slow takes the event and pauses over it longer than the leader waits for it.
    slow_worker = asyncio.create_task(slow.work_forever(work_seconds=1.0))
    fast_worker: asyncio.Task[None] | None = None
    try:

        async def slow_holds_it() -> bool:
            return bool(await slow.redis.llen(slow.processing_key("node-slow")))

        await until(slow_holds_it, "node-slow to take the event")
        assert await leader.reclaim(1, live=["node-l", "node-fast"]) == 1
        fast_worker = asyncio.create_task(fast.work_forever(work_seconds=0.0))

        async def recorded() -> dict[str, str]:
            return await leader.redis.hgetall(leader.delivery_counts_key)

        assert await until(recorded, "node-fast to record the event") == {event_id: "1"}

        async def slow_refused() -> bool:
            return f"event {event_id} was handed to another node" in caplog.text

        await until(slow_refused, "node-slow to finish, and have its record refused")
    finally:
        for task in (slow_worker, fast_worker):
            if task is not None:
                await cancel_and_wait(task)

    assert (slow.processed, fast.processed) == (0, 1)
    census = await leader.census()
    assert (census.delivered, census.deliveries, census.lost, census.in_flight) == (1, 1, 0, 0)
    assert census.processed_by == {"node-fast": 1}


async def test_a_worker_hands_back_what_it_held_before_it_restarted(
    make_queues: Callable[[str], EventQueues],
) -> None:
    before = make_queues("node-x")
    event_id = await before.publish("taken, then the process died")
    await before.move(1, batch_size=10)
    await before.redis.sadd(before.workers_key, "node-x")
    await before.redis.lmove(before.work_key, before.processing_key("node-x"), "RIGHT", "LEFT")

    after = make_queues("node-x")  # the same node id, a new process
    worker = asyncio.create_task(after.work_forever(work_seconds=0.0))
    try:

        async def recorded() -> dict[str, str]:
            return await after.redis.hgetall(after.delivery_counts_key)

        assert await until(recorded, "the event to be recorded") == {event_id: "1"}
    finally:
        await cancel_and_wait(worker)
    assert (await after.census()).lost == 0


async def test_the_census_sees_lost_and_duplicated_events(
    make_queues: Callable[[str], EventQueues],
) -> None:
    # What a harness relies on: the counts do go above 0 when events go missing or twice.
    queues = make_queues("node-a")
    for number in range(3):
        await queues.publish(str(number))
    await queues.move(1, batch_size=10)
    assert (await queues.census()).lost == 0

    lost = await queues.redis.rpop(queues.work_key)  # gone, as if a worker died holding it
    twice = await queues.redis.lindex(queues.work_key, 0)
    await queues.redis.lpush(queues.work_key, twice)  # moved twice, as if unfenced
    worker = asyncio.create_task(queues.work_forever(work_seconds=0.0))
    try:

        async def drained() -> Any:
            census = await queues.census()
            return census if census.queued == census.in_flight == 0 else None

        census = await until(drained, "the queue to drain")
    finally:
        await cancel_and_wait(worker)

    assert (census.published, census.delivered, census.deliveries) == (3, 2, 3)
    assert (census.lost, census.duplicated) == (1, 1)
    delivered = await queues.redis.lrange(queues.delivered_key, 0, -1)
    assert json.loads(lost)["id"] not in delivered
    assert delivered.count(json.loads(twice)["id"]) == 2


# -- real processes -------------------------------------------------------------------------

PREFIX = "e2e"


@pytest.mark.e2e
@pytest.mark.slow
def test_every_event_is_delivered_once_across_a_leader_kill(
    make_cluster: MakeCluster, redis_server: RedisServer
) -> None:
    # Small batches (15 events/s at a move every 0.2 s), so that moving spans seconds and the
    # kill lands in the middle of it; workers about as fast (3 x 6.7 events/s), so that each
    # node, the leader too, is likely to hold an event then. STEADY: no unrelated re-election.
    cluster = make_cluster(
        **STEADY,
        LEADER_CHANNEL_PREFIX=PREFIX,
        EXAMPLE_BATCH_SIZE="3",
        EXAMPLE_WORK_SECONDS="0.15",
    )
    nodes = cluster.start(3)
    leader = cluster.wait_for_leader()
    survivors = [node for node in nodes if node is not leader]
    base = f"{PREFIX}:{cluster.group}:example"
    events = 80
    published: list[str] = []

    def publish(count: int, to: list[AppNode]) -> None:
        for _ in range(count):
            number = len(published)
            response = to[number % len(to)].post("/events", json={"number": number})
            assert response.status_code == 202, response.text
            published.append(response.json()["id"])

    publish(events // 2, nodes)

    def moving() -> dict[str, Any] | None:
        stats = leader.stats()
        return stats if stats["moved"] >= 6 and stats["incoming"] > 0 else None

    before_kill = eventually(moving, what="the leader to be part-way through moving")
    leader.signal(signal.SIGKILL)
    leader.wait_stopped()
    killed_at = time.monotonic()
    with SyncRedis.from_url(redis_server.url, decode_responses=True) as redis:
        stranded = redis.llen(f"{base}:processing:{leader.node_id}")
        publish(events - len(published), survivors)
        successor = cluster.wait_for_leader(survivors, other_than=leader)
        last: dict[str, Any] = {}

        def drained() -> dict[str, Any] | None:
            last.update(successor.stats())
            idle = last["incoming"] == last["queued"] == last["in_flight"] == 0
            return last if idle and last["published"] == events else None

        try:
            after = eventually(drained, DRAIN_TIMEOUT, f"all {events} events to be processed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last GET /stats: {last}") from None
        drained_after = time.monotonic() - killed_at
        delivered = redis.lrange(f"{base}:delivered", 0, -1)

    print(
        f"\nkilled {leader.node_id} after it moved {before_kill['moved']} events, holding "
        f"{stranded}; drained {drained_after:.1f} s later\nmoved by node: {after['moved_by']}; "
        f"processed by node: {after['processed_by']}; lost {after['lost']}, "
        f"duplicated {after['duplicated']}"
    )
    # The harness's view: one record per delivery, by event id.
    assert sorted(delivered) == sorted(published), "events lost, duplicated or unknown"
    assert (after["lost"], after["duplicated"], after["delivered"]) == (0, 0, events)
    assert sum(after["moved_by"].values()) == events  # each moved once, by one leader or another
    assert after["moved_by"][leader.node_id] >= 6
    assert any(after["moved_by"].get(node.node_id, 0) > 0 for node in survivors)
    assert sum(after["processed_by"].values()) == events
