"""harness.leases on hand-made and sabotaged logs: every overlap and every term going back is
caught, and nothing else. A checker that never fails would pass any run, so each invariant has
a log that breaks it; the logs of :class:`harness.reporter.NodeReporter` are checked in the
format the nodes write them.
"""

from __future__ import annotations

from typing import Any

import pytest

from fastapi_leader.events import Cause, LeaseAcquired, LeaseLost, LeaseRenewed
from harness import leases
from harness.leases import Record
from harness.reporter import NodeReporter
from harness.reports import format_line, parse

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
    """The overlap of two leases outside pauses of the older holder, in seconds."""
    return sum(d.unexcused for d in leases.dual_leases(records, END))


# ---- leases ----------------------------------------------------------------------------------


def test_leases_one_after_the_other_are_fine() -> None:
    records = lead("a", 1, 0.0, 1.0, demoted=1.0) + lead("b", 2, 1.5, 2.0)
    assert leases.dual_leases(records, END) == []
    assert leases.check_terms(records, END) == []


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
    (dual,) = leases.dual_leases(records, END)
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
    (problem,) = leases.check_terms(records, END)
    assert "term 3 led 2 times" in problem


def test_a_term_going_backwards_is_caught() -> None:
    records = lead("a", 5, 0.0, 1.0, demoted=1.0) + lead("b", 4, 2.0, 3.0)
    (problem,) = leases.check_terms(records, END)
    assert "term went backwards" in problem


def test_a_node_whose_term_goes_down_is_caught() -> None:
    records = [rec(1.0, "a", "leader", leader="b", term=7), rec(2.0, "a", "leader", term=6)]
    (problem,) = leases.check_terms(records, END)
    assert "from 7 down to 6" in problem


def test_a_restarted_node_may_start_its_terms_again() -> None:
    records = [
        rec(1.0, "a", "leader", leader="b", term=7),
        rec(2.0, "a", "leader", 2, leader="b", term=0),
    ]
    assert leases.check_terms(records, END) == []


def test_leaderless_windows() -> None:
    records = lead("a", 1, 1.0, 2.0, demoted=2.0) + lead("b", 2, 2.5, 4.0, demoted=4.0)
    assert leases.leaderless_windows(records, 1.0, 5.0) == [(2.0, 2.5), (4.0, 5.0)]


# ---- the cap, the overlap ----------------------------------------------------------------------


def test_a_cap_ends_a_leadership_its_holder_still_believes_in() -> None:
    records = lead("a", 1, 0.0, 2.0) + lead("b", 2, 1.5, 3.0)
    (first, _) = leases.leaderships(records, END, cap={"a": 1.2})
    assert first.end == pytest.approx(1.2)
    assert leases.overlap([(h.start, h.end) for h in leases.leaderships(records, END)]) == (
        pytest.approx(0.5)
    )


def test_overlap_counts_time_held_by_two_or_more() -> None:
    assert leases.overlap([]) == 0
    assert leases.overlap([(0.0, 1.0), (1.0, 2.0)]) == 0
    assert leases.overlap([(0.0, 2.0), (1.0, 3.0), (1.5, 1.7)]) == pytest.approx(1.0)
    assert leases.overlap([(0.0, 1.0), (2.0, 1.0)]) == 0  # an empty interval counts for nothing


# ---- the reports of NodeReporter, as the nodes write them ---------------------------------------


class Node:
    """One node's NodeReporter, told events by hand; its lines parsed back into records."""

    def __init__(self, name: str, life: int = 1) -> None:
        self.name = name
        self.life = life
        self.lines: list[str] = []
        self.reporter = NodeReporter(write=lambda *a, **k: self.lines.append(format_line(*a, **k)))

    def acquired(self, at: float, term: int, expires_at: float) -> None:
        self.reporter.lease_acquired(
            LeaseAcquired(**self._who(at), term=term, expires_at=expires_at, latency=0.001)
        )

    def renewed(self, at: float, term: int, expires_at: float) -> None:
        self.reporter.lease_renewed(
            LeaseRenewed(**self._who(at), term=term, expires_at=expires_at, latency=0.001)
        )

    def lost(self, at: float, term: int) -> None:
        self.reporter.lease_lost(
            LeaseLost(**self._who(at), term=term, cause=Cause.RESIGNED, reason="", held_for=1)
        )

    def _who(self, at: float) -> dict[str, Any]:
        return {"group": "g", "node_id": self.name, "at": at}

    def records(self) -> list[Record]:
        out = []
        for line in self.lines:
            report = parse(line)
            assert report is not None, line
            out.append(Record(report.t, self.name, self.life, report.ev, report.data))
        return out


def test_reported_leases_one_after_the_other_are_fine() -> None:
    a, b = Node("a"), Node("b")
    a.acquired(0.0, 1, 1.0)
    a.renewed(0.5, 1, 1.5)
    a.lost(1.2, 1)
    b.acquired(1.6, 2, 2.6)
    records = a.records() + b.records()
    assert [(h.node, h.term, h.start, h.end) for h in leases.leaderships(records, END)] == [
        ("a", 1, 0.0, 1.2),
        ("b", 2, 1.6, 2.6),
    ]
    assert leases.dual_leases(records, END) == []
    assert leases.check_terms(records, END) == []


def test_a_sabotaged_report_of_two_overlapping_leases_is_caught() -> None:
    a, b = Node("a"), Node("b")
    a.acquired(0.0, 1, 1.0)
    a.renewed(0.8, 1, 1.8)  # renewed while b takes over: a trusts its lease until 1.8
    b.acquired(1.5, 2, 2.5)
    (dual,) = leases.dual_leases(a.records() + b.records(), END)
    assert (dual.first.node, dual.second.node) == ("a", "b")
    assert dual.unexcused == pytest.approx(0.3)


def test_a_renewal_that_does_not_move_the_end_is_not_reported() -> None:
    a = Node("a")
    a.acquired(0.0, 1, 1.0)
    a.renewed(0.2, 1, 1.0)
    a.renewed(0.4, 1, 1.4)
    assert [r.data["lease_end"] for r in a.records()] == [1.0, 1.4]


def test_a_sabotaged_report_of_a_term_going_back_is_caught() -> None:
    a, b = Node("a"), Node("b")
    a.acquired(0.0, 5, 1.0)
    a.lost(1.0, 5)
    b.acquired(2.0, 4, 3.0)
    (problem,) = leases.check_terms(a.records() + b.records(), END)
    assert "term went backwards: b led with term 4" in problem


def test_a_term_led_twice_in_reports_is_caught() -> None:
    a, b = Node("a"), Node("b")
    a.acquired(0.0, 3, 1.0)
    a.lost(1.0, 3)
    b.acquired(2.0, 3, 3.0)
    (problem,) = leases.check_terms(a.records() + b.records(), END)
    assert "term 3 led 2 times" in problem


def test_lines_that_are_not_reports_parse_to_none() -> None:
    assert parse(b"Traceback (most recent call last):\n") is None
    assert parse(b"[1, 2]\n") is None
    assert parse(b'{"ev": "joined"}\n') is None
    report = parse(format_line("joined", "n1", t=1.5, extra=True))
    assert report is not None
    assert (report.t, report.ev, report.node, report.data) == (1.5, "joined", "n1", {"extra": True})
