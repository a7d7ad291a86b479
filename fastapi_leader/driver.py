"""Drives one node's election core on the election thread.

Data flows one way. The transport hands raw messages to the :class:`Driver` (it is the
transport's sink), which decodes them (counting rejections), feeds them to the core with the
current monotonic time, and routes what the core returns: commands to one sender task, in order,
over the transport; events to the app's loop through :class:`~fastapi_leader.callbacks.Callbacks`.

One APScheduler job keeps time: a timer armed at the core's :attr:`~Election.next_tick_at` (the
leader's next renewal, a follower's next presence beat or election deadline), moved only when
that deadline comes earlier. Nothing ticks at a fixed rate, so an idle follower wakes a few
times a second, not every heartbeat; on a machine hosting many nodes that is most of their cost.

Everything here runs on the election thread's loop except the reads under :attr:`Driver.lock`,
which other threads take to read the core (:meth:`LeaderElection.status`, ``is_leader``).

What happens is also told to the election's observers (:mod:`fastapi_leader.events`), here, on
this thread, after the runtime has carried it out: the core only returns outputs, and the
runtime is what knows the latencies, the failures and the clock. ``counters`` are one such
observer (:class:`Counting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Literal, TypeVar

from apscheduler.job import Job

from . import events as ev
from .callbacks import Callbacks
from .core import (
    Acquire,
    AllocateTerm,
    Command,
    Demoted,
    Elected,
    Election,
    LeaderChanged,
    NodeIdConflict,
    Output,
    Release,
    Renew,
    Role,
    RoleChanged,
    Send,
)
from .election_thread import EXECUTOR, ElectionThread
from .messages import Codec, MessageRejected
from .transport.base import BrokerUnavailable, Transport
from .watchdog import PROBE_INTERVAL, LoopWatchdog, Verdict

__all__ = ["Counting", "Driver"]

log = logging.getLogger("fastapi_leader")

_T = TypeVar("_T")
_COMMANDS = (Send, AllocateTerm, Acquire, Renew, Release)
_CommandName = Literal["publish", "allocate_term", "acquire", "renew", "release"]

# How often the live members are read for MembersChange: every other watchdog round.
_MEMBERS_EVERY = 2


class Counting(ev.ElectionObserver):
    """``LeaderElection.counters``, kept from the events like any other observer's view."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters

    def message_dropped(self, event: ev.MessageDropped) -> None:
        self.counters[f"dropped_{event.reason}"] += 1

    def election_ended(self, event: ev.ElectionEnd) -> None:
        if event.won:
            self.counters["elections_won"] += 1

    def lease_lost(self, event: ev.LeaseLost) -> None:
        self.counters["demotions"] += 1

    def leader_changed(self, event: ev.LeaderChange) -> None:
        self.counters["leader_changes"] += 1

    def command_finished(self, event: ev.CommandFinished) -> None:
        if not event.ok:
            self.counters["commands_failed"] += 1

    def connection_lost(self, event: ev.ConnectionLost) -> None:
        self.counters["connection_lost"] += 1

    def loop_stalled(self, event: ev.LoopStalled) -> None:
        self.counters["loop_stalls"] += 1

    def node_id_conflict(self, event: ev.IdConflict) -> None:
        if not event.resolved:
            self.counters["node_id_conflicts"] += 1


class Driver:
    """The election-thread half of a :class:`~fastapi_leader.LeaderElection`."""

    def __init__(
        self,
        *,
        core: Election,
        codec: Codec,
        transport: Transport,
        thread: ElectionThread,
        callbacks: Callbacks,
        app_loop: asyncio.AbstractEventLoop,
        counters: Counter[str],
        loop_stall_limit: float,
        observers: Sequence[ev.ElectionObserver] = (),
    ) -> None:
        self.core = core
        self.lock = threading.Lock()
        """Held around every call into the core, so other threads read a consistent view."""
        self.transport = transport
        self.counters = counters
        self.watchdog = LoopWatchdog(loop_stall_limit)
        self.thread_ran_at = time.monotonic()
        """When the election thread last ran the watchdog's round (a liveness probe reads it:
        an election thread stuck for long is something only a restart cures)."""

        def failed() -> None:
            counters["observer_errors"] += 1

        self.observe = ev.Fanout([Counting(counters), *observers], failed)
        self._stood_at: float | None = None  # when the candidacy in progress began
        self._elected_at: dict[int, float] = {}  # term -> when this node began leading it
        self._leaderless_since: float | None = None
        self._lost_connection_at: float | None = None
        self._members: tuple[str, ...] | None = None
        self._leader_id: str | None = None  # the leader last reported
        self._acquire_sent: tuple[int, float] | None = None  # (term, sent_at) of an Acquire
        self._term_failures = 0  # allocations failed in a row (a warning says why, see below)
        self._codec = codec
        self._thread = thread
        self._callbacks = callbacks
        self._app_loop = app_loop
        self._timing = core.timing
        self._outbox: asyncio.Queue[Command] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timer: Job | None = None
        self._timer_at: float | None = None
        self._held: list[Command] | None = None  # commands held back during a handover
        self._unwatch: Callable[[], None] | None = None

    @property
    def node_id(self) -> str:
        return self.core.node_id

    def read(self, reader: Callable[[Election, float], _T]) -> _T:
        """``reader(core, now)`` under the lock, from any thread."""
        with self.lock:
            return reader(self.core, time.monotonic())

    def _call(self, step: Callable[[float], list[Output]]) -> list[Output]:
        """One input to the core, with the time read now; its outputs carried out (and
        returned)."""
        with self.lock:
            outputs = step(time.monotonic())
        self._apply(outputs)
        return outputs

    def _here(self, at: float) -> ev.ElectionEvent:
        return ev.ElectionEvent(group=self.core.group, node_id=self.node_id, at=at)

    # ---- lifecycle (election thread) ---------------------------------------------------------

    async def start(self) -> None:
        """Connect, join the group and start the timer and the watchdog. Raises what the
        transport's start raises, having closed it."""
        self._outbox = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._send_forever(), name=f"fastapi-leader sender {self.node_id}")
        ]
        try:
            await self.transport.start(self)
        except BaseException:
            await self._teardown()
            raise
        self._call(self.core.start)
        if self.observe.joined:
            self.observe.tell(self.observe.joined, self._here(time.monotonic()))
        self._start_timer()
        self._unwatch = self._thread.watch(self._app_loop, self.watchdog, self._on_verdict)
        self._tasks.append(
            asyncio.create_task(self._tend(), name=f"fastapi-leader tend {self.node_id}")
        )

    async def resign(self) -> bool:
        """Hand the leadership over, if held; whether it was."""
        with self.lock:
            outputs = self.core.resign(time.monotonic())
        await self._in_order(outputs)
        return any(isinstance(o, Demoted) for o in outputs)

    async def leave(self) -> None:
        """Hand over or say goodbye, then stop the timer and close the transport."""
        self._stop_timer()
        try:
            with self.lock:
                outputs = self.core.leave(time.monotonic())
            await self._in_order(outputs)
        finally:
            await self._teardown()
            if self.observe.left:
                self.observe.tell(self.observe.left, self._here(time.monotonic()))

    async def _teardown(self) -> None:
        self._stop_timer()
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            # Cancel again until it ends: before Python 3.12, asyncio.wait_for swallows a
            # cancellation that lands as its inner call completes (the sender's commands run
            # in one), and the task then waits on its queue for ever, and stop() with it.
            while not task.done():
                await asyncio.wait([task], timeout=1.0)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.transport.close()

    async def _in_order(self, outputs: list[Output], *, wait_for_app: bool = True) -> None:
        """Carry out a handover's outputs strictly in order: every callback (leader work
        cancelled, ``on_demoted`` run on the app's loop) before any command, and every command
        sent before this returns. Bounded by the callback timeout and the transport's command
        timeout. ``wait_for_app=False`` when the app's loop is known not to run."""
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
            if wait_for_app and events:
                await self._app_drained()
        finally:
            held: list[Command] = []
            if outer:
                held, self._held = self._held or [], None
        self._apply(commands)
        self._apply(held)
        if self._outbox is not None:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox.join(), self._callbacks.timeout)

    async def _app_drained(self) -> None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._callbacks.drain(), self._app_loop)
        except RuntimeError:  # the app's loop is closed: no callback can run any more
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self._callbacks.timeout)
        except (TimeoutError, asyncio.TimeoutError):
            future.cancel()

    # ---- the app-loop watchdog ---------------------------------------------------------------

    async def _tend(self) -> None:
        # Every probe interval: a sign of life of this thread (for the liveness probe) and, now
        # and then, the member table for observers. The app's loop is probed by the thread's
        # prober (one per app loop), which hands the verdicts to _on_verdict.
        rounds = 0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            self.thread_ran_at = time.monotonic()
            rounds += 1
            if rounds % _MEMBERS_EVERY == 0 and self.observe.members_changed:
                self._sample_members()

    def _on_verdict(self, verdict: Verdict, now: float) -> None:
        if verdict.stalled:
            self._tasks.append(
                asyncio.create_task(
                    self._stalled(verdict, now), name=f"fastapi-leader stall {self.node_id}"
                )
            )
        elif verdict.recovered:
            log.info("node %s: the app's event loop runs again; standing again", self.node_id)
            self._call(self.core.resume)
            if self.observe.loop_recovered:
                self.observe.tell(
                    self.observe.loop_recovered,
                    ev.LoopRecovered(group=self.core.group, node_id=self.node_id, at=now),
                )

    async def _stalled(self, verdict: Verdict, now: float) -> None:
        watchdog = self.watchdog
        if self.observe.loop_stalled:
            self.observe.tell(
                self.observe.loop_stalled,
                ev.LoopStalled(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=now,
                    stall=verdict.stall,
                    limit=watchdog.limit,
                ),
            )
        log.warning(
            "node %s: the app's event loop has not run for %.1f s "
            "(LEADER_LOOP_STALL_LIMIT=%g): handing the leadership over; this node "
            "stands again once its loop has answered for %g s",
            self.node_id,
            verdict.stall,
            watchdog.limit,
            watchdog.recovery,
        )
        with self.lock:
            outputs = self.core.suspend(now, f"app event loop stalled for {verdict.stall:.1f} s")
        # The app's loop is stuck: do not wait for its callbacks before handing over.
        await self._in_order(outputs, wait_for_app=False)

    def _sample_members(self) -> None:
        members = self.read(
            lambda core, now: tuple(member.node_id for member in core.status(now).members)
        )
        if members != self._members:
            self._members = members
            self.observe.tell(
                self.observe.members_changed,
                ev.MembersChange(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=time.monotonic(),
                    members=members,
                ),
            )

    # ---- Sink: what the transport reports -----------------------------------------------------

    def message_received(self, data: bytes) -> None:
        """Transport callback: one raw message from the broker."""
        self.counters["messages_received"] += 1
        try:
            message = self._codec.decode(data)
        except MessageRejected as exc:
            log.debug("node %s dropped a message: %s", self.node_id, exc)
            self._dropped(exc.reason.value, 1)
            return
        core = self.core
        with self.lock:
            # The core drops replays and out-of-range terms itself: count those too, by reason.
            dropped = dict(core.dropped)
            outputs = core.receive(message, time.monotonic())
            changed = [
                (reason, count - dropped.get(reason, 0))
                for reason, count in core.dropped.items()
                if count != dropped.get(reason, 0)
            ]
        for reason, count in changed:
            self._dropped(reason, count)
        self._apply(outputs)

    def _dropped(self, reason: str, count: int) -> None:
        event = ev.MessageDropped(
            group=self.core.group, node_id=self.node_id, at=time.monotonic(), reason=reason
        )
        for _ in range(count):
            self.observe.tell(self.observe.message_dropped, event)

    def connection_lost(self) -> None:
        """Transport callback: the subscription broke."""
        now = time.monotonic()
        if self._lost_connection_at is None:
            self._lost_connection_at = now
        self.observe.tell(
            self.observe.connection_lost,
            ev.ConnectionLost(group=self.core.group, node_id=self.node_id, at=now),
        )
        self._call(self.core.connection_lost)

    def connection_restored(self) -> None:
        """Transport callback: the subscription is back."""
        self._call(self.core.connection_restored)
        now = time.monotonic()
        lost_at, self._lost_connection_at = self._lost_connection_at, None
        if self.observe.connection_restored:
            self.observe.tell(
                self.observe.connection_restored,
                ev.ConnectionRestored(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=now,
                    down_for=0.0 if lost_at is None else now - lost_at,
                ),
            )

    # ---- the timer ----------------------------------------------------------------------------

    def _start_timer(self) -> None:
        tag = f"fastapi-leader:{self.core.group}:{self.node_id}:{id(self):x}"
        # The timer is one job, armed by moving its next run time (so no job is added or
        # removed, and logged, per tick); every tick arms it again for the core's next deadline.
        # Its interval, one heartbeat, only matters if a run is lost: APScheduler skips a run
        # while the previous one still counts as running, and a tick re-arms the timer before
        # APScheduler has counted it finished, so on a busy loop a deadline due at once can
        # fall in that gap. The skipped run is then retried a beat later, not forgotten (a
        # leader's renewals, and with them its leadership, would be). Running instances are
        # allowed to overlap for the same reason: a tick is one synchronous step, and an extra
        # one does nothing.
        self._timer = self._thread.scheduler.add_job(
            self._tick,
            "interval",
            seconds=self._timing.heartbeat_interval,
            id=f"{tag}:timer",
            name=f"{tag}:timer",
            executor=EXECUTOR,
            coalesce=True,
            max_instances=4,
            misfire_grace_time=None,
        )
        self._timer_at = None
        self._arm_timer()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            with contextlib.suppress(Exception):  # already gone with the scheduler
                timer.remove()

    async def _tick(self) -> None:
        self._timer_at = None
        self._call(self.core.tick)

    def _arm_timer(self) -> None:
        deadline = self.core.next_tick_at
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
        callbacks = self._callbacks
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
                self._role_changed(output)
                continue
            if isinstance(output, NodeIdConflict):
                self._report_conflict(output)
                continue
            if isinstance(output, Elected):
                self._elected(output)
            elif isinstance(output, Demoted):
                # Leader work stops as soon as the app's loop runs, ahead of any callback.
                callbacks.revoke(output.term)
                self._demoted(output)
            elif isinstance(output, LeaderChanged):
                self._leader_changed(output)
            callbacks.post(output)
        if changed:
            callbacks.notify()
        self._arm_timer()

    def _role_changed(self, change: RoleChanged) -> None:
        # One line per role change, with node, term and reason: what an operator reads.
        log.info(
            "node %s: %s -> %s (term %d): %s",
            self.node_id,
            change.old.value,
            change.new.value,
            change.term,
            change.reason,
        )
        observe = self.observe
        now = time.monotonic()
        group, node_id = self.core.group, self.node_id
        if observe.role_changed:
            observe.tell(
                observe.role_changed,
                ev.RoleChange(
                    group=group,
                    node_id=node_id,
                    at=now,
                    old=change.old,
                    new=change.new,
                    term=change.term,
                    cause=change.cause,
                    reason=change.reason,
                ),
            )
        if change.new is Role.CANDIDATE:
            self._stood_at = now
            if observe.election_started:
                observe.tell(
                    observe.election_started,
                    ev.ElectionStart(
                        group=group, node_id=node_id, at=now, term=change.term, cause=change.cause
                    ),
                )
        elif change.old is Role.CANDIDATE:
            stood_at, self._stood_at = self._stood_at, None
            if observe.election_ended:
                observe.tell(
                    observe.election_ended,
                    ev.ElectionEnd(
                        group=group,
                        node_id=node_id,
                        at=now,
                        term=change.term,
                        won=change.new is Role.LEADER,
                        cause=change.cause,
                        duration=0.0 if stood_at is None else now - stood_at,
                    ),
                )

    def _elected(self, elected: Elected) -> None:
        now = time.monotonic()
        self._elected_at[elected.term] = now
        sent = self._acquire_sent
        if self.observe.lease_acquired and sent is not None and sent[0] == elected.term:
            self.observe.tell(
                self.observe.lease_acquired,
                ev.LeaseAcquired(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=now,
                    term=elected.term,
                    expires_at=self.core.lease_expires_at,
                    latency=now - sent[1],
                ),
            )

    def _demoted(self, demoted: Demoted) -> None:
        now = time.monotonic()
        began = self._elected_at.pop(demoted.term, now)
        self.observe.tell(
            self.observe.lease_lost,
            ev.LeaseLost(
                group=self.core.group,
                node_id=self.node_id,
                at=now,
                term=demoted.term,
                cause=demoted.cause,
                reason=demoted.reason,
                held_for=now - began,
            ),
        )

    def _leader_changed(self, change: LeaderChanged) -> None:
        leader_id = change.leader_id
        if leader_id is None:
            if self._leaderless_since is None:
                self._leaderless_since = change.last_heard_at
            leaderless_for = None
        else:
            since, self._leaderless_since = self._leaderless_since, None
            leaderless_for = None if since is None else max(0.0, time.monotonic() - since)
        previous, self._leader_id = self._leader_id, leader_id
        if self.node_id not in (leader_id, previous):
            # A leader's own changes are said in its role lines.
            log.info(
                "node %s: %s (term %d)",
                self.node_id,
                "no leader known" if leader_id is None else f"following {leader_id}",
                change.term,
            )
        self.observe.tell(
            self.observe.leader_changed,
            ev.LeaderChange(
                group=self.core.group,
                node_id=self.node_id,
                at=time.monotonic(),
                leader_id=leader_id,
                term=change.term,
                leaderless_for=leaderless_for,
            ),
        )

    def _report_conflict(self, conflict: NodeIdConflict) -> None:
        if self.observe.node_id_conflict:
            self.observe.tell(
                self.observe.node_id_conflict,
                ev.IdConflict(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=time.monotonic(),
                    other_incarnation=conflict.other_incarnation,
                    yielding=conflict.yielding,
                    resolved=conflict.resolved,
                ),
            )
        if conflict.resolved:
            log.info("node %s: no other process uses this node id any more", conflict.node_id)
            return
        who = "this one (the later start)" if conflict.yielding else "the other (the later start)"
        log.warning(
            "node %s: another live process uses the same node id in group %r: set a distinct "
            "LEADER_NODE_ID per process (or leave it unset for a random one); %s does not "
            "stand for election while both run",
            conflict.node_id,
            self.core.group,
            who,
        )

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
        transport = self.transport
        core = self.core
        # Read before sending: the lease then ends no later than Redis's TTL does.
        sent_at = time.monotonic()
        name: _CommandName = "publish"
        try:
            if isinstance(command, Send):
                await transport.publish(self._codec.encode(command.message), command.to)
                self._finished(name, sent_at, True)
            elif isinstance(command, AllocateTerm):
                name = "allocate_term"
                term = await transport.allocate_term(command.floor)
                self._term_failures = 0
                self._finished(name, sent_at, True)
                self._call(lambda now: core.term_allocated(term, now))
            elif isinstance(command, Acquire):
                name = "acquire"
                announce = self._codec.encode(command.announce)
                acquired = await transport.acquire(command.term, command.ttl, announce)
                self._finished(name, sent_at, True)
                self._acquire_sent = (command.term, sent_at)
                try:
                    self._call(
                        lambda now: core.acquire_result(command.term, acquired, sent_at, now)
                    )
                finally:
                    self._acquire_sent = None
            elif isinstance(command, Renew):
                name = "renew"
                announce = self._codec.encode(command.announce)
                renewed = await transport.renew(command.term, command.ttl, announce)
                returned_at = time.monotonic()
                self._finished(name, sent_at, True, returned_at)
                self._call(lambda now: core.renew_result(command.term, renewed, sent_at, now))
                self._renewed(command.term, renewed, returned_at - sent_at)
            elif isinstance(command, Release):
                name = "release"
                goodbye = command.announce
                await transport.release(
                    command.term, None if goodbye is None else self._codec.encode(goodbye)
                )
                self._finished(name, sent_at, True)
        except (BrokerUnavailable, TimeoutError, asyncio.TimeoutError) as exc:
            returned_at = time.monotonic()
            self._finished(name, sent_at, False, returned_at)
            log.debug("node %s: %s failed: %s", self.node_id, type(command).__name__, exc)
            if isinstance(command, AllocateTerm):
                self._term_failed(exc)
                self._call(core.term_failed)
            elif isinstance(command, Acquire):
                self._call(lambda now: core.acquire_failed(command.term, sent_at, now))
            elif isinstance(command, Renew):
                self._call(lambda now: core.renew_result(command.term, None, sent_at, now))
                timeout = not isinstance(exc, BrokerUnavailable)
                self._renew_failed(command.term, returned_at - sent_at, timeout)

    def _term_failed(self, exc: Exception) -> None:
        # A node that cannot allocate terms never leads: say why at WARNING (the role change it
        # causes is only INFO), on the 3rd failure in a row (one is a blip) and every 50th.
        self._term_failures += 1
        if self._term_failures == 3 or self._term_failures % 50 == 0:
            log.warning(
                "node %s: could not allocate a term (%d times in a row): %s",
                self.node_id,
                self._term_failures,
                exc,
            )

    def _finished(
        self, name: _CommandName, sent_at: float, ok: bool, returned_at: float | None = None
    ) -> None:
        handlers = self.observe.command_finished
        if handlers:
            now = time.monotonic() if returned_at is None else returned_at
            self.observe.tell(
                handlers,
                ev.CommandFinished(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=now,
                    command=name,
                    latency=now - sent_at,
                    ok=ok,
                ),
            )

    def _renewed(self, term: int, renewed: bool, latency: float) -> None:
        if not renewed:
            self._renew_failed(term, latency, False, key_lost=True)
            return
        core = self.core
        # Applied only by a leader still leading that term: else the answer came too late.
        if not self.observe.lease_renewed or core.role is not Role.LEADER:
            return
        if self.read(Election.fencing_token) != term:
            return
        self.observe.tell(
            self.observe.lease_renewed,
            ev.LeaseRenewed(
                group=core.group,
                node_id=self.node_id,
                at=time.monotonic(),
                term=term,
                expires_at=core.lease_expires_at,
                latency=latency,
            ),
        )

    def _renew_failed(
        self, term: int, latency: float, timeout: bool, *, key_lost: bool = False
    ) -> None:
        if self.observe.renew_failed:
            reason: Literal["error", "timeout", "key_lost"] = (
                "key_lost" if key_lost else "timeout" if timeout else "error"
            )
            self.observe.tell(
                self.observe.renew_failed,
                ev.RenewFailed(
                    group=self.core.group,
                    node_id=self.node_id,
                    at=time.monotonic(),
                    term=term,
                    latency=latency,
                    reason=reason,
                ),
            )
