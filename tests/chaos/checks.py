"""The invariants, checked over the whole log of a run: pure functions, no I/O.

The log is one list of :class:`~harness.leases.Record`: the nodes' own reports (see
:mod:`harness.reports`) and the harness's records of what it did to each node process
(``spawn``, ``kill``, ``term``, ``stop``, ``cont``, ``exit``), all stamped with
``time.monotonic()``. :class:`View` replays it to tell who leads and who knows it at any
instant; the functions below check the group's recovery from each fault:

- the leaderships, terms and lease overlaps come from :mod:`harness.leases`, shared with the
  benchmarks (:func:`check_terms`, :func:`dual_leases`: re-exported here);
- after each fault ends, one leader, and every node agreeing on it, within bounds
  (:func:`recovery`);
- a node that rejoins does not unseat the leader (:func:`disruptions`);
- a stall of a node's app loop below ``LEADER_LOOP_STALL_LIMIT`` changes no leadership, and one
  of the leader's beyond it hands the leadership over, once the limit has passed, to another
  node (:func:`loop_stall`).

Process deaths, tracebacks and lost or duplicated events are checked where they are observed
(the harness) and land in the same list of violations.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.leases import (
    DualLease,
    Leadership,
    Record,
    check_terms,
    dual_leases,
    leaderless_windows,
    leaderships,
    pauses,
)

__all__ = [
    "DualLease",
    "Leadership",
    "Record",
    "View",
    "check_terms",
    "disruptions",
    "dual_leases",
    "leaderless_windows",
    "leaderships",
    "loop_stall",
    "pauses",
    "recovery",
]

# A handover of a leader stalled beyond the limit may come this much before the limit by the
# harness's clock (the stall's start is the node's own report, the watchdog's count may start
# a probe earlier); earlier, the leadership was lost to the stall, not handed over.
HANDOVER_EARLY_SLACK = 0.25
# Harness records about processes.
PROCESS_EVENTS = frozenset({"spawn", "kill", "term", "stop", "cont", "exit"})


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


def loop_stall(
    records: Sequence[Record],
    node: str,
    led: bool,
    start: float,
    end: float,
    until: float,
    limit: float,
) -> list[str]:
    """The invariants of one stall of ``node``'s app loop, from ``start`` to ``end`` (its own
    ``stalling`` and ``unstalled`` reports), watched until ``until`` (the next fault); ``led``:
    the node was the agreed leader when the stall began.

    Below ``limit``: no leadership changes at all (nobody elected, the stalled leader not
    demoted). Beyond it (``led`` only): no other node elected before the limit, another one
    elected before the stall ends, and the stalled node not elected again until ``until``.
    """
    window = [r for r in records if start <= r.t <= until]
    elected = [r for r in window if r.ev == "elected"]
    what = f"{node}'s app loop stalled {end - start:.2f} s"
    if end - start < limit:
        problems = [
            f"{what} (below the {limit:g} s limit): {r.node} elected (term "
            f"{r.data.get('token')}) {r.t - start:.2f} s after the stall began"
            for r in elected
        ]
        problems += [
            f"{what} (below the {limit:g} s limit): it was demoted "
            f"{r.t - start:.2f} s after the stall began"
            for r in window
            if r.ev == "demoted" and r.node == node and led
        ]
        return problems
    if not led:
        return []
    problems = []
    successors = [r for r in elected if r.node != node]
    early = [r for r in successors if r.t < start + limit - HANDOVER_EARLY_SLACK]
    for r in early:
        problems.append(
            f"{what}: {r.node} elected {r.t - start:.2f} s into the stall, before the "
            f"{limit:g} s limit: the leadership was lost to the stall, not handed over"
        )
    if not any(r.t <= end for r in successors):
        problems.append(
            f"{what} (beyond the {limit:g} s limit): no other node was elected while it lasted"
        )
    for r in elected:
        if r.node == node:
            problems.append(
                f"{what}: it was elected again {r.t - end:.2f} s after the stall ended "
                "(a node handed over by its watchdog must wait before it stands again)"
            )
    return problems


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
