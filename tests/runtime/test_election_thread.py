"""The process's election thread: shared by every election of the process, started again in a
forked child, and the memory transport's semantics with nodes on several threads."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import threading
import time
import uuid
from typing import Any

import pytest

from fastapi_leader import LeaderElection, LeaderSettings, MemoryBroker, MemoryTransport
from fastapi_leader.transport.base import Names
from tests.helpers.cluster import WAIT, Cluster, eventually


def election_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastapi-leader" and t.is_alive()]


async def test_elections_of_one_process_share_one_thread_that_ends_with_the_last() -> None:
    assert election_threads() == []
    async with Cluster(broker=MemoryBroker()) as one, Cluster(broker=MemoryBroker()) as two:
        nodes = [await one.add() for _ in range(3)] + [await two.add() for _ in range(2)]
        await one.wait_for_single_leader()
        await two.wait_for_single_leader()
        assert len({id(node._thread) for node in nodes}) == 1
        assert len(election_threads()) == 1
        for node in nodes[:-1]:
            await node.stop()
        assert len(election_threads()) == 1  # the last election still runs on it
    await eventually(lambda: not election_threads(), what="the election thread to end")


def _node_on_its_own_thread(
    broker: MemoryBroker, group: str, node_id: str, ready: threading.Event, done: threading.Event
) -> Any:
    nodes: dict[str, tuple[LeaderElection, asyncio.AbstractEventLoop]] = {}

    async def main() -> None:
        settings = LeaderSettings(redis_url="memory://", group=group, node_id=node_id)
        names = Names(settings.channel_prefix, group, node_id)
        node = LeaderElection(settings, transport=MemoryTransport(broker, names))
        nodes[node_id] = (node, asyncio.get_running_loop())
        await node.start()
        ready.set()
        await asyncio.to_thread(done.wait)
        await node.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=f"app {node_id}")
    thread.start()
    return thread, nodes


async def test_memory_transport_elects_one_leader_among_nodes_on_several_threads() -> None:
    # Each node has an app loop on a thread of its own (as if three apps shared a process);
    # the broker delivers onto the loop each transport runs on.
    broker, group, done = MemoryBroker(), f"t-{uuid.uuid4().hex[:8]}", threading.Event()
    started = []
    try:
        for node_id in ("a", "b", "c"):
            ready = threading.Event()
            started.append(_node_on_its_own_thread(broker, group, node_id, ready, done))
            assert await asyncio.to_thread(ready.wait, WAIT)
        loops = {node: loop for _, found in started for node, loop in found.values()}
        nodes = list(loops)

        def one_leader_all_agree() -> LeaderElection | None:
            leaders = [n for n in nodes if n.is_leader]
            if len(leaders) == 1 and all(n.leader_id == leaders[0].node_id for n in nodes):
                return leaders[0]
            return None

        leader = await eventually(one_leader_all_agree, what="one leader every thread names")
        term = leader.term
        # A handover crosses threads too: resign on the leader's own app loop.
        resigned = asyncio.run_coroutine_threadsafe(leader.resign(), loops[leader])
        assert await asyncio.wrap_future(resigned)
        successor = await eventually(
            lambda: (s := one_leader_all_agree()) is not None and s is not leader and s,
            what="a successor every thread names",
        )
        assert successor.fencing_token is not None and successor.fencing_token > term
    finally:
        done.set()
        for thread, _ in started:
            await asyncio.to_thread(thread.join, WAIT)
    assert all(not thread.is_alive() for thread, _ in started)


def _child(settings: LeaderSettings, results: Any) -> None:
    async def main() -> tuple[str, int]:
        node = LeaderElection(settings)
        await node.start()
        try:
            await node.wait_until_leader(timeout=WAIT)
            assert node._thread is not None
            return node.node_id, node._thread.pid
        finally:
            await node.stop()

    try:
        results.put(asyncio.run(main()))
    except BaseException as exc:  # report, rather than hang the parent
        results.put(repr(exc))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
async def test_forked_children_draw_their_own_node_ids_and_start_their_own_thread() -> None:
    # The shape of `gunicorn --preload` and `multiprocessing`: settings built, and an election
    # running, in the parent before the fork.
    settings = LeaderSettings(redis_url="memory://", group=f"t-{uuid.uuid4().hex[:8]}")
    assert settings.node_id is None
    parent = LeaderElection(settings)
    await parent.start()
    try:
        await parent.wait_until_leader(timeout=WAIT)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        children = [context.Process(target=_child, args=(settings, results)) for _ in range(2)]
        for child in children:
            child.start()
        reports = [await asyncio.to_thread(results.get, True, 2 * WAIT) for _ in children]
        for child in children:
            await asyncio.to_thread(child.join, WAIT)
        assert all(isinstance(r, tuple) for r in reports), reports
        ids = {parent.node_id} | {node_id for node_id, _ in reports}
        assert len(ids) == 3, f"node ids collide: {ids}"
        pids = {pid for _, pid in reports}
        assert len(pids) == 2 and os.getpid() not in pids  # each child runs its own thread
        assert all(child.exitcode == 0 for child in children)
    finally:
        await parent.stop()


async def test_elections_on_one_app_loop_share_its_probe_and_each_sees_a_stall() -> None:
    async with Cluster(broker=MemoryBroker(), loop_stall_limit=1.0) as cluster:
        nodes = [await cluster.add() for _ in range(3)]
        leader = await cluster.wait_for_single_leader()
        term = leader.term
        assert nodes[0]._thread is not None
        assert len(nodes[0]._thread._probers) == 1  # one probe for the three
        time.sleep(1.6)  # noqa: ASYNC251 - the point: this loop stops answering
        # Every node of this loop gave up standing, so the group leads again only once the
        # loop has answered for the recovery time (the limit, 1 s).
        await eventually(
            lambda: all(n.counters["loop_stalls"] == 1 for n in nodes),
            what="every election of the loop to count the stall",
        )
        successor = await cluster.wait_for_single_leader()
        assert successor.term > term
        assert all(n.loop_stall < 1.0 for n in nodes)
