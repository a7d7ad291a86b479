"""What a chaos node reports about itself: one JSON line on stdout per change, time-stamped.

Runs inside the node processes (the harness reads the lines). Every line is one JSON object
written with a single ``os.write`` (atomic on a pipe)::

    {"t": <time.monotonic()>, "pid": ..., "ev": ..., ...}

On Linux the monotonic clock is system-wide, so the harness compares ``t`` across processes
and with its own readings (when it injected a fault). Events:

- ``armed``: imports done, about to start; ``joined``: the election started (connected);
- ``lease``: this node's lease was taken (``acquired: true``, stamped when the acquire
  returned, before the runtime even applied it) or extended (a renewal), with ``lease_end``,
  the node's own reading of when its leadership ends, and ``lease_end_lo``: the same reading
  bracketed from below (the two differ only if the process was descheduled, or stopped, while
  it read the lease);
- ``elected`` (``token``), ``demoted``, ``leader`` (``leader``: the leader this node knows,
  ``term``: the highest term it has seen), from the election's own callbacks;
- ``left``: the election stopped (graceful shutdown); ``exiting``.

The lease lines come from wrapping :class:`RedisTransport`'s ``acquire`` and ``renew`` (class
attributes: one election per process): right after one of them returns "yes", a ``call_soon``
callback reads :meth:`LeaderElection.status`, so the runtime has applied the answer by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

from fastapi_leader import LeaderElection, RedisTransport

PID = os.getpid()


def emit(ev: str, t: float | None = None, **data: Any) -> None:
    """Write one event line; ``t`` defaults to now (``time.monotonic()``)."""
    record: dict[str, Any] = {"t": time.monotonic() if t is None else t, "pid": PID, "ev": ev}
    record.update(data)
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with contextlib.suppress(BrokenPipeError):
        os.write(1, line.encode())


class Reporter:
    """Reports the role changes and lease extensions of the one election in this process."""

    def __init__(self, election: LeaderElection) -> None:
        self.election = election
        self._last_lease_end: float | None = None
        election.on_elected(self._elected)
        election.on_demoted(self._demoted)
        election.on_leader_change(self._leader_changed)
        self._wrap_transport()

    def _wrap_transport(self) -> None:
        reporter = self
        acquire, renew = RedisTransport.acquire, RedisTransport.renew

        async def reporting_acquire(
            transport: RedisTransport, term: int, ttl: float, announce: bytes
        ) -> bool:
            acquired = await acquire(transport, term, ttl, announce)
            if acquired:
                # Read before the runtime applies the answer: an early (safe) start of validity.
                returned_at = time.monotonic()
                asyncio.get_running_loop().call_soon(reporter.report_lease, term, returned_at)
            return acquired

        async def reporting_renew(
            transport: RedisTransport, term: int, ttl: float, announce: bytes
        ) -> bool:
            renewed = await renew(transport, term, ttl, announce)
            if renewed:
                asyncio.get_running_loop().call_soon(reporter.report_lease, term, None)
            return renewed

        RedisTransport.acquire = reporting_acquire  # type: ignore[method-assign,assignment]
        RedisTransport.renew = reporting_renew  # type: ignore[method-assign,assignment]

    def _lease_end(self) -> tuple[float, float, float] | None:
        """(read_at, lease_end_lo, lease_end): the lease end bracketed by two clock readings."""
        before = time.monotonic()
        status = self.election.status()
        after = time.monotonic()
        if status.lease_remaining is None:
            return None
        return after, before + status.lease_remaining, after + status.lease_remaining

    def report_lease(self, term: int, acquired_at: float | None) -> None:
        if self.election.status().fencing_token != term:
            return  # the answer was not used (too late, or superseded)
        reading = self._lease_end()
        if reading is None:
            return
        read_at, lease_end_lo, lease_end = reading
        if acquired_at is not None:
            emit(
                "lease",
                t=acquired_at,
                term=term,
                lease_end=lease_end,
                lease_end_lo=lease_end_lo,
                acquired=True,
            )
        elif self._last_lease_end is None or lease_end > self._last_lease_end:
            emit("lease", t=read_at, term=term, lease_end=lease_end, lease_end_lo=lease_end_lo)
        self._last_lease_end = lease_end

    def _elected(self, token: int) -> None:
        reading = self._lease_end()
        emit("elected", token=token, lease_end=None if reading is None else reading[2])

    def _demoted(self) -> None:
        self._last_lease_end = None
        emit("demoted")

    def _leader_changed(self, leader_id: str | None) -> None:
        emit("leader", leader=leader_id, term=self.election.term)
