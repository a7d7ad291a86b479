"""A sink that records what a transport reports, and the commands of a transport, for the
transport tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi_leader.transport.base import Transport

# Generous: these bound waits that normally end in milliseconds; they only matter on failure.
WAIT = 10.0


class RecordingSink:
    """Records what a transport reports, and lets a test await a condition on it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lost = 0
        self.restored = 0
        self._changed = asyncio.Event()

    def message_received(self, data: bytes) -> None:
        self.messages.append(data)
        self._changed.set()

    def connection_lost(self) -> None:
        self.lost += 1
        self._changed.set()

    def connection_restored(self) -> None:
        self.restored += 1
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        """Until ``condition()`` holds, re-checked on every report (TimeoutError after
        ``timeout``)."""

        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def wait_for_message(self, data: bytes) -> None:
        await self.wait_until(lambda: data in self.messages)


def every_command(transport: Transport) -> list[Callable[[], Awaitable[Any]]]:
    """One call of each command a transport sends to its broker (for outage tests: each must
    fail with :class:`~fastapi_leader.transport.BrokerUnavailable`)."""
    return [
        lambda: transport.publish(b"x"),
        lambda: transport.allocate_term(0),
        lambda: transport.acquire(1, 1.0, b"x"),
        lambda: transport.renew(1, 1.0, b"x"),
        lambda: transport.release(1, b"x"),
    ]
