"""Fixtures for the end-to-end tests: clusters of real example-app processes.

- ``make_cluster``: a factory, ``make_cluster(**env)`` returns an empty
  :class:`~tests.e2e.nodes.AppCluster` (start nodes with ``cluster.start(3)``); every node of
  every cluster it made is stopped after the test, pass or fail. ``make_cluster(app=...)``
  serves another app than the example (e.g. ``nodes.STALL_APP``).
- ``shared_cluster``: three running nodes (``STEADY`` timings) shared by a module's tests
  that do not change the leadership.

Both run on the session's private server (``redis_server``), never the machine's own Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastapi_leader.testing import RedisServer

from .nodes import EXAMPLE_APP, AppCluster

MakeCluster = Callable[..., AppCluster]

# Quick enough that a test moving a few dozen events waits a fraction of a second.
_TEST_ENV = {"EXAMPLE_WORK_SECONDS": "0.01", "EXAMPLE_MOVE_INTERVAL": "0.2"}

STEADY = {
    "LEADER_LEASE": "1.0",
    "LEADER_ELECTION_TIMEOUT_MIN": "1.2",
    "LEADER_ELECTION_TIMEOUT_MAX": "1.5",
    "LEADER_MEMBER_EXPIRY": "2.0",
}
"""Timings for tests about something other than speed: a leader keeps its lease through a
one-second stall (a loaded 2-core CI box, other suites running), so a test never sees an
unrelated re-election. The rule behind each default still holds (lease < timeout - beat)."""


@pytest.fixture
def make_cluster(redis_server: RedisServer, tmp_path: Path) -> Iterator[MakeCluster]:
    with contextlib.ExitStack() as clusters:

        def make(app: str = EXAMPLE_APP, **env: str) -> AppCluster:
            return clusters.enter_context(
                AppCluster(redis_server.url, tmp_path, app, **{**_TEST_ENV, **env})
            )

        yield make


@pytest.fixture(scope="module")
def shared_cluster(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppCluster]:
    log_dir = tmp_path_factory.mktemp("nodes")
    with AppCluster(redis_server.url, log_dir, **_TEST_ENV, **STEADY) as cluster:
        cluster.start(3)
        yield cluster
