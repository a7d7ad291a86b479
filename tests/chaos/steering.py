"""The harness's commands to a node process, one a line on its stdin; runs inside the nodes.

- ``stall SECONDS KIND``: block the node's app loop (the loop this runs on: the one the
  election was started on, or uvicorn's) for SECONDS, ``sleep`` or ``spin``
  (:func:`harness.stalls.stall`), as a route of the app would; reported as ``stalling``
  and ``unstalled`` (with ``blocked``: how long it was);
- ``resign``: the node's election hands its leadership over (:meth:`LeaderElection.resign`;
  nodes that pass ``resign`` to :func:`follow_commands` only);
- the end of stdin: the harness is gone, the node leaves.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from harness.reports import emit
from harness.stalls import stall

_background: set[asyncio.Task[Any]] = set()


def obey(line: str, resign: Callable[[], Awaitable[Any]] | None = None) -> None:
    """Carry out one command line (on the app's loop: a stall blocks it)."""
    words = line.split()
    if len(words) == 3 and words[0] == "stall":
        stall(float(words[1]), words[2])
    elif words == ["resign"] and resign is not None:
        task = asyncio.ensure_future(resign())
        _background.add(task)
        task.add_done_callback(_background.discard)
    elif words:
        emit("error", error=f"unknown command {line.strip()!r}")


async def follow_commands(
    on_end: Callable[[], None], resign: Callable[[], Awaitable[Any]] | None = None
) -> None:
    """Obey the harness's commands until stdin ends; then call ``on_end``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        obey(line.decode(errors="replace"), resign)
    on_end()
