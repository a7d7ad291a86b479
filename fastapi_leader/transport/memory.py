"""An in-process broker with Redis's semantics, for local development and tests.

One :class:`MemoryBroker` stands for one Redis server and is shared by every node of the
process; each node talks to it through its own :class:`MemoryTransport`::

    broker = MemoryBroker()
    a = MemoryTransport(broker, Names("fastapi-leader", "billing", "a"))

Like Redis pub/sub, delivery is asynchronous (scheduled with ``loop.call_soon_threadsafe`` on
the subscriber's own loop, so a message is never delivered inside ``publish``), in publish order
for each subscriber, and at most once: a message for a node that is disconnected or closed when
it comes due is dropped. Keys expire against ``time.monotonic()``. The four operations are
atomic: nothing in them awaits, and they hold the broker's lock, so nodes on several threads
(and a test's thread calling :meth:`MemoryBroker.disconnect`) share one broker safely.

Faults for tests: :meth:`MemoryBroker.disconnect` cuts one node off (its sink hears
``connection_lost``, it hears no messages and its commands raise :class:`BrokerUnavailable`),
:meth:`MemoryBroker.reconnect` lets it back in, and :meth:`MemoryBroker.flush` drops every key,
as a Redis restart does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .base import BrokerUnavailable, Names, Sink

__all__ = ["MemoryBroker", "MemoryTransport"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run ``method`` holding its broker's lock (``self._broker`` or ``self``)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        broker = getattr(self, "_broker", self)
        with broker._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class MemoryBroker:
    """Channels and keys shared by the nodes of one process: an in-memory Redis."""

    def __init__(self) -> None:
        # Dicts used as ordered sets: deliveries go out in subscription order, run after run.
        self._subscribers: dict[str, dict[MemoryTransport, None]] = {}
        # key -> (value, monotonic deadline or None for no expiry)
        self._keys: dict[str, tuple[str, float | None]] = {}
        self._disconnected: set[str] = set()
        self._started: dict[str, MemoryTransport] = {}
        self._lock = threading.RLock()

    # -- test helpers ------------------------------------------------------------------------

    @_locked
    def disconnect(self, node_id: str) -> None:
        """Cut node ``node_id`` off: it hears ``connection_lost``, receives nothing, and its
        commands (and a ``start``) raise :class:`BrokerUnavailable` until :meth:`reconnect`."""
        if node_id in self._disconnected:
            return
        self._disconnected.add(node_id)
        transport = self._started.get(node_id)
        if transport is not None:
            transport._connection_epoch += 1
            transport._schedule(transport._connection_lost)

    @_locked
    def reconnect(self, node_id: str) -> None:
        """Let node ``node_id`` back in; a started node hears ``connection_restored``."""
        if node_id not in self._disconnected:
            return
        self._disconnected.discard(node_id)
        transport = self._started.get(node_id)
        if transport is not None:
            transport._schedule(transport._connection_restored)

    @_locked
    def flush(self) -> None:
        """Drop every key, as a Redis restart without persistence does."""
        self._keys.clear()

    def is_connected(self, node_id: str) -> bool:
        """False between :meth:`disconnect` and :meth:`reconnect` of ``node_id``."""
        return node_id not in self._disconnected

    # -- what transports use -----------------------------------------------------------------

    def _check(self, node_id: str) -> None:
        if node_id in self._disconnected:
            raise BrokerUnavailable(f"node {node_id!r} is disconnected from the memory broker")

    def _get(self, key: str) -> str | None:
        entry = self._keys.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if deadline is not None and time.monotonic() >= deadline:
            del self._keys[key]
            return None
        return value

    def _set(self, key: str, value: str, ttl_ms: int | None) -> None:
        deadline = None if ttl_ms is None else time.monotonic() + ttl_ms / 1000
        self._keys[key] = (value, deadline)

    def _delete(self, key: str) -> None:
        self._keys.pop(key, None)

    def _publish(self, channel: str, data: bytes) -> None:
        for transport in tuple(self._subscribers.get(channel, ())):
            if self.is_connected(transport.names.node_id):
                transport._schedule(transport._deliver, data, transport._connection_epoch)

    @_locked
    def _register(self, transport: MemoryTransport) -> None:
        node_id = transport.names.node_id
        if node_id in self._started:
            raise RuntimeError(f"node {node_id!r} is already started on this memory broker")
        self._started[node_id] = transport
        for channel in (transport.names.broadcast, transport.names.own_channel):
            self._subscribers.setdefault(channel, {})[transport] = None

    @_locked
    def _unregister(self, transport: MemoryTransport) -> None:
        if self._started.get(transport.names.node_id) is transport:
            del self._started[transport.names.node_id]
        for channel in (transport.names.broadcast, transport.names.own_channel):
            subscribers = self._subscribers.get(channel)
            if subscribers is not None:
                subscribers.pop(transport, None)
                if not subscribers:
                    del self._subscribers[channel]


def _ttl_ms(ttl: float) -> int:
    # Rounded as RedisTransport rounds it, so both expire at the same instant.
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return math.ceil(ttl * 1000)


class MemoryTransport:
    """One node's connection to a :class:`MemoryBroker`; implements ``Transport``."""

    def __init__(self, broker: MemoryBroker, names: Names) -> None:
        self.names = names
        self._broker = broker
        self._sink: Sink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Bumped by each disconnect: a delivery scheduled before a cut is dropped even when the
        # node is back by the time it comes due, as Redis drops a dead connection's buffer.
        self._connection_epoch = 0

    def __repr__(self) -> str:
        return f"<MemoryTransport node={self.names.node_id!r}>"

    async def start(self, sink: Sink) -> None:
        """Subscribe to the broadcast and own channels and deliver to ``sink`` until closed.

        Raises:
            BrokerUnavailable: the node is disconnected (see :meth:`MemoryBroker.disconnect`).
            RuntimeError: already started, closed, or another live node has the same id.
        """
        if self._closed:
            raise RuntimeError("MemoryTransport.start(): the transport is closed")
        if self._sink is not None:
            raise RuntimeError("MemoryTransport.start() was already called")
        self._broker._check(self.names.node_id)
        self._broker._register(self)
        self._loop = asyncio.get_running_loop()
        self._sink = sink

    async def close(self) -> None:
        """Unsubscribe; pending deliveries are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._broker._unregister(self)

    async def publish(self, data: bytes, to: str | None = None) -> None:
        """Publish on the broadcast channel, or on node ``to``'s own channel."""
        with self._broker._lock:
            self._check()
            self._broker._publish(
                self.names.broadcast if to is None else self.names.node_channel(to), data
            )

    async def allocate_term(self, floor: int) -> int:
        """Set the term counter to ``max(counter, floor) + 1`` and return it."""
        with self._broker._lock:
            self._check()
            term = max(int(self._broker._get(self.names.term_key) or 0), int(floor)) + 1
            self._broker._set(self.names.term_key, str(term), None)
            return term

    async def acquire(self, term: int, ttl: float, announce: bytes) -> bool:
        """Take the leader key if nobody holds it, announcing on the broadcast channel."""
        ttl_ms = _ttl_ms(ttl)
        with self._broker._lock:
            self._check()
            if self._broker._get(self.names.leader_key) is not None:
                return False
            if int(self._broker._get(self.names.term_key) or 0) > term:
                return False  # a newer term exists: this leadership would carry a stale token
            self._broker._set(self.names.leader_key, self.names.holder(term), ttl_ms)
            self._broker._publish(self.names.broadcast, announce)
            return True

    async def renew(self, term: int, ttl: float, announce: bytes) -> bool:
        """Reset the leader key's TTL if it holds ``holder(term)``, announcing the renewal."""
        ttl_ms = _ttl_ms(ttl)
        with self._broker._lock:
            self._check()
            if self._broker._get(self.names.leader_key) != self.names.holder(term):
                return False
            self._broker._set(self.names.leader_key, self.names.holder(term), ttl_ms)
            self._broker._publish(self.names.broadcast, announce)
            return True

    async def release(self, term: int, announce: bytes | None) -> bool:
        """Delete the leader key if it holds ``holder(term)``, announcing it if asked."""
        with self._broker._lock:
            self._check()
            if self._broker._get(self.names.leader_key) != self.names.holder(term):
                return False
            self._broker._delete(self.names.leader_key)
            if announce:
                self._broker._publish(self.names.broadcast, announce)
            return True

    # -- internals ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise BrokerUnavailable(f"node {self.names.node_id!r}: the transport is closed")
        self._broker._check(self.names.node_id)

    def _schedule(self, callback: Callable[..., None], *args: object) -> None:
        if self._loop is not None and not self._closed:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody to tell
                self._loop.call_soon_threadsafe(callback, *args)

    def _deliver(self, data: bytes, connection_epoch: int) -> None:
        if (
            self._sink is not None
            and not self._closed
            and connection_epoch == self._connection_epoch
        ):
            self._sink.message_received(data)

    def _connection_lost(self) -> None:
        if self._sink is not None and not self._closed:
            self._sink.connection_lost()

    def _connection_restored(self) -> None:
        if self._sink is not None and not self._closed:
            self._sink.connection_restored()
