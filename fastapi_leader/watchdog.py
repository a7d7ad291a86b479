"""The app-loop watchdog: how long has the application's event loop not run?

The election thread keeps the leadership through stalls of the app's loop; that is the point of
it. But a leader whose loop is stuck for good would renew for ever while doing none of the
leader's work. So the election thread probes the app's loop (a callback scheduled on it with
``call_soon_threadsafe``, answered when the loop runs it) and measures how long the oldest
unanswered probe has waited. Past the limit the node hands over and stands no more; once the
loop has answered every probe promptly for :data:`RECOVERY` seconds (or the limit, if shorter)
it may stand again. The same reading feeds :attr:`LeaderElection.loop_stall`.

Pure bookkeeping: the caller passes the time in, and sends the probes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROBE_INTERVAL", "RECOVERY", "LoopWatchdog", "Verdict"]

# How often the app's loop is probed. A probe is one callback on that loop; four a second cost
# nothing measurable and read a stall to within a quarter of a second, far below any sensible
# limit (seconds).
PROBE_INTERVAL = 0.25

# How long the app's loop must answer promptly before a node that gave up the lead may stand
# again: long enough that a loop stalling again and again (a request storm of blocking calls)
# does not win an election between two stalls and lose it at the next.
RECOVERY = 5.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the watchdog's check found: ``stall`` seconds without an answer; ``stalled`` is
    set the first time it passes the limit, ``recovered`` once the loop is healthy again."""

    stall: float
    stalled: bool = False
    recovered: bool = False


class LoopWatchdog:
    """Tracks probes of one event loop against ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.recovery = min(RECOVERY, limit)
        self._probe_sent_at: float | None = None  # the unanswered probe, if any
        self._healthy_since: float | None = None
        self.tripped = False

    def stall(self, now: float) -> float:
        """Seconds the app's loop has not answered (0 while it answers)."""
        sent = self._probe_sent_at
        return 0.0 if sent is None else max(0.0, now - sent)

    def should_probe(self) -> bool:
        """Whether to send a probe now (none is outstanding)."""
        return self._probe_sent_at is None

    def probe_sent(self, now: float) -> None:
        self._probe_sent_at = now

    def answered(self, now: float) -> None:
        """The app's loop ran the probe."""
        sent, self._probe_sent_at = self._probe_sent_at, None
        if sent is not None and now - sent > PROBE_INTERVAL:
            self._healthy_since = None  # a late answer: a stall, if a short one
        elif self._healthy_since is None:
            self._healthy_since = now

    def check(self, now: float) -> Verdict:
        """Called every :data:`PROBE_INTERVAL`: did the loop pass the limit, or recover?"""
        stall = self.stall(now)
        if stall > PROBE_INTERVAL:
            self._healthy_since = None
        if not self.tripped and stall > self.limit:
            self.tripped = True
            return Verdict(stall, stalled=True)
        healthy = self._healthy_since
        if self.tripped and healthy is not None and now - healthy >= self.recovery:
            self.tripped = False
            return Verdict(stall, recovered=True)
        return Verdict(stall)
