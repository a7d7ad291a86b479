"""Transports: how messages and the group's keys reach the broker.

``RedisTransport`` talks to Redis or Valkey; ``MemoryTransport`` keeps everything in one process
(local development and tests) with the same semantics.
"""

from .base import BrokerUnavailable, Names, Sink, Transport
from .memory import MemoryBroker, MemoryTransport
from .redis import RedisTransport, acl_rule

__all__ = [
    "BrokerUnavailable",
    "MemoryBroker",
    "MemoryTransport",
    "Names",
    "RedisTransport",
    "Sink",
    "Transport",
    "acl_rule",
]
