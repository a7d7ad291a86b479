"""What runs on the nodes, and how events are published and counted: the pluggable part.

A :class:`NodeKind` says how to start one node process and how the harness publishes events
and reads back their deliveries. Two kinds:

- :class:`BuiltinNodes` (``--kind builtin``, the default): :mod:`tests.chaos.node`, an
  election plus a leader-only mover from a Redis Stream to a delivery list, with fenced
  writes. The harness publishes with ``XADD`` straight to Redis (not through a node).
- :class:`ExampleAppNodes` (``--kind example``): the example app under uvicorn
  (:mod:`tests.chaos.appnode`), events published with ``POST /events`` on a live node, and
  deliveries read from what the app records in Redis; see the class for what it expects.

Events are counted by id: "acknowledged" when the publish call said so; a timed-out publish
may still be delivered (counted apart, never as a duplicate).

On a replicated topology (``redis+sentinel://``, ``redis+cluster://``: builtin nodes only) an
event is acknowledged once its primary *and its replica* hold it: ``XADD`` then ``WAIT 1`` on
the same connection. With asynchronous replication, an ``XADD`` the primary alone confirmed
is lost when that primary is killed before it passed it on, and the new primary never heard of
it: that is Redis losing an acknowledged write, which no leader election or fence can bring
back (the library's documented limit), so the harness does not count it as acknowledged. It
counts such events apart (``primary_only``), and how many of them were delivered anyway.
"""

from __future__ import annotations

import abc
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from fastapi_leader.redis_url import parse_broker_url

from .node import data_client, stream_keys

ROOT = Path(__file__).resolve().parents[2]
# A publish that takes longer has failed as far as the count goes (it may still land).
PUBLISH_TIMEOUT = 1.0
# How long a replicated publish waits for the replica to confirm the event.
WAIT_MS = 500

__all__ = [
    "BuiltinNodes",
    "ExampleAppNodes",
    "NodeKind",
    "NodeSpec",
    "data_client",
    "direct_client",
]


@dataclass(frozen=True)
class NodeSpec:
    """One node slot: its id, its proxy's URL and (for HTTP nodes) its port."""

    name: str
    redis_url: str
    port: int


def direct_client(redis_url: str) -> Redis:
    """A client straight to Redis (no proxy), without retries: a retried XADD could add the
    same event twice and make a duplicate that no node made."""
    return Redis.from_url(
        redis_url,
        socket_timeout=PUBLISH_TIMEOUT,
        socket_connect_timeout=PUBLISH_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


class NodeKind(abc.ABC):
    """How nodes are run, and how events reach them and are counted."""

    name: str
    fence_markers: tuple[str, ...] = ()
    """What the nodes log when the fence refuses a stale leadership's write (counted in the
    summary: each is a pause or cut that the fence, not luck, kept from duplicating work)."""

    def __init__(self, redis_url: str, prefix: str, group: str) -> None:
        self.redis_url = redis_url  # direct, not through a proxy
        self.prefix = prefix
        self.group = group
        self.redis: Redis | RedisCluster = data_client(redis_url, PUBLISH_TIMEOUT)
        self.last_error = ""
        """Why the last publish failed (for the publishes' log)."""
        self.primary_only: dict[str, float] = {}
        """Replicated topologies: events the primary confirmed and its replica did not (in
        time), with when the publish began; not acknowledged (see the module's docstring)."""

    @abc.abstractmethod
    def command(self, node: NodeSpec) -> list[str]:
        """argv of a node process."""

    def env(self, node: NodeSpec) -> dict[str, str]:
        """Environment of a node process, on top of the LEADER_* the harness sets."""
        return {}

    @abc.abstractmethod
    async def publish(self, seq: int, live: Sequence[NodeSpec]) -> str | None:
        """Publish event number ``seq``; its id if acknowledged, else None."""

    @abc.abstractmethod
    async def deliveries(self) -> list[str]:
        """The ids of every delivery so far, one per delivery (duplicates included)."""

    async def close(self) -> None:
        await self.redis.aclose()


class BuiltinNodes(NodeKind):
    """:mod:`tests.chaos.node` processes; events go into a Redis Stream."""

    name = "builtin"
    fence_markers = ("refused by the fence",)

    def __init__(self, redis_url: str, prefix: str, group: str) -> None:
        super().__init__(redis_url, prefix, group)
        self.keys = stream_keys(prefix, group)
        self.topology = parse_broker_url(redis_url).topology
        # Cluster: a plain client per primary, for XADD and WAIT on one connection.
        self._nodes: dict[tuple[str, int], Redis] = {}

    def command(self, node: NodeSpec) -> list[str]:
        return [sys.executable, "-m", "tests.chaos.node"]

    async def publish(self, seq: int, live: Sequence[NodeSpec]) -> str | None:
        event_id = f"e{seq}"
        stream = self.keys["stream"]
        began = time.monotonic()
        try:
            if self.topology == "standalone":
                await self.redis.xadd(stream, {"id": event_id})
                return event_id
            replicas = await self._xadd_and_wait(stream, event_id)
        except (RedisError, RedisClusterException, OSError) as exc:
            self.last_error = repr(exc)
            if isinstance(self.redis, RedisCluster):
                # The slot may have moved: read the map again before the next publish.
                with contextlib.suppress(RedisError, RedisClusterException, OSError):
                    await self.redis.nodes_manager.initialize()
            return None
        if replicas < 1:
            self.primary_only[event_id] = began
            return None
        return event_id

    async def _xadd_and_wait(self, stream: str, event_id: str) -> int:
        """XADD, then WAIT for one replica, on one connection (WAIT counts the replicas that
        have this connection's writes); the number of replicas that confirmed."""
        client: Redis | RedisCluster = self.redis
        if isinstance(client, RedisCluster):
            await client.initialize()  # reads the slot map the first time only
            node = client.get_node_from_key(stream)
            if node is None:
                raise RedisError(f"no primary known for {stream}")
            client = self._node_client(node)
        async with client.pipeline(transaction=False) as pipe:
            pipe.xadd(stream, {"id": event_id})
            pipe.execute_command("WAIT", 1, WAIT_MS)
            _, replicas = await pipe.execute()
        return int(replicas)

    def _node_client(self, node: ClusterNode) -> Redis:
        key = (node.host, node.port)
        if key not in self._nodes:
            self._nodes[key] = direct_client(f"redis://{node.host}:{node.port}/0")
        return self._nodes[key]

    async def close(self) -> None:
        for client in self._nodes.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        await super().close()

    async def deliveries(self) -> list[str]:
        raw = await self.redis.lrange(self.keys["delivered"], 0, -1)
        return [_text(item) for item in raw]


class ExampleAppNodes(NodeKind):
    """The example app (``example_app.main:app``) under uvicorn, one process per node.

    What the harness expects of the app:

    - ``example_app.main`` defines ``app`` (the FastAPI app) and ``election`` (its
      :class:`LeaderElection`, configured from ``LEADER_*``), so that
      :mod:`tests.chaos.appnode` can attach the reporter before serving;
    - ``POST /events`` (body: the event's data) answers 2xx with JSON ``{"id": <event id>}``
      only once the event is stored in Redis, and an error status (not an unhandled
      exception: the harness fails a run on any traceback) while Redis is unreachable;
    - every delivery of an event (each time the leader's job hands it on) is recorded in Redis
      under ``{LEADER_CHANNEL_PREFIX}:{LEADER_GROUP}:example:delivered`` as one element per
      delivery, the event id or a JSON object with an ``"id"``: a list (``RPUSH``) or a
      stream (``XADD`` with an ``id`` field). :attr:`deliveries_key` can be changed;
    - ``EXAMPLE_MOVE_INTERVAL`` and ``EXAMPLE_WORK_SECONDS`` are honoured (set short here).
    """

    name = "example"
    fence_markers = ("leader work refused", "fenced off at once")
    move_interval = "0.1"

    def __init__(self, redis_url: str, prefix: str, group: str) -> None:
        super().__init__(redis_url, prefix, group)
        self.deliveries_key = f"{prefix}:{group}:example:delivered"
        self.http = httpx.AsyncClient(timeout=PUBLISH_TIMEOUT, trust_env=False)
        self._rng = random.Random(0)

    def command(self, node: NodeSpec) -> list[str]:
        return [sys.executable, "-m", "tests.chaos.appnode", "--port", str(node.port)]

    def env(self, node: NodeSpec) -> dict[str, str]:
        return {
            "LEADER_ADVERTISE_URL": f"http://127.0.0.1:{node.port}",
            "EXAMPLE_MOVE_INTERVAL": self.move_interval,
            "EXAMPLE_WORK_SECONDS": "0",
        }

    async def publish(self, seq: int, live: Sequence[NodeSpec]) -> str | None:
        if not live:
            return None
        node = self._rng.choice(list(live))
        try:
            response = await self.http.post(
                f"http://127.0.0.1:{node.port}/events", content=f"event {seq}"
            )
        except httpx.HTTPError:
            return None
        if not response.is_success:
            return None
        event_id = response.json().get("id")
        return None if event_id is None else str(event_id)

    async def deliveries(self) -> list[str]:
        kind = _text(await self.redis.type(self.deliveries_key))
        if kind == "none":
            return []
        if kind == "list":
            raw = await self.redis.lrange(self.deliveries_key, 0, -1)
        elif kind == "stream":
            entries = await self.redis.xrange(self.deliveries_key) or []
            raw = [(fields or {}).get(b"id", b"") for _, fields in entries]
        else:
            raise RuntimeError(f"{self.deliveries_key} is a {kind}: expected a list or stream")
        return [_event_id(item) for item in raw]

    async def close(self) -> None:
        await self.http.aclose()
        await super().close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event_id(item: bytes | str) -> str:
    text = _text(item)
    if text.startswith("{"):
        return str(json.loads(text)["id"])
    return text


NODE_KINDS: dict[str, type[NodeKind]] = {
    BuiltinNodes.name: BuiltinNodes,
    ExampleAppNodes.name: ExampleAppNodes,
}
