"""Shared fixtures: throw-away Redis-protocol servers (never the machine's own Redis).

- ``redis_server``: one server for the whole session.
- ``redis_url``: that server's URL, flushed before the test.
- ``make_redis_server``: a factory for extra, private servers, stopped after the test.

Tests using any of them get the ``redis`` marker automatically, so ``-m "not redis"`` runs the
pure tests alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fastapi_leader.testing import RedisServer

_REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "make_redis_server"})

MakeRedisServer = Callable[..., RedisServer]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private server shared by the session; tests must not stop or pause it."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, emptied (FLUSHALL) before the test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def make_redis_server() -> Iterator[MakeRedisServer]:
    """Factory for private servers a test may stop, restart or pause.

    ``make_redis_server(extra_args=["--maxmemory", "10mb"])`` takes RedisServer's keyword
    arguments and returns a started server; every server it made is stopped after the test.
    """
    with contextlib.ExitStack() as servers:

        def make(**kwargs: Any) -> RedisServer:
            return servers.enter_context(RedisServer(**kwargs))

        yield make
