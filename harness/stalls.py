"""Blocking the calling thread's event loop on purpose, the two ways real apps do it.

- ``sleep``: ``time.sleep`` (a sync client called in an ``async def``): the loop is stuck, the
  GIL is free;
- ``spin``: a pure-Python busy loop (a large JSON encode, pandas, a model call): the loop is
  stuck and the thread holds the GIL, giving it up only every ``sys.getswitchinterval()``.

Shared by the stall routes of :mod:`tests.e2e.stall_app`, the chaos nodes' ``stall`` command
and the benchmark nodes' ``stall`` command (:func:`stall`: reported as ``stalling`` and
``unstalled``), so that every suite stalls a loop the same way. This module imports nothing
of the library.
"""

from __future__ import annotations

import time

from .reports import emit

__all__ = ["STALL_KINDS", "block", "stall"]

STALL_KINDS: tuple[str, ...] = ("sleep", "spin")


def block(seconds: float, kind: str) -> float:
    """Block the calling thread for ``seconds`` in the way ``kind`` names; return how long it
    was blocked (by ``time.monotonic()``)."""
    if kind not in STALL_KINDS:
        raise ValueError(f"unknown stall kind {kind!r}; known: {', '.join(STALL_KINDS)}")
    began = time.monotonic()
    if kind == "sleep":
        time.sleep(seconds)
    else:
        deadline = began + seconds
        spins = 0
        while time.monotonic() < deadline:
            spins += sum(range(200))  # Python bytecode, not a C call that drops the GIL
    return time.monotonic() - began


def stall(seconds: float, kind: str, node: str | None = None) -> None:
    """:func:`block`, reported: a ``stalling`` line before, an ``unstalled`` one after (with
    ``blocked``: how long it was)."""
    emit("stalling", node, seconds=seconds, kind=kind)
    blocked = block(seconds, kind)
    emit("unstalled", node, seconds=seconds, kind=kind, blocked=blocked)
