"""The alternatives we measure ourselves against, as benchmark nodes (see ``node.py``).

``tooz``: OpenStack tooz's leader election on its Redis driver, used as its documentation shows:
``get_coordinator(url, member)``, ``start(start_heart=True)``, ``create_group``/``join_group``,
``watch_elected_as_leader`` and ``run_watchers()`` called in a loop. Its only knob is the URL's
``timeout=`` (whole seconds, default 30): the socket timeout, the leader lock's TTL and the
membership TTL at once; the heart renews them every ``timeout / 2``. tooz's Redis driver has no
``get_leader`` and no demotion callback: a follower cannot name the leader, and a leader is never
told that its lock expired. So a tooz leader's ``lease_end`` is ``null`` (unknown) and its
leadership, as the node sees it, lasts until the process stops.

``leaselock``: a Kubernetes-style lease lock written by hand on one key: followers ``GET`` it
every retry period and take it with ``SET key id NX PX ttl`` when it is free; the holder extends
it every renew period with a compare-and-``PEXPIRE`` script, reads its own lease as "last
successful renewal *sent* + ttl" on the monotonic clock, steps down when that passes or a renewal
finds the key gone, and on shutdown deletes the key if it still holds it (client-go's
``ReleaseOnCancel``). Defaults 15 s / 10 s / 2 s (``LeaseDuration``, ``RenewDeadline``,
``RetryPeriod`` of client-go, read here as TTL, renew period and retry period).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

Emit = Callable[..., None]


def tooz_factory(args: argparse.Namespace, emit: Emit) -> Callable[[str, str], Any]:
    from tooz import coordination

    # tooz reads host and port from the URL and its options from the query string.
    parts = urlsplit(args.redis_url)
    url = urlunsplit(parts._replace(path="", query=f"timeout={args.tooz_timeout}"))
    poll = args.tooz_poll

    class ToozNode:
        def __init__(self, group: str, node_id: str) -> None:
            self.node_id = node_id
            self.group = group.encode()
            self.coordinator = coordination.get_coordinator(url, node_id.encode())
            self.leading = False
            self.commands: Counter[str] = Counter()
            self._done = threading.Event()
            self._poller: threading.Thread | None = None

        def _count_commands(self) -> None:
            """Count what the coordinator's client sends (pipelines, used only to join and
            leave, are not counted)."""
            client = self.coordinator._client
            send = client.execute_command

            def counted(*command: Any, **options: Any) -> Any:
                role = "leader" if self.leading else "follower"
                self.commands[f"{role}:{str(command[0]).lower()}"] += 1
                return send(*command, **options)

            client.execute_command = counted

        def _join(self) -> None:
            self.coordinator.start(start_heart=True)
            self._count_commands()
            with contextlib.suppress(coordination.GroupAlreadyExist):
                self.coordinator.create_group(self.group).get()
            self.coordinator.join_group(self.group).get()
            self.coordinator.watch_elected_as_leader(self.group, self._elected)

        def _elected(self, event: Any) -> None:
            self.leading = True
            emit("elected", self.node_id, lease_end=None)
            emit("leader", self.node_id, leader=self.node_id)

        def _poll_forever(self) -> None:
            failures = 0
            while True:
                try:
                    self.coordinator.run_watchers()
                except Exception as exc:
                    failures += 1
                    if failures in (1, 10, 100):
                        emit("error", self.node_id, error=f"run_watchers: {exc!r}")
                if self._done.wait(poll):
                    return

        async def start(self) -> None:
            await asyncio.to_thread(self._join)
            self._poller = threading.Thread(target=self._poll_forever, daemon=True)
            self._poller.start()

        async def stop(self) -> None:
            self._done.set()
            if self._poller is not None:
                await asyncio.to_thread(self._poller.join)
            if self.leading:
                # The application stops its leader work before tooz releases the lock.
                self.leading = False
                emit("demoted", self.node_id)
            await asyncio.to_thread(self.coordinator.stop)

        def stats(self) -> dict[str, Any]:
            return {
                "role": "leader" if self.leading else "follower",
                "commands": dict(self.commands),
            }

    return ToozNode


_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def leaselock_factory(args: argparse.Namespace, emit: Emit) -> Callable[[str, str], Any]:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    ttl, renew_period, retry_period = args.ttl, args.renew, args.retry
    ttl_ms = round(ttl * 1000)

    class LeaseLockNode:
        def __init__(self, group: str, node_id: str) -> None:
            self.node_id = node_id
            self.key = f"leaselock:{group}:leader"
            # A command slower than the retry period is as good as lost.
            self.redis = Redis.from_url(
                args.redis_url, socket_timeout=retry_period, socket_connect_timeout=2.0
            )
            self.renew_script = self.redis.register_script(_RENEW)
            self.release_script = self.redis.register_script(_RELEASE)
            self.lease_end: float | None = None  # set while leading
            self.known: str | None = None
            self.commands: Counter[str] = Counter()
            self._task: asyncio.Task[None] | None = None

        def _count(self, kind: str) -> None:
            role = "leader" if self.lease_end is not None else "follower"
            self.commands[f"{role}:{kind}"] += 1

        def _know(self, leader: str | None) -> None:
            if leader != self.known:
                self.known = leader
                emit("leader", self.node_id, leader=leader)

        def _demote(self) -> None:
            self.lease_end = None
            emit("demoted", self.node_id)
            self._know(None)

        async def _lead(self) -> None:
            """Renew every renew period until the lease passes or the key is gone."""
            assert self.lease_end is not None
            next_renew = time.monotonic() + renew_period
            while True:
                await asyncio.sleep(max(0.0, min(next_renew, self.lease_end) - time.monotonic()))
                now = time.monotonic()
                if now >= self.lease_end:
                    self._demote()  # read against our own clock: the lease ran out
                    return
                sent = time.monotonic()
                self._count("renew")
                try:
                    renewed = await self.renew_script(keys=[self.key], args=[self.node_id, ttl_ms])
                except RedisError:
                    next_renew = time.monotonic() + retry_period
                    continue
                if not renewed:
                    self._demote()
                    return
                self.lease_end = sent + ttl
                emit("lease", self.node_id, lease_end=self.lease_end)
                next_renew = sent + renew_period

        async def _try_acquire(self) -> None:
            self._count("get")
            holder = await self.redis.get(self.key)
            if holder is not None:
                self._know(holder.decode())
                return
            self._know(None)
            sent = time.monotonic()
            self._count("set_nx")
            if await self.redis.set(self.key, self.node_id, nx=True, px=ttl_ms):
                self.lease_end = sent + ttl
                returned = time.monotonic()
                emit("lease", self.node_id, t=returned, lease_end=self.lease_end, acquired=True)
                emit("elected", self.node_id, lease_end=self.lease_end)
                self._know(self.node_id)

        async def _run(self) -> None:
            while True:
                if self.lease_end is not None:
                    await self._lead()
                    continue
                with contextlib.suppress(RedisError):
                    await self._try_acquire()
                if self.lease_end is None:
                    await asyncio.sleep(retry_period)

        async def start(self) -> None:
            await self.redis.ping()
            self._task = asyncio.create_task(self._run())

        async def stop(self) -> None:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self.lease_end is not None:
                self._count("release")
                self._demote()  # leader work stops before the key is given back
                with contextlib.suppress(RedisError):
                    await self.release_script(keys=[self.key], args=[self.node_id])
            await self.redis.aclose()

        def stats(self) -> dict[str, Any]:
            return {
                "role": "leader" if self.lease_end is not None else "follower",
                "commands": dict(self.commands),
            }

    return LeaseLockNode
