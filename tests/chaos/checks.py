"""The invariants, checked over the whole log of a run: pure functions, no I/O.

The log is one list of :class:`Record`: the nodes' own reports (see
:mod:`tests.chaos.reporting`) and the harness's records of what it did to each node process
(``spawn``, ``kill``, ``term``, ``stop``, ``cont``, ``exit``), all stamped with
``time.monotonic()``. :class:`View` replays it to tell who leads and who knows it at any
instant; the functions below derive leaderships and check them:

- at most one leadership per term, and terms (fencing tokens) only grow, across the group
  and within each node process (:func:`check_terms`);
- never two valid leases at once, except where the older holder is SIGSTOPped
  (:func:`dual_leases`);
- after each fault ends, one leader, and every node agreeing on it, within bounds
  (:func:`recovery`);
- a node that rejoins does not unseat the leader (:func:`disruptions`).

Process deaths, tracebacks and lost or duplicated events are checked where they are observed
(the harness) and land in the same list of violations.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Leadership",
    "Record",
    "View",
    "check_terms",
    "disruptions",
    "dual_leases",
    "leaderless_windows",
    "leaderships",
    "recovery",
]

# A lease read whose two clock readings are further apart than this (the process was stopped
# or descheduled while reading) is dated by the lower reading.
_READ_SPREAD = 0.02
# Harness records about processes.
PROCESS_EVENTS = frozenset({"spawn", "kill", "term", "stop", "cont", "exit"})


@dataclass(frozen=True)
class Record:
    """One line of the log: ``node`` is the node id, ``life`` its process incarnation."""

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


@dataclass
class _Node:
    alive: bool = False
    joined: bool = False
    paused: bool = False
    leaving: bool = False
    leading: bool = False
    known: str | None = None


class View:
    """The group as the records describe it, applied one record at a time."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.t = -math.inf

    def apply(self, record: Record) -> None:
        self.t = max(self.t, record.t)
        node = self.nodes.setdefault(record.node, _Node())
        ev = record.ev
        if ev == "spawn":
            self.nodes[record.node] = _Node(alive=True)
        elif ev in ("kill", "exit"):
            node.alive = node.joined = node.leading = node.paused = False
        elif ev == "term":
            node.leaving = True
        elif ev == "stop":
            node.paused = True
        elif ev == "cont":
            node.paused = False
        elif ev == "joined":
            node.joined = True
        elif ev == "elected":
            node.leading = True
        elif ev in ("demoted", "left"):
            node.leading = False
        elif ev == "leader":
            node.known = record.data.get("leader")

    def participants(self) -> list[str]:
        """Nodes that are running, joined, not paused and not on their way out."""
        return [
            name
            for name, node in self.nodes.items()
            if node.alive and node.joined and not node.paused and not node.leaving
        ]

    def leader(self) -> str | None:
        """The one node that says it leads, among the running ones; None for none or many."""
        leading = [
            name
            for name, node in self.nodes.items()
            if node.alive and not node.paused and node.leading
        ]
        return leading[0] if len(leading) == 1 else None

    def agreed(self) -> str | None:
        """The leader, if every participant names it."""
        leader = self.leader()
        if leader is None:
            return None
        for name in self.participants():
            if name != leader and self.nodes[name].known != leader:
                return None
        return leader


def _sorted(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.t)


def leaderships(records: Sequence[Record], observed_until: float) -> list[Leadership]:
    """Every leadership in the log. One starts at the earlier of its ``lease acquired`` and
    ``elected`` reports and ends at the earliest of: the ``demoted``/``left`` report, the last
    lease end its holder reported, the kill of its process (a SIGKILLed node leads no more,
    whatever it thought), a newer leadership of the same process, ``observed_until``."""
    out: list[Leadership] = []
    open_: dict[tuple[str, int], Leadership] = {}
    lease_end: dict[tuple[str, int], float] = {}

    def close(key: tuple[str, int], at: float, how: str) -> None:
        held = open_.pop(key)
        end = min(at, lease_end.pop(key, at))
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
    for key in list(open_):
        close(key, observed_until, "observed until")
    return sorted(out, key=lambda held: held.start)


@dataclass
class DualLease:
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


@dataclass
class Recovery:
    """How long after ``ended`` the group had one leader, and all agreed on it (None: not
    within the log)."""

    ended: float
    leader_after: float | None
    agreed_after: float | None


def recovery(records: Sequence[Record], ended: float, until: float) -> Recovery:
    """Replay the log from a fault's end (``ended``) to the next fault's start (``until``):
    when began the stretch of one leader, and of every participant naming it, that lasted to
    ``until``? (A node may find out late that a connection went silent during the fault and
    disagree for a while: the figure counts until it agrees again.) None: not so at ``until``.
    """
    view = View()
    ordered = _sorted(records)
    position = 0
    while position < len(ordered) and ordered[position].t <= ended:
        view.apply(ordered[position])
        position += 1
    leader_since = ended if view.leader() else None
    agreed_since = ended if view.agreed() else None
    for record in ordered[position:]:
        if record.t > until:
            break
        view.apply(record)
        if view.leader() is None:
            leader_since = None
        elif leader_since is None:
            leader_since = record.t
        if view.agreed() is None:
            agreed_since = None
        elif agreed_since is None:
            agreed_since = record.t
    return Recovery(
        ended,
        None if leader_since is None else leader_since - ended,
        None if agreed_since is None else agreed_since - ended,
    )


def disruptions(records: Sequence[Record], start: float, end: float) -> list[Record]:
    """``elected`` reports in ``[start, end]``: a window in which the leader must not change
    (a node joining a healthy group)."""
    return [r for r in records if r.ev == "elected" and start <= r.t <= end]


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


def count_events(acknowledged: Iterable[str], delivered: Sequence[str]) -> dict[str, int]:
    """Lost: acknowledged, never delivered. Duplicated: deliveries beyond the first."""
    counts = Counter(delivered)
    acked = set(acknowledged)
    return {
        "published": len(acked),
        "delivered": len(counts),
        "lost": len(acked - counts.keys()),
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "unacknowledged_delivered": len(counts.keys() - acked),
    }
