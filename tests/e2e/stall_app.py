"""A FastAPI app whose routes block its own event loop: the stalls of issue 10, served.

    uvicorn tests.e2e.stall_app:app --port 8000            # LEADER_* from the environment
    gunicorn -k uvicorn.workers.UvicornWorker -w 3 --preload tests.e2e.stall_app:app

- ``GET /leader``: this node's view (:func:`fastapi_leader.leader_router`);
- ``POST /stall?seconds=S&kind=sleep|spin``: blocks the app's event loop for ``S`` seconds
  inside an ``async def`` (see :mod:`harness.stalls`), then answers how long it blocked;
- ``POST /work?ms=M``: ``M`` milliseconds of pure-Python CPU work on the loop, the unit of the
  saturating load.

Every response carries ``X-Worker-Pid``: the process that served it. Under ``gunicorn -w`` or
``uvicorn --workers`` all workers share one port, and this header tells their answers apart
(and names the process to signal).

The election is built at import, as an app does that needs it in its routes or decorators
(``@election.scheduled_job``, the example app): under ``--preload`` that import runs once, in
the master, before the workers are forked. Only the public API is used.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Query, Request, Response

from fastapi_leader import LeaderElection, LeaderStatusDep, leader_lifespan, leader_router
from harness.stalls import block

# A stall longer than this is a mistake in a test, not a stall worth serving.
MAX_STALL_SECONDS = 120.0
MAX_WORK_MS = 1000.0

election = LeaderElection()  # LEADER_* environment variables
app = FastAPI(title="fastapi-leader stall app", lifespan=leader_lifespan(election))
app.include_router(leader_router())


@app.middleware("http")
async def name_the_worker(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.post("/stall")
async def stall(
    status: LeaderStatusDep,
    seconds: float = Query(gt=0, le=MAX_STALL_SECONDS),
    kind: Literal["sleep", "spin"] = "sleep",
) -> dict[str, Any]:
    """Block this event loop (an ``async def`` that never awaits) for ``seconds``."""
    blocked = block(seconds, kind)
    return {"node_id": status.node_id, "pid": os.getpid(), "kind": kind, "blocked": blocked}


@app.post("/work")
async def work(ms: float = Query(20.0, gt=0, le=MAX_WORK_MS)) -> dict[str, Any]:
    """``ms`` milliseconds of CPU on the loop: what a route that computes something costs."""
    block(ms / 1000, "spin")
    return {"pid": os.getpid(), "ms": ms}
