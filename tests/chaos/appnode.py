"""The example app as a chaos node: ``example_app.main:app`` under uvicorn, reporting.

    python -m tests.chaos.appnode --port 8001  # LEADER_* and EXAMPLE_* from the environment

The same app and server as ``uvicorn example_app.main:app --port 8001``, plus the reporter of
:mod:`harness.reports` on the app's ``election``, so that the harness gets the node's role
changes with monotonic time stamps on stdout, and ``joined``/``left`` when the app's lifespan
has started/stopped (the election with it). uvicorn handles SIGTERM: the lifespan stops the
election (a graceful handover), then uvicorn exits by the same signal (recent uvicorn re-raises
it), so the harness takes a ``left`` report as the mark of a graceful stop. The end of stdin
(the harness died) makes it exit as well; the harness's commands on stdin (``stall``) are those
of :mod:`tests.chaos.steering`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from harness.reporter import NodeReporter
from harness.reports import emit

from .steering import follow_commands


async def serve(port: int) -> None:
    from example_app.main import app, election  # reads LEADER_* and EXAMPLE_* now

    NodeReporter().attach(election)
    app_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def reporting_lifespan(app: Any) -> AsyncIterator[Any]:
        async with app_lifespan(app) as state:
            emit("joined")
            yield state
        emit("left")

    app.router.lifespan_context = reporting_lifespan
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)

    def exit_server() -> None:
        server.should_exit = True

    emit("armed")
    # On uvicorn's loop, the app's: a stall command blocks what the app's routes run on.
    watcher = asyncio.create_task(follow_commands(exit_server))
    try:
        await server.serve()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    emit("exiting")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.appnode")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(relativeCreated)8.0f %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
