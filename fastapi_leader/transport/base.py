"""The small interface every transport implements, and the names it uses on the broker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["BrokerUnavailable", "Names", "Sink", "Transport"]


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached (raised by :meth:`Transport.start` and by commands)."""


@dataclass(frozen=True, slots=True)
class Names:
    """Channel and key names of one node in one group. Everything lives under
    ``<prefix>:{<group>}``, so one ACL pattern covers a group (see the docs: Security), and the
    braces make the group a Redis Cluster hash tag: every key and channel of a group hashes to
    one slot, so the scripts (which touch two keys and publish) run on one node, and the group's
    sharded pub/sub lives on that node too."""

    prefix: str
    group: str
    node_id: str

    @property
    def base(self) -> str:
        """``<prefix>:{<group>}``: the hash tag ``{<group>}`` decides the cluster slot."""
        return f"{self.prefix}:{{{self.group}}}"

    @property
    def broadcast(self) -> str:
        """The channel every node of the group hears."""
        return self.base

    def node_channel(self, node_id: str) -> str:
        """The channel only ``node_id`` hears (votes are sent there)."""
        return f"{self.base}:node:{node_id}"

    @property
    def own_channel(self) -> str:
        return self.node_channel(self.node_id)

    @property
    def leader_key(self) -> str:
        """Holds ``"<node_id>:<term>"`` while a leadership lasts, with the lease as its TTL."""
        return f"{self.base}:leader"

    @property
    def term_key(self) -> str:
        """The group's term counter: the source of fencing tokens."""
        return f"{self.base}:term"

    def holder(self, term: int) -> str:
        """The leader key's value for this node's leadership of ``term``."""
        return f"{self.node_id}:{term}"


class Sink(Protocol):
    """What a transport reports to. Called on the event loop, never concurrently; must not
    block or raise."""

    def message_received(self, data: bytes) -> None: ...

    def connection_lost(self) -> None: ...

    def connection_restored(self) -> None: ...


class Transport(Protocol):
    """Publish/subscribe plus the four atomic operations on the group's keys.

    Every method but :meth:`close` may raise :class:`BrokerUnavailable` (or a timeout); the
    runtime treats that as "no answer", never as "no".
    """

    names: Names

    async def start(self, sink: Sink) -> None:
        """Connect and subscribe to the broadcast and own channels, then deliver every message
        to ``sink`` until closed, reconnecting with backoff (reporting ``connection_lost`` /
        ``connection_restored``). Raises :class:`BrokerUnavailable` if the first connection
        fails, so a misconfigured node fails loudly at startup."""
        ...

    async def close(self) -> None:
        """Unsubscribe and close every connection. Idempotent."""
        ...

    async def publish(self, data: bytes, to: str | None = None) -> None:
        """Publish on the broadcast channel, or on node ``to``'s own channel."""
        ...

    async def allocate_term(self, floor: int) -> int:
        """Atomically set the term counter to ``max(counter, floor) + 1`` and return it."""
        ...

    async def acquire(self, term: int, ttl: float, announce: bytes) -> bool:
        """``SET leader_key holder(term) NX PX ttl``, unless the term counter has passed
        ``term``; if set, publish ``announce`` on the broadcast channel in the same atomic step.
        True if this node now holds the key."""
        ...

    async def renew(self, term: int, ttl: float, announce: bytes) -> bool:
        """If the key holds ``holder(term)``, reset its TTL and publish ``announce``, atomically.
        True if renewed, False if the key is not ours."""
        ...

    async def release(self, term: int, announce: bytes | None) -> bool:
        """If the key holds ``holder(term)``, delete it and publish ``announce`` (if any),
        atomically. True if released."""
        ...
