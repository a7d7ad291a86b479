"""The example app as users run it: real uvicorn processes on a real server, over HTTP.

The timings printed here (run with ``-s``) are the README's figures: crash failover and
graceful handover, measured from outside the processes.
"""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import STEADY, MakeCluster
from .nodes import AppCluster, AppNode, always, eventually

pytestmark = pytest.mark.e2e

# Crash failover lands near the election timeout (0.5 to 0.7 s by default).
FAILOVER_BOUND = 3.0
# A graceful handover takes a few Redis round trips; in the handover test a failover by timeout
# would take at least 2 s after the old leader's last heartbeat.
HANDOVER_BOUND = 1.0
SLOW_ELECTION = {
    **STEADY,
    "LEADER_ELECTION_TIMEOUT_MIN": "2.0",
    "LEADER_ELECTION_TIMEOUT_MAX": "2.5",
}
# Twice the STEADY election timeout, and more: a joining node listens for one election timeout
# before it may stand; by then it would have, had it wanted to.
OBSERVE = 2 * float(STEADY["LEADER_ELECTION_TIMEOUT_MAX"]) + 0.5


def test_three_nodes_agree_on_one_leader(shared_cluster: AppCluster) -> None:
    leader = shared_cluster.wait_for_leader()

    def views_settled() -> list[dict] | None:
        views = [node.view() for node in shared_cluster.nodes]
        settled = all(view is not None and len(view["members"]) == 3 for view in views)
        return views if settled else None

    views = eventually(views_settled, what="every node to list three members")
    assert [view["is_leader"] for view in views] == [
        node is leader for node in shared_cluster.nodes
    ]
    assert {view["leader_id"] for view in views} == {leader.node_id}
    assert len({view["term"] for view in views}) == 1
    leader_view = leader.view()
    assert leader_view is not None
    assert leader_view["role"] == "leader"
    assert leader_view["fencing_token"] == leader_view["term"]
    for view in views:
        assert view["group"] == shared_cluster.group
        assert view["connected"] is True
        members = {member["node_id"]: member for member in view["members"]}
        assert set(members) == {node.node_id for node in shared_cluster.nodes}
        assert [m for m in members.values() if m["is_leader"]] == [members[leader.node_id]]
        assert members[leader.node_id]["url"] == leader.url


def test_a_follower_answers_503_naming_the_leader(shared_cluster: AppCluster) -> None:
    leader = shared_cluster.wait_for_leader()
    followers = [node for node in shared_cluster.nodes if node is not leader]

    for follower in followers:
        response = follower.post("/admin/move")
        assert response.status_code == 503, response.text
        assert response.headers["X-Leader-Id"] == leader.node_id
        assert response.headers["X-Leader-Url"] == leader.url
        assert int(response.headers["Retry-After"]) >= 0
        detail = response.json()["detail"]
        assert (detail["leader_id"], detail["leader_url"]) == (leader.node_id, leader.url)
        assert detail["node_id"] == follower.node_id

    response = leader.post("/admin/move")
    assert response.status_code == 200, response.text
    assert response.json()["node_id"] == leader.node_id


def test_the_leader_only_job_runs_on_exactly_one_node(shared_cluster: AppCluster) -> None:
    leader = shared_cluster.wait_for_leader()
    term = _view(leader)["term"]
    nodes = shared_cluster.nodes
    before = {node.node_id: node.stats() for node in nodes}
    events = 30

    for number in range(events):
        response = nodes[number % len(nodes)].post("/events", json={"number": number})
        assert response.status_code == 202, response.text

    def all_processed() -> dict[str, dict] | None:
        stats = {node.node_id: node.stats() for node in nodes}
        processed = sum(s["processed"] - before[n]["processed"] for n, s in stats.items())
        drained = all(s["incoming"] == 0 and s["queued"] == 0 for s in stats.values())
        return stats if drained and processed >= events else None

    after = eventually(all_processed, what=f"{events} events to be moved and processed")
    moved = {n: after[n]["moved"] - before[n]["moved"] for n in after}
    processed = {n: after[n]["processed"] - before[n]["processed"] for n in after}
    print(f"\nmoved by node: {moved}; processed by node: {processed}")
    assert _view(leader)["term"] == term, "the leadership changed during the test"
    assert moved == {n: events if n == leader.node_id else 0 for n in moved}
    assert sum(processed.values()) == events  # each event once, none twice
    assert [after[n]["is_leader"] for n in after] == [node is leader for node in nodes]


def test_kill_9_of_the_leader_fails_over_well_within_bounds(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    cluster.start(3)
    leader = cluster.wait_for_leader()
    term = _view(leader)["term"]
    survivors = [node for node in cluster.nodes if node is not leader]

    killed_at = time.monotonic()
    leader.signal(signal.SIGKILL)
    successor = cluster.wait_for_leader(survivors, other_than=leader)
    failover = time.monotonic() - killed_at

    print(f"\ncrash failover (kill -9 to an agreed new leader): {failover:.3f} s")
    assert failover < FAILOVER_BOUND
    assert _view(successor)["term"] > term


def test_sigterm_of_the_leader_hands_over_without_a_timeout(make_cluster: MakeCluster) -> None:
    # Election timeouts of 2 s or more: only a handover can give a new leader within 1 s.
    cluster = make_cluster(**SLOW_ELECTION)
    cluster.start(3)
    leader = cluster.wait_for_leader(timeout=20.0)  # the first election waits 2 s too
    term = _view(leader)["term"]
    survivors = [node for node in cluster.nodes if node is not leader]

    signalled_at = time.monotonic()
    leader.signal(signal.SIGTERM)
    exited_at = successor_at = None
    successor = None
    deadline = signalled_at + 10.0
    while exited_at is None or successor_at is None:
        assert time.monotonic() < deadline, "no new leader and exit within 10 s of SIGTERM"
        if exited_at is None and not leader.running:
            exited_at = time.monotonic()
        if successor_at is None:
            successor = cluster.agreed_leader(survivors)
            if successor is not None and successor is not leader:
                successor_at = time.monotonic()
        time.sleep(0.005)

    print(
        f"\ngraceful handover: new leader {successor_at - signalled_at:.3f} s after SIGTERM, "
        f"{successor_at - exited_at:+.3f} s from the old leader's exit"
    )
    # A clean exit: uvicorn re-raises the signal it stopped for (since 0.29), older ones exit 0.
    assert leader.process.returncode in (0, -signal.SIGTERM), leader.output()
    assert "Application shutdown complete." in leader.output()
    assert successor_at - exited_at < HANDOVER_BOUND
    assert successor is not None
    assert _view(successor)["term"] > term


def test_a_joining_node_does_not_unseat_the_leader(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(**STEADY)
    cluster.start(3)
    leader = cluster.wait_for_leader()
    term = _view(leader)["term"]

    (newcomer,) = cluster.start(1)

    def everyone_sees_four() -> bool:
        views = [node.view() for node in cluster.nodes]
        return all(
            view is not None and len(view["members"]) == 4 and view["leader_id"] is not None
            for view in views
        )

    eventually(everyone_sees_four, what="every node to list four members and name a leader")

    def unchanged() -> bool:
        views = [node.view() for node in cluster.nodes]
        return all(
            view is not None
            and view["leader_id"] == leader.node_id
            and view["term"] == term
            and view["is_leader"] == (node is leader)
            for node, view in zip(cluster.nodes, views, strict=True)
        )

    always(unchanged, OBSERVE, f"{leader.node_id} leading in term {term}, seen by all four")
    assert _view(newcomer)["role"] == "follower"


def _view(node: AppNode) -> dict:
    view = node.view()
    assert view is not None, f"{node.node_id} does not answer GET /leader"
    return view
