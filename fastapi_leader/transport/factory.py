"""Building a node's transport from its settings: the one place that reads ``redis_url``'s
scheme and turns the settings into a transport's arguments."""

from __future__ import annotations

from ..settings import LeaderSettings
from .base import Names, Transport
from .memory import MemoryBroker, MemoryTransport
from .redis import RedisTransport

__all__ = ["transport_for"]

_MEMORY_BROKER: MemoryBroker | None = None


def _process_broker() -> MemoryBroker:
    """The one in-memory broker of this process, for ``LEADER_REDIS_URL=memory://``."""
    global _MEMORY_BROKER
    if _MEMORY_BROKER is None:
        _MEMORY_BROKER = MemoryBroker()
    return _MEMORY_BROKER


def transport_for(settings: LeaderSettings, names: Names) -> Transport:
    """The transport ``settings.redis_url`` names, for the node ``names`` describes."""
    url = settings.redis_url
    if url.startswith("memory://"):
        return MemoryTransport(_process_broker(), names)
    # A command slower than the lease is worthless: by then the leadership it serves is over.
    return RedisTransport(
        url,
        names,
        command_timeout=max(settings.lease, 0.25),
        ssl_options=settings.redis_ssl_options,
        sentinel_password=(
            None
            if settings.sentinel_password is None
            else settings.sentinel_password.get_secret_value()
        ),
        # Heartbeats prove the subscription alive: PING only a silence longer than the
        # leader's (a slow profile's 3 s beats would otherwise cost five PINGs each).
        idle_before_ping=1.5 * settings.heartbeat_interval,
        # After an outage or a failover the group elects one election timeout after the nodes
        # hear each other again: retries a quarter of that apart (within 0.1 to 1 s) keep the
        # wait for the subscription small beside it, at a few connection attempts a second.
        retry_cap=min(1.0, max(0.1, settings.election_timeout_min / 4)),
    )
