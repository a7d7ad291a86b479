"""What the demo (``python -m example_app``) says about what it sees, one line per change.

:class:`Narrator` is fed observations (the nodes' ``GET /leader`` views, processes that exited)
with the time they were made, and returns the lines to print, without their timestamp. It does
no I/O and reads no clock, so every sentence it can say is tested from observations alone; the
launcher does the polling and the printing.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Narrator", "describe_exit"]


def describe_exit(code: int) -> str:
    """A process's exit status in words: ``was killed by SIGKILL``, ``exited with code 1``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Narrator:
    """The demo's running commentary: leaders, gaps without one, exits, Redis lost and back.

    ``pids`` maps node ids to their process ids (the kill command each leader line offers);
    ``redis`` names the server for the lines about it (its redacted URL); ``redis_pid`` is the
    throw-away server's pid, or None when the user's Redis is used."""

    def __init__(self, pids: Mapping[str, int], redis: str, redis_pid: int | None) -> None:
        self._pids = dict(pids)
        self._redis = redis
        self._redis_pid = redis_pid
        self._leaders: list[str] | None = None  # None: not looked yet
        self._leaderless_since: float | None = None
        self._redis_exited = False
        self._redis_lost = False  # every node that answers says it has lost Redis

    def node_exited(self, node_id: str, code: int) -> str:
        """The line for a node whose process ended with ``code`` (told once per node)."""
        return f"{node_id} (pid {self._pids.get(node_id)}) {describe_exit(code)}"

    def redis_exited(self, code: int | None) -> str:
        """The one line for the throw-away server's end; the nodes' own logs would say it as
        connection errors, and the lines about losing Redis are not said after it."""
        self._redis_exited = True
        how = "has exited" if code is None else describe_exit(code)
        return (
            f"redis (pid {self._redis_pid}) {how}: the nodes cannot elect a leader without it; "
            "Ctrl-C stops the demo"
        )

    def saw(self, views: Sequence[Mapping[str, Any]], now: float) -> list[str]:
        """The lines for one round of views (those of the nodes that answered), seen at
        ``now`` (seconds, any monotonic clock): a change of leader, or of Redis's reach."""
        lines: list[str] = []
        lost = bool(views) and not any(view.get("connected") for view in views)
        if lost != self._redis_lost and not self._redis_exited:
            if lost:
                lines.append(f"the nodes have lost Redis at {self._redis}; they retry until back")
            else:
                lines.append("the nodes reach Redis again")
        self._redis_lost = lost
        current = sorted(str(view["node_id"]) for view in views if view.get("is_leader"))
        if current == self._leaders:
            return lines
        if len(current) == 1:
            leader = current[0]
            term = next(view.get("term", "?") for view in views if view["node_id"] == leader)
            gap = ""
            if self._leaderless_since is not None:
                gap = f" after {now - self._leaderless_since:.2f} s without one"
            pid = self._pids.get(leader)
            lines.append(
                f"leader is {leader} (term {term}, pid {pid}){gap}; watch failover: kill -9 {pid}"
            )
            self._leaderless_since = None
        elif not current:
            if self._leaderless_since is None:
                self._leaderless_since = now
            lines.append("no leader" + (" yet" if self._leaders is None else ""))
        else:  # the election promises this never happens
            lines.append(f"several nodes say they lead: {', '.join(current)}")
        self._leaders = current
        return lines
