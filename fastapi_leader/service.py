"""The asyncio runtime: drives the election core with APScheduler jobs and a transport.

Data flows one way. The transport hands raw messages to :class:`LeaderElection`, which decodes
them (counting rejections), feeds them to the core with the current monotonic time, and carries
out what the core returns: commands go to one sender task, in order, over the transport; events
go to one callback task, in order, so a slow user callback never delays the protocol.

One APScheduler job keeps time: a timer armed at the core's :attr:`~Election.next_tick_at`
(the leader's next renewal, a follower's next presence beat or election deadline), moved only
when that deadline comes earlier. Nothing ticks at a fixed rate, so an idle follower wakes a few
times a second, not every heartbeat; on a machine hosting many nodes that is most of their cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .core import (
    Acquire,
    AllocateTerm,
    Command,
    Demoted,
    Elected,
    Election,
    Event,
    LeaderChanged,
    Output,
    Release,
    Renew,
    Role,
    RoleChanged,
    Send,
    Status,
    Timing,
)
from .messages import Codec, MessageRejected
from .settings import LeaderSettings
from .transport.base import BrokerUnavailable, Names, Transport
from .transport.memory import MemoryBroker, MemoryTransport
from .transport.redis import RedisTransport

__all__ = ["LeaderElection", "NotStarted"]

log = logging.getLogger("fastapi_leader")

# Our jobs run on an executor of their own so that APScheduler's per-run INFO lines ("Running
# job ...", several a second) can be silenced without touching the user's jobs.
EXECUTOR = "fastapi-leader"
logging.getLogger(f"apscheduler.executors.{EXECUTOR}").setLevel(logging.WARNING)


class _JobExecutor(AsyncIOExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """APScheduler's asyncio executor, for the election's own job, minus one false alarm.

    Shutting a scheduler down (ours on :meth:`LeaderElection.stop`, or a user's own) cancels the
    tasks of jobs that were submitted but have not started yet, and APScheduler logs each as
    "Error running job" with a ``CancelledError`` traceback. Our job is a tick, one synchronous
    step that the stopped core would ignore anyway: a tick cancelled before it ran is the normal
    end of it, not an error. Any other exception is still logged."""

    def _run_job_error(self, job_id: str, exc: BaseException, traceback: Any = None) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self._run_job_success(job_id, [])  # APScheduler's bookkeeping, without the log line
            return
        super()._run_job_error(job_id, exc, traceback)


# How long leader work and on_demoted callbacks may take when leadership is handed over before
# the key is released anyway: a stuck callback must not keep the group leaderless.
DEFAULT_CALLBACK_TIMEOUT = 5.0

_F = TypeVar("_F", bound=Callable[..., Any])
Callback = Callable[..., Any]
_JobSpec = tuple[Callable[..., Any], Any, dict[str, Any]]


class NotStarted(RuntimeError):
    """The election service was used before :meth:`LeaderElection.start` (or after stop)."""


_MEMORY_BROKER: MemoryBroker | None = None


def _process_broker() -> MemoryBroker:
    """The one in-memory broker of this process, for ``LEADER_REDIS_URL=memory://``."""
    global _MEMORY_BROKER
    if _MEMORY_BROKER is None:
        _MEMORY_BROKER = MemoryBroker()
    return _MEMORY_BROKER


class LeaderElection:
    """One node of an election group, running on the current asyncio event loop.

    Args:
        settings: the configuration; by default read from ``LEADER_*`` environment variables.
        transport: a transport to use instead of the one ``settings.redis_url`` names (its
            names must match the settings' prefix, group and node id).
        scheduler: an :class:`~apscheduler.schedulers.asyncio.AsyncIOScheduler` to run the
            election's jobs on (started if it is not running; never shut down by us). By
            default the service creates, starts and shuts down its own.
        callback_timeout: how long, on resign or shutdown, leader work and ``on_demoted``
            callbacks may take before the lease is released anyway.

    Callbacks (sync or async; register with the decorators or pass lists):

    - ``on_elected(token)``: this node became leader; ``token`` is the fencing token. An async
      callback runs as *leader work*: a task cancelled as soon as the leadership ends, before
      any ``on_demoted`` callback runs.
    - ``on_demoted()``: this node stopped being leader.
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
    ) -> None:
        self.settings = settings if settings is not None else LeaderSettings()
        s = self.settings
        self.names = Names(s.channel_prefix, s.group, s.node_id)
        if transport is not None and transport.names != self.names:
            raise ValueError(
                f"transport names {transport.names} do not match the settings {self.names}"
            )
        self._transport = transport
        self._owns_transport = transport is None
        self._scheduler = scheduler
        self._owns_scheduler = scheduler is None
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
        self._core = self._new_core()

        self._on_elected: list[Callback] = []
        self._on_demoted: list[Callback] = []
        self._on_leader_change: list[Callback] = []
        self._user_jobs: list[_JobSpec] = []

        self.counters: Counter[str] = Counter()
        """Messages received and dropped (by reason), elections won, demotions, leader changes
        and failed commands, since start."""

        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._lifecycle = asyncio.Lock()
        self._outbox: asyncio.Queue[Command] | None = None
        self._events: asyncio.Queue[Event] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._leader_work: set[asyncio.Task[Any]] = set()
        # Leader work we cancelled, as opposed to work whose caller was cancelled.
        self._revoked: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._jobs: list[Job] = []
        self._timer: Job | None = None
        self._timer_at: float | None = None
        self._changed = asyncio.Event()
        self._held: list[Command] | None = None  # commands held back during a handover

    def _new_core(self) -> Election:
        return Election(
            self.settings.node_id,
            self.settings.group,
            self.timing,
            rng=random.Random(),
            url=self.settings.advertise_url,
            # Sequence numbers must outlive a restart under the same node id, or the group
            # would drop the new process's messages as replays: start from the wall clock in
            # microseconds, which no earlier process can have counted up to.
            first_seq=time.time_ns() // 1000,
        )

    # ---- callbacks ----------------------------------------------------------------------------

    def on_elected(self, callback: _F) -> _F:
        """Register ``callback(token)`` for when this node becomes leader (decorator)."""
        self._on_elected.append(callback)
        return callback

    def on_demoted(self, callback: _F) -> _F:
        """Register ``callback()`` for when this node stops being leader (decorator)."""
        self._on_demoted.append(callback)
        return callback

    def on_leader_change(self, callback: _F) -> _F:
        """Register ``callback(leader_id)`` for when the known leader changes (decorator)."""
        self._on_leader_change.append(callback)
        return callback

    # ---- leader-only work ---------------------------------------------------------------------

    def leader_only(self, func: _F) -> _F:
        """Wrap a sync or async function so that it runs only while this node leads; on a
        follower the call is skipped (logged at debug level) and returns ``None``. The lease is
        read at the moment of the call."""
        name = _name(func)
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def guarded_async(*args: Any, **kwargs: Any) -> Any:
                if not self.is_leader:
                    log.debug("node %s: skipped %s: not the leader", self.node_id, name)
                    return None
                # A call that outlives the leadership is leader work like an async on_elected:
                # cancelled when the leadership ends, and awaited before on_demoted and the
                # handover, so a job never writes on after a successor has taken over, nor
                # past the lifespan's shutdown into resources already closed.
                task = asyncio.create_task(
                    func(*args, **kwargs), name=f"fastapi-leader leader work {name}"
                )
                self._leader_work.add(task)
                task.add_done_callback(self._leader_work.discard)
                try:
                    return await task
                except asyncio.CancelledError:
                    if task in self._revoked:
                        log.info("node %s: %s cancelled: leadership ended", self.node_id, name)
                        return None
                    raise

            return guarded_async  # type: ignore[return-value]

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if not self.is_leader:
                log.debug("node %s: skipped %s: not the leader", self.node_id, name)
                return None
            return func(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    def scheduled_job(self, trigger: Any, **trigger_args: Any) -> Callable[[_F], _F]:
        """Decorator: run the function on the election's scheduler, on the leader only, so a
        cron-like task runs once per cluster instead of once per replica or worker::

            @election.scheduled_job("interval", seconds=5)
            async def sweep() -> None: ...

        ``trigger`` and ``trigger_args`` are APScheduler's ``add_job`` arguments (``"cron",
        minute="*/5"``, ``"interval", seconds=30``, a trigger object ...). The job fires on every
        node; followers skip it. Registered before :meth:`start`, it is added at start.
        Returns the function unchanged."""

        def register(func: _F) -> _F:
            options = {"coalesce": True, "max_instances": 1, **trigger_args}
            options.setdefault("id", f"fastapi-leader:{self.group}:job:{_name(func)}")
            options.setdefault("name", _name(func))
            spec = (self.leader_only(func), trigger, options)
            self._user_jobs.append(spec)
            if self._scheduler is not None and self._state == "running":
                self._add_user_job(self._scheduler, spec)
            return func

        return register

    def _add_user_job(self, scheduler: AsyncIOScheduler, spec: _JobSpec) -> None:
        func, trigger, options = spec
        self._jobs.append(scheduler.add_job(func, trigger, replace_existing=True, **options))

    # ---- reading ------------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.settings.node_id

    @property
    def group(self) -> str:
        """The election group's name."""
        return self.settings.group

    @property
    def is_leader(self) -> bool:
        """Whether this node holds a valid lease *now*: read against the monotonic clock at each
        access, so it turns false on time even if the event loop was blocked or paused."""
        return self._core.is_leader(time.monotonic())

    @property
    def leader_id(self) -> str | None:
        """The live leader this node knows of (itself while leading), or ``None``."""
        return self._core.status(time.monotonic()).leader_id

    @property
    def fencing_token(self) -> int | None:
        """The term of this node's current leadership while it is valid, else ``None``.
        Strictly greater than every earlier leadership's token in the group."""
        return self._core.fencing_token(time.monotonic())

    @property
    def term(self) -> int:
        """The highest term this node has seen."""
        return self._core.term

    @property
    def role(self) -> Role:
        """``leader`` exactly while :attr:`is_leader` is true."""
        return self._core.status(time.monotonic()).role

    @property
    def running(self) -> bool:
        """Whether the service is started and not stopped."""
        return self._state == "running"

    def status(self) -> Status:
        """A snapshot of this node's view of the election, the lease read now."""
        return self._core.status(time.monotonic())

    @property
    def members(self) -> tuple[str, ...]:
        """Ids of the live members this node hears (itself included once it hears itself)."""
        return tuple(member.node_id for member in self.status().members)

    async def wait_until_leader(self, timeout: float | None = None) -> int:
        """Wait until this node leads; return its fencing token.

        Raises :class:`TimeoutError` after ``timeout`` seconds, :class:`NotStarted` if the
        service is not running."""
        token: int = await self._wait(self._token_if_leader, timeout, "this node to become leader")
        return token

    async def wait_for_leader(self, timeout: float | None = None) -> str:
        """Wait until some node (this one included) is known to lead; return its id."""
        leader: str = await self._wait(lambda: self.leader_id, timeout, "a leader to be elected")
        return leader

    def _token_if_leader(self) -> int | None:
        return self.fencing_token

    async def _wait(self, probe: Callable[[], Any], timeout: float | None, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._state not in ("starting", "running"):
                raise NotStarted("the election service is not running")
            value = probe()
            if value is not None:
                return value
            changed = self._changed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            # Leadership can also end by the clock alone (the lease runs out between events):
            # poll at heartbeat pace as well as on every change.
            step = self.timing.heartbeat_interval
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    changed.wait(), step if remaining is None else min(step, remaining)
                )

    # ---- lifecycle ----------------------------------------------------------------------------

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
                await self._teardown()
                if self._owns_transport:
                    # _teardown closed it, and a closed transport cannot start again: a retry
                    # would fail with "the transport is closed". Build a fresh one then.
                    self._transport = None
                self._state = "new"
                self._core = self._new_core()
                raise
            self._state = "running"
            log.info(
                "node %s joined group %r on %s",
                self.node_id,
                self.group,
                self.settings.redis_url_redacted,
            )

    async def _start(self) -> None:
        self._outbox = asyncio.Queue()
        self._events = asyncio.Queue()
        self._changed = asyncio.Event()
        if self._transport is None:
            self._transport = self._make_transport()
        self._tasks = [
            asyncio.create_task(self._send_forever(), name=f"fastapi-leader sender {self.node_id}"),
            asyncio.create_task(
                self._dispatch_forever(), name=f"fastapi-leader callbacks {self.node_id}"
            ),
        ]
        await self._transport.start(self)
        self._apply(self._core.start(time.monotonic()))
        self._start_jobs()

    def _make_transport(self) -> Transport:
        url = self.settings.redis_url
        if url.startswith("memory://"):
            return MemoryTransport(_process_broker(), self.names)
        # A command slower than the lease is worthless: by then the leadership it serves is over.
        return RedisTransport(
            url,
            self.names,
            command_timeout=max(self.settings.lease, 0.25),
            ssl_options=self.settings.redis_ssl_options,
        )

    def _start_jobs(self) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            scheduler = self._scheduler = AsyncIOScheduler(timezone=timezone.utc)
        if EXECUTOR not in scheduler._executors:  # no public lookup exists
            scheduler.add_executor(_JobExecutor(), alias=EXECUTOR)
        if not scheduler.running:
            scheduler.start()
        tag = f"fastapi-leader:{self.group}:{self.node_id}"
        # The timer is one job, armed by moving its next run time (so no job is added or
        # removed, and logged, per tick); every tick arms it again for the core's next deadline.
        # Its interval, one heartbeat, only matters if a run is lost: APScheduler skips a run
        # while the previous one still counts as running, and a tick re-arms the timer before
        # APScheduler has counted it finished, so on a busy loop a deadline due at once can
        # fall in that gap. The skipped run is then retried a beat later, not forgotten (a
        # leader's renewals, and with them its leadership, would be). Running instances are
        # allowed to overlap for the same reason: a tick is one synchronous step, and an extra
        # one does nothing.
        self._timer = scheduler.add_job(
            self._tick,
            "interval",
            seconds=self.timing.heartbeat_interval,
            id=f"{tag}:timer",
            name=f"{tag}:timer",
            executor=EXECUTOR,
            coalesce=True,
            max_instances=4,
            misfire_grace_time=None,
        )
        self._jobs = [self._timer]
        self._timer_at = None
        self._arm_timer()
        for spec in self._user_jobs:
            self._add_user_job(scheduler, spec)

    async def stop(self) -> None:
        """Leave the group: stop leader work, hand leadership over (release the key, name a
        successor), say goodbye, stop the jobs and close the connections. Idempotent; safe to
        call from a cancelled task (the handover still completes, bounded by timeouts)."""
        async with self._lifecycle:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return
            self._state = "stopping"
            task = asyncio.ensure_future(self._leave())
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await task  # finish leaving even if our caller is being cancelled
                raise
            finally:
                self._state = "stopped"
                self._changed.set()

    async def _leave(self) -> None:
        self._stop_jobs()
        try:
            await self._in_order(self._core.leave(time.monotonic()))
        finally:
            await self._teardown()
            log.info("node %s left group %r", self.node_id, self.group)

    async def resign(self) -> bool:
        """Give up the leadership, if held: stop leader work, release the key and name a
        successor, which takes over within a few broker round trips. This node stays in the
        group as a follower. Returns whether this node was leader."""
        if self._state != "running":
            raise NotStarted("the election service is not running")
        outputs = self._core.resign(time.monotonic())
        await self._in_order(outputs)
        return any(isinstance(o, Demoted) for o in outputs)

    async def _in_order(self, outputs: list[Output]) -> None:
        """Carry out a handover's outputs strictly in order: every callback (leader work
        cancelled, ``on_demoted`` run) before any command, and every command sent before this
        returns. Bounded by the callback timeout and the transport's command timeout."""
        events = [o for o in outputs if not isinstance(o, _COMMANDS)]
        commands = [o for o in outputs if isinstance(o, _COMMANDS)]
        # While the callbacks run, the core goes on (a presence beat, a vote) and its messages
        # carry later sequence numbers than the handover's: were they sent first, every node
        # would drop the handover as a replay, and the group would wait out an election
        # timeout. Hold them back until this handover's commands are queued.
        # (Nested in another handover, it holds nothing itself: its commands join the outer
        # one's held list, behind the outer one's own.)
        outer = self._held is None
        if outer:
            self._held = []
        try:
            self._apply(events)
            if self._events is not None:
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._events.join(), self.callback_timeout)
        finally:
            held: list[Command] = []
            if outer:
                held, self._held = self._held or [], None
        self._apply(commands)
        self._apply(held)
        if self._outbox is not None:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox.join(), self.callback_timeout)

    async def _teardown(self) -> None:
        self._cancel_leader_work()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # Cancel again until it ends: before Python 3.12, asyncio.wait_for swallows a
            # cancellation that lands as its inner call completes (the sender's commands run
            # in one), and the task then waits on its queue for ever, and stop() with it.
            while not task.done():
                await asyncio.wait([task], timeout=1.0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._transport is not None:
            await self._transport.close()
        self._stop_jobs()

    def _stop_jobs(self) -> None:
        scheduler = self._scheduler
        if self._owns_scheduler:
            if scheduler is not None and scheduler.running:
                scheduler.shutdown(wait=False)
            self._scheduler = None
        else:
            for job in self._jobs:
                with contextlib.suppress(Exception):  # already gone
                    job.remove()
        self._jobs, self._timer = [], None

    # ---- Sink: what the transport reports -----------------------------------------------------

    def message_received(self, data: bytes) -> None:
        """Transport callback: one raw message from the broker."""
        self.counters["messages_received"] += 1
        try:
            message = self._codec.decode(data)
        except MessageRejected as exc:
            self.counters[f"dropped_{exc.reason.value}"] += 1
            log.debug("node %s dropped a message: %s", self.node_id, exc)
            return
        # The core drops replays and out-of-range terms itself: count those too, by reason.
        dropped = dict(self._core.dropped)
        self._apply(self._core.receive(message, time.monotonic()))
        for reason, count in self._core.dropped.items():
            if count != dropped.get(reason, 0):
                self.counters[f"dropped_{reason}"] += count - dropped.get(reason, 0)

    def connection_lost(self) -> None:
        """Transport callback: the subscription broke."""
        self.counters["connection_lost"] += 1
        self._apply(self._core.connection_lost(time.monotonic()))

    def connection_restored(self) -> None:
        """Transport callback: the subscription is back."""
        self._apply(self._core.connection_restored(time.monotonic()))

    # ---- jobs ---------------------------------------------------------------------------------

    async def _tick(self) -> None:
        self._timer_at = None
        self._apply(self._core.tick(time.monotonic()))

    def _arm_timer(self) -> None:
        deadline = self._core.next_tick_at
        timer = self._timer
        if deadline is None or timer is None:
            return
        armed = self._timer_at
        if armed is not None and (armed <= deadline or armed <= time.monotonic()):
            # Armed early enough: a deadline that moved later is re-armed when the timer fires.
            # Or due already, its tick queued on a busy loop: that tick re-arms, and moving
            # the job now would only make APScheduler skip the second run, with a warning.
            return
        self._timer_at = deadline
        # A millisecond late, so the tick never reads a clock a hair before the deadline.
        delay = max(0.0, deadline - time.monotonic()) + 0.001
        with contextlib.suppress(Exception):  # the job is gone while stopping
            timer.modify(next_run_time=datetime.now(timezone.utc) + timedelta(seconds=delay))

    # ---- carrying out the core's outputs ------------------------------------------------------

    def _apply(self, outputs: Sequence[Output]) -> None:
        changed = False
        for output in outputs:
            if isinstance(output, _COMMANDS):
                if self._held is not None:
                    self._held.append(output)  # see _in_order
                elif self._outbox is not None:
                    self._outbox.put_nowait(output)
                continue
            changed = True
            if isinstance(output, RoleChanged):
                log.info(
                    "node %s: %s -> %s (term %d): %s",
                    self.node_id,
                    output.old.value,
                    output.new.value,
                    output.term,
                    output.reason,
                )
                continue
            if isinstance(output, Elected):
                self.counters["elections_won"] += 1
            elif isinstance(output, Demoted):
                self.counters["demotions"] += 1
                # Leader work stops now, before any later command or callback.
                self._cancel_leader_work()
            elif isinstance(output, LeaderChanged):
                self.counters["leader_changes"] += 1
                log.info(
                    "node %s: leader is %s (term %d)",
                    self.node_id,
                    output.leader_id or "unknown",
                    output.term,
                )
            if self._events is not None:
                self._events.put_nowait(output)
        if changed:
            self._changed.set()
            self._changed = asyncio.Event()
        self._arm_timer()

    async def _send_forever(self) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        while True:
            command = await outbox.get()
            try:
                await self._send(command)
            except Exception:  # a bug, not a broker fault: keep the node alive and say so
                log.exception("node %s: unexpected error sending %r", self.node_id, command)
            finally:
                outbox.task_done()

    async def _send(self, command: Command) -> None:
        transport = self._transport
        assert transport is not None
        core = self._core
        # Read before sending: the lease then ends no later than Redis's TTL does.
        sent_at = time.monotonic()
        try:
            if isinstance(command, Send):
                await transport.publish(self._codec.encode(command.message), command.to)
            elif isinstance(command, AllocateTerm):
                term = await transport.allocate_term(command.floor)
                self._apply(core.term_allocated(term, time.monotonic()))
            elif isinstance(command, Acquire):
                announce = self._codec.encode(command.announce)
                acquired = await transport.acquire(command.term, command.ttl, announce)
                self._apply(core.acquire_result(command.term, acquired, sent_at, time.monotonic()))
            elif isinstance(command, Renew):
                announce = self._codec.encode(command.announce)
                renewed = await transport.renew(command.term, command.ttl, announce)
                self._apply(core.renew_result(command.term, renewed, sent_at, time.monotonic()))
            elif isinstance(command, Release):
                goodbye = command.announce
                await transport.release(
                    command.term, None if goodbye is None else self._codec.encode(goodbye)
                )
        except (BrokerUnavailable, TimeoutError, asyncio.TimeoutError) as exc:
            self.counters["commands_failed"] += 1
            log.debug("node %s: %s failed: %s", self.node_id, type(command).__name__, exc)
            now = time.monotonic()
            if isinstance(command, AllocateTerm):
                self._apply(core.term_failed(now))
            elif isinstance(command, Acquire):
                # No answer is not "no": the key may be ours. Give it back if so, and stand
                # again later rather than lead on a lease we cannot date.
                self._apply(core.acquire_result(command.term, False, sent_at, now))
                self._apply([Release(term=command.term, announce=None)])
            elif isinstance(command, Renew):
                self._apply(core.renew_result(command.term, None, sent_at, now))

    # ---- callbacks ----------------------------------------------------------------------------

    def _cancel_leader_work(self) -> None:
        for task in self._leader_work:
            self._revoked.add(task)
            task.cancel()

    async def _dispatch_forever(self) -> None:
        assert self._events is not None
        events = self._events
        while True:
            event = await events.get()
            try:
                await self._dispatch(event)
            except Exception:
                log.exception("node %s: error dispatching %r", self.node_id, event)
            finally:
                events.task_done()

    async def _dispatch(self, event: Event) -> None:
        if isinstance(event, Elected):
            if self._core.fencing_token(time.monotonic()) != event.term:
                return  # already over: no leader work for a leadership that has ended
            for callback in self._on_elected:
                if inspect.iscoroutinefunction(callback):
                    task = asyncio.create_task(
                        self._leader_work_guard(callback, event.term),
                        name=f"fastapi-leader leader work {_name(callback)}",
                    )
                    self._leader_work.add(task)
                    task.add_done_callback(self._leader_work.discard)
                else:
                    await self._call(callback, event.term)
        elif isinstance(event, Demoted):
            pending = [t for t in self._leader_work if not t.done()]
            if pending:
                _, still = await asyncio.wait(pending, timeout=self.callback_timeout)
                for task in still:
                    log.warning(
                        "node %s: leader work %s ignored cancellation for %.1f s",
                        self.node_id,
                        task.get_name(),
                        self.callback_timeout,
                    )
            for callback in self._on_demoted:
                await self._call(callback)
        elif isinstance(event, LeaderChanged):
            for callback in self._on_leader_change:
                await self._call(callback, event.leader_id)

    async def _leader_work_guard(self, callback: Callback, token: int) -> None:
        try:
            await callback(token)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("node %s: leader work %s failed", self.node_id, _name(callback))

    async def _call(self, callback: Callback, *args: Any) -> None:
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await asyncio.wait_for(_as_coroutine(result), self.callback_timeout)
        except Exception:
            log.exception("node %s: callback %s failed", self.node_id, _name(callback))


_COMMANDS = (Send, AllocateTerm, Acquire, Renew, Release)


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _name(callback: Callback) -> str:
    return getattr(callback, "__qualname__", repr(callback))
