"""LeaderElection, the asyncio runtime, on the in-memory transport: its API and its failure modes.

Each test runs a cluster on its own ``MemoryBroker`` (so nothing is shared between tests) with the
default timings. The same guarantees on a real Redis are in ``test_election_redis.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fastapi_leader import (
    BrokerUnavailable,
    LeaderElection,
    LeaderSettings,
    MemoryBroker,
    MemoryTransport,
    NotStarted,
    Role,
)
from fastapi_leader.testing import RedisServer
from tests.helpers.cluster import WAIT, Cluster, always, eventually

LEASE = 0.4  # the default
HANDOVER_BOUND = 0.5  # below the shortest election timeout: only a handover is that fast

ROLE_LINE = re.compile(r"^node (\S+): (\w+) -> (\w+) \(term (\d+)\): (.+)$")


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster(broker=MemoryBroker()) as cluster:
        yield cluster


def our_tasks() -> list[asyncio.Task[Any]]:
    """The tasks this library runs (sender, callbacks, transport reader, leader work)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("fastapi-leader")]


async def three_nodes(cluster: Cluster) -> tuple[list[LeaderElection], LeaderElection]:
    nodes = [await cluster.add() for _ in range(3)]
    return nodes, await cluster.wait_for_single_leader()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ---- lifecycle ------------------------------------------------------------------------------


async def test_start_and_stop_are_idempotent(cluster: Cluster) -> None:
    node = cluster.make()
    await node.stop()  # never started: nothing to do, and it cannot be started any more
    with pytest.raises(RuntimeError, match="cannot be started again"):
        await node.start()

    node = cluster.make()
    await node.start()
    tasks = our_tasks()
    await node.start()
    assert node.running
    assert our_tasks() == tasks, "a second start() started more tasks"
    await node.wait_until_leader(WAIT)

    await node.stop()
    await node.stop()
    assert not node.running and not node.is_leader
    assert our_tasks() == []
    with pytest.raises(RuntimeError, match="cannot be started again"):
        await node.start()


async def test_stop_ends_even_if_a_task_swallows_its_cancellation(cluster: Cluster) -> None:
    # Before Python 3.12, asyncio.wait_for swallows a cancellation that lands just as its inner
    # call completes; the sender runs every command in one. A task of the node's own that
    # swallows the first cancel stands for that here: stop() must still end.
    node = await cluster.add()

    async def swallows_one_cancel() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # as wait_for does, result in hand
            await asyncio.Event().wait()
        await asyncio.Event().wait()  # as the sender does: back to its queue

    # The node's tasks live on the election thread: start the swallower there, as its own.
    driver, thread = node._driver, node._thread
    assert driver is not None and thread is not None

    async def add_swallower() -> asyncio.Task[None]:
        task = asyncio.create_task(swallows_one_cancel())
        driver._tasks.append(task)
        await asyncio.sleep(0)  # let it start waiting
        return task

    swallower = await asyncio.wrap_future(thread.submit(add_swallower()))
    stopping = asyncio.create_task(node.stop())
    try:
        done, _ = await asyncio.wait([stopping], timeout=WAIT)
        assert done, "stop() hung on a task that ignored its cancellation"
    finally:
        # On failure, lets stop() (and the fixture's) end; on success the thread is gone.
        with contextlib.suppress(RuntimeError):
            thread.loop.call_soon_threadsafe(swallower.cancel)
        await stopping
    assert not node.running


async def test_memory_url_elects_among_the_nodes_of_the_process() -> None:
    async with Cluster("memory://") as cluster:
        nodes, leader = await three_nodes(cluster)
        assert sorted(leader.members) == sorted(cluster.ids(nodes))


async def test_stop_from_a_cancelled_task_still_hands_over(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_leader")
    nodes, old = await three_nodes(cluster)
    old_token = old.fencing_token
    assert old_token is not None
    in_on_demoted = asyncio.Event()
    release_on_demoted = asyncio.Event()

    @old.on_demoted
    async def slow_cleanup() -> None:
        in_on_demoted.set()
        await release_on_demoted.wait()

    survivors = [n for n in nodes if n is not old]
    stopping = asyncio.create_task(old.stop())
    await asyncio.wait_for(in_on_demoted.wait(), WAIT)  # stop() is now mid-handover
    stopping.cancel()
    # The caller is cancelled, but the handover goes on once the callback is done.
    release_on_demoted.set()
    released_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    new = await eventually(lambda: next((n for n in survivors if n.is_leader), None))
    assert time.monotonic() - released_at < HANDOVER_BOUND
    assert new.fencing_token is not None and new.fencing_token > old_token
    assert not old.running and not old.is_leader
    assert f"node {new.node_id}: follower -> candidate" in caplog.text
    assert f"named successor of {old.node_id}" in caplog.text
    assert not [t for t in our_tasks() if old.node_id in t.get_name()]


async def test_handover_survives_messages_sent_while_on_demoted_runs(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: the handover is released only after on_demoted has run; a presence beat the
    # demoted node sent meanwhile carried a later sequence number, went out first, and every
    # node then dropped the handover as a replay (and waited out an election timeout).
    caplog.set_level(logging.INFO, logger="fastapi_leader")
    nodes, old = await three_nodes(cluster)

    @old.on_demoted
    async def slow_cleanup() -> None:
        # Outlasts a heartbeat tick (0.1 s), in which the node beats as a follower, but not the
        # lease (0.4 s): past the lease the key is gone, and the release announces nothing.
        await asyncio.sleep(0.15)

    # Lead for longer than a follower's presence interval (1/3 s), so that the node's first
    # tick as a follower beats at once.
    await always(lambda: old.is_leader, 0.4, "the leadership")
    started = time.monotonic()
    assert await old.resign()
    new = await eventually(lambda: next((n for n in nodes if n.is_leader), None))
    assert f"named successor of {old.node_id}" in caplog.text
    assert time.monotonic() - started < 0.15 + HANDOVER_BOUND
    assert new is not old
    assert all(n.counters["dropped_replay"] == 0 for n in nodes)


async def test_failed_start_leaves_nothing_running_and_can_be_retried(
    make_redis_server: Any,
) -> None:
    port = free_port()  # nothing listens there
    async with Cluster(f"redis://127.0.0.1:{port}/0") as cluster:
        node = cluster.make()
        for _ in range(2):  # a retry fails the same way, not with "already started"
            with pytest.raises(BrokerUnavailable):
                await node.start()
            assert not node.running
            assert our_tasks() == []
            with pytest.raises(NotStarted):
                await node.wait_for_leader(0.1)

        server: RedisServer = make_redis_server(port=port)
        await node.start()
        assert node.running
        assert await node.wait_until_leader(WAIT) >= 1
        assert server.is_running


# ---- callbacks ------------------------------------------------------------------------------


async def test_exceptions_in_callbacks_are_logged_and_the_election_goes_on(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    heard: dict[str, list[str]] = {}
    nodes = [cluster.make() for _ in range(3)]
    for node in nodes:
        events = heard[node.node_id] = []

        @node.on_elected
        def bad_elected(token: int) -> None:
            raise RuntimeError("boom: sync on_elected")

        @node.on_elected
        async def bad_leader_work(token: int) -> None:
            raise RuntimeError("boom: async on_elected")

        @node.on_demoted
        def bad_demoted() -> None:
            raise RuntimeError("boom: sync on_demoted")

        @node.on_demoted
        async def bad_async_demoted() -> None:
            raise RuntimeError("boom: async on_demoted")

        @node.on_leader_change
        async def bad_leader_change(leader_id: str | None) -> None:
            raise RuntimeError("boom: async on_leader_change")

        # Registered after the failing ones: still called.
        @node.on_elected
        def good_elected(token: int, events: list[str] = events) -> None:
            events.append("elected")

        @node.on_demoted
        def good_demoted(events: list[str] = events) -> None:
            events.append("demoted")

        await node.start()

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "fastapi_leader" and r.exc_info]

    def messages() -> set[str]:
        return {str(r.exc_info[1]) for r in failures() if r.exc_info}

    first = await cluster.wait_for_single_leader()
    # The leader is seen as soon as its election thread knows; its callbacks run on this loop
    # after that. Resigning first would test a leadership whose callbacks have not run yet.
    await eventually(
        lambda: heard[first.node_id] == ["elected"] and "boom: async on_elected" in messages(),
        what="the first leader's on_elected callbacks",
    )
    assert await first.resign()
    second = await cluster.wait_for_single_leader()
    assert second is not first
    await eventually(lambda: heard[first.node_id] == ["elected", "demoted"])
    await eventually(lambda: heard[second.node_id] == ["elected"])

    expected = {
        "boom: sync on_elected",
        "boom: async on_elected",
        "boom: sync on_demoted",
        "boom: async on_demoted",
        "boom: async on_leader_change",
    }
    # Each failure is logged as its callback ends, not all of them by the time `heard` says so.
    await eventually(lambda: messages() == expected, what=f"the failures {expected} logged")
    assert all(r.levelno == logging.ERROR for r in failures())
    # And the nodes still work: the new leader renews, the others follow it.
    token = second.fencing_token
    await always(
        lambda: second.is_leader and second.fencing_token == token, LEASE * 2, "the leadership"
    )


async def test_leader_only_calls_through_on_the_leader_only(cluster: Cluster) -> None:
    nodes, leader = await three_nodes(cluster)
    follower = next(n for n in nodes if n is not leader)
    calls: list[str] = []

    def wrap(node: LeaderElection) -> tuple[Any, Any]:
        @node.leader_only
        def sync_work(x: int) -> int:
            """Doubles."""
            calls.append(f"sync {node.node_id}")
            return 2 * x

        @node.leader_only
        async def async_work(x: int) -> int:
            calls.append(f"async {node.node_id}")
            return 3 * x

        return sync_work, async_work

    sync_on_follower, async_on_follower = wrap(follower)
    assert sync_on_follower(5) is None
    assert await async_on_follower(5) is None
    assert calls == []

    sync_on_leader, async_on_leader = wrap(leader)
    assert sync_on_leader(5) == 10
    assert await async_on_leader(5) == 15
    assert calls == [f"sync {leader.node_id}", f"async {leader.node_id}"]
    # The wrapper keeps the function's name and doc, and stays a coroutine function.
    assert sync_on_leader.__name__ == "sync_work" and sync_on_leader.__doc__ == "Doubles."
    assert asyncio.iscoroutinefunction(async_on_leader)


# ---- reading the lease ----------------------------------------------------------------------


async def test_a_blocked_app_loop_keeps_the_lease(cluster: Cluster) -> None:
    # The election runs on a thread of its own: the app's loop blocked for several leases
    # (a sync call in an async route) delays no renewal.
    _, leader = await three_nodes(cluster)
    token = leader.fencing_token
    assert token is not None

    async def blocked() -> tuple[bool, int | None, Role]:
        time.sleep(LEASE * 4)  # noqa: ASYNC251 - blocks the loop on purpose
        # Read before yielding to the loop even once.
        return leader.is_leader, leader.fencing_token, leader.status().role

    assert await blocked() == (True, token, Role.LEADER)
    assert {node.leader_id for node in cluster.nodes} == {leader.node_id}


async def _on_election_thread(node: LeaderElection, step: Callable[[], Any]) -> Any:
    """Run ``step()`` on the node's election thread (where its scheduler and timer live)."""
    thread = node._thread
    assert thread is not None

    async def run() -> Any:
        return step()

    return await asyncio.wrap_future(thread.submit(run()))


async def test_regression_a_tick_cancelled_by_a_scheduler_shutdown_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Stopping (ours, or the user shutting down the scheduler they lent us) between a tick's
    # submission and its first step cancels its task, and APScheduler logged "Error running
    # job" with a CancelledError traceback: on every stop of a benchmark process with ten
    # nodes in it.
    from datetime import datetime, timezone

    settings = LeaderSettings(redis_url="memory://", group="shutdown", node_id="n1")
    node = LeaderElection(settings)
    await node.start()
    try:
        assert node._thread is not None
        scheduler = node._thread.scheduler

        def modify_then_shut_down() -> None:
            [timer] = [job for job in scheduler.get_jobs() if job.id.endswith(":timer")]
            # Both calls only queue work on the loop: the scheduler's wake-up submits the tick
            # (now due) as a task, and the shutdown queued behind it cancels that task before
            # it takes a step. This is what a stop right after the timer was re-armed does.
            timer.modify(next_run_time=datetime.now(timezone.utc))
            scheduler.shutdown(wait=False)

        await _on_election_thread(node, modify_then_shut_down)
        await asyncio.sleep(0.05)
    finally:
        await node.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_regression_a_skipped_tick_is_retried_a_beat_later_not_lost() -> None:
    # A tick re-arms the timer before APScheduler counts it finished; on a busy loop a run
    # due at once fell in that gap, APScheduler skipped it (with a warning) and moved the job
    # a year ahead: the leader never renewed again and a 100-node group re-elected.
    from fastapi_leader.election_thread import EXECUTOR
    from fastapi_leader.transport import Names

    names = Names("fastapi-leader", "skipped", "n1")
    settings = LeaderSettings(redis_url="memory://", group="skipped", node_id="n1")
    node = LeaderElection(settings, transport=MemoryTransport(MemoryBroker(), names))
    await node.start()
    try:
        token = await node.wait_until_leader(WAIT)
        assert node._thread is not None
        scheduler = node._thread.scheduler
        [timer] = [job for job in scheduler.get_jobs() if job.id.endswith(":timer")]
        # Every run of the next 2.5 beats counts as overlapping earlier ones, so APScheduler
        # skips them all (APScheduler 3 offers no public hook for this).
        running = scheduler._lookup_executor(EXECUTOR)._instances

        def overlap(by: int) -> None:
            running[timer.id] += by

        await _on_election_thread(node, lambda: overlap(100))
        await asyncio.sleep(2.5 * node.timing.heartbeat_interval)
        await _on_election_thread(node, lambda: overlap(-100))
        await asyncio.sleep(LEASE)  # longer than what was left of the lease
        assert node.is_leader and node.fencing_token == token
    finally:
        await node.stop()


async def test_one_log_line_per_role_change(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_leader")
    nodes, first = await three_nodes(cluster)
    first_token = first.fencing_token
    assert await first.resign()
    second = await cluster.wait_for_single_leader()
    second_token = second.fencing_token

    lines: dict[str, list[tuple[str, str, int, str]]] = {n.node_id: [] for n in nodes}
    for record in caplog.records:
        match = ROLE_LINE.match(record.getMessage())
        if record.name == "fastapi_leader" and match:
            node_id, old, new, term, reason = match.groups()
            lines[node_id].append((old, new, int(term), reason))
    for node in nodes:
        changes = lines[node.node_id]
        # The lines chain from follower to the node's current role: none missing, none twice.
        roles = ["follower"] + [new for _, new, _, _ in changes]
        assert [old for old, _, _, _ in changes] == roles[:-1], changes
        assert roles[-1] == node.role.value
        assert all(reason.strip() for _, _, _, reason in changes)
        assert roles.count("leader") == node.counters["elections_won"]
        assert [old for old, _, _, _ in changes].count("leader") == node.counters["demotions"]
    assert ("candidate", "leader", first_token) in [c[:3] for c in lines[first.node_id]]
    assert ("leader", "follower", first_token, "resigned") in lines[first.node_id]
    assert ("candidate", "leader", second_token) in [c[:3] for c in lines[second.node_id]]


# ---- waiting --------------------------------------------------------------------------------


async def test_wait_for_leader_times_out_when_no_node_can_lead(cluster: Cluster) -> None:
    node = await cluster.add()
    assert cluster.broker is not None
    cluster.broker.disconnect(node.node_id)  # it cannot hear itself, so it never stands
    for wait in (node.wait_for_leader, node.wait_until_leader):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await wait(timeout=0.2)
        assert 0.19 <= time.monotonic() - started < 2.0
    assert node.leader_id is None and not node.is_leader


async def test_waits_before_start_and_after_stop_raise_not_started(cluster: Cluster) -> None:
    node = cluster.make()
    with pytest.raises(NotStarted):
        await node.wait_until_leader()
    with pytest.raises(NotStarted):
        await node.wait_for_leader(timeout=1)
    with pytest.raises(NotStarted):
        await node.resign()

    await node.start()
    assert cluster.broker is not None
    cluster.broker.disconnect(node.node_id)  # so that nothing is ever elected
    waiter = asyncio.create_task(node.wait_for_leader())
    await asyncio.sleep(0)  # let the waiter start waiting
    await node.stop()
    # A pending wait ends with NotStarted when the service stops (not at its timeout).
    with pytest.raises(NotStarted):
        await asyncio.wait_for(waiter, 2.0)
    with pytest.raises(NotStarted):
        await node.wait_until_leader(timeout=1)
