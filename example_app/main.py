"""fastapi-leader's example app: one mover (the leader), many workers (every node).

Run one node with ``uvicorn example_app.main:app --port 8000``, or a local cluster with
``python -m example_app``. Every replica runs this same app:

- ``POST /events`` queues an event (the body is its data), on any node.
- The leader alone moves queued events to the work queue every 0.5 s: a leader-only
  scheduled job, so it runs once per cluster, not once per replica.
- Every node takes events off the work queue and processes them in a background task.
- ``GET /stats``: what this node moved (as leader) and processed, and what is waiting.
- ``POST /admin/move``: move a batch now. Leader only: a follower answers 503 and names the
  leader (``X-Leader-Id``, ``X-Leader-Url``).
- ``GET /leader``: this node's view of the election.

Configuration is read from the environment only: ``LEADER_*`` for the election (see
:class:`fastapi_leader.LeaderSettings`: ``LEADER_REDIS_URL``, ``LEADER_GROUP``,
``LEADER_NODE_ID``, ``LEADER_ADVERTISE_URL``, ...), whose Redis the app uses for its queues
too, and ``EXAMPLE_*`` for the app's own knobs (see :class:`example_app.work.ExampleSettings`:
``EXAMPLE_MOVE_INTERVAL``, ``EXAMPLE_BATCH_SIZE``, ``EXAMPLE_WORK_SECONDS``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from redis.asyncio import Redis

from fastapi_leader import (
    LeaderElection,
    LeaderStatusDep,
    leader_lifespan,
    leader_router,
    require_leader,
)

from .work import EventQueues, ExampleSettings

settings = ExampleSettings()  # EXAMPLE_* environment variables
election = LeaderElection()  # LEADER_* environment variables
# Nothing connects before the first command; the lifespan closes the client.
queues = EventQueues(
    Redis.from_url(election.settings.redis_url, decode_responses=True),
    f"{election.settings.channel_prefix}:{election.group}:example",
)


@contextlib.asynccontextmanager
async def workers(app: FastAPI) -> AsyncIterator[None]:
    """Every node, leader or not, processes events from the work queue while it runs."""
    task = asyncio.create_task(queues.work_forever(settings.work_seconds))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await queues.close()


app = FastAPI(
    title="fastapi-leader example",
    lifespan=leader_lifespan(election, lifespan=workers),
)
app.include_router(leader_router())


@election.scheduled_job("interval", seconds=settings.move_interval)
async def move_events() -> None:
    """Runs on the leader only, so each event is moved once, by one node."""
    token = election.fencing_token
    if token is not None:  # None: the leadership ended a moment ago
        await queues.move(token, settings.batch_size)


@app.post("/events", status_code=202)
async def post_event(request: Request) -> dict[str, str]:
    """Queue an event for the leader to hand out; its data is the request body, as text."""
    data = (await request.body()).decode(errors="replace")
    return {"id": await queues.push(data), "node_id": election.node_id}


@app.post("/admin/move", dependencies=[Depends(require_leader)])
async def move_now() -> dict[str, Any]:
    """Move a batch at once instead of at the next tick; followers answer 503."""
    token = election.fencing_token
    moved = 0 if token is None else await queues.move(token, settings.batch_size)
    return {"moved": moved, "node_id": election.node_id, "fencing_token": token}


@app.get("/stats")
async def stats(status: LeaderStatusDep) -> dict[str, Any]:
    """This node's counts, and what waits in the shared lists."""
    incoming, queued = await queues.lengths()
    return {
        "node_id": status.node_id,
        "is_leader": status.is_leader,
        "moved": queues.moved,
        "processed": queues.processed,
        "incoming": incoming,
        "queued": queued,
    }
