"""Health probes for an orchestrator: liveness, readiness, and an opt-in leader-only check.

::

    app.include_router(probe_router())  # GET /livez, GET /readyz
    app.include_router(probe_router(leaderz="/leaderz"))  # and GET /leaderz

- **Liveness** fails only for what a restart cures (client-go's healthz adaptor has the same
  rule): the app's event loop stuck past ``LEADER_LOOP_STALL_LIMIT``; the election's own thread
  not running for ``margin`` seconds; or this node still taking itself for the leader ``margin``
  seconds after its lease ended without a renewal (the runtime steps down at the lease's end, so
  only a wedged runtime gets there). Redis being away is *not* a liveness failure: a restart
  does not bring Redis back, and a node cut off from it already stops leading by itself.
  Served over HTTP, the app-loop part is mostly the probe's own timeout: a loop stuck for good
  does not answer at all.
- **Readiness** is the election running (started, not shutting down). It never depends on
  leadership: a readiness that waits for the leader deadlocks rolling updates (the new pods
  never become ready, so the old leader is never replaced), and followers serve traffic.
- **Leader only** (opt-in): 200 on the leader, the usual 503 with ``X-Leader-Id`` /
  ``X-Leader-Url`` elsewhere: for a load balancer's health check that must send some traffic
  to the leader alone. Do not use it as a Deployment's readiness probe (see above).

Every answer is JSON ``{"status": "ok" | "failing", "checks": {...}}`` with ``Cache-Control:
no-store``. :func:`liveness` and :func:`readiness` are the plain functions behind the routes,
safe to call from any thread (a sidecar server of your own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .integration import LEADER_ONLY_RESPONSES, NotLeader, get_election
from .service import LeaderElection

__all__ = ["DEFAULT_LIVENESS_MARGIN", "ProbeResult", "liveness", "probe_router", "readiness"]

DEFAULT_LIVENESS_MARGIN = 10.0
"""Seconds a wedged runtime is given before liveness fails: as long as the app's loop may stall
by default (``LEADER_LOOP_STALL_LIMIT``), and far beyond any lease (0.4 s by default), so a
slow host never fails it."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A probe's verdict: ``ok``, and each check by name with what it found (failing checks
    say why)."""

    ok: bool
    checks: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        """200 when ok, else 503; JSON ``{"status": ..., "checks": ...}``, not cached."""
        return JSONResponse(
            {"status": "ok" if self.ok else "failing", "checks": self.checks},
            status_code=200 if self.ok else 503,
            headers={"Cache-Control": "no-store"},
        )


def liveness(election: LeaderElection, *, margin: float = DEFAULT_LIVENESS_MARGIN) -> ProbeResult:
    """Whether this process needs a restart: fails only for what one cures (see the module)."""
    checks: dict[str, str] = {}
    ok = True
    limit = election.settings.loop_stall_limit
    stall = election.loop_stall
    if stall > limit:
        ok = False
        checks["app_loop"] = f"stuck for {stall:.1f} s (LEADER_LOOP_STALL_LIMIT={limit:g})"
    else:
        checks["app_loop"] = "ok"
    facts = election._runtime_health()
    if facts is None:
        checks["election"] = "not running"
        return ProbeResult(ok, checks)
    thread_idle, stale_lease = facts
    if thread_idle > margin:
        ok = False
        checks["election_thread"] = f"has not run for {thread_idle:.1f} s"
    else:
        checks["election_thread"] = "ok"
    if stale_lease is not None and stale_lease > margin:
        ok = False
        checks["lease"] = (
            f"still leading {stale_lease:.1f} s after its lease ended without a renewal"
        )
    else:
        checks["lease"] = "ok"
    return ProbeResult(ok, checks)


def readiness(election: LeaderElection) -> ProbeResult:
    """Whether this node should get traffic: the election is running. Never leadership."""
    running = election.running
    return ProbeResult(running, {"election": "running" if running else "not running"})


def probe_router(
    *,
    livez: str | None = "/livez",
    readyz: str | None = "/readyz",
    leaderz: str | None = None,
    margin: float = DEFAULT_LIVENESS_MARGIN,
    include_in_schema: bool = False,
) -> APIRouter:
    """A router with the probes: ``GET /livez`` (:func:`liveness`), ``GET /readyz``
    (:func:`readiness`), and, when ``leaderz`` names a path, the leader-only check. A path set
    to ``None`` is left out. Needs :func:`~fastapi_leader.leader_lifespan`."""
    router = APIRouter(include_in_schema=include_in_schema)

    if livez is not None:

        @router.get(livez, name="liveness", summary="Whether this process needs a restart")
        async def live(request: Request) -> JSONResponse:
            return liveness(get_election(request), margin=margin).response()

    if readyz is not None:

        @router.get(readyz, name="readiness", summary="Whether this node takes traffic")
        async def ready(request: Request) -> JSONResponse:
            return readiness(get_election(request)).response()

    if leaderz is not None:

        @router.get(
            leaderz,
            name="leader_only_check",
            summary="200 on the leader, 503 elsewhere",
            responses=LEADER_ONLY_RESPONSES,
        )
        async def leader(request: Request) -> JSONResponse:
            election = get_election(request)
            status = election.status()
            if not status.is_leader:
                raise NotLeader.from_status(status)
            body: dict[str, Any] = {
                "status": "ok",
                "checks": {"leader": status.node_id},
                "fencing_token": status.fencing_token,
            }
            return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
