"""What a node process reports about itself: one JSON object a line on stdout, time-stamped.

Written by the nodes (:func:`emit`, :class:`harness.reporter.NodeReporter`), read by the harness
(:func:`parse`). Every line is written with a single ``os.write`` (atomic on a pipe, from any
thread)::

    {"t": <time.monotonic()>, "pid": ..., "ev": ..., "node": ..., ...}

``node`` is there when a process hosts several nodes. On Linux the monotonic clock is
system-wide, so the harness compares ``t`` across processes and with its own readings (when
it injected a fault). The lines :class:`~harness.reporter.NodeReporter` writes:

- ``lease`` (``term``, ``lease_end``; ``acquired: true`` for the first of a leadership): the
  node took the leader key or renewed it; ``lease_end`` is the node's own reading of when its
  leadership ends (``time.monotonic()``), ``t`` when the runtime applied the answer. From the
  election's :class:`~fastapi_leader.events.LeaseAcquired` and
  :class:`~fastapi_leader.events.LeaseRenewed` events (a renewal that does not move the end
  is not reported);
- ``released`` (``term``, ``cause``): the leadership of ``term`` ended, stamped on the
  election thread (:class:`~fastapi_leader.events.LeaseLost`), so it dates a handover even
  while the app's loop (and so ``demoted``) is stalled;
- ``elected`` (``token``, ``lease_end``), ``demoted``, ``leader`` (``leader``: the leader this
  node knows; ``term``: the highest term it has seen), from the election's callbacks, on the
  app's loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

# No import of the library here: the benchmarks' bare app (the memory baseline) and the peers'
# processes write these lines too, and must not load it. NodeReporter is harness.reporter's.
__all__ = ["PID", "Report", "emit", "format_line", "parse"]

PID = os.getpid()


def format_line(ev: str, node: str | None = None, t: float | None = None, **data: Any) -> str:
    """One report line (with its newline); ``t`` defaults to now (``time.monotonic()``)."""
    record: dict[str, Any] = {"t": time.monotonic() if t is None else t, "pid": PID, "ev": ev}
    if node is not None:
        record["node"] = node
    record.update(data)
    return json.dumps(record, separators=(",", ":")) + "\n"


def emit(ev: str, node: str | None = None, t: float | None = None, **data: Any) -> None:
    """Write one report line on stdout (:func:`format_line`). A harness that is gone (a
    broken pipe) is no error: the node is about to be told by its stdin."""
    line = format_line(ev, node, t, **data)
    with contextlib.suppress(BrokenPipeError):
        os.write(1, line.encode())


@dataclass(frozen=True)
class Report:
    """One parsed line: ``data`` holds every field but ``t``, ``ev``, ``pid`` and ``node``."""

    t: float
    ev: str
    pid: int | None
    node: str | None
    data: dict[str, Any] = field(default_factory=dict, compare=False)


def parse(line: bytes | str) -> Report | None:
    """One report line, or None for a line that is not one (no JSON object, no ``t`` or
    ``ev``): the harness decides what an unparsable line means."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            return None
        t = float(record.pop("t"))
        ev = str(record.pop("ev"))
        pid = record.pop("pid", None)
        node = record.pop("node", None)
        return Report(
            t, ev, None if pid is None else int(pid), None if node is None else str(node), record
        )
    except (ValueError, KeyError, TypeError):
        return None
