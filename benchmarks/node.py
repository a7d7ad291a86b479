"""One benchmark process: hosts election nodes and reports every change as a JSON line.

The harness starts this script (``python -m benchmarks.node --impl ours --redis-url ...``) and
steers it through stdin, one command a line:

- ``start GROUP COUNT LABEL``: start COUNT nodes (ids ``LABEL-0`` ...) in GROUP, concurrently;
- ``stop``: stop them all gracefully (the process stays, for the next ``start``);
- ``churn GROUP SIZE PERIOD LABEL``: keep SIZE nodes in GROUP; every PERIOD seconds a node with
  a fresh id joins and the oldest leaves (the memory scenario);
- ``stats``: one ``stats`` line per node (commands it sent, by kind and role, table sizes);
- ``stall SECONDS KIND``: block this process's event loop (the one the nodes were started on:
  the application's loop) for SECONDS, ``sleep`` (``time.sleep``) or ``spin`` (pure Python,
  holding the GIL), as a route of the app would; reported as ``stalling`` and ``unstalled``;
- ``exit``: stop everything and exit.

SIGTERM stops every node gracefully (``await election.stop()`` for ours), then exits; so does
the end of stdin (the harness died). With ``--app`` the process instead serves a FastAPI app
under uvicorn (the memory scenario's measured node; ``--impl none`` is the bare app).

Every stdout line is one :mod:`harness.reports` line, written with a single ``write()``
(atomic on a pipe, even from tooz's threads): ``{"t": <time.monotonic()>, "pid": ..., "ev":
..., "node": ...}``. On Linux the monotonic clock is system-wide, so the harness compares ``t``
across processes. Events: ``armed`` (imports done), ``joined``, ``elected`` (with
``lease_end``: the node's own reading of when its leadership ends, ``null`` when the
implementation cannot tell), ``lease`` (an acquisition or a renewal: the new ``lease_end``),
``released`` (ours: the leadership ended, by the election thread), ``demoted``, ``leader`` (the
leader this node knows, for implementations whose followers know it), ``left``, ``stats``,
``stalling``, ``unstalled``, ``serving``, ``error``; with ``--timeline`` (ours) also
``connection`` (``state``: ``lost`` or ``restored``, the subscription), ``stood`` and
``stood_end`` (a candidacy, with ``won``).

Ours reports through :class:`harness.reporter.NodeReporter`, an observer of the election's
public events (:mod:`fastapi_leader.events`): every extension of the lease, with the end the
node itself reads its leadership against (``time.monotonic()`` seconds), and the broker
commands it sends, by role.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from harness.reports import PID, emit

# The profiles the benchmark compares, by name; flags override single fields.
PROFILES = ("default", "fast", "economy")


def profile_timings(name: str) -> dict[str, float]:
    """The timings of a profile: ``default`` is LeaderSettings' own defaults, ``fast`` and
    ``economy`` what ``LeaderSettings.fast()`` and ``.economy()`` use. Imported only here, so
    that the bare app and the peers' processes never load this library."""
    from fastapi_leader import LeaderSettings

    profiles = {"fast": LeaderSettings.FAST_PROFILE, "economy": LeaderSettings.ECONOMY_PROFILE}
    return dict(profiles.get(name, {}))


class BenchNode(Protocol):
    """What the process needs of a node, whichever implementation it runs."""

    node_id: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


NodeFactory = Callable[[str, str], BenchNode]


# ---- ours --------------------------------------------------------------------------------------


def _timeline_observer(node_id: str) -> Any:
    """``--timeline``: an observer that also reports the subscription breaking and coming back
    (``connection``, ``state`` lost or restored) and each candidacy (``stood``, ``stood_end``):
    where a failover's time goes (the topology scenario)."""
    from fastapi_leader.events import (
        ConnectionLost,
        ConnectionRestored,
        ElectionEnd,
        ElectionObserver,
        ElectionStart,
    )

    class Timeline(ElectionObserver):
        def connection_lost(self, event: ConnectionLost) -> None:
            emit("connection", node_id, t=event.at, state="lost")

        def connection_restored(self, event: ConnectionRestored) -> None:
            emit("connection", node_id, t=event.at, state="restored", down_for=event.down_for)

        def election_started(self, event: ElectionStart) -> None:
            emit("stood", node_id, t=event.at, term=event.term, cause=event.cause.value)

        def election_ended(self, event: ElectionEnd) -> None:
            emit("stood_end", node_id, t=event.at, term=event.term, won=event.won)

    return Timeline()


def our_factory(args: argparse.Namespace) -> NodeFactory:
    from fastapi_leader import LeaderElection, LeaderSettings
    from harness.reporter import NodeReporter

    timings = {**profile_timings(args.profile), **_timing_overrides(args)}
    timeline = args.timeline

    class OurNode:
        def __init__(self, group: str, node_id: str) -> None:
            self.node_id = node_id
            settings = LeaderSettings(
                redis_url=args.redis_url, group=group, node_id=node_id, **timings
            )
            # Reports the leases, role and leader, and counts the commands, from the
            # election's own events: nothing wraps its transport.
            self.reporter = NodeReporter(node_id)
            self.election = LeaderElection(settings, observer=self.reporter)
            self.reporter.attach(self.election)
            if timeline:
                self.election.add_observer(_timeline_observer(node_id))

        async def start(self) -> None:
            await self.election.start()

        async def stop(self) -> None:
            await self.election.stop()

        def stats(self) -> dict[str, Any]:
            status = self.election.status()
            return {
                "role": "leader" if status.is_leader else "follower",
                "term": status.term,
                "commands": self.reporter.commands,
                "members": len(status.members),
                "counters": dict(self.election.counters),
            }

    return OurNode


def _timing_overrides(args: argparse.Namespace) -> dict[str, float]:
    fields = {
        "heartbeat_interval": args.heartbeat,
        "lease": args.lease,
        "election_timeout_min": args.timeout_min,
        "election_timeout_max": args.timeout_max,
        "member_expiry": args.member_expiry,
    }
    return {name: value for name, value in fields.items() if value is not None}


def make_factory(args: argparse.Namespace) -> NodeFactory:
    if args.impl == "ours":
        return our_factory(args)
    from . import peers

    if args.impl == "tooz":
        return peers.tooz_factory(args, emit)
    if args.impl == "leaselock":
        return peers.leaselock_factory(args, emit)
    raise SystemExit(f"unknown --impl {args.impl!r}")


# ---- the process -------------------------------------------------------------------------------


class Host:
    """The nodes of this process and the commands that steer them."""

    def __init__(self, factory: NodeFactory) -> None:
        self.factory = factory
        self.nodes: list[BenchNode] = []
        self.churn: asyncio.Task[None] | None = None
        self.exiting = asyncio.Event()

    async def start(self, group: str, count: int, label: str) -> None:
        new = [self.factory(group, f"{label}-{i}") for i in range(count)]
        self.nodes.extend(new)
        await asyncio.gather(*(self._start_one(node) for node in new))

    async def _start_one(self, node: BenchNode) -> None:
        try:
            await node.start()
        except Exception as exc:
            emit("error", node.node_id, error=f"start: {exc!r}")
            raise
        emit("joined", node.node_id)

    async def stop(self) -> None:
        if self.churn is not None:
            self.churn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.churn
            self.churn = None
        nodes, self.nodes = self.nodes, []
        await asyncio.gather(*(self._stop_one(node) for node in nodes))

    async def _stop_one(self, node: BenchNode) -> None:
        try:
            await node.stop()
        except Exception as exc:
            emit("error", node.node_id, error=f"stop: {exc!r}")
        emit("left", node.node_id)

    async def churn_forever(self, group: str, size: int, period: float, label: str) -> None:
        """Keep ``size`` nodes; every ``period`` one with a fresh id joins and the oldest
        leaves. Quiet: only errors and a count every 10 turns are reported."""
        live: deque[BenchNode] = deque()
        turn = 0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                node = self.factory(group, f"{label}-{turn}")
                try:
                    await node.start()
                except Exception as exc:
                    emit("error", node.node_id, error=f"churn start: {exc!r}")
                else:
                    live.append(node)
                if len(live) > size:
                    old = live.popleft()
                    try:
                        await old.stop()
                    except Exception as exc:
                        emit("error", old.node_id, error=f"churn stop: {exc!r}")
                turn += 1
                if turn % 10 == 0:
                    emit("churned", turns=turn)
                next_at += period
                await asyncio.sleep(max(0.0, next_at - loop.time()))
        finally:
            await asyncio.gather(*(n.stop() for n in live), return_exceptions=True)

    def stats(self) -> None:
        for node in self.nodes:
            emit("stats", node.node_id, **node.stats())

    def stall(self, seconds: float, kind: str) -> None:
        """Block the event loop we run on (no ``await``): the app's loop, stuck in a route."""
        from harness.stalls import stall  # the stall of every suite

        stall(seconds, kind)

    async def handle(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        command, rest = words[0], words[1:]
        try:
            if command == "start":
                group, count, label = rest
                await self.start(group, int(count), label)
            elif command == "stop":
                await self.stop()
                emit("stopped")
            elif command == "churn":
                group, size, period, label = rest
                self.churn = asyncio.create_task(
                    self.churn_forever(group, int(size), float(period), label)
                )
            elif command == "stats":
                self.stats()
            elif command == "stall":
                seconds, kind = rest
                self.stall(float(seconds), kind)
            elif command == "exit":
                self.exiting.set()
            else:
                emit("error", error=f"unknown command {line!r}")
        except Exception as exc:
            emit("error", error=f"{command}: {exc!r}")


async def read_commands(host: Host) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: set[asyncio.Task[None]] = set()
    while True:
        line = await reader.readline()
        if not line:
            host.exiting.set()  # the harness is gone
            return
        # Commands run concurrently (a `stats` during a slow `start` is answered at once).
        task = asyncio.create_task(host.handle(line.decode()))
        pending.add(task)
        task.add_done_callback(pending.discard)


async def run_nodes(args: argparse.Namespace) -> None:
    host = Host(make_factory(args))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, host.exiting.set)
    reader = asyncio.create_task(read_commands(host))
    emit("armed", impl=args.impl)
    try:
        await host.exiting.wait()
        emit("stopping")
    finally:
        reader.cancel()
        await host.stop()
        emit("exited")


# ---- the FastAPI app (memory scenario) ---------------------------------------------------------


async def run_app(args: argparse.Namespace) -> None:
    """Serve a small FastAPI app; with an implementation, one node runs in its lifespan."""
    import uvicorn
    from fastapi import FastAPI

    factory = None if args.impl == "none" else make_factory(args)
    nodes: list[BenchNode] = []
    clients: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if factory is not None:
            node = factory(args.group, args.node_id)
            await node.start()
            nodes.append(node)
            emit("joined", node.node_id)
        if args.with_redis:
            from redis.asyncio import Redis

            client = Redis.from_url(args.redis_url)
            await client.ping()
            clients.append(client)
        emit("serving")  # uvicorn binds its socket right after the lifespan's startup
        try:
            yield
        finally:
            for node in nodes:
                await node.stop()
                emit("left", node.node_id)
            for client in clients:
                await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())

    async def answer_stats() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"stats":
                for node in nodes:
                    emit("stats", node.node_id, **node.stats())
        server.should_exit = True  # the harness is gone

    steering = asyncio.create_task(answer_stats())
    try:
        await serving  # uvicorn handles SIGTERM: lifespan shutdown stops the node
    finally:
        steering.cancel()
    emit("exited")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.node", description=__doc__)
    parser.add_argument("--impl", choices=["ours", "tooz", "leaselock", "none"], default="ours")
    parser.add_argument(
        "--redis-url", default=os.environ.get("LEADER_REDIS_URL"), help="default: LEADER_REDIS_URL"
    )
    parser.add_argument("--profile", choices=PROFILES, default="default")
    parser.add_argument(
        "--loop-stall-limit",
        type=float,
        help="ours: LEADER_LOOP_STALL_LIMIT (s), set in this process's environment, where the "
        "library reads it (a library without the setting ignores it)",
    )
    for flag in ("heartbeat", "lease", "timeout-min", "timeout-max", "member-expiry"):
        parser.add_argument(f"--{flag}", type=float, help="ours: override the profile (seconds)")
    parser.add_argument("--tooz-timeout", type=int, default=30, help="tooz: timeout= (whole s)")
    parser.add_argument(
        "--tooz-poll", type=float, default=1.0, help="tooz: seconds between run_watchers() calls"
    )
    parser.add_argument("--ttl", type=float, default=15.0, help="leaselock: PX of the key (s)")
    parser.add_argument("--renew", type=float, default=10.0, help="leaselock: renew period (s)")
    parser.add_argument("--retry", type=float, default=2.0, help="leaselock: retry period (s)")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="ours: also report the subscription's losses and returns and each candidacy",
    )
    parser.add_argument("--app", action="store_true", help="serve a FastAPI app (one node)")
    parser.add_argument(
        "--with-redis", action="store_true", help="--app: also open a redis-py client"
    )
    parser.add_argument("--group", default="bench", help="--app: the node's group")
    parser.add_argument("--node-id", default=f"app-{PID}", help="--app: the node's id")
    args = parser.parse_args(argv)
    if (args.impl != "none" or args.with_redis) and not args.redis_url:
        parser.error("--redis-url (or LEADER_REDIS_URL) is required")
    if args.impl == "none" and not args.app:
        parser.error("--impl none is only meaningful with --app")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.loop_stall_limit is not None:
        os.environ["LEADER_LOOP_STALL_LIMIT"] = str(args.loop_stall_limit)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(run_app(args) if args.app else run_nodes(args))


if __name__ == "__main__":
    main()
