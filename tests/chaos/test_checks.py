"""The chaos checks on hand-made logs: each invariant is caught when broken, and not before.

(Leaderships, terms and dual leases are :mod:`harness.leases`'s: tests/test_harness_leases.py.)

These are what keeps the harness honest: a checker that never fails would pass any run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.leases import Record
from tests.chaos import checks
from tests.chaos.__main__ import parse_args
from tests.chaos.faults import (
    KINDS,
    LOOP_STALL_LIMIT,
    PROCESS_KINDS,
    TOPOLOGY_FAULTS,
    check_faults,
    schedule,
)
from tests.chaos.harness import ChaosConfig, find_tracebacks
from tests.chaos.proxy import classify
from tests.test_harness_leases import END, lead, rec

# ---- recovery --------------------------------------------------------------------------------


def group(*names: str) -> list[Record]:
    return [r for n in names for r in (rec(0.0, n, "spawn"), rec(0.1, n, "joined"))]


def test_recovery_times_one_leader_then_agreement() -> None:
    records = [
        *group("a", "b", "c"),
        *lead("a", 1, 10.7, 11.1),
        rec(10.71, "a", "leader", leader="a", term=1),
        rec(10.75, "b", "leader", leader="a", term=1),
        rec(10.8, "c", "leader", leader="a", term=1),
    ]
    result = checks.recovery(records, 10.0, 20.0)
    assert result.leader_after == pytest.approx(0.701)
    assert result.agreed_after == pytest.approx(0.8)


def test_recovery_counts_until_the_last_disagreement_ends() -> None:
    records = [
        *group("a", "b"),
        *lead("a", 1, 1.0, 9.0),
        rec(1.01, "a", "leader", leader="a"),
        rec(1.02, "b", "leader", leader="a"),
        rec(11.5, "b", "leader", leader=None),  # b finds its connection dead, late
        rec(12.0, "b", "leader", leader="a"),
    ]
    result = checks.recovery(records, 10.0, 20.0)
    assert result.leader_after == 0.0
    assert result.agreed_after == pytest.approx(2.0)


def test_no_recovery_is_none() -> None:
    records = [*group("a", "b"), *lead("a", 1, 1.0, 2.0, demoted=2.0)]
    result = checks.recovery(records, 3.0, 20.0)
    assert result.leader_after is None
    assert result.agreed_after is None


def test_two_running_leaders_are_not_one_leader() -> None:
    records = [*group("a", "b"), *lead("a", 1, 1.0, 9.0), *lead("b", 2, 1.5, 9.0)]
    assert checks.recovery(records, 3.0, 20.0).leader_after is None


def test_a_stopped_leader_does_not_count() -> None:
    records = [
        *group("a", "b"),
        *lead("a", 1, 1.0, 9.0),
        rec(2.0, "a", "stop"),
        *lead("b", 2, 3.0, 9.0),
        rec(3.01, "b", "leader", leader="b"),
    ]
    # b leads from its election on; a, stopped, need not name it.
    assert checks.recovery(records, 2.5, 20.0).agreed_after == pytest.approx(0.501)


def test_disruptions_are_elections_in_the_window() -> None:
    records = lead("a", 1, 1.0, 2.0) + lead("b", 2, 5.0, 6.0)
    assert [r.node for r in checks.disruptions(records, 4.0, 6.0)] == ["b"]


# ---- events, tracebacks ----------------------------------------------------------------------


def test_count_events() -> None:
    counts = checks.count_events(["e1", "e2", "e3"], ["e1", "e1", "e3", "e9"])
    assert counts == {
        "published": 3,
        "delivered": 3,
        "lost": 1,
        "duplicated": 1,
        "unacknowledged_delivered": 1,
    }


def test_tracebacks_are_found(tmp_path: Path) -> None:
    clean = tmp_path / "n1.1.stderr"
    clean.write_text("WARNING fastapi_leader.transport.redis: Lost the subscription\n")
    dirty = tmp_path / "n2.1.stderr"
    dirty.write_text(
        "ERROR x: callback failed\nTraceback (most recent call last):\n  File ...\nBoom\n"
    )
    (problem,) = find_tracebacks([clean, dirty, tmp_path / "missing"])
    assert problem.startswith("traceback in n2.1.stderr")
    assert "Boom" in problem


# ---- app-loop stalls ----------------------------------------------------------------------------

LIMIT = 3.0


def stall_problems(records: list[Record], led: bool, start: float, end: float) -> list[str]:
    return checks.loop_stall(records, "a", led, start, end, END, LIMIT)


def test_a_stall_below_the_limit_that_changes_nothing_is_fine() -> None:
    records = lead("a", 1, 0.0, 20.0)
    assert stall_problems(records, True, 5.0, 7.0) == []
    assert stall_problems(records, False, 5.0, 7.0) == []  # "a" is a follower here


def test_a_leader_stalled_below_the_limit_that_loses_its_leadership_is_caught() -> None:
    records = lead("a", 1, 0.0, 5.4, demoted=7.0) + lead("b", 2, 5.6, 20.0)
    problems = stall_problems(records, True, 5.0, 7.0)
    assert len(problems) == 2
    assert "b elected (term 2) 0.60 s after the stall began" in problems[0]
    assert "it was demoted" in problems[1]


def test_a_follower_stalled_below_the_limit_that_stands_is_caught() -> None:
    records = lead("b", 1, 0.0, 5.5, demoted=7.1) + lead("a", 2, 7.2, 20.0)
    (problem,) = stall_problems(records, False, 5.0, 7.0)
    assert "a elected (term 2)" in problem


def test_a_leader_stalled_beyond_the_limit_that_hands_over_after_it_is_fine() -> None:
    records = lead("a", 1, 0.0, 8.1, demoted=10.0) + lead("b", 2, 8.2, 20.0)
    assert stall_problems(records, True, 5.0, 10.0) == []


def test_a_leader_stalled_beyond_the_limit_that_loses_the_lead_early_is_caught() -> None:
    records = lead("a", 1, 0.0, 5.4, demoted=10.0) + lead("b", 2, 5.6, 20.0)
    (problem,) = stall_problems(records, True, 5.0, 10.0)
    assert "before the 3 s limit" in problem


def test_a_leader_stalled_beyond_the_limit_that_keeps_the_lead_is_caught() -> None:
    records = lead("a", 1, 0.0, 20.0)
    (problem,) = stall_problems(records, True, 5.0, 10.0)
    assert "no other node was elected" in problem


def test_a_leader_handed_over_by_its_watchdog_that_stands_again_at_once_is_caught() -> None:
    records = (
        lead("a", 1, 0.0, 8.1, demoted=10.0)
        + lead("b", 2, 8.2, 10.3, demoted=10.3)
        + lead("a", 3, 10.5, 20.0)
    )
    (problem,) = stall_problems(records, True, 5.0, 10.0)
    assert "elected again 0.50 s after the stall ended" in problem


# ---- schedule, proxy classification ----------------------------------------------------------


def test_a_seed_gives_the_same_schedule() -> None:
    first = schedule(42)
    again = schedule(42)
    assert [next(first) for _ in range(50)] == [next(again) for _ in range(50)]
    other = schedule(43)
    assert [next(other) for _ in range(50)] != [next(schedule(42)) for _ in range(50)]


def test_every_kind_comes_once_a_round() -> None:
    steps = schedule(7)
    kinds = [next(steps).kind for _ in range(2 * len(KINDS))]
    assert sorted(kinds[: len(KINDS)]) == sorted(KINDS)
    assert sorted(kinds[len(KINDS) :]) == sorted(KINDS)


def test_a_stopped_leader_stays_stopped_longer_than_the_election_timeout() -> None:
    steps = schedule(1, ["stop-leader"])
    assert min(next(steps).duration for _ in range(200)) > 0.75


def test_loop_stalls_fall_below_and_beyond_the_limit() -> None:
    below = schedule(1, ["loop-stall"])
    beyond = schedule(1, ["loop-stall-long"])
    shorts = [next(below) for _ in range(200)]
    longs = [next(beyond) for _ in range(200)]
    assert max(step.duration for step in shorts) <= LOOP_STALL_LIMIT - 1.0
    assert min(step.duration for step in longs) >= LOOP_STALL_LIMIT + 1.5
    assert {step.target for step in longs} == {"leader"}
    assert {step.target for step in shorts} == {"leader", "follower"}
    assert {step.mode for step in shorts + longs} == {"sleep", "spin"}


def resp(*args: str) -> bytes:
    out = f"*{len(args)}\r\n"
    for arg in args:
        out += f"${len(arg.encode())}\r\n{arg}\r\n"
    return out.encode()


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (resp("SUBSCRIBE", "a", "b"), "subscriber"),
        (resp("CLIENT", "SETINFO", "LIB-NAME", "redis-py") + resp("SUBSCRIBE", "a"), "subscriber"),
        (resp("HELLO", "3") + resp("AUTH", "u", "p") + resp("PING"), "command"),
        (resp("EVALSHA", "abc", "1", "k"), "command"),
        (resp("CLIENT", "SETINFO", "LIB-VER", "8"), None),  # only the handshake so far
        (resp("CLIENT", "SETNAME", "x")[:-3], None),  # half a command
        (b"PING\r\n", "command"),  # an inline command
        (b"\x16\x03\x01garbage", "command"),  # not RESP at all
    ],
)
def test_classify(data: bytes, kind: str | None) -> None:
    assert classify(data)[0] == kind


def test_classify_says_where_the_handshake_ends() -> None:
    handshake = resp("CLIENT", "SETINFO", "LIB-NAME", "redis-py")
    assert classify(handshake + resp("SUB")[:4]) == (None, len(handshake))


# ---- topologies ------------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_a_topology_runs_its_failover_and_the_process_faults_only(topology: str) -> None:
    kinds = TOPOLOGY_FAULTS[topology]
    assert f"{topology}-failover" in kinds
    assert set(kinds) - {f"{topology}-failover"} == set(PROCESS_KINDS)
    check_faults(kinds, topology)
    with pytest.raises(ValueError, match="cannot run on the"):
        check_faults(("net-cut",), topology)  # needs the standalone run's proxies
    steps = schedule(5, kinds)
    failovers = [
        step for step in (next(steps) for _ in range(4 * len(kinds))) if step.target == "redis"
    ]
    assert {step.mode for step in failovers} == {"prompt", "lagging"}


def test_a_replay_command_reproduces_the_config() -> None:
    config = ChaosConfig(
        seed=8, duration=200, topology="cluster", faults=("cluster-failover",), steps=2
    )
    command = config.replay()
    assert command == (
        "python -m tests.chaos --seed 8 --duration 200 --topology cluster "
        "--faults cluster-failover --steps 2"
    )
    again = parse_args(command.split()[3:])
    assert (again.seed, again.duration, again.topology, again.kinds, again.steps) == (
        8,
        200,
        "cluster",
        ("cluster-failover",),
        2,
    )
    default = ChaosConfig(seed=3, topology="sentinel")
    assert default.replay() == "python -m tests.chaos --seed 3 --duration 100 --topology sentinel"
    assert parse_args(default.replay().split()[3:]).kinds == TOPOLOGY_FAULTS["sentinel"]
