"""The chaos checks on hand-made logs: each invariant is caught when broken, and not before.

These are what keeps the harness honest: a checker that never fails would pass any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chaos import checks
from tests.chaos.checks import Record
from tests.chaos.faults import KINDS, schedule
from tests.chaos.harness import find_tracebacks
from tests.chaos.proxy import classify

END = 100.0


def rec(t: float, node: str, ev: str, life: int = 1, **data: Any) -> Record:
    return Record(t, node, life, ev, data)


def lead(
    node: str,
    term: int,
    start: float,
    lease_end: float,
    *,
    demoted: float | None = None,
    life: int = 1,
) -> list[Record]:
    """A leadership as a node reports it: acquired, elected, maybe demoted."""
    out = [
        rec(start, node, "lease", life, term=term, lease_end=lease_end, acquired=True),
        rec(start + 0.001, node, "elected", life, token=term, lease_end=lease_end),
    ]
    if demoted is not None:
        out.append(rec(demoted, node, "demoted", life))
    return out


def unexcused(records: list[Record]) -> float:
    return sum(d.unexcused for d in checks.dual_leases(records, END))


# ---- leases ----------------------------------------------------------------------------------


def test_leases_one_after_the_other_are_fine() -> None:
    records = lead("a", 1, 0.0, 1.0, demoted=1.0) + lead("b", 2, 1.5, 2.0)
    assert checks.dual_leases(records, END) == []
    assert checks.check_terms(records, END) == []


def test_overlapping_leases_are_caught() -> None:
    records = lead("a", 1, 0.0, 2.0) + lead("b", 2, 1.5, 3.0)
    assert unexcused(records) == pytest.approx(0.5)


def test_a_renewal_extends_the_lease() -> None:
    records = [
        *lead("a", 1, 0.0, 0.4),
        rec(0.3, "a", "lease", term=1, lease_end=1.7, lease_end_lo=1.7),
        *lead("b", 2, 1.5, 3.0),
    ]
    assert unexcused(records) == pytest.approx(0.2)


def test_the_demotion_ends_the_lease_early() -> None:
    records = lead("a", 1, 0.0, 2.0, demoted=1.0) + lead("b", 2, 1.5, 3.0)
    assert unexcused(records) == 0


def test_overlap_while_the_old_holder_is_stopped_is_excused() -> None:
    records = [
        *lead("a", 1, 0.0, 2.0),
        rec(1.0, "a", "stop"),
        *lead("b", 2, 1.5, 3.0),
        rec(2.5, "a", "cont"),
        rec(2.51, "a", "demoted"),
    ]
    (dual,) = checks.dual_leases(records, END)
    assert dual.paused == pytest.approx(0.5)
    assert dual.unexcused == pytest.approx(0.0)


def test_overlap_after_the_pause_is_caught() -> None:
    records = [
        *lead("a", 1, 0.0, 2.0),
        rec(1.0, "a", "stop"),
        *lead("b", 2, 1.5, 3.0),
        rec(1.8, "a", "cont"),
        rec(1.9, "a", "demoted"),
    ]
    assert unexcused(records) == pytest.approx(0.1)


def test_a_killed_leader_leads_no_more() -> None:
    records = [*lead("a", 1, 0.0, 2.0), rec(1.0, "a", "kill"), *lead("b", 2, 1.5, 3.0)]
    assert unexcused(records) == 0


def test_a_lease_read_across_a_pause_is_dated_by_its_lower_reading() -> None:
    records = [
        *lead("a", 1, 0.0, 0.4),
        rec(0.3, "a", "lease", term=1, lease_end=5.0, lease_end_lo=0.7),
        *lead("b", 2, 1.5, 3.0),
    ]
    assert unexcused(records) == 0


def test_the_same_node_restarted_is_another_holder() -> None:
    records = lead("a", 1, 0.0, 2.0) + lead("a", 2, 1.5, 3.0, life=2)
    assert unexcused(records) == pytest.approx(0.5)


# ---- terms -----------------------------------------------------------------------------------


def test_two_leaderships_in_one_term_are_caught() -> None:
    records = lead("a", 3, 0.0, 1.0, demoted=1.0) + lead("b", 3, 2.0, 3.0)
    (problem,) = checks.check_terms(records, END)
    assert "term 3 led 2 times" in problem


def test_a_term_going_backwards_is_caught() -> None:
    records = lead("a", 5, 0.0, 1.0, demoted=1.0) + lead("b", 4, 2.0, 3.0)
    (problem,) = checks.check_terms(records, END)
    assert "term went backwards" in problem


def test_a_node_whose_term_goes_down_is_caught() -> None:
    records = [rec(1.0, "a", "leader", leader="b", term=7), rec(2.0, "a", "leader", term=6)]
    (problem,) = checks.check_terms(records, END)
    assert "from 7 down to 6" in problem


def test_a_restarted_node_may_start_its_terms_again() -> None:
    records = [
        rec(1.0, "a", "leader", leader="b", term=7),
        rec(2.0, "a", "leader", 2, leader="b", term=0),
    ]
    assert checks.check_terms(records, END) == []


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


def test_leaderless_windows() -> None:
    records = lead("a", 1, 1.0, 2.0, demoted=2.0) + lead("b", 2, 2.5, 4.0, demoted=4.0)
    assert checks.leaderless_windows(records, 1.0, 5.0) == [(2.0, 2.5), (4.0, 5.0)]


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
