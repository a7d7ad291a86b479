"""What an election reports as it runs: the interface for metrics, logs, probes and harnesses.

Subclass :class:`ElectionObserver`, override the methods you need (the others do nothing), and
pass it to the election::

    class Printer(ElectionObserver):
        def role_changed(self, event: RoleChange) -> None:
            print(event.node_id, event.old.value, "->", event.new.value, event.cause.value)


    election = LeaderElection(observer=Printer())  # or observer=[Printer(), metrics]

**Where it runs.** Every method is called on the election's own thread (``fastapi-leader``),
synchronously, right after the runtime carried out what the event reports, and in the order
things happened. So an observer must be fast (a counter, a gauge, a queue's ``put_nowait``:
microseconds; a renewal reports every heartbeat) and thread-safe with respect to whatever else
reads its state; it must not block (no I/O, no locks held for long): while it runs, the
election waits. To act on the app's loop, hand over with ``loop.call_soon_threadsafe``. An
exception in an observer is logged (the first of each method with its traceback, the rest at
debug level), counted in ``election.counters["observer_errors"]``, and never reaches the
election. Observers are told in the order they were given; one observer may watch several
elections (every event names its ``group`` and ``node_id``).

Every event carries ``at``: the ``time.monotonic()`` reading at which the runtime saw it (on
Linux the clock is system-wide, so harnesses compare it across processes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .core import Cause, Role

__all__ = [
    "Cause",
    "CommandFinished",
    "ConnectionLost",
    "ConnectionRestored",
    "ElectionEnd",
    "ElectionEvent",
    "ElectionObserver",
    "ElectionStart",
    "IdConflict",
    "LeaderChange",
    "LeaseAcquired",
    "LeaseLost",
    "LeaseRenewed",
    "LoopRecovered",
    "LoopStalled",
    "MembersChange",
    "MessageDropped",
    "RenewFailed",
    "RoleChange",
]

log = logging.getLogger("fastapi_leader")


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionEvent:
    """What every event says: which node of which group, and when (``time.monotonic()``).
    :meth:`ElectionObserver.joined` and :meth:`ElectionObserver.left` get exactly this."""

    group: str
    node_id: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleChange(ElectionEvent):
    """This node's role changed: ``old`` -> ``new`` in ``term`` (the highest it has seen).
    ``cause`` is one of a few stable words, ``reason`` the sentence the log line says."""

    old: Role
    new: Role
    term: int
    cause: Cause
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionStart(ElectionEvent):
    """This node stood for election (it became a candidate); ``term`` is the highest it had
    seen (the one it stands in is allocated next). ``cause``: ``election_timeout`` or
    ``named_successor``."""

    term: int
    cause: Cause


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionEnd(ElectionEvent):
    """This node's candidacy ended: ``won`` (it leads ``term`` now) or lost, for ``cause``
    (``key_held``, ``superseded``, ``other_leader``, ...), ``duration`` seconds after it
    stood."""

    term: int
    won: bool
    cause: Cause
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseAcquired(ElectionEvent):
    """This node took the leader key for ``term`` and leads until ``expires_at`` (on the
    monotonic clock) unless it renews; the command took ``latency`` seconds."""

    term: int
    expires_at: float
    latency: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRenewed(ElectionEvent):
    """A renewal succeeded: the lease of ``term`` now ends at ``expires_at``; the round trip
    took ``latency`` seconds."""

    term: int
    expires_at: float
    latency: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewFailed(ElectionEvent):
    """A renewal of ``term`` failed after ``latency`` seconds: ``error`` (the broker did not
    answer: unreachable, or the connection broke), ``timeout``, or ``key_lost`` (the key is not
    this node's any more: the leadership ends with it). After ``error`` or ``timeout`` the
    lease runs on until it ends, and the next beat retries."""

    term: int
    latency: float
    reason: Literal["error", "timeout", "key_lost"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseLost(ElectionEvent):
    """This node's leadership of ``term`` ended, for ``cause`` (``resigned``, ``shutdown``,
    ``lease_expired``, ``key_lost``, ...), after ``held_for`` seconds; ``is_leader`` is false
    from here on."""

    term: int
    cause: Cause
    reason: str
    held_for: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaderChange(ElectionEvent):
    """The leader this node knows changed: ``leader_id`` (this node's own id while it leads),
    ``None`` while none is known. When a leader becomes known after none was,
    ``leaderless_for`` is how long this node went without one, from the last time it heard the
    previous leader; ``None`` otherwise (and for the first leader a node hears after it
    joined)."""

    leader_id: str | None
    term: int
    leaderless_for: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDropped(ElectionEvent):
    """A message from the broker was dropped: ``reason`` is a
    :class:`~fastapi_leader.RejectReason` value (``bad_signature``, ``replay``, ...) or
    ``duplicate_node_id``."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLost(ElectionEvent):
    """The subscription to the broker broke (a leader steps down with it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRestored(ElectionEvent):
    """The subscription is back, after ``down_for`` seconds."""

    down_for: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopStalled(ElectionEvent):
    """The app's event loop has not run for ``stall`` seconds, past ``limit``
    (``LEADER_LOOP_STALL_LIMIT``): this node hands over and does not stand until it recovers."""

    stall: float
    limit: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopRecovered(ElectionEvent):
    """The app's event loop has answered promptly again for long enough: this node may stand
    again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdConflict(ElectionEvent):
    """Another live process (incarnation ``other_incarnation``) uses this node's id:
    ``yielding`` when this one (the later start) gives way; ``resolved`` once the other has
    not been heard for a member expiry."""

    other_incarnation: int
    yielding: bool
    resolved: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class MembersChange(ElectionEvent):
    """The live members this node hears changed: their ids (itself included once it hears
    itself), sorted. Sampled four times a second, and told only when it changed."""

    members: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandFinished(ElectionEvent):
    """One broker command ended: ``command`` is ``publish``, ``allocate_term``, ``acquire``,
    ``renew`` or ``release``; ``ok`` is false when the broker did not answer (an error or a
    timeout), not when it answered "no"."""

    command: Literal["publish", "allocate_term", "acquire", "renew", "release"]
    latency: float
    ok: bool


class ElectionObserver:
    """Base class of election observers: every method does nothing; override what you need.

    Methods are called on the election's thread, must be fast, thread-safe and non-blocking
    (see the module docstring); an exception is logged and never reaches the election.
    """

    def joined(self, event: ElectionEvent) -> None:
        """The election started: connected and joined the group as a follower."""

    def left(self, event: ElectionEvent) -> None:
        """The election stopped (after its handover, if it led); nothing follows."""

    def role_changed(self, event: RoleChange) -> None:
        """This node's role changed (follower, candidate, leader)."""

    def election_started(self, event: ElectionStart) -> None:
        """This node stood for election."""

    def election_ended(self, event: ElectionEnd) -> None:
        """This node's candidacy ended, won or lost."""

    def lease_acquired(self, event: LeaseAcquired) -> None:
        """This node took the leader key: its leadership begins."""

    def lease_renewed(self, event: LeaseRenewed) -> None:
        """A renewal succeeded (every heartbeat while leading)."""

    def renew_failed(self, event: RenewFailed) -> None:
        """A renewal failed."""

    def lease_lost(self, event: LeaseLost) -> None:
        """This node's leadership ended."""

    def leader_changed(self, event: LeaderChange) -> None:
        """The leader this node knows changed."""

    def message_dropped(self, event: MessageDropped) -> None:
        """A message was dropped (unsigned, forged, replayed, malformed, ...)."""

    def connection_lost(self, event: ConnectionLost) -> None:
        """The broker connection broke."""

    def connection_restored(self, event: ConnectionRestored) -> None:
        """The broker connection is back."""

    def loop_stalled(self, event: LoopStalled) -> None:
        """The app's event loop stalled past its limit."""

    def loop_recovered(self, event: LoopRecovered) -> None:
        """The app's event loop runs smoothly again."""

    def node_id_conflict(self, event: IdConflict) -> None:
        """Another process uses this node id (or no longer does: ``resolved``)."""

    def members_changed(self, event: MembersChange) -> None:
        """The live members changed."""

    def command_finished(self, event: CommandFinished) -> None:
        """A broker command ended (several a second: keep this one very cheap)."""


# The methods an observer may override, in one place (the fan-out below is built from it).
METHODS = tuple(
    name
    for name in vars(ElectionObserver)
    if not name.startswith("_") and callable(getattr(ElectionObserver, name))
)

Handlers = tuple[Callable[[Any], None], ...]


class Fanout:
    """The observers of one election, by method: for each method, the bound methods of the
    observers that override it (so an event nobody listens to costs one truth test, and is
    not even built). Errors are caught, logged and counted through ``on_error``."""

    def __init__(
        self,
        observers: Iterable[ElectionObserver],
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.observers = tuple(observers)
        self._on_error = on_error
        self._failed: set[tuple[int, str]] = set()
        for name in METHODS:
            default = getattr(ElectionObserver, name)
            handlers = tuple(
                getattr(observer, name)
                for observer in self.observers
                if getattr(type(observer), name, default) is not default
            )
            setattr(self, name, handlers)

    def __getattr__(self, name: str) -> Handlers:  # for type checkers: set in __init__
        raise AttributeError(name)

    def tell(self, handlers: Handlers, event: Any) -> None:
        """Call each handler with ``event``; an exception is logged, counted, and dropped."""
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                self._on_error()
                key = (id(getattr(handler, "__self__", handler)), handler.__name__)
                if key in self._failed:
                    log.debug("election observer %r failed again", handler, exc_info=True)
                else:
                    self._failed.add(key)
                    log.exception(
                        "election observer %r failed (logged once; the election goes on)",
                        handler,
                    )


def as_observers(
    observer: ElectionObserver | Iterable[ElectionObserver] | None,
) -> list[ElectionObserver]:
    """``observer=`` as a list: one observer, several, or none."""
    if observer is None:
        return []
    if isinstance(observer, ElectionObserver):
        return [observer]
    observers = list(observer)
    for item in observers:
        if not isinstance(item, ElectionObserver):
            raise TypeError(
                f"observer: expected an ElectionObserver (or several), not {type(item).__name__}"
            )
    return observers
