"""User callbacks and leader work, run on the application's event loop.

The election decides on its own thread; what the user wrote runs where the user expects it: on
the loop :meth:`LeaderElection.start` was awaited on, beside the app's own clients and pools,
which are bound to that loop. The election thread hands events over with
``call_soon_threadsafe``; one dispatcher task takes them in order, so a slow callback never
delays the protocol (it only delays the callbacks behind it).

*Leader work* is a task that must not outlive the leadership it was started under: an async
``on_elected`` callback, an async ``@leader_only`` call, a leader-only scheduled job. A demotion
cancels all of it as soon as the app's loop runs, and ``on_demoted`` waits for it to end.
Callbacks come in pairs: each leadership's ``on_elected`` runs (and its leader work begins)
before that leadership's ``on_demoted``, even when the leadership was over before the app's loop
got to it; work revoked before its first step is started and cancelled at its first ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .core import Demoted, Elected, Event, LeaderChanged

__all__ = ["Callbacks", "LeaderWorkRevoked", "callable_name"]

log = logging.getLogger("fastapi_leader")

_T = TypeVar("_T")
Callback = Callable[..., Any]


def callable_name(callback: object) -> str:
    """A callable's name for log lines."""
    return getattr(callback, "__qualname__", repr(callback))


class LeaderWorkRevoked(Exception):
    """Raised by :meth:`Callbacks.run_as_leader_work` when the leadership ended mid-call."""


@dataclass(eq=False)
class _Work:
    term: int
    name: str
    task: asyncio.Task[Any] | None = None
    started: bool = False
    revoked: bool = False


@dataclass
class _Registry:
    on_elected: list[Callback] = field(default_factory=list)
    on_demoted: list[Callback] = field(default_factory=list)
    on_leader_change: list[Callback] = field(default_factory=list)


class Callbacks:
    """One node's callbacks and leader work. Every method but :meth:`post` and :meth:`revoke`
    runs on the app's loop; those two may be called from any thread."""

    def __init__(self, node_id: Callable[[], str], timeout: float) -> None:
        self._node_id = node_id
        self.timeout = timeout
        self.registry = _Registry()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[Event] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._work: set[_Work] = set()
        self._revoked_through = 0  # every leadership up to this term has ended
        self._elected_terms: set[int] = set()  # leaderships whose on_elected has run
        self.changed: asyncio.Event | None = None

    # ---- lifecycle (app loop) -------------------------------------------------------------

    def start(self) -> None:
        """Bind to the running loop and start the dispatcher."""
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self.changed = asyncio.Event()
        self._dispatcher = self._loop.create_task(
            self._dispatch_forever(), name=f"fastapi-leader callbacks {self._node_id()}"
        )

    async def drain(self) -> None:
        """Wait until every event posted so far has been dispatched (bounded by the caller)."""
        if self._events is not None:
            await self._events.join()

    async def stop(self) -> None:
        """Cancel leader work and the dispatcher, and wait for both to end."""
        self._revoke_all(None)
        tasks = [w.task for w in self._work if w.task is not None and not w.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout)
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.cancel()
            # Cancel again until it ends: before Python 3.12, asyncio.wait_for swallows a
            # cancellation that lands as its inner call completes (callbacks run in one).
            while not dispatcher.done():
                await asyncio.wait([dispatcher], timeout=1.0)
                dispatcher.cancel()
        self._loop = None
        if self.changed is not None:
            self.changed.set()

    # ---- from the election thread ------------------------------------------------------------

    def post(self, event: Event) -> None:
        """Hand an event to the app's loop (any thread). Dropped when the loop is gone."""
        self._call_soon(self._accept, event)

    def revoke(self, term: int) -> None:
        """The leadership of ``term`` (and every earlier one) ended: cancel its leader work as
        soon as the app's loop runs (any thread)."""
        self._call_soon(self._revoke_all, term)

    def notify(self) -> None:
        """Wake waiters (:meth:`LeaderElection.wait_until_leader` ...) on the app's loop."""
        self._call_soon(self._wake)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the app's loop is closed: nobody to tell
            loop.call_soon_threadsafe(callback, *args)

    # ---- on the app's loop -------------------------------------------------------------------

    def _accept(self, event: Event) -> None:
        if self._events is not None:
            self._events.put_nowait(event)
        self._wake()

    def _wake(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = asyncio.Event()

    def _revoke_all(self, term: int | None) -> None:
        if term is not None:
            self._revoked_through = max(self._revoked_through, term)
        for work in self._work:
            if term is None or work.term <= term:
                self._revoke(work)

    @staticmethod
    def _revoke(work: _Work) -> None:
        work.revoked = True
        if work.started and work.task is not None:
            work.task.cancel()
        # Not started yet: it cancels itself at its first step (see _begin), so that it has
        # begun, as promised, before on_demoted runs.

    def leader_work(self, coro: Coroutine[Any, Any, _T], term: int, name: str) -> asyncio.Task[_T]:
        """Run ``coro`` as leader work of the leadership ``term``: a task on this loop,
        cancelled when that leadership ends."""
        task = self._new_work(coro, term, name).task
        assert task is not None
        return task

    async def run_as_leader_work(self, coro: Coroutine[Any, Any, _T], term: int, name: str) -> _T:
        """Await ``coro`` as leader work; raise :class:`LeaderWorkRevoked` if the leadership
        ended before it finished (the caller's own cancellation propagates as usual)."""
        work = self._new_work(coro, term, name)
        task: asyncio.Task[_T] | None = work.task
        assert task is not None
        try:
            return await task
        except asyncio.CancelledError:
            if work.revoked and task.cancelled():
                raise LeaderWorkRevoked(name) from None
            raise

    def _new_work(self, coro: Coroutine[Any, Any, Any], term: int, name: str) -> _Work:
        work = _Work(term=term, name=name, revoked=term <= self._revoked_through)
        task = asyncio.get_running_loop().create_task(
            self._begin(work, coro), name=f"fastapi-leader leader work {name}"
        )
        work.task = task
        self._work.add(work)
        task.add_done_callback(lambda _: self._work.discard(work))
        return work

    async def _begin(self, work: _Work, coro: Coroutine[Any, Any, _T]) -> _T:
        work.started = True
        if work.revoked:
            # Revoked before its first step: begin it anyway, and cancel it at its first await.
            task = asyncio.current_task()
            if task is not None:
                task.cancel()
        return await coro

    async def _dispatch_forever(self) -> None:
        assert self._events is not None
        events = self._events
        while True:
            event = await events.get()
            try:
                await self._dispatch(event)
            except Exception:
                log.exception("node %s: error dispatching %r", self._node_id(), event)
            finally:
                events.task_done()

    async def _dispatch(self, event: Event) -> None:
        registry = self.registry
        if isinstance(event, Elected):
            self._elected_terms.add(event.term)
            for callback in registry.on_elected:
                if inspect.iscoroutinefunction(callback):
                    self.leader_work(
                        self._guarded(callback, event.term), event.term, callable_name(callback)
                    )
                else:
                    await self._call(callback, event.term)
        elif isinstance(event, Demoted):
            if event.term not in self._elected_terms:
                return  # its on_elected never ran: no on_demoted alone
            self._elected_terms.discard(event.term)
            self._revoke_all(event.term)
            pending = [
                w.task
                for w in self._work
                if w.term <= event.term and w.task is not None and not w.task.done()
            ]
            if pending:
                _, still = await asyncio.wait(pending, timeout=self.timeout)
                for task in still:
                    log.warning(
                        "node %s: leader work %s ignored cancellation for %.1f s",
                        self._node_id(),
                        task.get_name(),
                        self.timeout,
                    )
            for callback in registry.on_demoted:
                await self._call(callback)
        elif isinstance(event, LeaderChanged):
            for callback in registry.on_leader_change:
                await self._call(callback, event.leader_id)

    async def _guarded(self, callback: Callback, token: int) -> None:
        try:
            await callback(token)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "node %s: leader work %s failed", self._node_id(), callable_name(callback)
            )

    async def _call(self, callback: Callback, *args: Any) -> None:
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await asyncio.wait_for(_as_coroutine(result), self.timeout)
        except Exception:
            log.exception("node %s: callback %s failed", self._node_id(), callable_name(callback))


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
