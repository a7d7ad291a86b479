"""The demo's commentary (:class:`example_app.narration.Narrator`), from observations alone."""

from __future__ import annotations

from typing import Any

import pytest

from example_app.narration import Narrator, describe_exit

PIDS = {"node-1": 101, "node-2": 102}
REDIS = "redis://127.0.0.1:6379/0"


def view(node: str, *, leads: bool = False, term: int = 1, connected: bool = True) -> Any:
    return {"node_id": node, "is_leader": leads, "term": term, "connected": connected}


def narrator(redis_pid: int | None = None) -> Narrator:
    return Narrator(PIDS, REDIS, redis_pid)


def test_a_first_leader_after_a_leaderless_start() -> None:
    n = narrator()
    assert n.saw([view("node-1"), view("node-2")], now=10.0) == ["no leader yet"]
    assert n.saw([view("node-1"), view("node-2")], now=10.1) == []  # nothing changed
    assert n.saw([view("node-1"), view("node-2", leads=True, term=1)], now=10.25) == [
        "leader is node-2 (term 1, pid 102) after 0.25 s without one; watch failover: kill -9 102"
    ]


def test_a_failover_is_told_with_its_gap() -> None:
    n = narrator()
    n.saw([view("node-1"), view("node-2", leads=True)], now=1.0)
    assert n.saw([view("node-1")], now=2.0) == ["no leader"]
    assert n.saw([view("node-1")], now=2.3) == []
    assert n.saw([view("node-1", leads=True, term=2)], now=2.5) == [
        "leader is node-1 (term 2, pid 101) after 0.50 s without one; watch failover: kill -9 101"
    ]


def test_two_nodes_saying_they_lead_are_named() -> None:
    n = narrator()
    lines = n.saw([view("node-1", leads=True), view("node-2", leads=True)], now=1.0)
    assert lines == ["several nodes say they lead: node-1, node-2"]


def test_losing_the_users_redis_and_getting_it_back_are_one_line_each() -> None:
    n = narrator()
    n.saw([view("node-1", leads=True), view("node-2")], now=1.0)
    down = [view("node-1", connected=False), view("node-2", connected=False)]
    assert n.saw(down, now=2.0) == [
        f"the nodes have lost Redis at {REDIS}; they retry until back",
        "no leader",
    ]
    assert n.saw(down, now=2.1) == []  # said once, not at every poll
    back = [view("node-1", leads=True, term=2), view("node-2")]
    assert n.saw(back, now=3.0)[0] == "the nodes reach Redis again"


def test_one_node_still_connected_is_not_redis_lost() -> None:
    n = narrator()
    n.saw([view("node-1", leads=True), view("node-2")], now=1.0)
    assert n.saw([view("node-1", leads=True), view("node-2", connected=False)], now=2.0) == []


def test_no_answer_at_all_is_not_redis_lost() -> None:
    n = narrator()
    n.saw([view("node-1", leads=True)], now=1.0)
    assert n.saw([], now=2.0) == ["no leader"]


def test_the_throw_away_servers_end_is_the_only_line_about_redis() -> None:
    n = narrator(redis_pid=77)
    n.saw([view("node-1", leads=True), view("node-2")], now=1.0)
    assert n.redis_exited(-9) == (
        "redis (pid 77) was killed by SIGKILL: the nodes cannot elect a leader without it; "
        "Ctrl-C stops the demo"
    )
    down = [view("node-1", connected=False), view("node-2", connected=False)]
    assert n.saw(down, now=2.0) == ["no leader"]


def test_a_node_exit_names_its_pid() -> None:
    assert narrator().node_exited("node-2", -9) == "node-2 (pid 102) was killed by SIGKILL"


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (-9, "was killed by SIGKILL"),
        (-15, "was killed by SIGTERM"),
        (0, "exited with code 0"),
        (3, "exited with code 3"),
    ],
)
def test_exit_codes_in_words(code: int, words: str) -> None:
    assert describe_exit(code) == words
