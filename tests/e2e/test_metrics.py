"""Prometheus metrics under ``uvicorn --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR``, through a
real failover, and the example app's ``/metrics``.

The server's two workers are two nodes of a group that also has one outside node (the example
app, single process). The server's workers stand late (a 3 s election timeout), the outside
node early (1.2 s): when the leading worker is killed, the outside node takes over, and the
server's ``/metrics`` must say that none of its live workers leads, although the dead worker's
file says it did (the router forgets the gauges of dead processes).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from fastapi_leader.testing import RedisServer

from .conftest import STEADY, MakeCluster
from .nodes import HTTP_TIMEOUT, WAIT, WorkerServer, eventually

pytestmark = pytest.mark.e2e

METRICS_APP = "tests.e2e.metrics_app:app"
# The workers' timings: valid on their own (lease < timeout - beat) and slower to stand than
# the outside node's STEADY ones (1.2 to 1.5 s), so the outside node wins the failover.
SLOW_TO_STAND = {
    "LEADER_LEASE": "1.0",
    "LEADER_ELECTION_TIMEOUT_MIN": "3.0",
    "LEADER_ELECTION_TIMEOUT_MAX": "3.5",
    "LEADER_MEMBER_EXPIRY": "2.0",
}
SAMPLE = re.compile(r"^(fastapi_leader_\w+)(\{[^}]*\})? (\S+)$", re.M)


def scrape(url: str) -> list[tuple[str, dict[str, str], float]] | None:
    """``GET /metrics``: (name, labels, value) per sample; None if no worker answered."""
    try:
        response = httpx.get(
            f"{url}/metrics",
            timeout=HTTP_TIMEOUT,
            headers={"Connection": "close"},
            trust_env=False,
        )
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    samples = []
    for name, labels, number in SAMPLE.findall(response.text):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        samples.append((name, pairs, float(number)))
    return samples


def series(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> list:
    return [
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    ]


def test_uvicorn_workers_share_metrics_through_a_failover(
    redis_server: RedisServer, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    with WorkerServer.uvicorn(
        METRICS_APP,
        workers=2,
        redis_url=redis_server.url,
        log_dir=tmp_path,
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
        **SLOW_TO_STAND,
    ) as server:
        views = server.views(
            2,
            lambda views: sum(view["is_leader"] for view in views.values()) == 1,
            timeout=3 * WAIT,
            what="one of the two workers to lead",
        )
        group = next(iter(views.values()))["group"]
        (leader_pid,) = [pid for pid, view in views.items() if view["is_leader"]]

        def one_leader() -> list | None:
            samples = scrape(server.url)
            if samples is None:
                return None
            leading = series(samples, "fastapi_leader_is_leader", group=group)
            return samples if leading == [1.0] else None

        samples = eventually(one_leader, what="the server's /metrics to show its leader")
        assert series(samples, "fastapi_leader_connected", group=group) == [1.0]
        assert series(samples, "fastapi_leader_term", group=group) == [views[leader_pid]["term"]]
        won = series(samples, "fastapi_leader_elections_total", group=group, outcome="won")
        assert sum(won) == 1

        outside = make_cluster(**STEADY).start(1, LEADER_GROUP=group)[0]
        eventually(
            lambda: (view := outside.view()) is not None and view["leader_id"] is not None,
            what="the outside node to hear the leader",
        )
        server.kill(leader_pid)
        eventually(
            lambda: (view := outside.view()) is not None and view["is_leader"],
            timeout=2 * WAIT,
            what="the outside node to take over",
        )

        def nobody_leads_here() -> list | None:
            samples = scrape(server.url)
            if samples is None:
                return None
            leading = series(samples, "fastapi_leader_is_leader", group=group)
            return samples if leading == [0.0] else None

        samples = eventually(nobody_leads_here, what="the server's /metrics to drop its leader")
        assert not list(multiproc.glob(f"gauge_live*_{leader_pid}.db"))
        assert sum(series(samples, "fastapi_leader_elections_total", group=group)) >= 1
        # Counters outlive the worker that counted them: the dead leader's lost leadership
        # is not forgotten, and nothing counts twice.
        changes = series(samples, "fastapi_leader_leadership_changes_total", change="gained")
        assert sum(changes) == 1
        assert all(os.path.exists(p) for p in multiproc.glob("counter_*.db"))

    # The outside node: the example app, one process, its own /metrics.
    samples = scrape(outside.url)
    assert samples is not None
    assert series(samples, "fastapi_leader_is_leader", group=group) == [1.0]
    gained = series(
        samples,
        "fastapi_leader_leadership_changes_total",
        change="gained",
        reason="election_timeout",
    )
    assert gained == [1.0]
    (gap,) = series(samples, "fastapi_leader_leaderless_seconds_sum", group=group)
    assert 0.5 < gap < 2 * WAIT  # a crash: about an election timeout without a leader
    outside.signal(signal.SIGTERM)
