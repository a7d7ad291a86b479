"""Leaderships, terms and lease overlaps, reconstructed from the nodes' reports: pure functions.

The input is a list of :class:`Record`: the nodes' own reports (:mod:`harness.reports`) and,
where a harness has them, its records of what it did to each node process (``spawn``,
``kill``, ``term``, ``stop``, ``cont``, ``exit``), all stamped with ``time.monotonic()``. From
them:

- :func:`leaderships`: every leadership, from when its holder began to believe in it to the
  earliest moment it could no longer;
- :func:`dual_leases`: every overlap of two leaderships of different processes, with the part
  the older holder spent SIGSTOPped (which the guarantee excuses);
- :func:`check_terms`: at most one leadership per term, terms (fencing tokens) only growing,
  across the group and within each node process;
- :func:`leaderless_windows`, :func:`overlap`: the stretches without a leader, the total time
  with two or more.

A checker that never fails proves nothing: ``tests/test_harness_leases.py`` feeds these
sabotaged logs (two leases overlapping, a term going back) and expects them caught.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DualLease",
    "Leadership",
    "Record",
    "check_terms",
    "dual_leases",
    "leaderless_windows",
    "leaderships",
    "overlap",
    "pauses",
]

# A lease read whose two clock readings are further apart than this (the process was stopped
# or descheduled while reading) is dated by the lower reading (``lease_end_lo``).
_READ_SPREAD = 0.02


@dataclass(frozen=True)
class Record:
    """One line of the log: ``node`` is the node id, ``life`` its process incarnation (a
    harness that never restarts a node may use the pid)."""

    t: float
    node: str
    life: int
    ev: str
    data: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Leadership:
    """One leadership, by its holder's reports: valid from ``start`` to ``end``."""

    node: str
    life: int
    term: int | None
    start: float
    end: float
    how_ended: str = "open"


def _sorted(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.t)


def leaderships(
    records: Sequence[Record], observed_until: float, cap: Mapping[str, float] | None = None
) -> list[Leadership]:
    """Every leadership in the log. One starts at the earlier of its ``lease acquired`` and
    ``elected`` reports and ends at the earliest of: the ``demoted``/``left`` report (or the
    ``released`` one of its term, from the election thread), the last
    lease end its holder reported, the kill of its process (a SIGKILLed node leads no more,
    whatever it thought), a newer leadership of the same process, ``observed_until``, and the
    node's ``cap`` if it has one (the harness's own bound: when it saw the process die, or the
    latest a lease renewed before a SIGSTOP can end)."""
    out: list[Leadership] = []
    open_: dict[tuple[str, int], Leadership] = {}
    lease_end: dict[tuple[str, int], float] = {}

    def close(key: tuple[str, int], at: float, how: str) -> None:
        held = open_.pop(key)
        end = min(at, lease_end.pop(key, at))
        if cap is not None and key[0] in cap:
            end = min(end, cap[key[0]])
        held.end = max(held.start, end)
        held.how_ended = how
        out.append(held)

    for record in _sorted(records):
        key = (record.node, record.life)
        ev, data = record.ev, record.data
        if ev == "lease":
            term = data.get("term")
            if key in open_ and data.get("acquired") and open_[key].term != term:
                close(key, record.t, "superseded")
            if key not in open_:
                open_[key] = Leadership(record.node, record.life, term, record.t, record.t)
            end = float(data["lease_end"])
            low = float(data.get("lease_end_lo", end))
            if end - low > _READ_SPREAD:
                end = low
            lease_end[key] = max(lease_end.get(key, -math.inf), end)
        elif ev == "elected":
            token = data.get("token")
            if key in open_ and open_[key].term not in (None, token):
                close(key, record.t, "superseded")
            if key not in open_:
                open_[key] = Leadership(record.node, record.life, token, record.t, record.t)
                if data.get("lease_end") is not None:
                    lease_end[key] = float(data["lease_end"])
            elif open_[key].term is None:
                open_[key].term = token
        elif ev in ("demoted", "left", "kill", "exit") and key in open_:
            close(key, record.t, ev)
        elif ev == "released" and key in open_ and open_[key].term == data.get("term"):
            close(key, record.t, "demoted")
    for key in list(open_):
        close(key, observed_until, "observed until")
    return sorted(out, key=lambda held: held.start)


@dataclass
class DualLease:
    """Two leaderships valid at once, from ``start`` to ``end``."""

    first: Leadership
    second: Leadership
    start: float
    end: float
    paused: float  # how much of the overlap the older holder spent SIGSTOPped

    @property
    def unexcused(self) -> float:
        return self.end - self.start - self.paused


def pauses(
    records: Sequence[Record], observed_until: float
) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """SIGSTOP windows by node process: ``[(start, end)]``."""
    out: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    since: dict[tuple[str, int], float] = {}
    for record in _sorted(records):
        key = (record.node, record.life)
        if record.ev == "stop":
            since[key] = record.t
        elif record.ev in ("cont", "kill", "exit") and key in since:
            out[key].append((since.pop(key), record.t))
    for key, start in since.items():
        out[key].append((start, observed_until))
    return out


def dual_leases(records: Sequence[Record], observed_until: float) -> list[DualLease]:
    """Every overlap of two leaderships (of different processes), with the part of it that
    the older holder spent stopped, which the guarantee excuses."""
    held = leaderships(records, observed_until)
    stopped = pauses(records, observed_until)
    out = []
    for i, first in enumerate(held):
        for second in held[i + 1 :]:
            if second.start >= first.end:
                break  # sorted by start: no later one overlaps `first` either
            if (first.node, first.life) == (second.node, second.life):
                continue
            start, end = second.start, min(first.end, second.end)
            if end <= start:
                continue
            excused = sum(
                max(0.0, min(end, p_end) - max(start, p_start))
                for p_start, p_end in stopped.get((first.node, first.life), [])
            )
            out.append(DualLease(first, second, start, end, excused))
    return out


def check_terms(records: Sequence[Record], observed_until: float) -> list[str]:
    """At most one leadership per term; each leadership's term above every earlier one's;
    each node process's own term never going down."""
    problems = []
    by_term: dict[int, list[Leadership]] = defaultdict(list)
    highest: Leadership | None = None
    for held in leaderships(records, observed_until):
        if held.term is None:
            continue
        by_term[held.term].append(held)
        if highest is not None and highest.term is not None and held.term < highest.term:
            problems.append(
                f"term went backwards: {held.node} led with term {held.term} at "
                f"{held.start:.3f}, after {highest.node} had led with term {highest.term}"
            )
        if highest is None or (highest.term or 0) < held.term:
            highest = held
    for term, holders in sorted(by_term.items()):
        if len(holders) > 1:
            names = ", ".join(f"{h.node}@{h.start:.3f}" for h in holders)
            problems.append(f"term {term} led {len(holders)} times: {names}")
    seen: dict[tuple[str, int], tuple[int, float]] = {}
    for record in _sorted(records):
        if record.ev != "leader" or record.data.get("term") is None:
            continue
        key = (record.node, record.life)
        term = int(record.data["term"])
        if key in seen and term < seen[key][0]:
            problems.append(
                f"{record.node} (life {record.life}): term went from {seen[key][0]} down to "
                f"{term} at {record.t:.3f}"
            )
        seen[key] = (max(term, seen.get(key, (term, 0.0))[0]), record.t)
    return problems


def leaderless_windows(
    records: Sequence[Record], since: float, observed_until: float
) -> list[tuple[float, float]]:
    """Stretches of ``[since, observed_until]`` during which nobody held a valid lease."""
    spans = sorted(
        (held.start, held.end) for held in leaderships(records, observed_until) if held.end > since
    )
    gaps = []
    covered = since
    for start, end in spans:
        if start > covered:
            gaps.append((covered, start))
        covered = max(covered, end)
    if covered < observed_until:
        gaps.append((covered, observed_until))
    return gaps


def overlap(intervals: Sequence[tuple[float, float]]) -> float:
    """Total time during which at least two of the intervals overlap."""
    points: list[tuple[float, int]] = []
    for start, end in intervals:
        if end > start:
            points += [(start, 1), (end, -1)]
    points.sort()
    depth, total, since = 0, 0.0, 0.0
    for at, step in points:
        if depth >= 2:
            total += at - since
        depth += step
        since = at
    return total
