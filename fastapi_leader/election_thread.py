"""The election's own thread: one asyncio loop and one APScheduler scheduler per process.

The protocol must keep time while the application's event loop is busy (a sync call in an
``async def`` route, a large JSON encode, a CPU-bound request): a leader whose heartbeats wait
for the app's loop loses its lease to the first half-second stall. So every election of a process
runs here instead: its transport's connections, the core, its timer job. A pure-Python loop that
holds the GIL still yields it every ``sys.getswitchinterval()`` (5 ms), so this thread keeps its
rhythm; only a pause of the whole process (SIGSTOP, a VM stop, a C call holding the GIL) stops
it, and the lease is built to end on time then.

Several elections in one process (a group per singleton role) share the thread: it starts with
the first election and ends with the last. A fork copies the handle but not the thread, so the
handle is per process id: a child (``gunicorn --preload``, ``multiprocessing``) starts its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import timezone
from typing import Any, TypeVar

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .watchdog import PROBE_INTERVAL, LoopWatchdog, Verdict

__all__ = ["EXECUTOR", "ElectionThread"]

_T = TypeVar("_T")

# The election's jobs run on an executor of their own so that APScheduler's per-run INFO lines
# ("Running job ...", several a second) can be silenced without touching anyone else's jobs.
EXECUTOR = "fastapi-leader"
logging.getLogger(f"apscheduler.executors.{EXECUTOR}").setLevel(logging.WARNING)


class _JobExecutor(AsyncIOExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """APScheduler's asyncio executor, for the election's own jobs, minus one false alarm.

    Shutting the scheduler down cancels the tasks of jobs submitted but not started yet, and
    APScheduler logs each as "Error running job" with a ``CancelledError`` traceback. Our jobs
    are ticks, one synchronous step each that a stopped core would ignore anyway: a tick
    cancelled before it ran is the normal end of it, not an error. Any other exception is still
    logged."""

    def _run_job_error(self, job_id: str, exc: BaseException, traceback: Any = None) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self._run_job_success(job_id, [])  # APScheduler's bookkeeping, without the log line
            return
        super()._run_job_error(job_id, exc, traceback)


Verdicts = Callable[[Verdict, float], None]


class _LoopProber:
    """Probes one app loop for every election started on it (election thread only).

    One probe, a callback the app's loop runs, serves every election of that loop: with five
    elections in a process, five probers would wake the app's loop five times as often for the
    same answer. Each election keeps its own :class:`~fastapi_leader.watchdog.LoopWatchdog`
    (its own limit and verdicts); the prober feeds them all the same probes and answers, checks
    each every :data:`~fastapi_leader.watchdog.PROBE_INTERVAL`, and hands over the verdicts
    that say something."""

    def __init__(self, app_loop: asyncio.AbstractEventLoop) -> None:
        self.app_loop = app_loop
        self.watchers: dict[LoopWatchdog, Verdicts] = {}
        self.task: asyncio.Task[None] | None = None
        # The app's loop answers by stamping the time here, not with a callback back to the
        # election thread: one wakeup per probe instead of two. list.append is atomic.
        self._answers: list[float] = []
        self._sent_at: float | None = None  # the outstanding probe

    def add(self, watchdog: LoopWatchdog, verdicts: Verdicts) -> None:
        self.watchers[watchdog] = verdicts
        if self._sent_at is not None:
            watchdog.probe_sent(self._sent_at)

    def _answered(self) -> None:  # runs on the app's loop
        self._answers.append(time.monotonic())

    async def run(self) -> None:
        while True:
            while self._answers:
                at = self._answers.pop(0)
                self._sent_at = None
                for watchdog in self.watchers:
                    watchdog.answered(at)
            now = time.monotonic()
            if self._sent_at is None:
                with contextlib.suppress(RuntimeError):  # closed: the stall grows, as it should
                    self.app_loop.call_soon_threadsafe(self._answered)
                self._sent_at = now
                for watchdog in self.watchers:
                    watchdog.probe_sent(now)
            for watchdog, verdicts in list(self.watchers.items()):
                verdict = watchdog.check(now)
                if verdict.stalled or verdict.recovered:
                    verdicts(verdict, now)
            await asyncio.sleep(PROBE_INTERVAL)


class ElectionThread:
    """A daemon thread running an asyncio loop and an :class:`AsyncIOScheduler` on it.

    Use :meth:`acquire` and :meth:`release` (counted: the thread stops with the last release),
    not the constructor."""

    _lock = threading.Lock()
    _current: ElectionThread | None = None
    _users = 0

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._probers: dict[asyncio.AbstractEventLoop, _LoopProber] = {}
        self.scheduler = AsyncIOScheduler(event_loop=self.loop, timezone=timezone.utc)
        self.scheduler.add_executor(_JobExecutor(), alias=EXECUTOR)
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="fastapi-leader", daemon=True
        )
        self._thread.start()
        started.wait()

    @classmethod
    def acquire(cls) -> ElectionThread:
        """The process's election thread, started if none runs; pair with :meth:`release`."""
        with cls._lock:
            current = cls._current
            if current is None or current.pid != os.getpid():
                current = cls._current = ElectionThread()
                cls._users = 0
            cls._users += 1
            return current

    def release(self) -> None:
        """One user fewer; the last one stops the thread (and waits for it to end)."""
        with ElectionThread._lock:
            if ElectionThread._current is not self:
                return
            ElectionThread._users -= 1
            if ElectionThread._users > 0:
                return
            ElectionThread._current = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    def watch(
        self, app_loop: asyncio.AbstractEventLoop, watchdog: LoopWatchdog, verdicts: Verdicts
    ) -> Callable[[], None]:
        """Feed ``watchdog`` the probes of ``app_loop`` and pass its telling verdicts (stalled,
        recovered) to ``verdicts`` with the time they were read; call on this thread. Returns
        the call that stops it. Elections started on one app loop share its probe."""
        prober = self._probers.get(app_loop)
        if prober is None:
            prober = self._probers[app_loop] = _LoopProber(app_loop)
            prober.task = self.loop.create_task(prober.run(), name="fastapi-leader watchdog")
        prober.add(watchdog, verdicts)

        def unwatch() -> None:
            prober.watchers.pop(watchdog, None)
            if not prober.watchers and self._probers.get(app_loop) is prober:
                del self._probers[app_loop]
                if prober.task is not None:
                    prober.task.cancel()

        return unwatch

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Run ``coro`` on the thread's loop; the future is safe to wait on from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def in_thread(self) -> bool:
        """Whether the caller runs on this thread."""
        return threading.current_thread() is self._thread

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self.scheduler.start)
        self.loop.call_soon(started.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                if self.scheduler.running:
                    self.scheduler.shutdown(wait=False)
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()


def _after_fork_in_child() -> None:
    # The parent's thread does not exist here, and its lock may have been held mid-fork.
    ElectionThread._lock = threading.Lock()
    ElectionThread._current = None
    ElectionThread._users = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
