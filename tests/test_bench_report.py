"""The benchmarks' statistics and targets: what the report calls met, missed or not measured.

Pure functions on hand-made cells; the benchmarks themselves run real processes (``nox -s
bench``) and are not part of the test session.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks.harness import overlap, summary
from benchmarks.run import evaluate, make_config, parse_args, scenario_key
from benchmarks.scenarios import DUAL_LEASE, Cell

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
