"""The example app's worker through a Redis outage, on a real server that is stopped and started
again: it says once that it cannot work, not once a second, and once that it works again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from example_app.work import EventQueues, cancel_and_wait
from tests.conftest import MakeRedisServer

# Three of the worker's retry periods (1 s): without the once-per-outage rule, three warnings.
OUTAGE = 3.5
WAIT = 20.0


async def _eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_worker_says_once_that_redis_is_gone_and_once_that_it_is_back(
    make_redis_server: MakeRedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server()
    # As the example app builds its client: no retries inside redis-py.
    client = Redis.from_url(
        server.url, decode_responses=True, retry=Retry(NoBackoff(), 0), socket_timeout=5.0
    )
    queues = EventQueues(client, "test:outage", "node-1")
    caplog.set_level(logging.WARNING, logger="example_app")
    task = asyncio.create_task(queues.work_forever(0.0))
    try:
        probe = Redis.from_url(server.url, decode_responses=True)
        try:

            async def began() -> bool:  # the worker's first step registers it
                return bool(await probe.sismember(queues.workers_key, "node-1"))

            await _eventually(began, "the worker to start")
        finally:
            await probe.aclose()

        server.stop()
        await asyncio.sleep(OUTAGE)  # observing the outage for a while is the point here
        gone = [r.getMessage() for r in caplog.records if "cannot work" in r.getMessage()]
        assert len(gone) == 1, gone
        assert "retrying every 1 s" in gone[0]

        server.start()  # the same port: the worker's next try finds it

        async def back() -> bool:
            return any("working on the queue again" in r.getMessage() for r in caplog.records)

        await _eventually(back, "the worker to say it works again")
        assert sum("cannot work" in r.getMessage() for r in caplog.records) == 1
    finally:
        await cancel_and_wait(task)
        await queues.close()
