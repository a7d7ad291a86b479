"""A factory for clusters of election nodes in one test, on a real server or in memory.

::

    async with Cluster(redis_url) as cluster:  # or Cluster(broker=MemoryBroker())
        a, b, c = [await cluster.add() for _ in range(3)]
        leader = await cluster.wait_for_single_leader()

Every cluster has its own group name (a uuid), so tests sharing a server never hear each other.
:meth:`Cluster.close` stops every node it made. Waits poll the state under test every 20 ms
against a deadline; they never sleep to synchronise.

Nodes on Redis name their connections (``CLIENT SETNAME``, through redis-py's ``client_name``
URL option) ``<group>.<node id>``, so a test can find them in ``CLIENT LIST`` and kill them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Iterable
from types import TracebackType
from typing import Any, ClassVar

from redis.asyncio import Redis

from fastapi_leader import LeaderElection, LeaderSettings, MemoryBroker, MemoryTransport
from fastapi_leader.transport.base import Names
from harness.waiting import WAIT
from harness.waiting import always_async as always
from harness.waiting import eventually_async as eventually

__all__ = [
    "WAIT",
    "Cluster",
    "CuttableProxy",
    "LeaderSampler",
    "always",
    "eventually",
    "first_of",
    "kill_connections",
]


class Cluster:
    """Nodes of one election group: on the Redis at ``redis_url`` (``memory://``: the process's
    in-memory broker), or on ``broker`` through explicit ``MemoryTransport`` objects."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker: MemoryBroker | None = None,
        group: str | None = None,
        **settings: Any,
    ) -> None:
        if (redis_url is None) == (broker is None):
            raise ValueError("give either redis_url or broker")
        self.redis_url = redis_url
        self.broker = broker
        self.group = group or f"t-{uuid.uuid4().hex[:12]}"
        self.defaults = settings
        self.nodes: list[LeaderElection] = []
        self._count = 0

    # ---- building -----------------------------------------------------------------------------

    def settings(self, node_id: str | None = None, **overrides: Any) -> LeaderSettings:
        """Settings for a node of this group (not added to the cluster)."""
        self._count += 1
        node_id = node_id or f"n{self._count}"
        options = {**self.defaults, **overrides}
        url = options.pop("redis_url", None)
        if url is None:
            url = "memory://" if self.redis_url is None else self.redis_url
            if url.startswith("redis://"):
                url = f"{url}?client_name={self.client_name(node_id)}"
        return LeaderSettings(redis_url=url, group=self.group, node_id=node_id, **options)

    def client_name(self, node_id: str) -> str:
        """The name a node's Redis connections carry in ``CLIENT LIST``."""
        return f"{self.group}.{node_id}"

    def make(self, node_id: str | None = None, **overrides: Any) -> LeaderElection:
        """A node of this group, not started; :meth:`close` stops it all the same."""
        settings = self.settings(node_id, **overrides)
        transport = None
        if self.broker is not None:
            names = Names(settings.channel_prefix, settings.group, settings.node_id)
            transport = MemoryTransport(self.broker, names)
        node = LeaderElection(settings, transport=transport)
        self.nodes.append(node)
        return node

    async def add(self, node_id: str | None = None, **overrides: Any) -> LeaderElection:
        """A started node of this group; ``overrides`` are LeaderSettings fields."""
        node = self.make(node_id, **overrides)
        await node.start()
        return node

    # ---- reading ------------------------------------------------------------------------------

    @property
    def running(self) -> list[LeaderElection]:
        return [node for node in self.nodes if node.running]

    def leaders(self) -> list[LeaderElection]:
        """Every node whose lease is valid now."""
        return [node for node in self.nodes if node.is_leader]

    def leader(self) -> LeaderElection | None:
        """The one node whose lease is valid now, or None; fails if there are two."""
        leaders = self.leaders()
        assert len(leaders) <= 1, f"two leaders at once: {[n.node_id for n in leaders]}"
        return leaders[0] if leaders else None

    def settled(
        self, *, same_term: bool = True, among: Iterable[LeaderElection] | None = None
    ) -> LeaderElection | None:
        """The leader, once every running node (of ``among``) knows it and, with ``same_term``,
        has seen no term but its fencing token; else None."""
        leader = self.leader()
        if leader is None:
            return None
        token = leader.fencing_token
        for node in self.running if among is None else among:
            if node.leader_id != leader.node_id or (same_term and node.term != token):
                return None
        return leader

    async def wait_for_single_leader(
        self, timeout: float = WAIT, *, same_term: bool = True
    ) -> LeaderElection:
        """Wait until exactly one node leads and every running node agrees on it (and, with
        ``same_term``, on its term); return it."""
        leader: LeaderElection = await eventually(
            lambda: self.settled(same_term=same_term),
            timeout,
            f"one leader agreed on by {self.ids(self.running)}",
        )
        return leader

    @staticmethod
    def ids(nodes: Iterable[LeaderElection]) -> list[str]:
        return [node.node_id for node in nodes]

    # ---- ending -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every node (concurrently; a failing stop does not keep the others running)."""
        results = await asyncio.gather(
            *(node.stop() for node in self.nodes), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class LeaderSampler:
    """Samples ``is_leader`` of every node of a cluster every few milliseconds, in the
    background, and records every instant at which two nodes held a valid lease at once.

    Use as ``async with LeaderSampler(cluster) as sampler: ...``; then ``sampler.overlaps``
    must be empty. ``history`` holds each change of the set of leaders, with its time.
    """

    def __init__(self, cluster: Cluster, interval: float = 0.002) -> None:
        self.cluster = cluster
        self.interval = interval
        self.samples = 0
        self.overlaps: list[tuple[float, list[str]]] = []
        self.history: list[tuple[float, tuple[str, ...]]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def leaders_seen(self) -> list[str]:
        """Every node that led while sampled, in order of first sighting."""
        seen: list[str] = []
        for _, leaders in self.history:
            seen.extend(node_id for node_id in leaders if node_id not in seen)
        return seen

    def led_between(self, node_id: str, start: float, end: float) -> bool:
        """Whether ``node_id`` was seen leading at any sample taken in [start, end]."""
        in_force: tuple[str, ...] = ()  # the leaders as last sampled before ``start``
        for at, leaders in self.history:
            if at > end:
                break
            if at <= start:
                in_force = leaders
            elif node_id in leaders:
                return True
        return node_id in in_force

    def sample(self) -> None:
        now = time.monotonic()
        leaders = tuple(node.node_id for node in self.cluster.nodes if node.is_leader)
        self.samples += 1
        if len(leaders) > 1:
            self.overlaps.append((now, list(leaders)))
        if not self.history or self.history[-1][1] != leaders:
            self.history.append((now, leaders))

    async def _run(self) -> None:
        while True:
            self.sample()
            # The sampling period, not a synchronisation: this task only observes.
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> LeaderSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()


async def kill_connections(
    admin: Redis, client_name: str, *, pubsub_only: bool = False
) -> list[dict[str, Any]]:
    """``CLIENT KILL ID`` every connection named ``client_name`` (only its subscriber with
    ``pubsub_only``); returns the ``CLIENT LIST`` entries killed."""
    victims = [
        client
        for client in await admin.client_list()
        if client.get("name") == client_name and (not pubsub_only or "P" in client.get("flags", ""))
    ]
    for client in victims:
        await admin.execute_command("CLIENT", "KILL", "ID", client["id"])
    return victims


async def first_of(awaitables: Iterable[Awaitable[Any]], timeout: float = WAIT) -> Any:
    """The result of whichever awaitable finishes first; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        assert done, f"none finished within {timeout} s"
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class CuttableProxy:
    """A TCP proxy in front of a Redis server that can cut one kind of a node's connections.

    A node pointed at :attr:`url` talks to Redis through the proxy. A connection counts as the
    node's *subscriber* once it has sent ``SUBSCRIBE``, and as its *command* connection once it
    has sent ``EVALSHA``, ``PUBLISH`` or ``SCRIPT``. While that kind is cut (:meth:`cut`), its
    open connections are closed and any new one is closed as soon as it shows its kind, so the
    node's reconnection attempts fail as they would against an unreachable server, while the
    other connection keeps working. :meth:`heal` lets new connections through again.
    """

    _MARKERS: ClassVar[dict[str, tuple[bytes, ...]]] = {
        "subscriber": (b"SUBSCRIBE",),
        "commands": (b"EVALSHA", b"PUBLISH", b"SCRIPT"),
    }

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.cut_kinds: set[str] = set()
        self.refused = 0  # connections closed because their kind was cut
        self._server: asyncio.Server | None = None
        self._links: dict[asyncio.StreamWriter, set[str]] = {}  # client side -> kinds seen
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def cut(self, kind: str) -> None:
        """Close every open connection of ``kind`` ("subscriber" or "commands") and refuse
        new ones until :meth:`heal`."""
        assert kind in self._MARKERS
        self.cut_kinds.add(kind)
        for client, kinds in list(self._links.items()):
            if kind in kinds:
                self._drop(client)

    def heal(self) -> None:
        self.cut_kinds.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._links):
            self._drop(client)
        # Aborted connections end their tasks; cancelling them instead would make asyncio log
        # the server callback's CancelledError as an error.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WAIT)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> CuttableProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _drop(self, client: asyncio.StreamWriter) -> None:
        kinds = self._links.pop(client, None)
        if kinds is not None:
            self.refused += 1
        client.transport.abort()  # an RST, as CLIENT KILL or a dead network would give
        upstream = getattr(client, "_fl_upstream", None)
        if upstream is not None:
            upstream.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        writer._fl_upstream = up_writer  # type: ignore[attr-defined]
        self._links[writer] = set()
        back = asyncio.create_task(self._pipe(up_reader, writer))
        self._tasks.add(back)
        try:
            await self._forward(reader, writer, up_writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.pop(writer, None)
            writer.transport.abort()
            up_writer.transport.abort()
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await back
            self._tasks.discard(back)
            self._tasks.discard(task)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        tail = b""  # a marker may straddle two reads
        while True:
            chunk = await reader.read(65536)
            if not chunk or client not in self._links:
                return
            seen = (tail + chunk).upper()
            tail = chunk[-16:]
            kinds = self._links[client]
            for kind, markers in self._MARKERS.items():
                if any(marker in seen for marker in markers):
                    kinds.add(kind)
            if kinds & self.cut_kinds:
                self._drop(client)
                return
            upstream.write(chunk)
            await upstream.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        writer.transport.abort()
