"""The app-loop watchdog's bookkeeping, with time passed in (the driver does the probing)."""

from __future__ import annotations

import pytest

from fastapi_leader.watchdog import PROBE_INTERVAL, RECOVERY, LoopWatchdog


def healthy_for(watchdog: LoopWatchdog, start: float, seconds: float) -> list[str]:
    """Probe every interval from ``start`` for ``seconds``, each answered at once; return the
    verdicts that said something."""
    said = []
    now = start
    while now <= start + seconds + 1e-9:
        if watchdog.should_probe():
            watchdog.probe_sent(now)
            watchdog.answered(now + 0.001)
        verdict = watchdog.check(now + 0.002)
        if verdict.stalled:
            said.append("stalled")
        if verdict.recovered:
            said.append("recovered")
        now = round(now + PROBE_INTERVAL, 9)
    return said


def test_a_loop_that_answers_never_trips() -> None:
    watchdog = LoopWatchdog(limit=10.0)
    assert watchdog.should_probe()
    assert watchdog.stall(0.0) == 0.0
    assert healthy_for(watchdog, 0.0, 60.0) == []
    assert not watchdog.tripped


def test_an_unanswered_probe_grows_the_stall_and_trips_once_past_the_limit() -> None:
    watchdog = LoopWatchdog(limit=2.0)
    watchdog.probe_sent(1.0)
    assert not watchdog.should_probe()  # one probe outstanding at a time
    assert watchdog.stall(2.5) == pytest.approx(1.5)
    assert not watchdog.check(3.0).stalled  # at the limit, not past it
    verdict = watchdog.check(3.1)
    assert verdict.stalled and verdict.stall == pytest.approx(2.1)
    assert watchdog.tripped
    assert not watchdog.check(9.0).stalled  # one verdict per stall


def test_recovery_needs_a_healthy_stretch_and_a_late_answer_restarts_it() -> None:
    watchdog = LoopWatchdog(limit=10.0)
    assert watchdog.recovery == RECOVERY
    watchdog.probe_sent(0.0)
    assert watchdog.check(10.5).stalled
    watchdog.answered(11.0)  # late: a stall, so no healthy stretch starts
    assert not watchdog.check(11.0).recovered
    # Healthy for almost the recovery time, then one slow answer: the stretch starts over.
    assert healthy_for(watchdog, 11.25, RECOVERY - 0.5) == []
    watchdog.probe_sent(20.0)
    watchdog.answered(20.0 + 2 * PROBE_INTERVAL)
    assert healthy_for(watchdog, 20.75, RECOVERY - 0.5) == []
    assert healthy_for(watchdog, 20.75 + RECOVERY - 0.25, 1.0) == ["recovered"]
    assert not watchdog.tripped


def test_a_short_limit_needs_only_that_long_to_recover() -> None:
    watchdog = LoopWatchdog(limit=1.0)
    assert watchdog.recovery == 1.0
    watchdog.probe_sent(0.0)
    assert watchdog.check(1.25).stalled
    watchdog.answered(1.3)
    assert healthy_for(watchdog, 1.5, 1.5) == ["recovered"]
