"""A live page of the cluster, ``GET /dashboard``, fed by server-sent events.

The page (``dashboard.html``, served as is) opens ``GET /dashboard/events``, a stream of
snapshots of what the serving node knows, four a second:

- ``election``: its ``GET /leader`` view (leader, term, the members with their URL and how long
  ago each was last heard);
- ``timeline``: the leadership changes it saw since it started, oldest first (observed through
  :class:`fastapi_leader.ElectionObserver`, not polled);
- ``work``: the cluster's event counts from Redis (published, waiting, moved and processed by
  each node), or ``work_error`` while Redis cannot be read.

Every node serves the page and the stream, so the page survives the node it came from: when
its stream breaks, it connects to another member it heard of (the stream answers
cross-origin for that). Each stream ends by itself after :data:`STREAM_SECONDS`, with a ``bye``
event after which the page reconnects at once: uvicorn waits for open responses before it shuts
down, and an endless stream would hold a stopping node (the leader's handover with it) for as
long as a tab stays open.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, StreamingResponse
from redis.exceptions import RedisError

from fastapi_leader import LeaderElection, LeaderStatus
from fastapi_leader.events import ElectionObserver, LeaderChange

from .work import Census

__all__ = ["STREAM_SECONDS", "LeadershipTimeline", "dashboard_router"]

PAGE = Path(__file__).with_name("dashboard.html")

# Four snapshots a second: a failover takes well under a second, and the page should show its
# gap; each costs one Redis script and a few hundred bytes.
SNAPSHOT_INTERVAL = 0.25
# How long one stream lasts before it ends and the page reconnects: the most a stream can add
# to a node's shutdown (see the module docstring), and cheap (one request a second per tab).
STREAM_SECONDS = 1.0
# The page's EventSource waits this long (ms) before it retries a node that did not answer.
RETRY_MILLISECONDS = 500
# A census answers in a millisecond; a Redis that hangs (paused, cut off) must not freeze the
# page's view of the election, which comes from this node's memory.
CENSUS_TIMEOUT = 1.0
# Leadership changes kept: a demo sees a few dozen; a bound keeps a long-running node's memory flat.
TIMELINE_LENGTH = 200

CensusReader = Callable[[], Coroutine[Any, Any, Census]]


class LeadershipTimeline(ElectionObserver):
    """Every leader this node came to know (or lost), with the wall-clock time it learned it.

    Told on the election's thread; ``deque.append`` is atomic, and readers copy the deque."""

    def __init__(self, length: int = TIMELINE_LENGTH) -> None:
        self._changes: deque[dict[str, Any]] = deque(maxlen=length)

    def leader_changed(self, event: LeaderChange) -> None:
        """Record the change as the page draws it."""
        self._changes.append(
            {
                "at": time.time(),
                "leader_id": event.leader_id,
                "term": event.term,
                "leaderless_for": event.leaderless_for,
                "seen_by": event.node_id,
            }
        )

    def changes(self) -> list[dict[str, Any]]:
        """The changes recorded so far, oldest first."""
        return list(self._changes)


def dashboard_router(
    election: LeaderElection, timeline: LeadershipTimeline, census: CensusReader
) -> APIRouter:
    """``GET /dashboard`` (the page) and ``GET /dashboard/events`` (its stream) for ``election``,
    whose ``timeline`` must be one of its observers; ``census`` reads the work's counts."""
    router = APIRouter(prefix="/dashboard", tags=["dashboard"])

    @router.get("", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @router.get("/events", include_in_schema=False)
    async def events() -> StreamingResponse:
        return StreamingResponse(
            _stream(election, timeline, census),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-store",
                # The page, served by one node, follows the stream of another when that one
                # dies. It reads what GET /leader already tells anyone who asks.
                "Access-Control-Allow-Origin": "*",
            },
        )

    return router


async def _stream(
    election: LeaderElection, timeline: LeadershipTimeline, census: CensusReader
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    ends_at = time.monotonic() + STREAM_SECONDS
    while True:
        snapshot = await _snapshot(election, timeline, census)
        yield f"data: {json.dumps(snapshot, separators=(',', ':'))}\n\n"
        if time.monotonic() + SNAPSHOT_INTERVAL > ends_at:
            break
        await asyncio.sleep(SNAPSHOT_INTERVAL)
    yield "event: bye\ndata: {}\n\n"


async def _snapshot(
    election: LeaderElection, timeline: LeadershipTimeline, census: CensusReader
) -> dict[str, Any]:
    snapshot: dict[str, Any] = {
        "at": time.time(),
        "election": LeaderStatus.from_status(election.status()).model_dump(mode="json"),
        "timeline": timeline.changes(),
        "work": None,
        "work_error": None,
    }
    try:
        counts = await asyncio.wait_for(census(), CENSUS_TIMEOUT)
    except RedisError as exc:  # Redis away: the page says so and keeps the election's view
        snapshot["work_error"] = f"Redis is unavailable: {exc}"
    except asyncio.TimeoutError:  # (not the builtin TimeoutError before Python 3.11)
        snapshot["work_error"] = f"Redis did not answer within {CENSUS_TIMEOUT:g} s"
    else:
        snapshot["work"] = {
            "published": counts.published,
            "incoming": counts.incoming,
            "queued": counts.queued,
            "in_flight": counts.in_flight,
            "delivered": counts.delivered,
            "lost": counts.lost,
            "duplicated": counts.duplicated,
            "moved_by": counts.moved_by,
            "processed_by": counts.processed_by,
        }
    return snapshot
