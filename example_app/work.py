"""The example's singleton work: a stream of events, one mover (the leader), many workers.

Every key lives under ``{LEADER_CHANNEL_PREFIX}:{group}:example``:

- ``:events``, a Redis Stream: ``POST /events`` appends (XADD) on any node; ``:published``
  counts the appends (in the same transaction).
- ``:checkpoint``: the id of the last event moved to the work queue. The leader alone, on a
  timer, moves the events after it from the stream onto ``:work`` and advances the checkpoint,
  in one *fenced* script (``:fence`` holds the newest fencing token used): a leader that was
  paused (GC, SIGSTOP) after reading its token, and wakes after a successor was elected, moves
  nothing.
- ``:work``, a list every node drains: a worker moves one event at a time to its own
  ``:processing:{node_id}`` list (BLMOVE), processes it, then records it and drops it from its
  list in one script. The leader hands the events held by nodes it no longer hears (``:workers``
  names every node that ever worked) back to the queue, fenced as well. An event is therefore
  always in exactly one place: the stream, the queue, one node's hands, or done.
- ``:delivered``, a list with the id of each event whose processing was recorded, once per
  record; ``:delivery_counts``, a hash of event id to its number of records; ``:moved_by`` and
  ``:processed_by``, hashes of node id to counts. A fault-injection harness reads them (or
  ``GET /stats``) to count events lost (published, but neither waiting nor recorded) and
  duplicated (recorded more than once): both must stay 0. They grow with every event: fine for
  a demo and a test run; real work would expire or trim them.

Two mechanisms share the work. The move reads the checkpoint inside its script, so even two
leaders running it at once move disjoint events: that alone makes each event reach the queue
once. The fence makes a stale leadership do nothing at all once a newer one has acted, which
matters most for the hand-back: it acts on the leader's view of who is alive, and after a pause
that view is stale (every other node looks gone).

Recording is what "exactly once" means here. A node that is paused while it holds an event, and
is given up for gone, may still finish processing it after another node has; its record is then
refused, so the work's *effects* must be idempotent, or themselves written with a check, as the
record is. Needs Redis 6.2 or later (exclusive XRANGE, XTRIM MINID, LMOVE).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError

from fastapi_leader import Fence

__all__ = ["Census", "EventQueues", "ExampleSettings"]

log = logging.getLogger("example_app")

# Fenced (see Fence.script). KEYS: events, checkpoint, work, moved_by. ARGV: batch size, node id.
# Moves up to a batch of the events after the checkpoint onto the work queue, oldest first, and
# advances the checkpoint to the last one moved. Returns how many moved.
_MOVE = """
local checkpoint = redis.call('GET', KEYS[2])
local start = checkpoint and ('(' .. checkpoint) or '-'
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[1])
if #entries == 0 then
    return 0
end
for _, entry in ipairs(entries) do
    local fields, data = entry[2], ''
    for i = 1, #fields, 2 do
        if fields[i] == 'data' then
            data = fields[i + 1]
        end
    end
    redis.call('LPUSH', KEYS[3], cjson.encode({id = entry[1], data = data}))
end
local last = entries[#entries][1]
redis.call('SET', KEYS[2], last)
-- The stream keeps the events not moved yet and the checkpoint's own entry, nothing older.
redis.call('XTRIM', KEYS[1], 'MINID', last)
redis.call('HINCRBY', KEYS[4], ARGV[2], #entries)
return #entries
"""

# KEYS: work, then processing lists. Hands every event in those lists back to the end of the
# work queue that workers take from next. Returns how many. Run fenced by the leader for nodes
# it no longer hears, and plainly by a worker for its own list when it holds nothing.
_REQUEUE = """
local requeued = 0
for i = 2, #KEYS do
    while redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'RIGHT') do
        requeued = requeued + 1
    end
end
return requeued
"""

# KEYS: the worker's processing list, delivered, delivery_counts, processed_by. ARGV: the event
# as taken, its id, the node id. Records the event as processed only if the worker still holds
# it: the leader may have handed it to another node meanwhile. Returns 1 if recorded, else 0.
_DONE = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
    return 0
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
return 1
"""

# KEYS: events, checkpoint, work, workers, delivery_counts, published, moved_by, processed_by.
# ARGV: the prefix of processing lists. One consistent snapshot of the counts. (The processing
# lists are named from the workers set here, so this script suits a single Redis, not a cluster.)
_CENSUS = """
local incoming = redis.call('XLEN', KEYS[1])
local checkpoint = redis.call('GET', KEYS[2])
if checkpoint and #redis.call('XRANGE', KEYS[1], checkpoint, checkpoint) == 1 then
    incoming = incoming - 1
end
local in_flight = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    in_flight = in_flight + redis.call('LLEN', ARGV[1] .. node)
end
return {
    incoming,
    redis.call('LLEN', KEYS[3]),
    in_flight,
    tonumber(redis.call('GET', KEYS[6]) or '0'),
    redis.call('HLEN', KEYS[5]),
    redis.call('HGETALL', KEYS[7]),
    redis.call('HGETALL', KEYS[8]),
}
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


@dataclass(frozen=True)
class Census:
    """Where the events are, cluster-wide, at one instant (read in one script)."""

    incoming: int
    """Published, not moved to the work queue yet."""
    queued: int
    """In the work queue."""
    in_flight: int
    """Taken by a worker, not recorded yet."""
    published: int
    """Appended to the stream, ever."""
    delivered: int
    """Distinct events whose processing was recorded."""
    moved_by: dict[str, int]
    """Events moved to the work queue, by node id."""
    processed_by: dict[str, int]
    """Processings recorded, by node id."""

    @property
    def deliveries(self) -> int:
        """Processings recorded, duplicates included."""
        return sum(self.processed_by.values())

    @property
    def duplicated(self) -> int:
        """Processings recorded beyond the first of their event."""
        return self.deliveries - self.delivered

    @property
    def lost(self) -> int:
        """Events published that are nowhere: neither waiting nor recorded."""
        return self.published - self.incoming - self.queued - self.in_flight - self.delivered


class EventQueues:
    """The stream, the work queue and this node's part in them.

    ``redis`` must decode responses (``decode_responses=True``); :meth:`close` closes it.
    """

    def __init__(self, redis: Redis, base: str, node_id: str) -> None:
        self.redis = redis
        self.node_id = node_id
        self.events_key = f"{base}:events"
        self.published_key = f"{base}:published"
        self.checkpoint_key = f"{base}:checkpoint"
        self.work_key = f"{base}:work"
        self.workers_key = f"{base}:workers"
        self.processing_prefix = f"{base}:processing:"
        self.delivered_key = f"{base}:delivered"
        self.delivery_counts_key = f"{base}:delivery_counts"
        self.moved_by_key = f"{base}:moved_by"
        self.processed_by_key = f"{base}:processed_by"
        self.fence = Fence(redis, f"{base}:fence")
        self.moved = 0
        """Events this node moved to the work queue (as leader) since it started."""
        self.processed = 0
        """Events this node processed and recorded since it started."""
        self._move = self.fence.script(_MOVE)
        self._reclaim = self.fence.script(_REQUEUE)
        self._requeue = redis.register_script(_REQUEUE)
        self._done = redis.register_script(_DONE)
        self._census = redis.register_script(_CENSUS)
        self._closed = False

    def processing_key(self, node_id: str) -> str:
        """The list holding the event that node ``node_id`` is processing."""
        return f"{self.processing_prefix}{node_id}"

    async def publish(self, data: str) -> str:
        """Append an event to the stream; return its id (the stream entry's)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.events_key, {"data": data})
            pipe.incr(self.published_key)
            event_id, _ = await pipe.execute()
        return str(event_id)

    async def move(self, fencing_token: int, batch_size: int) -> int:
        """Move up to ``batch_size`` events after the checkpoint to the work queue, oldest first,
        and advance the checkpoint, fenced by ``fencing_token``; return how many moved (0 after
        :meth:`close`). Raises :class:`~fastapi_leader.StaleToken` (and moves nothing) when a
        newer leadership has used the fence."""
        if self._closed:
            return 0
        keys = [self.events_key, self.checkpoint_key, self.work_key, self.moved_by_key]
        moved = int(await self._move(fencing_token, keys=keys, args=[batch_size, self.node_id]))
        self.moved += moved
        return moved

    async def reclaim(self, fencing_token: int, live: Collection[str]) -> int:
        """Hand the events held by workers that are not in ``live`` (nor this node) back to the
        work queue, fenced by ``fencing_token``; return how many. Raises
        :class:`~fastapi_leader.StaleToken` when a newer leadership has used the fence."""
        if self._closed:
            return 0
        workers = {str(node) for node in await self.redis.smembers(self.workers_key)}
        gone = sorted(workers - set(live) - {self.node_id})
        if not gone:
            return 0
        keys = [self.work_key, *(self.processing_key(node) for node in gone)]
        requeued = int(await self._reclaim(fencing_token, keys=keys))
        if requeued:
            log.warning("requeued %d event(s) held by nodes gone from the group", requeued)
        return requeued

    async def census(self) -> Census:
        """Where the events are, cluster-wide, now."""
        keys = [
            self.events_key,
            self.checkpoint_key,
            self.work_key,
            self.workers_key,
            self.delivery_counts_key,
            self.published_key,
            self.moved_by_key,
            self.processed_by_key,
        ]
        reply = await self._census(keys=keys, args=[self.processing_prefix])
        incoming, queued, in_flight, published, delivered, moved_by, processed_by = reply
        return Census(
            incoming=int(incoming),
            queued=int(queued),
            in_flight=int(in_flight),
            published=int(published),
            delivered=int(delivered),
            moved_by=_counts(moved_by),
            processed_by=_counts(processed_by),
        )

    async def work_forever(self, work_seconds: float) -> None:
        """Take events off the work queue and process them, one at a time, until cancelled.

        Before the first event, and after any Redis error, this node holds nothing: whatever
        its processing list holds (from an earlier life of this node id, or a reply lost with
        the connection) goes back to the queue first."""
        hand_back = True  # this node may hold events from before
        failing = False  # in an outage: said once, not at every retry
        while True:
            try:
                if hand_back:
                    await self._hand_back()
                    hand_back = False
                if failing:
                    failing = False
                    log.warning("working on the queue again: Redis answers")
                taken = await self.redis.blmove(
                    self.work_key, self.processing_key(self.node_id), _POLL_SECONDS, "RIGHT", "LEFT"
                )
                if taken is None:
                    continue
                await asyncio.sleep(work_seconds)  # the "processing"
                await self._record(str(taken))
            except RedisError as exc:  # unreachable, timed out, loading, read-only ...
                if not failing:
                    failing = True
                    log.warning(
                        "cannot work on the queue: %s; retrying every %g s", exc, _RETRY_SECONDS
                    )
                hand_back = True
                await asyncio.sleep(_RETRY_SECONDS)

    async def close(self) -> None:
        """Hand back the event this node holds, if any, then close the Redis client. Call it
        after the worker has stopped. A last leader tick after this moves nothing rather than
        reconnect. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._requeue(keys=[self.work_key, self.processing_key(self.node_id)])
        except RedisError as exc:  # the leader hands it back once it stops hearing us
            log.warning("could not hand back the event in hand: %s", exc)
        await self.redis.aclose()

    async def _hand_back(self) -> None:
        await self.redis.sadd(self.workers_key, self.node_id)
        requeued = int(await self._requeue(keys=[self.work_key, self.processing_key(self.node_id)]))
        if requeued:
            log.warning("handed %d event(s) left in this node's hands back to the queue", requeued)

    async def _record(self, taken: str) -> None:
        event_id = json.loads(taken)["id"]
        keys = [
            self.processing_key(self.node_id),
            self.delivered_key,
            self.delivery_counts_key,
            self.processed_by_key,
        ]
        if int(await self._done(keys=keys, args=[taken, event_id, self.node_id])):
            self.processed += 1
        else:
            log.warning(
                "event %s was handed to another node while this one held it: not recorded",
                event_id,
            )


def _counts(flat: list[Any]) -> dict[str, int]:
    """``{field: int(value)}`` from an HGETALL reply as a Lua script returns it (flat)."""
    return {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended.

    Cancelled again every second until it ends: before Python 3.12, a cancellation that lands as
    a timeout expires inside redis-py's blocking calls can be swallowed, and a loop like
    :meth:`EventQueues.work_forever` would then go on polling for ever."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())
