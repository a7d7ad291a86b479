"""Node identity under the ways users run several processes of one app on one host.

- ``gunicorn -k uvicorn.workers.UvicornWorker -w 3 --preload``: the app (and its election) is
  imported once, in the master, and forked into every worker: each worker must still be a
  node of its own, and a ``kill -9`` of the leading worker must move the lead at the speed of
  an ordinary crash;
- ``uvicorn --workers 3``;
- two processes given one ``LEADER_NODE_ID`` (``LEADER_NODE_ID=$HOSTNAME`` with two workers):
  a configuration error, reported in one line that names the setting, that never leaves the
  group without a leader.

Only the public surface is used: ``GET /leader`` of each worker (told apart by the app's
``X-Worker-Pid`` header, see :mod:`tests.e2e.stall_app`), signals and ``LEADER_*`` variables.
Run with ``-s`` to see the failover figures.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fastapi_leader.testing import RedisServer

from .conftest import MakeCluster
from .nodes import STALL_APP, AppNode, WorkerServer, always, eventually

pytestmark = pytest.mark.e2e

WORKERS = 3
# A crash failover lands near the election timeout (0.5 to 0.7 s by default), plus finding a
# worker that answers; generous for a loaded 2-core box.
FAILOVER_BOUND = 3.0
# "Within a few heartbeats" (0.1 s each): generous.
DUPLICATE_DETECTION_BOUND = 5.0
# Two processes with one id: watched this long for churn (several election timeouts).
DUPLICATE_OBSERVE = 4.0
# After the leading one of the two dies, the other has lost its rival: it leads within about
# one member expiry and one election timeout (1.7 s by default). Generous.
DUPLICATE_FAILOVER_BOUND = 6.0
SETTING = "LEADER_NODE_ID"

Views = dict[int, dict[str, Any]]


def settled(count: int) -> Any:
    """A condition on the workers' views: ``count`` distinct node ids, each view listing
    ``count`` members, exactly one leader, named by every view in one term."""

    def check(views: Views) -> bool:
        ids = {view["node_id"] for view in views.values()}
        leaders = [view for view in views.values() if view["is_leader"]]
        return (
            len(ids) == count
            and all(len(view["members"]) == count for view in views.values())
            and len(leaders) == 1
            and {view["leader_id"] for view in views.values()} == {leaders[0]["node_id"]}
            and len({view["term"] for view in views.values()}) == 1
        )

    return check


def leading_pid(views: Views) -> int:
    (pid,) = [pid for pid, view in views.items() if view["is_leader"]]
    return pid


def test_gunicorn_preload_workers_are_distinct_nodes_and_fail_over(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with WorkerServer.gunicorn(
        STALL_APP, workers=WORKERS, redis_url=redis_server.url, log_dir=tmp_path
    ) as server:
        server.wait_ready(WORKERS)
        views = server.views(
            WORKERS,
            settled(WORKERS),
            what=f"{WORKERS} workers with distinct node ids, each listing {WORKERS} members "
            "and naming one leader",
        )
        victim = leading_pid(views)
        old = views[victim]
        member_ids = {member["node_id"] for member in old["members"]}
        assert member_ids == {view["node_id"] for view in views.values()}

        killed_at = server.kill(victim, signal.SIGKILL)

        def new_leader(views: Views) -> bool:
            return any(
                view["is_leader"]
                and view["node_id"] != old["node_id"]
                and view["term"] > old["term"]
                for view in views.values()
            )

        server.views(
            None,
            new_leader,
            exclude=[victim],
            timeout=FAILOVER_BOUND + 10,
            what="a surviving worker to lead",
        )
        failover = time.monotonic() - killed_at
        # gunicorn starts a worker in the dead one's place: it joins as a node of its own.
        after = server.views(
            WORKERS,
            settled(WORKERS),
            exclude=[victim],
            what=f"{WORKERS} workers (one of them new) to agree again",
        )
        agreed = time.monotonic() - killed_at

    print(
        f"\ngunicorn --preload, kill -9 of the leading worker: a new leader after "
        f"{failover:.3f} s, all {WORKERS} workers agreeing after {agreed:.3f} s"
    )
    assert failover < FAILOVER_BOUND
    assert old["node_id"] not in {view["node_id"] for view in after.values()}


def test_uvicorn_workers_are_distinct_nodes_with_one_leader(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with WorkerServer.uvicorn(
        STALL_APP, workers=WORKERS, redis_url=redis_server.url, log_dir=tmp_path
    ) as server:
        server.wait_ready(WORKERS)
        views = server.views(
            WORKERS,
            settled(WORKERS),
            what=f"{WORKERS} workers with distinct node ids, each listing {WORKERS} members "
            "and naming one leader",
        )
    assert len({view["node_id"] for view in views.values()}) == WORKERS


def test_two_processes_with_one_node_id_are_reported_and_the_group_stays_led(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(app=STALL_APP)
    (first,) = cluster.start(1, LEADER_NODE_ID="twin")
    eventually(lambda: _leads(first), what="the first process to lead")

    (later,) = cluster.start(1, LEADER_NODE_ID="twin")
    joined_at = time.monotonic()

    def first_leads_alone() -> bool:
        assert _leads(first), "the first process stopped leading"
        assert not _leads(later), "the later process leads"
        return True

    def reported() -> list[AppNode]:
        first_leads_alone()  # all along, not only once the clash is reported
        return [node for node in (first, later) if _report_lines(node)]

    reporters = eventually(
        reported,
        DUPLICATE_DETECTION_BOUND,
        f"a line naming {SETTING} in the output of either process",
    )
    detected = time.monotonic() - joined_at
    always(first_leads_alone, DUPLICATE_OBSERVE, "the first process leading, the later not")
    for node in (first, later):
        lines = _report_lines(node)
        assert len(lines) <= 1, f"{node!r} reported the clash {len(lines)} times: {lines}"

    killed_at = time.monotonic()
    first.signal(signal.SIGKILL)
    eventually(
        lambda: _leads(later), DUPLICATE_FAILOVER_BOUND, "the later process to lead once alone"
    )
    took_over = time.monotonic() - killed_at

    print(
        f"\none LEADER_NODE_ID in two processes: reported after {detected:.3f} s by "
        f"{reporters}; the survivor led {took_over:.3f} s after kill -9 of the leader"
    )


def _leads(node: AppNode) -> bool:
    view = node.view()
    return view is not None and bool(view["is_leader"])


def _report_lines(node: AppNode) -> list[str]:
    return [line for line in node.log().splitlines() if SETTING in line]
