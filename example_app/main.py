"""fastapi-leader's example app: one mover (the leader), many workers (every node).

Run one node with ``uvicorn example_app.main:app --port 8000``, or a local cluster with
``python -m example_app``. Every replica runs this same app:

- ``POST /events`` appends an event (the body is its data) to a Redis Stream, on any node.
- The leader alone moves new events from the stream to the work queue every 0.5 s, and advances
  its checkpoint in the same fenced script (:class:`fastapi_leader.Fence`): a leader-only
  scheduled job, so it runs once per cluster, and a leader that wakes from a pause after a
  successor has taken over moves nothing. Each event reaches the queue exactly once.
- Every node takes events off the work queue and processes them in a background task; the
  leader hands the events held by nodes it no longer hears back to the queue.
- ``GET /stats``: what this node moved (as leader) and processed, and the cluster-wide counts
  a fault-injection harness needs (published, waiting, delivered, lost, duplicated).
- ``POST /admin/move``: move a batch now. Leader only: a follower answers 503 and names the
  leader (``X-Leader-Id``, ``X-Leader-Url``).
- ``GET /leader``: this node's view of the election.
- ``GET /metrics``: Prometheus metrics, when the ``[prometheus]`` extra is installed (under
  ``uvicorn --workers N``, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory).
- ``GET /livez``, ``GET /readyz``: health probes for an orchestrator.
- ``GET /dashboard``: a live page of the cluster (see :mod:`example_app.dashboard`).

Configuration is read from the environment only: ``LEADER_*`` for the election (see
:class:`fastapi_leader.LeaderSettings`: ``LEADER_REDIS_URL``, ``LEADER_GROUP``,
``LEADER_NODE_ID``, ``LEADER_ADVERTISE_URL``, ...), whose Redis the app uses for its queues
too, and ``EXAMPLE_*`` for the app's own knobs (see :class:`example_app.work.ExampleSettings`:
``EXAMPLE_MOVE_INTERVAL``, ``EXAMPLE_BATCH_SIZE``, ``EXAMPLE_WORK_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from fastapi_leader import (
    LeaderElection,
    LeaderStatusDep,
    StaleToken,
    leader_lifespan,
    leader_router,
    probe_router,
    require_leader,
)

from .dashboard import LeadershipTimeline, dashboard_router
from .work import EventQueues, ExampleSettings, cancel_and_wait

log = logging.getLogger("example_app")

# Seconds a command may take before its connection counts as dead: longer than the worker's
# blocking read (1 s), far shorter than TCP's own give-up on a half-open connection.
REDIS_TIMEOUT = 5.0

settings = ExampleSettings()  # EXAMPLE_* environment variables
election = LeaderElection()  # LEADER_* environment variables
# Nothing connects before the first command; the lifespan closes the client. No retries inside
# redis-py: a blocking move retried after its reply was lost would leave an event stranded in
# this node's hands unseen; the worker retries itself, after handing back what it holds.
queues = EventQueues(
    Redis.from_url(
        election.settings.redis_url,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
    ),
    f"{election.settings.channel_prefix}:{election.group}:example",
    election.node_id,
)


@contextlib.asynccontextmanager
async def workers(app: FastAPI) -> AsyncIterator[None]:
    """Every node, leader or not, processes events from the work queue while it runs."""
    task = asyncio.create_task(queues.work_forever(settings.work_seconds))
    try:
        yield
    finally:
        await cancel_and_wait(task)
        await queues.close()


app = FastAPI(
    title="fastapi-leader example",
    lifespan=leader_lifespan(election, lifespan=workers),
)
app.include_router(leader_router())
app.include_router(probe_router())
timeline = LeadershipTimeline()
election.add_observer(timeline)
app.include_router(dashboard_router(election, timeline, queues.census))

try:
    from fastapi_leader.prometheus import PrometheusObserver, metrics_router
except ImportError:  # the [prometheus] extra is not installed: no /metrics
    pass
else:
    election.add_observer(PrometheusObserver())
    app.include_router(metrics_router())


@app.exception_handler(RedisError)
async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Redis out of reach (or loading, or read-only after a failover) is a condition of the
    moment, not a bug: 503, no traceback."""
    return JSONResponse({"detail": f"Redis is unavailable: {exc}"}, status_code=503)


@election.on_elected
async def fence_off_older_leaderships(token: int) -> None:
    """From the moment this leadership begins, the fence refuses every older one, even before
    this node's first move."""
    try:
        await queues.fence.advance(token)
    except StaleToken as exc:  # a newer leadership exists already: ours is ending
        log.warning("leadership fenced off at once: %s", exc)
    except RedisError as exc:  # the first move advances it
        log.warning("cannot advance the fence: %s", exc)


@election.scheduled_job("interval", seconds=settings.move_interval)
async def move_events() -> None:
    """Runs on the leader only. The move reads and advances the checkpoint in one script, so
    each event is moved once even where two leaderships overlap; the fence makes one that a
    newer leadership has overtaken (paused between reading its token and writing) do nothing
    at all, which matters for the hand-back: after a pause, every other node looks gone."""
    token = election.fencing_token
    if token is None:  # the leadership ended a moment ago
        return
    try:
        await queues.move(token, settings.batch_size)
        await queues.reclaim(token, election.members)
    except StaleToken as exc:
        log.warning("leader work refused: %s", exc)
    except RedisError as exc:  # the next tick tries again
        log.warning("cannot move events: %s", exc)


@app.post("/events", status_code=202)
async def post_event(request: Request) -> dict[str, str]:
    """Publish an event for the leader to hand out; its data is the request body, as text."""
    data = (await request.body()).decode(errors="replace")
    return {"id": await queues.publish(data), "node_id": election.node_id}


@app.post("/admin/move", dependencies=[Depends(require_leader)])
async def move_now() -> dict[str, Any]:
    """Move a batch at once instead of at the next tick; followers answer 503, and a
    leadership that a newer one has overtaken answers 409."""
    token = election.fencing_token
    try:
        moved = 0 if token is None else await queues.move(token, settings.batch_size)
    except StaleToken as exc:
        raise HTTPException(409, str(exc)) from None
    return {"moved": moved, "node_id": election.node_id, "fencing_token": token}


@app.get("/stats")
async def stats(status: LeaderStatusDep) -> dict[str, Any]:
    """This node's counts since it started, and the cluster's, read from Redis at once.

    A harness that has drained the cluster (``incoming``, ``queued`` and ``in_flight`` 0)
    checks ``lost`` and ``duplicated``: both must be 0. ``lost``: published, but neither
    waiting nor recorded as processed; ``duplicated``: processings recorded beyond the first
    of their event (``deliveries - delivered``)."""
    census = await queues.census()
    return {
        "node_id": status.node_id,
        "is_leader": status.is_leader,
        "moved": queues.moved,
        "processed": queues.processed,
        "incoming": census.incoming,
        "queued": census.queued,
        "in_flight": census.in_flight,
        "published": census.published,
        "delivered": census.delivered,
        "deliveries": census.deliveries,
        "lost": census.lost,
        "duplicated": census.duplicated,
        "moved_by": census.moved_by,
        "processed_by": census.processed_by,
    }
