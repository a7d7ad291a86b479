"""The harness's own node: one election and one leader-only job, reporting on stdout.

    python -m tests.chaos.node  # configured by LEADER_* and CHAOS_* environment variables

It runs a :class:`LeaderElection` (``LEADER_*`` settings: the harness points
``LEADER_REDIS_URL`` at the node's fault proxy), reports through :mod:`harness.reports`,
and, while it leads, moves events from a Redis Stream to a delivery list with fenced writes
(:class:`StreamMover`), so that the harness can count lost and duplicated events.

SIGTERM (or the end of stdin: the harness is gone) stops the election gracefully and exits 0.
The harness's commands on stdin (``stall``) are those of :mod:`tests.chaos.steering`.

``CHAOS_SABOTAGE`` breaks the node on purpose, to show that the harness notices:

- ``long-lease``: the node trusts its lease for 2 s while Redis's key lives for the configured
  lease only (as a node that ignores its lease's expiry would): two valid leaderships overlap
  as soon as the leader is cut off or paused (a thread on a connection straight to Redis,
  ``CHAOS_DIRECT_REDIS_URL``, keeps cutting the key's TTL back; see :class:`_KeyCutter`);
- ``unfenced-work``: the mover reads and writes without fencing tokens: a leader paused
  between its read and its write delivers events a second time;
- ``raise-on-demote``: an ``on_demoted`` callback raises (the library logs a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

from redis import Redis as BlockingRedis
from redis.asyncio import Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from fastapi_leader import LeaderElection, LeaderSettings
from fastapi_leader.redis_url import parse_broker_url
from fastapi_leader.transport.base import Names
from harness.reporter import NodeReporter
from harness.reports import emit

from .steering import follow_commands

log = logging.getLogger("chaos.node")

SABOTAGES = ("long-lease", "unfenced-work", "raise-on-demote")
# The lease the long-lease sabotage believes in: far beyond the key's TTL and the election
# timeout, so that an overlap cannot hide in a timing accident.
SABOTAGED_LEASE = 2.0

# Between the leader's read of new events and its write of them: the window in which a pause
# of the leader makes an unfenced mover deliver twice (real work takes time there too).
PROCESSING_SECONDS = 0.1
MOVE_INTERVAL = 0.02
BATCH = 50
# A command to a Redis that does not answer fails after this; the mover tries again.
REDIS_TIMEOUT = 0.5


def stream_keys(prefix: str, group: str) -> dict[str, str]:
    """The workload's keys, shared by the harness (which publishes and counts) and the nodes.
    Under the group's base, ``<prefix>:{<group>}``: on Redis Cluster the hash tag puts them
    in the group's slot, with the election's keys, so that one failover of that slot's
    primary hits the election and the workload together, and the fenced scripts, whose keys
    must share a slot, run there."""
    base = f"{Names(prefix, group, '').base}:chaos"
    return {
        "stream": f"{base}:events",
        "delivered": f"{base}:delivered",
        "checkpoint": f"{base}:checkpoint",
        "fence": f"{base}:fence",
    }


# KEYS: stream, checkpoint, fence. ARGV: token, batch. Claims the fence for ``token`` (refused,
# -1, if a newer token has claimed it) and returns the checkpoint and the entries after it.
# Claiming on the read matters: a stale leader that read before the new one and writes after
# it would otherwise pass the fence and deliver the same entries again.
_FENCED_READ = """
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[1]) < fence then return -1 end
redis.call('SET', KEYS[3], ARGV[1])
local last = redis.call('GET', KEYS[2]) or '0-0'
return {last, redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', ARGV[2])}
"""

# KEYS: delivered, checkpoint, fence. ARGV: token, new checkpoint, event ids... Delivers the
# events and advances the checkpoint, unless a newer token has claimed the fence (-1).
_FENCED_WRITE = """
local fence = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[1]) < fence then return -1 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('SET', KEYS[2], ARGV[2])
return #ARGV - 2
"""


def data_client(redis_url: str, timeout: float) -> Redis | RedisCluster:
    """A client of the workload's data for any of the library's URLs: one server, a Sentinel
    service's primary (each connection asks the sentinels, and a READONLY reply drops it:
    it follows a failover), or a Redis Cluster (a connection error makes the next command
    read the slot map again). Nothing is retried: a retried write whose reply was lost would
    be done twice, a duplicate that no leadership made."""
    url = parse_broker_url(redis_url)
    options: dict[str, object] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.topology == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in url.hosts],
            require_full_coverage=False,
            **options,  # type: ignore[arg-type]
        )
    if url.topology == "sentinel":
        assert url.service_name is not None
        sentinel = Sentinel(list(url.hosts), sentinel_kwargs=dict(options))
        return sentinel.master_for(url.service_name, db=url.db, **options)
    return Redis.from_url(redis_url, **options)  # type: ignore[arg-type]


class StreamMover:
    """The leader-only job: stream entries after the checkpoint go to the delivery list."""

    def __init__(
        self, redis: Redis | RedisCluster, keys: dict[str, str], *, fenced: bool = True
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.fenced = fenced
        self._read = redis.register_script(_FENCED_READ)
        self._write = redis.register_script(_FENCED_WRITE)

    async def move_once(self, token: int) -> int:
        """Move one batch with ``token``; -1 if the fence refused it."""
        keys = self.keys
        if self.fenced:
            read = await self._read(
                keys=[keys["stream"], keys["checkpoint"], keys["fence"]], args=[token, BATCH]
            )
            if read == -1:
                return -1
            _, entries = read
        else:
            last = _text(await self.redis.get(keys["checkpoint"]) or b"0-0")
            entries = await self.redis.xrange(keys["stream"], f"({last}", "+", count=BATCH)
        if not entries:
            return 0
        if self.fenced:
            await asyncio.sleep(PROCESSING_SECONDS)
        else:
            # Processing that holds the loop (CPU work, a sync client): a stop that lands in it
            # resumes straight into the write below, before the loop can run the demotion's
            # cancel. With an await here the runtime's prompt cancel usually won that race, and
            # the missing fence went unseen in some runs.
            time.sleep(PROCESSING_SECONDS)  # noqa: ASYNC251 (the point: it holds the loop)
        ids = [_event_id(fields) for _, fields in entries]
        checkpoint = entries[-1][0]
        if self.fenced:
            written = await self._write(
                keys=[keys["delivered"], keys["checkpoint"], keys["fence"]],
                args=[token, checkpoint, *ids],
            )
            return int(written)
        await self.redis.rpush(keys["delivered"], *ids)
        await self.redis.set(keys["checkpoint"], checkpoint)
        return len(ids)

    async def run(self, election: LeaderElection, token: int) -> None:
        """Move batches while this leadership lasts (the runtime cancels us when it ends)."""
        while election.fencing_token == token:
            try:
                if await self.move_once(token) < 0:
                    log.warning("mover: token %d refused by the fence", token)
                    return
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.warning("mover: %s", exc or type(exc).__name__)
            await asyncio.sleep(MOVE_INTERVAL)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _event_id(fields: dict[bytes, bytes] | list[bytes]) -> bytes:
    if isinstance(fields, dict):
        return fields[b"id"]
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))  # raw XRANGE reply from Lua
    return pairs[b"id"]


# KEYS: the leader key. ARGV: this node's holder prefix ("n1:"), the real lease (ms). Cuts the
# key's TTL back to the real lease if it is this node's and lives longer.
_CUT_TTL = """
local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
if redis.call('PTTL', KEYS[1]) > tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""
# How often the cutter looks: the key outlives the real lease by at most this (and a round
# trip), far less than the long lease's surplus.
CUT_INTERVAL = 0.01


class _KeyCutter:
    """long-lease: the core counts a long lease; Redis's key keeps the real one.

    A thread of its own, on a connection straight to Redis (``CHAOS_DIRECT_REDIS_URL``, not
    the node's fault proxy), cuts the key's TTL back every :data:`CUT_INTERVAL`. Cutting it
    after each renewal the node saw, through the proxy, let the sabotage slip now and then:
    when the net-cut began between a renewal and its cut, or swallowed the reply of a renewal
    that Redis had applied, the key kept the long TTL, expired with the node's own lease, and
    no overlap was there to catch.
    """

    def __init__(self, settings: LeaderSettings, direct_url: str) -> None:
        names = Names(settings.channel_prefix, settings.group, settings.node_id or "")
        self.key = names.leader_key
        self.holder_prefix = f"{settings.node_id}:"
        self.ttl_ms = int(settings.lease * 1000)
        self.client = BlockingRedis.from_url(
            direct_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self._script = self.client.register_script(_CUT_TTL)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-key-cutter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(CUT_INTERVAL):
            with contextlib.suppress(RedisError, OSError):
                self._script(keys=[self.key], args=[self.holder_prefix, self.ttl_ms])


def _sabotage_lease(election: LeaderElection, settings: LeaderSettings) -> _KeyCutter:
    """long-lease: the core is built from these timings at start. Its member expiry grows
    with the lease: at the default 1 s, the leader's "cannot hear itself" check would step it
    down a second after the cut, about when its successor is elected, and the overlap could
    shrink to nothing; so the node trusts its lease until it finds its subscription dead
    (~1.5 s) or the long lease ends."""
    election.timing = dataclasses.replace(
        election.timing, lease=SABOTAGED_LEASE, member_expiry=SABOTAGED_LEASE
    )
    direct = os.environ.get("CHAOS_DIRECT_REDIS_URL") or settings.redis_url
    return _KeyCutter(settings, direct)


async def main() -> None:
    sabotage = os.environ.get("CHAOS_SABOTAGE", "")
    if sabotage and sabotage not in SABOTAGES:
        raise SystemExit(f"unknown CHAOS_SABOTAGE {sabotage!r}; known: {', '.join(SABOTAGES)}")
    settings = LeaderSettings()
    reporter = NodeReporter()
    election = LeaderElection(settings, observer=reporter)
    reporter.attach(election)
    cutter = _sabotage_lease(election, settings) if sabotage == "long-lease" else None
    redis = data_client(settings.redis_url, REDIS_TIMEOUT)
    mover = StreamMover(
        redis,
        stream_keys(settings.channel_prefix, settings.group),
        fenced=sabotage != "unfenced-work",
    )

    @election.on_elected
    async def lead(token: int) -> None:
        await mover.run(election, token)

    if sabotage == "raise-on-demote":

        @election.on_demoted
        def fail() -> None:
            raise RuntimeError("sabotage: on_demoted raises")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    watcher = asyncio.create_task(follow_commands(stop.set, election.resign))
    emit("armed", sabotage=sabotage or None)
    try:
        if cutter is not None:
            cutter.start()
        await election.start()
        emit("joined")
        await stop.wait()
    finally:
        watcher.cancel()
        await election.stop()
        emit("left")
        if cutter is not None:
            cutter.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(redis.aclose(), 2.0)
    emit("exiting")


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(relativeCreated)8.0f %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main())
