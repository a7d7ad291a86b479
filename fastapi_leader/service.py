"""The election service: one node of a group, started on the app's event loop, run on its own.

:class:`LeaderElection` is the public face of the runtime. Its parts live beside it, one idea
a module:

- ``election_thread.py``: the process's election thread (its asyncio loop and APScheduler
  scheduler), shared by every election of the process;
- ``driver.py``: the core driven on that thread: transport in, commands out, the timer;
- ``callbacks.py``: callbacks and leader work, on the app's loop;
- ``watchdog.py``: how long the app's loop has not run;
- ``jobs.py``: leader-only APScheduler jobs of the user's, on the app's loop.

So a stall of the app's loop delays nothing of the protocol; what the user wrote runs where the
user expects it, on the loop :meth:`LeaderElection.start` was awaited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar, cast

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .callbacks import Callbacks
from .core import Election, Role, Status, Timing
from .driver import Driver, log
from .election_thread import ElectionThread
from .events import ElectionObserver, as_observers
from .jobs import ScheduledJobs
from .logs import install_default_handler
from .messages import Codec
from .settings import LeaderSettings, new_node_id
from .transport.base import Names, Transport
from .transport.factory import transport_for

__all__ = ["LeaderElection", "NotStarted"]

# How long leader work and on_demoted callbacks may take when leadership is handed over before
# the key is released anyway: a stuck callback must not keep the group leaderless.
DEFAULT_CALLBACK_TIMEOUT = 5.0

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


class NotStarted(RuntimeError):
    """The election service was used before :meth:`LeaderElection.start` (or after stop)."""


def _new_incarnation() -> int:
    # The start time in microseconds, then random bits: a later start compares larger (which
    # of two processes sharing one node id gives way), and two starts in the same microsecond
    # still differ. Below 2**60 until the year 2250.
    return (time.time_ns() // 1000) << 8 | secrets.randbits(8)


class LeaderElection:
    """One node of an election group.

    Args:
        settings: the configuration; by default read from ``LEADER_*`` environment variables.
        transport: a transport to use instead of the one ``settings.redis_url`` names (its
            names must match the settings' prefix and group, and node id if one is set).
        scheduler: an :class:`~apscheduler.schedulers.asyncio.AsyncIOScheduler` on the app's
            loop for the jobs of :meth:`scheduled_job` (started if it is not running; never shut
            down by us). By default the service makes one when it has such jobs. The protocol's
            own jobs run on the election thread's scheduler, whatever is passed here.
        callback_timeout: how long, on resign or shutdown, leader work and ``on_demoted``
            callbacks may take before the lease is released anyway.
        observer: an :class:`~fastapi_leader.events.ElectionObserver`, or several, told what
            the election does (role changes, elections, renewals, drops, stalls ...) on the
            election's thread: see :mod:`fastapi_leader.events`. More with
            :meth:`add_observer`.

    The election runs on a thread of its own (one per process, shared by its elections), so a
    stalled app loop does not cost the leadership; :attr:`is_leader`, :attr:`fencing_token` and
    :meth:`status` may be read from any thread.

    Callbacks (sync or async; register with the decorators) run on the app's loop, the one
    :meth:`start` was awaited on:

    - ``on_elected(token)``: this node became leader; ``token`` is the fencing token. An async
      callback runs as *leader work*: a task cancelled as soon as the leadership ends, before
      any ``on_demoted`` callback runs.
    - ``on_demoted()``: this node stopped being leader; always after that leadership's
      ``on_elected``, whose leader work has begun.
    - ``on_leader_change(leader_id)``: the leader this node knows changed (``None``: none). A
      leader that falls silent is reported gone within an election timeout, at the latest when
      this node stands; :attr:`leader_id` and :meth:`status` say so as soon as it has been
      silent for a lease.

    An exception in a callback is logged and never stops the election.
    """

    def __init__(
        self,
        settings: LeaderSettings | None = None,
        *,
        transport: Transport | None = None,
        scheduler: AsyncIOScheduler | None = None,
        callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT,
        observer: ElectionObserver | Iterable[ElectionObserver] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else LeaderSettings()
        self._observers = as_observers(observer)
        s = self.settings
        if transport is not None:
            names = transport.names
            if (names.prefix, names.group) != (s.channel_prefix, s.group) or (
                s.node_id is not None and names.node_id != s.node_id
            ):
                raise ValueError(
                    f"transport names {names} do not match the settings "
                    f"{Names(s.channel_prefix, s.group, s.node_id or names.node_id)}"
                )
        self._transport = transport
        self.callback_timeout = callback_timeout
        self.timing = Timing(
            heartbeat_interval=s.heartbeat_interval,
            lease=s.lease,
            election_timeout_min=s.election_timeout_min,
            election_timeout_max=s.election_timeout_max,
            member_expiry=s.member_expiry,
        )
        # While a key is rotated, messages carry a signature under each key (see the settings).
        keys = s.message_keys
        self._codec = Codec(s.group, keys, signers=max(1, len(keys)))
        self._drawn_id: tuple[int, str] | None = None  # (pid, id) of an id we drew
        self._callbacks = Callbacks(lambda: self.node_id, callback_timeout)
        self._jobs = ScheduledJobs(self, scheduler)
        # The jobs fire on the leader only: resumed first thing when elected, paused at the end.
        self._callbacks.registry.on_elected.append(self._jobs.leading)
        self._callbacks.registry.on_demoted.append(self._jobs.following)

        self.counters: Counter[str] = Counter()
        """Messages received and dropped (by reason), elections won, demotions, leader changes,
        failed commands, app-loop stalls, node-id conflicts and observer errors, since start
        (kept by an observer of the election's events, like any other)."""

        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._lifecycle = asyncio.Lock()
        self._thread: ElectionThread | None = None
        self._driver: Driver | None = None

    # ---- identity -----------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id: the configured one, or one drawn in this process (a forked child
        draws its own) and kept from :meth:`start` on."""
        if self._driver is not None:
            return self._driver.node_id
        if self.settings.node_id is not None:
            return self.settings.node_id
        if self._transport is not None:
            return self._transport.names.node_id
        drawn = self._drawn_id
        if drawn is None or drawn[0] != os.getpid():
            drawn = self._drawn_id = (os.getpid(), new_node_id())
        return drawn[1]

    @property
    def names(self) -> Names:
        """This node's channel and key names on the broker."""
        return Names(self.settings.channel_prefix, self.settings.group, self.node_id)

    @property
    def group(self) -> str:
        """The election group's name."""
        return self.settings.group

    # ---- callbacks ----------------------------------------------------------------------------

    def on_elected(self, callback: _F) -> _F:
        """Register ``callback(token)`` for when this node becomes leader (decorator)."""
        self._callbacks.registry.on_elected.append(callback)
        return callback

    def on_demoted(self, callback: _F) -> _F:
        """Register ``callback()`` for when this node stops being leader (decorator)."""
        self._callbacks.registry.on_demoted.append(callback)
        return callback

    def on_leader_change(self, callback: _F) -> _F:
        """Register ``callback(leader_id)`` for when the known leader changes (decorator)."""
        self._callbacks.registry.on_leader_change.append(callback)
        return callback

    def add_observer(self, observer: ElectionObserver) -> None:
        """Tell ``observer`` too what this election does, from :meth:`start` on (see
        :mod:`fastapi_leader.events`). Before :meth:`start` only."""
        if self._state != "new":
            raise RuntimeError("add_observer: the election has started; add observers before")
        self._observers.extend(as_observers(observer))

    @property
    def observers(self) -> tuple[ElectionObserver, ...]:
        """The observers this election tells, in order (``counters``' own not included)."""
        return tuple(self._observers)

    # ---- leader-only work ---------------------------------------------------------------------

    def leader_only(self, func: _F) -> _F:
        """``@leader_only`` bound to this election: see :func:`fastapi_leader.leader_only`.

        On a follower a call is skipped (``None``; a request answers 503); on the leader an
        async call runs as leader work, cancelled if the leadership ends before it does."""
        # The one implementation lives with the FastAPI face, which knows how to answer a
        # request; imported here, on use, because that module imports this one.
        from .leader_only import leader_only

        return cast(_F, leader_only(self)(func))

    def scheduled_job(self, trigger: Any, **trigger_args: Any) -> Callable[[_F], _F]:
        """Decorator: run the function on an APScheduler scheduler of the app's loop, on the
        leader only, so a cron-like task runs once per cluster instead of once per replica::

            @election.scheduled_job("interval", seconds=5)
            async def sweep() -> None: ...

        ``trigger`` and ``trigger_args`` are APScheduler's ``add_job`` arguments (``"cron",
        minute="*/5"``, ``"interval", seconds=30``, a trigger object ...). The job fires on every
        node; followers skip it. Registered before :meth:`start`, it is added at start.
        Returns the function unchanged."""
        return self._jobs.decorator(trigger, trigger_args)

    # ---- reading (any thread) -----------------------------------------------------------------

    def _read(self, reader: Callable[[Election, float], _T]) -> _T:
        driver = self._driver
        if driver is None:
            return reader(self._new_core(self.node_id, 0), time.monotonic())
        return driver.read(reader)

    @property
    def is_leader(self) -> bool:
        """Whether this node holds a valid lease *now*: read against the monotonic clock at each
        access, so it turns false on time even if nothing ran in between."""
        return self._read(Election.is_leader)

    @property
    def leader_id(self) -> str | None:
        """The live leader this node knows of (itself while leading), or ``None``."""
        return self.status().leader_id

    @property
    def fencing_token(self) -> int | None:
        """The term of this node's current leadership while it is valid, else ``None``.
        Strictly greater than every earlier leadership's token in the group."""
        return self._read(Election.fencing_token)

    @property
    def term(self) -> int:
        """The highest term this node has seen."""
        return self._read(lambda core, now: core.term)

    @property
    def role(self) -> Role:
        """``leader`` exactly while :attr:`is_leader` is true."""
        return self.status().role

    @property
    def running(self) -> bool:
        """Whether the service is started and not stopped."""
        return self._state == "running"

    def status(self) -> Status:
        """A snapshot of this node's view of the election, the lease read now."""
        return self._read(Election.status)

    @property
    def members(self) -> tuple[str, ...]:
        """Ids of the live members this node hears (itself included once it hears itself)."""
        return tuple(member.node_id for member in self.status().members)

    @property
    def loop_stall(self) -> float:
        """Seconds the app's event loop has not answered the election's probe (0 while it
        runs); past ``loop_stall_limit`` this node gives up the leadership."""
        driver = self._driver
        return 0.0 if driver is None else driver.watchdog.stall(time.monotonic())

    def _runtime_health(self) -> tuple[float, float | None] | None:
        """For the liveness probe: (seconds since the election thread last ran its watchdog
        round, seconds a leadership has outlived its lease or ``None``); ``None`` when not
        running."""
        driver = self._driver
        if driver is None or self._state != "running":
            return None

        def stale(core: Election, now: float) -> float | None:
            if core.role is not Role.LEADER:
                return None
            return max(0.0, now - core.lease_expires_at)

        now = time.monotonic()
        return max(0.0, now - driver.thread_ran_at), driver.read(stale)

    async def wait_until_leader(self, timeout: float | None = None) -> int:
        """Wait until this node leads; return its fencing token.

        Raises :class:`TimeoutError` after ``timeout`` seconds, :class:`NotStarted` if the
        service is not running."""
        token: int = await self._wait(lambda: self.fencing_token, timeout, "this node to lead")
        return token

    async def wait_for_leader(self, timeout: float | None = None) -> str:
        """Wait until some node (this one included) is known to lead; return its id."""
        leader: str = await self._wait(lambda: self.leader_id, timeout, "a leader to be elected")
        return leader

    async def _wait(self, probe: Callable[[], Any], timeout: float | None, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._state not in ("starting", "running"):
                raise NotStarted("the election service is not running")
            value = probe()
            if value is not None:
                return value
            changed = self._callbacks.changed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            # Leadership can also end by the clock alone (the lease runs out between events):
            # poll at heartbeat pace as well as on every change.
            step = self.timing.heartbeat_interval
            if remaining is not None:
                step = min(step, remaining)
            if changed is None:
                await asyncio.sleep(step)
                continue
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), step)

    # ---- lifecycle ----------------------------------------------------------------------------

    def _new_core(self, node_id: str, incarnation: int) -> Election:
        return Election(
            node_id,
            self.settings.group,
            self.timing,
            rng=random.Random(),
            url=self.settings.advertise_url,
            incarnation=incarnation,
            # Sequence numbers start from the wall clock in microseconds, so that even a node
            # of an older version (which counts them per id, not per incarnation) never drops
            # this incarnation's messages as replays of an earlier one's.
            first_seq=time.time_ns() // 1000,
        )

    async def start(self) -> None:
        """Connect to the broker, join the group as a follower and start the jobs.

        Idempotent. Raises :class:`~fastapi_leader.transport.BrokerUnavailable` if the broker
        cannot be reached, so that a misconfigured node fails at startup, loudly."""
        async with self._lifecycle:
            if self._state == "running":
                return
            if self._state != "new":
                raise RuntimeError("a stopped LeaderElection cannot be started again")
            self._state = "starting"
            try:
                await self._start()
            except BaseException:
                await self._abandon()
                self._state = "new"
                raise
            self._state = "running"
            install_default_handler()  # seen under plain uvicorn (see logs.py)

            log.info(
                "node %s joined group %r on %s",
                self.node_id,
                self.group,
                self.settings.redis_url_redacted,
            )

    async def _start(self) -> None:
        app_loop = asyncio.get_running_loop()
        node_id = self.node_id  # drawn now, in the process that runs the election
        names = Names(self.settings.channel_prefix, self.settings.group, node_id)
        transport = self._transport
        if transport is None:
            transport = transport_for(self.settings, names)
        self._thread = thread = ElectionThread.acquire()
        self.counters.clear()
        self._callbacks.start()
        self._driver = Driver(
            core=self._new_core(node_id, _new_incarnation()),
            codec=self._codec,
            transport=transport,
            thread=thread,
            callbacks=self._callbacks,
            app_loop=app_loop,
            counters=self.counters,
            loop_stall_limit=self.settings.loop_stall_limit,
            observers=self._observers,
        )
        await self._on_thread(self._driver.start())
        self._jobs.start()

    async def _abandon(self) -> None:
        # A failed start: the driver closed its transport; undo the rest.
        self._driver = None
        await self._callbacks.stop()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.release()

    async def _on_thread(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await ``coro`` run on the election thread; finish it even if we are cancelled."""
        assert self._thread is not None
        future = asyncio.wrap_future(self._thread.submit(coro))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await future
            raise

    async def stop(self) -> None:
        """Leave the group: stop leader work, hand leadership over (release the key, name a
        successor), say goodbye, stop the jobs and close the connections. Idempotent; safe to
        call from a cancelled task (the handover still completes, bounded by timeouts)."""
        async with self._lifecycle:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return
            self._state = "stopping"
            try:
                if self._driver is not None:
                    # Leader work, running jobs included, is cancelled and awaited in here,
                    # before the handover; the jobs stop after it, skipping on a follower.
                    await self._on_thread(self._driver.leave())
            finally:
                self._jobs.stop()
                try:
                    await self._callbacks.stop()
                finally:
                    self._state = "stopped"
                    thread, self._thread = self._thread, None
                    if thread is not None:
                        thread.release()
                    log.info("node %s left group %r", self.node_id, self.group)

    async def resign(self) -> bool:
        """Give up the leadership, if held: stop leader work, release the key and name a
        successor, which takes over within a few broker round trips. This node stays in the
        group as a follower. Returns whether this node was leader."""
        if self._state != "running" or self._driver is None:
            raise NotStarted("the election service is not running")
        return await self._on_thread(self._driver.resign())
