"""The example's singleton work, on three Redis keys under ``{prefix}:{group}:example``.

Clients push events onto ``incoming``. The leader alone, on a timer, moves them in batches onto
``work`` (one Lua script, so a batch moves atomically and each event exactly once). Every node,
leader or not, takes events off ``work`` and processes them: one mover, many workers.

The move is *fenced*: the script remembers the highest fencing token that has moved events and
refuses an older one, so a leader that was paused (GC, SIGSTOP) and woke up after a successor was
elected cannot move anything, even though it still thinks it leads for a moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["EventQueues", "ExampleSettings"]

log = logging.getLogger("example_app")

# KEYS: incoming, work, fence. ARGV: fencing token, batch size. Returns the number moved, or -1
# when a newer leadership has moved events already (this caller's leadership is over).
_MOVE_BATCH = """
local highest = tonumber(redis.call('GET', KEYS[3]) or '0')
local token = tonumber(ARGV[1])
if token < highest then return -1 end
redis.call('SET', KEYS[3], token)
local moved = 0
while moved < tonumber(ARGV[2]) do
    if not redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') then break end
    moved = moved + 1
end
return moved
"""

# How long a worker blocks waiting for an event before it asks again: short, so that shutdown
# never waits long for a blocked read.
_POLL_SECONDS = 1
# After Redis errors, wait before the next try rather than spin.
_RETRY_SECONDS = 1.0


class ExampleSettings(BaseSettings):
    """The example's own knobs, from ``EXAMPLE_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="EXAMPLE_", extra="ignore", frozen=True)

    move_interval: float = Field(default=0.5, gt=0)
    """``EXAMPLE_MOVE_INTERVAL``: seconds between the leader's moves of incoming events."""

    batch_size: int = Field(default=100, gt=0)
    """``EXAMPLE_BATCH_SIZE``: at most this many events per move."""

    work_seconds: float = Field(default=0.05, ge=0)
    """``EXAMPLE_WORK_SECONDS``: pretend processing time per event, so that the work spreads
    over the nodes visibly."""


class EventQueues:
    """The incoming list, the work queue, and this node's counts."""

    def __init__(self, redis: Redis, base: str) -> None:
        self.redis = redis
        self.incoming_key = f"{base}:incoming"
        self.work_key = f"{base}:work"
        self.fence_key = f"{base}:fence"
        self.moved = 0
        """Events this node moved to the work queue (as leader)."""
        self.processed = 0
        """Events this node took off the work queue and processed."""
        self._move_batch = redis.register_script(_MOVE_BATCH)
        self._closed = False

    async def push(self, data: str) -> str:
        """Add an event to the incoming list; return its id."""
        event_id = uuid.uuid4().hex[:12]
        await self.redis.lpush(self.incoming_key, json.dumps({"id": event_id, "data": data}))
        return event_id

    async def move(self, fencing_token: int, batch_size: int) -> int:
        """Move up to ``batch_size`` events, oldest first, from incoming to the work queue.

        Returns how many moved (0 as well when the token was refused, or after :meth:`close`)."""
        if self._closed:
            return 0
        keys = [self.incoming_key, self.work_key, self.fence_key]
        moved = int(await self._move_batch(keys=keys, args=[fencing_token, batch_size]))
        if moved < 0:
            log.warning(
                "move refused: fencing token %d is older than the last mover's", fencing_token
            )
            return 0
        self.moved += moved
        return moved

    async def close(self) -> None:
        """Close the Redis client. The election stops after the app's lifespan has exited, so
        a last leader tick may still come: it moves nothing rather than reconnect."""
        self._closed = True
        await self.redis.aclose()

    async def lengths(self) -> tuple[int, int]:
        """How many events wait in the incoming list and in the work queue."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.incoming_key)
            pipe.llen(self.work_key)
            incoming, work = await pipe.execute()
        return int(incoming), int(work)

    async def work_forever(self, work_seconds: float) -> None:
        """Take events off the work queue and process them, until cancelled.

        BRPOP hands each event to one worker only. An event taken just as the node stops is
        lost: good enough for a demo; real work would BLMOVE to a per-node list and acknowledge.
        """
        while True:
            try:
                popped = await self.redis.brpop([self.work_key], timeout=_POLL_SECONDS)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("cannot read the work queue: %s", exc)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            if popped is None:
                continue
            await asyncio.sleep(work_seconds)  # the "processing"
            self.processed += 1
