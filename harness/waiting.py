"""Waiting for what the reports say, and polling what a process answers.

In an event loop, the harness pulses a :class:`Changes` on every report it records, and
:func:`until` / :func:`wait_for` re-check their condition then (and every 50 ms, for
conditions that depend on the clock alone). Without a loop (the end-to-end tests poll HTTP),
:func:`eventually` and :func:`always` poll every 20 ms; :func:`eventually_async` and
:func:`always_async` do the same on a loop (the state of in-process elections). None of them
sleeps to synchronise: each returns as soon as its condition says so, and every wait has a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = [
    "Changes",
    "always",
    "always_async",
    "always_while",
    "eventually",
    "eventually_async",
    "until",
    "wait_for",
]

_T = TypeVar("_T")

# Re-check a condition at least this often, whether or not a report came.
RECHECK = 0.05
# How often the polling helpers ask.
POLL = 0.02
# The default bound of eventually(): generous, for waits that normally end within a second or
# two, on a loaded 2-core box where several Python processes import FastAPI at once.
WAIT = 10.0


class Changes:
    """A pulse for every change: waiters wake on the next :meth:`pulse`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def pulse(self) -> None:
        """Something changed: wake every waiter."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until the next pulse, or ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


async def until(
    probe: Callable[[], _T], timeout: float, changes: Changes | None = None
) -> _T | None:
    """Wait until ``probe()`` is truthy (re-checked on every pulse of ``changes`` and every
    50 ms) and return its value; None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if changes is None:
            await asyncio.sleep(min(remaining, RECHECK))
        else:
            await changes.wait(min(remaining, RECHECK))


async def wait_for(
    probe: Callable[[], _T], timeout: float, what: str, changes: Changes | None = None
) -> _T:
    """:func:`until`, raising :class:`TimeoutError` (naming ``what``) after ``timeout``."""
    value = await until(probe, timeout, changes)
    if not value:
        raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
    return value


def _timed_out(timeout: float, what: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what}")


def eventually(
    condition: Callable[[], _T], timeout: float = WAIT, what: str = "the condition"
) -> _T:
    """Poll ``condition`` every 20 ms until it returns something truthy, and return that;
    fail (AssertionError) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        time.sleep(POLL)
    return value


async def eventually_async(
    condition: Callable[[], _T], timeout: float = WAIT, what: str = "the condition"
) -> _T:
    """:func:`eventually` without blocking the loop (the condition reads state that tasks on
    this loop change)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(POLL)
    return value


def always(condition: Callable[[], Any], duration: float, what: str) -> None:
    """Check ``condition`` every 20 ms for ``duration`` seconds; fail the first time it is
    falsy. (Observing for a while is the point here: this waits for nothing.)"""
    deadline = time.monotonic() + duration
    while condition():
        if time.monotonic() >= deadline:
            return
        time.sleep(POLL)
    raise AssertionError(f"{what} stopped holding")


async def always_async(condition: Callable[[], Any], duration: float, what: str) -> None:
    """:func:`always` without blocking the loop."""
    deadline = time.monotonic() + duration
    while condition():
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"{what} stopped holding")


def always_while(running: Future[Any], condition: Callable[[], Any], what: str) -> float:
    """Check ``condition`` every 20 ms for as long as ``running`` (something done on another
    thread: a blocking request) runs, and once more after; fail the first time it is falsy
    (or raises AssertionError, whose message is kept). Returns how long it was watched."""
    began = time.monotonic()
    while True:
        done = running.done()
        try:
            held = condition()
            detail = ""
        except AssertionError as exc:
            held, detail = False, f": {exc}"
        if not held:
            elapsed = time.monotonic() - began
            raise AssertionError(f"{what} stopped holding after {elapsed:.2f} s{detail}")
        if done:
            return time.monotonic() - began
        time.sleep(POLL)
