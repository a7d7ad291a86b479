"""Prometheus metrics of the election: ``pip install "fastapi-leader[prometheus]"``.

::

    from fastapi_leader.prometheus import PrometheusObserver, metrics_router

    election = LeaderElection(observer=PrometheusObserver())
    app = FastAPI(lifespan=leader_lifespan(election))
    app.include_router(metrics_router())  # GET /metrics

Every node exports, leader or not (a standby without metrics is an alert nobody can write).
Names follow Prometheus' conventions: one prefix, base units, ``_total`` counters, the group as
a label and never the node id (a label whose values grow with every restart):

============================================== ======= ========================================
``fastapi_leader_is_leader{group}``            gauge   1 while a node of this process leads
``fastapi_leader_term{group}``                 gauge   the highest term seen
``fastapi_leader_members{group}``              gauge   live members heard
``fastapi_leader_connected{group}``            gauge   1 while connected to the broker
``fastapi_leader_leadership_changes_total``    counter ``{group, change="gained"|"lost",
                                                       reason}``: this node's leadership
                                                       (gained: ``election_timeout`` or
                                                       ``named_successor``; lost: the cause)
``fastapi_leader_elections_total``             counter ``{group, trigger, outcome}``: candidacies
                                                       (``outcome`` is ``won`` or why not)
``fastapi_leader_leaderless_seconds``          histo   ``{group}``: the gap before a leadership,
                                                       observed by the new leader
``fastapi_leader_renew_duration_seconds``      histo   ``{group}``: renewal round trips
``fastapi_leader_renew_failures_total``        counter ``{group, reason}``
``fastapi_leader_dropped_messages_total``      counter ``{group, reason}``
``fastapi_leader_loop_stalls_total``           counter ``{group}``
``fastapi_leader_connection_losses_total``     counter ``{group}``
``fastapi_leader_node_id_conflicts_total``     counter ``{group}``
============================================== ======= ========================================

Summed over the processes of a deployment, each counter counts every event once (a change of
leadership is counted by the node that gained it and the one that lost it, an election by its
candidate, a leaderless gap by its new leader), and ``is_leader`` sums to 1.

**Several workers** (``uvicorn --workers N``, gunicorn) share one ``/metrics`` through
prometheus-client's multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory
before the server starts. Nothing here is computed at scrape time: the gauges are set at each
event (``is_leader`` at every transition and when the lease ends) and carry a multiprocess mode
(``livemax`` for ``is_leader``, ``term`` and ``members``, ``livemin`` for ``connected``), so a
scrape reads the live workers' files. A worker killed without a goodbye leaves its file behind,
so :func:`metrics_router` forgets the gauges of processes that no longer exist before it
answers (gunicorn users may also call ``multiprocess.mark_process_dead`` in ``child_exit``).

Within one process several nodes of one group (tests, ``memory://``) fold into one series: the
most any of them says (the fewest for ``connected``).
"""

from __future__ import annotations

import glob
import os
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .core import Role
from .events import (
    ConnectionLost,
    ConnectionRestored,
    ElectionEnd,
    ElectionEvent,
    ElectionObserver,
    ElectionStart,
    IdConflict,
    LeaderChange,
    LeaseLost,
    LeaseRenewed,
    LoopStalled,
    MembersChange,
    MessageDropped,
    RenewFailed,
    RoleChange,
)

__all__ = ["PrometheusObserver", "metrics_router", "prune_dead_processes"]

PREFIX = "fastapi_leader"

# Renewals are one Redis round trip: sub-millisecond on loopback, a few ms in a data centre;
# past the lease (0.4 s by default) one no longer counts.
RENEW_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# A handover is milliseconds, a crash failover about one election timeout (0.5 to 0.7 s), a
# Redis outage seconds to minutes.
LEADERLESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Metrics:
    """The collectors, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, mode: Literal["livemax", "livemin"]) -> Gauge:
            return Gauge(
                f"{PREFIX}_{name}", doc, ["group"], registry=registry, multiprocess_mode=mode
            )

        self.is_leader = gauge("is_leader", "1 while a node of this process leads.", "livemax")
        self.term = gauge("term", "The highest election term seen.", "livemax")
        self.members = gauge("members", "Live members of the group heard.", "livemax")
        self.connected = gauge("connected", "1 while connected to the broker.", "livemin")
        self.leadership_changes = Counter(
            f"{PREFIX}_leadership_changes",
            "Leaderships gained and lost by this node, by reason.",
            ["group", "change", "reason"],
            registry=registry,
        )
        self.elections = Counter(
            f"{PREFIX}_elections",
            "Candidacies of this node, by what made it stand and how it ended.",
            ["group", "trigger", "outcome"],
            registry=registry,
        )
        self.leaderless = Histogram(
            f"{PREFIX}_leaderless_seconds",
            "Time without a leader before this node's leadership began, from the last sign of "
            "the previous leader.",
            ["group"],
            buckets=LEADERLESS_BUCKETS,
            registry=registry,
        )
        self.renew_duration = Histogram(
            f"{PREFIX}_renew_duration_seconds",
            "Round trip of the leader's successful lease renewals.",
            ["group"],
            buckets=RENEW_BUCKETS,
            registry=registry,
        )
        self.renew_failures = Counter(
            f"{PREFIX}_renew_failures",
            "Lease renewals that failed, by reason (error, timeout, key_lost).",
            ["group", "reason"],
            registry=registry,
        )
        self.dropped = Counter(
            f"{PREFIX}_dropped_messages",
            "Messages dropped, by reason (unsigned, bad_signature, replay, ...).",
            ["group", "reason"],
            registry=registry,
        )
        self.loop_stalls = Counter(
            f"{PREFIX}_loop_stalls",
            "Times the app's event loop stalled past LEADER_LOOP_STALL_LIMIT.",
            ["group"],
            registry=registry,
        )
        self.connection_losses = Counter(
            f"{PREFIX}_connection_losses",
            "Times the broker connection broke.",
            ["group"],
            registry=registry,
        )
        self.node_id_conflicts = Counter(
            f"{PREFIX}_node_id_conflicts",
            "Times another live process was found using this node's id.",
            ["group"],
            registry=registry,
        )


# One set of collectors per registry: a second observer (a second app in one test process)
# shares it instead of failing with "Duplicated timeseries in CollectorRegistry".
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_REGISTERING = threading.Lock()


@dataclass
class _Node:
    leading: bool = False
    term: int = 0
    members: int = 0
    connected: bool = True


class PrometheusObserver(ElectionObserver):
    """Exports an election's events as Prometheus metrics (see the module for the list).

    Args:
        registry: where the collectors are registered; default prometheus-client's global
            ``REGISTRY`` (which multiprocess mode also writes through). Observers given the same
            registry share its collectors.

    Pass it as ``LeaderElection(observer=...)`` (one observer may watch several elections: a
    group per singleton role), or ``leader_lifespan(observer=...)``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        with _REGISTERING:
            metrics = _BY_REGISTRY.get(registry)
            if metrics is None:
                metrics = _BY_REGISTRY[registry] = _Metrics(registry)
        self.metrics = metrics
        self.registry = registry
        self._lock = threading.Lock()
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._triggers: dict[tuple[str, str], str] = {}  # why each candidacy in progress began

    # ---- the gauges: this process's nodes of a group, folded ---------------------------------

    def _update(self, event: ElectionEvent, change: Callable[[_Node], None]) -> None:
        with self._lock:
            node = self._nodes.setdefault((event.group, event.node_id), _Node())
            change(node)
            self._publish(event.group)

    def _publish(self, group: str) -> None:
        nodes = [n for (g, _), n in self._nodes.items() if g == group]
        m = self.metrics
        m.is_leader.labels(group).set(1 if any(n.leading for n in nodes) else 0)
        m.term.labels(group).set(max((n.term for n in nodes), default=0))
        m.members.labels(group).set(max((n.members for n in nodes), default=0))
        m.connected.labels(group).set(1 if nodes and all(n.connected for n in nodes) else 0)

    def joined(self, event: ElectionEvent) -> None:
        self._update(event, lambda node: None)

    def left(self, event: ElectionEvent) -> None:
        with self._lock:
            self._nodes.pop((event.group, event.node_id), None)
            self._publish(event.group)

    def role_changed(self, event: RoleChange) -> None:
        def change(node: _Node) -> None:
            node.leading = event.new is Role.LEADER
            node.term = max(node.term, event.term)

        self._update(event, change)
        if event.new is Role.LEADER:
            # Gained for what made it stand: an election timeout, or a handover to it.
            with self._lock:
                trigger = self._triggers.get((event.group, event.node_id), event.cause.value)
            self.metrics.leadership_changes.labels(event.group, "gained", trigger).inc()

    def lease_lost(self, event: LeaseLost) -> None:
        def change(node: _Node) -> None:
            node.leading = False

        self._update(event, change)
        self.metrics.leadership_changes.labels(event.group, "lost", event.cause.value).inc()

    def leader_changed(self, event: LeaderChange) -> None:
        def change(node: _Node) -> None:
            node.term = max(node.term, event.term)

        self._update(event, change)
        if event.leader_id == event.node_id and event.leaderless_for is not None:
            self.metrics.leaderless.labels(event.group).observe(event.leaderless_for)

    def members_changed(self, event: MembersChange) -> None:
        def change(node: _Node) -> None:
            node.members = len(event.members)

        self._update(event, change)

    def connection_lost(self, event: ConnectionLost) -> None:
        def change(node: _Node) -> None:
            node.connected = False

        self._update(event, change)
        self.metrics.connection_losses.labels(event.group).inc()

    def connection_restored(self, event: ConnectionRestored) -> None:
        def change(node: _Node) -> None:
            node.connected = True

        self._update(event, change)

    # ---- counters and histograms --------------------------------------------------------------

    def election_started(self, event: ElectionStart) -> None:
        with self._lock:
            self._triggers[(event.group, event.node_id)] = event.cause.value

    def election_ended(self, event: ElectionEnd) -> None:
        with self._lock:
            trigger = self._triggers.pop((event.group, event.node_id), "unknown")
        outcome = "won" if event.won else event.cause.value
        self.metrics.elections.labels(event.group, trigger, outcome).inc()

    def lease_renewed(self, event: LeaseRenewed) -> None:
        self.metrics.renew_duration.labels(event.group).observe(event.latency)

    def renew_failed(self, event: RenewFailed) -> None:
        self.metrics.renew_failures.labels(event.group, event.reason).inc()

    def message_dropped(self, event: MessageDropped) -> None:
        self.metrics.dropped.labels(event.group, event.reason).inc()

    def loop_stalled(self, event: LoopStalled) -> None:
        self.metrics.loop_stalls.labels(event.group).inc()

    def node_id_conflict(self, event: IdConflict) -> None:
        if not event.resolved:
            self.metrics.node_id_conflicts.labels(event.group).inc()


# ---- /metrics ---------------------------------------------------------------------------------

_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")


def prune_dead_processes(path: str | None = None) -> list[int]:
    """In multiprocess mode, forget the live-mode gauges of processes that no longer exist
    (``multiprocess.mark_process_dead``), so a killed worker's ``is_leader`` of 1 does not
    outlive it. Returns their pids. :func:`metrics_router` calls it before each scrape."""
    path = path or os.environ.get(_MULTIPROC_ENV)
    if not path:
        return []
    dead = set()
    for file in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        found = _LIVE_GAUGE_FILE.search(os.path.basename(file))
        if found is not None and not _alive(int(found.group(1))):
            dead.add(int(found.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def metrics_router(
    path: str = "/metrics",
    *,
    registry: CollectorRegistry | None = None,
    include_in_schema: bool = False,
) -> APIRouter:
    """A router with ``GET {path}``: the metrics in Prometheus' text format.

    ``app.include_router(metrics_router())``. With ``PROMETHEUS_MULTIPROC_DIR`` set (and no
    ``registry``), it answers for every worker of the server, from their files, having first
    forgotten the gauges of dead ones; otherwise it serves ``registry`` (default: the global
    one)."""
    router = APIRouter(include_in_schema=include_in_schema)

    @router.get(path, name="metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        # A sync route: FastAPI runs it in a worker thread, off the app's loop (merging the
        # workers' files reads the disk).
        directory = os.environ.get(_MULTIPROC_ENV)
        if registry is None and directory:
            prune_dead_processes(directory)
            served = CollectorRegistry()
            multiprocess.MultiProcessCollector(served, directory)  # type: ignore[no-untyped-call]
        else:
            served = REGISTRY if registry is None else registry
        return Response(generate_latest(served), media_type=CONTENT_TYPE_LATEST)

    return router
