"""The benchmarks' statistics and targets: what the report calls met, missed or not measured.

Pure functions on hand-made cells; the benchmarks themselves run real processes (``nox -s
bench``) and are not part of the test session.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import topology
from benchmarks.harness import IMPLS, Event, overlap, summary
from benchmarks.run import evaluate, make_config, parse_args, scenario_key
from benchmarks.scenarios import DUAL_LEASE, Cell
from benchmarks.topology import KINDS

CRASH = "failover, to agreement"


def config(*args: str) -> Any:
    return make_config(parse_args(["--scenarios", "crash,pause", "--impls", "ours", *args]))


def crash_cell(samples: list[float], timeouts: int = 0) -> Cell:
    cell = Cell("crash failover", "ours")
    cell.add_all(CRASH, "ms", samples)
    cell.metric(CRASH, "ms").timeouts = timeouts
    return cell


def rows_for(rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["target"].startswith(prefix)]


# ---- summary and overlap ------------------------------------------------------------------------


def test_summary_is_nearest_rank_and_counts_timeouts_beyond_every_sample() -> None:
    assert summary([]) is None
    s = summary([5.0, 1.0, 3.0])
    assert s == {"n": 3, "min": 1.0, "median": 3.0, "p95": 5.0, "max": 5.0}
    twenty = summary([float(v) for v in range(1, 20)], timeouts=1)
    assert twenty is not None
    assert twenty["n"] == 20 and twenty["max"] == math.inf
    assert twenty["p95"] == 19.0  # nearest rank: one timeout of 20 hides below the p95


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ([], 0.0),
        ([(0.0, 1.0), (2.0, 3.0)], 0.0),
        ([(0.0, 2.0), (1.0, 3.0)], 1.0),
        ([(0.0, 10.0), (1.0, 2.0), (1.5, 4.0)], 3.0),
        ([(0.0, 1.0), (1.0, 2.0)], 0.0),  # touching is not overlapping
        ([(3.0, 1.0), (0.0, 5.0)], 0.0),  # an empty interval counts for nothing
    ],
)
def test_overlap_is_the_time_two_or_more_intervals_share(
    intervals: list[tuple[float, float]], expected: float
) -> None:
    assert overlap(intervals) == pytest.approx(expected)


# ---- evaluate -----------------------------------------------------------------------------------


def test_a_whole_measurement_within_the_target_is_met() -> None:
    rows = evaluate([crash_cell([600.0] * 20)], config())
    [row] = rows_for(rows, "crash failover p95 <= 750")
    assert row["met"] is True and row["figure"] == "p95 600 ms"


def test_one_timed_out_trial_of_twenty_misses_the_target_despite_the_p95() -> None:
    rows = evaluate([crash_cell([600.0] * 19, timeouts=1)], config())
    for row in rows_for(rows, "crash failover"):
        assert row["met"] is False
        assert "1 of 20 trials timed out" in row["figure"]


def test_a_failed_scenario_leaves_its_targets_not_measured() -> None:
    failed = Cell("crash", "ours", skipped="failed: RuntimeError: no server")
    rows = evaluate([failed], config())
    crash = rows_for(rows, "crash failover")
    assert len(crash) == 2  # both targets are there, not silently absent
    assert all(row["met"] is None and "failed" in row["figure"] for row in crash)


def test_a_scenario_not_asked_for_has_no_target_rows() -> None:
    assert rows_for(evaluate([crash_cell([600.0])], config()), "pause") == []


def test_pause_trials_that_found_no_leader_count_against_the_dual_lease_figure() -> None:
    cell = Cell("pause", "ours")
    cell.add_all(DUAL_LEASE, "ms", [0.0] * 19)
    cell.metric(DUAL_LEASE, "ms").timeouts = 1  # what _lane now records for a failed trial
    [row] = rows_for(evaluate([cell], config()), "pause: 0 ms")
    assert row["met"] is False


def test_scenario_keys_of_titles() -> None:
    assert scenario_key("idle cost, 50 nodes") == "idle"
    assert scenario_key("app-loop stall beyond the limit") == "stall"
    assert scenario_key("crash") == "crash"


def test_quick_runs_the_trials_its_help_says(capsys: pytest.CaptureFixture[str]) -> None:
    assert config("--quick").trials == 3
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "3 trials" in " ".join(capsys.readouterr().out.split())


# ---- topology failover (issue 11) --------------------------------------------------------------


def topology_cell(kind: str, after_promotion: list[float], growth: list[float]) -> Cell:
    cell = Cell(topology.title(kind), "ours")
    cell.add_all(topology.AFTER_PROMOTION, "ms", after_promotion)
    cell.add_all(topology.TOKEN, "count", growth)
    return cell


def topology_rows(cells: list[Cell], kind: str | None = None) -> list[dict[str, Any]]:
    """The topology targets, of one kind (Sentinel, Cluster) or of all."""
    cfg = make_config(parse_args(["--scenarios", "topology", "--impls", "ours"]))
    rows = evaluate(cells, cfg)
    return [
        r for r in rows if ": primary killed" in r["target"] and r["target"].startswith(kind or "")
    ]


def test_the_new_leader_is_the_first_lease_taken_after_the_kill_by_a_node_of_the_group() -> None:
    nodes = {"a", "b"}
    events = [
        Event(1.0, "lease", 1, "a", {"term": 3, "acquired": True}),  # before the kill
        Event(2.5, "lease", 1, "a", {"term": 3}),  # a renewal, not a leadership
        Event(3.0, "lease", 3, "c", {"term": 9, "acquired": True}),  # another group's node
        Event(4.0, "lease", 2, "b", {"term": 7, "acquired": True}),
        Event(3.5, "lease", 1, "a", {"term": 5, "acquired": True}),  # the same node again
    ]
    found = topology.first_new_lease(events, nodes, after=2.0)
    assert found is not None and (found.node, found.data["term"]) == ("a", 5)
    assert topology.first_new_lease(events, nodes, after=4.0) is None
    restored = [
        Event(2.2, "connection", 1, "a", {"state": "lost"}),
        Event(3.2, "connection", 2, "b", {"state": "restored"}),
    ]
    back = topology.restored_after(restored, nodes, after=2.0)
    assert back is not None and back.t == 3.2
    elected = [
        Event(1.0, "elected", 1, "a", {"token": 3}),
        Event(5.0, "elected", 1, "a", {"token": 5}),
    ]
    assert topology.token_of(elected, "a") == 5 and topology.token_of(elected, "b") is None


def test_failover_figures_are_measured_from_the_kill_and_from_the_promotion() -> None:
    found = topology.figures(10.0, 12.25, 13.0, token_before=3, token_after=5)
    assert found.promoted_ms == pytest.approx(2250)
    assert found.leader_ms == pytest.approx(3000)
    assert found.after_promotion_ms == pytest.approx(750)
    assert found.token_growth == 2


def test_the_topology_promise_is_one_election_timeout_after_the_promotion() -> None:
    limit = IMPLS["ours"].timeout_max
    assert limit is not None
    within = topology_cell("Sentinel", [limit * 1000 - 50] * 5, [2.0] * 5)
    late = [limit * 1000 - 50] * 4 + [limit * 1000 + 50]
    beyond = topology_cell("Cluster", late, [0, 2, 2, 2, 2])
    sentinel = topology_rows([within, beyond], "Sentinel")
    cluster = topology_rows([within, beyond], "Cluster")
    assert [row["met"] for row in sentinel] == [True, True]
    assert [row["met"] for row in cluster] == [False, False]  # the p95 and a token not larger
    assert f"{limit * 1000:.0f} ms" in cluster[0]["target"]


def test_a_failed_topology_leaves_the_other_ones_targets_measured() -> None:
    failed = Cell(topology.title("Cluster"), "ours", skipped="failed: TimeoutError: no cluster")
    rows = topology_rows([topology_cell("Sentinel", [300.0] * 3, [1.0] * 3), failed])
    by_kind = {kind: [r["met"] for r in rows if r["target"].startswith(kind)] for kind in KINDS}
    assert by_kind == {"Sentinel": [True, True], "Cluster": [None, None]}


def test_the_topology_scenario_is_chosen_by_name_and_runs_a_few_trials() -> None:
    assert "topology" in parse_args([]).scenario_list  # in the default (whole) run
    assert make_config(parse_args(["--quick"])).topology_trials == 3
    assert make_config(parse_args([])).topology_trials == 5
    assert make_config(parse_args(["--topology-trials", "8"])).topology_trials == 8
    assert scenario_key(topology.title("Sentinel")) == "topology"
