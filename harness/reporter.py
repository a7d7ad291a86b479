"""An election's reports: :class:`NodeReporter`, an observer of its public events and callbacks.

The lines it writes are described in :mod:`harness.reports`. It only observes: nothing in the
harness patches, wraps or subclasses a transport to see what the election does.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from fastapi_leader import LeaderElection
from fastapi_leader.events import (
    CommandFinished,
    ElectionObserver,
    LeaseAcquired,
    LeaseLost,
    LeaseRenewed,
)

from .reports import emit

__all__ = ["Emit", "NodeReporter"]

Emit = Callable[..., None]


class NodeReporter(ElectionObserver):
    """Reports one election's leases, role and leader, and counts the broker commands it
    sends (by role: ``leader:renew``, ``follower:publish``, ...).

    Give it to the election and attach its callbacks::

        reporter = NodeReporter()
        election = LeaderElection(settings, observer=reporter)
        reporter.attach(election)

    The observer methods run on the election's thread (cheap: a counter, one write); the
    callbacks on the app's loop.
    """

    def __init__(self, node: str | None = None, write: Emit = emit) -> None:
        self.node = node
        self._write = write
        self._election: LeaderElection | None = None
        self._last_lease_end: float | None = None
        self._commands: Counter[str] = Counter()
        self._lock = threading.Lock()

    def attach(self, election: LeaderElection) -> None:
        """Report ``election``'s callbacks too (and observe it, if it was not given the
        reporter as an observer). Before :meth:`LeaderElection.start`."""
        self._election = election
        if self not in election.observers:
            election.add_observer(self)
        election.on_elected(self._elected)
        election.on_demoted(self._demoted)
        election.on_leader_change(self._leader_changed)

    @property
    def commands(self) -> dict[str, int]:
        """The broker commands sent so far, by ``role:command``."""
        with self._lock:
            return dict(self._commands)

    # ---- events (the election's thread) ----------------------------------------------------

    def lease_acquired(self, event: LeaseAcquired) -> None:
        """The first lease of a leadership."""
        self._last_lease_end = event.expires_at
        self._write(
            "lease",
            self.node,
            t=event.at,
            term=event.term,
            lease_end=event.expires_at,
            acquired=True,
        )

    def lease_renewed(self, event: LeaseRenewed) -> None:
        """A renewal, when it moved the lease's end."""
        if self._last_lease_end is not None and event.expires_at <= self._last_lease_end:
            return
        self._last_lease_end = event.expires_at
        self._write("lease", self.node, t=event.at, term=event.term, lease_end=event.expires_at)

    def lease_lost(self, event: LeaseLost) -> None:
        """The leadership ended, by the election thread's clock."""
        self._last_lease_end = None
        self._write("released", self.node, t=event.at, term=event.term, cause=event.cause.value)

    def command_finished(self, event: CommandFinished) -> None:
        """Count the command, by the role the node has as it ends."""
        election = self._election
        role = "leader" if election is not None and election.is_leader else "follower"
        with self._lock:
            self._commands[f"{role}:{event.command}"] += 1

    # ---- callbacks (the app's loop) --------------------------------------------------------

    def _elected(self, token: int) -> None:
        assert self._election is not None
        lease_end = self._election.status().lease_expires_at
        self._write("elected", self.node, token=token, lease_end=lease_end)

    def _demoted(self) -> None:
        self._write("demoted", self.node)

    def _leader_changed(self, leader_id: str | None) -> None:
        assert self._election is not None
        self._write("leader", self.node, leader=leader_id, term=self._election.term)
