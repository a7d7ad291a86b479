"""The election protocol as a pure state machine: no I/O, no clock, no asyncio.

Everything that changes a node's view of the election lives in this file. The caller (the
runtime in ``service.py``, or a simulator in the tests) brings three kinds of input, each with
the current reading of *its own* monotonic clock, ``now``:

- a decoded :class:`~fastapi_leader.messages.Message` that came back through the broker;
- a timer tick (:meth:`Election.tick`), and member pruning (:meth:`Election.prune`);
- the result of an operation on the group's keys that the core asked for.

Each call returns a list of :data:`Output`, in order: *commands* for the runtime to carry out
(publish a message, allocate a term, acquire / renew / release the leader key) and *events* for
the application (:class:`Elected`, :class:`Demoted`, :class:`LeaderChanged`, :class:`RoleChanged`).

How a leader is chosen, and why it is safe:

1. A follower that has heard no leader for a random election timeout (and has itself been
   listening for at least that long) first sends itself a probe on its own channel: when it
   comes back, everything Redis delivered before it has been read, and if the wait is still
   over (no heartbeat, no vote request in the backlog), the node becomes a candidate and asks
   Redis for a fresh term: ``max(counter, highest term seen) + 1``, so terms never repeat or
   go backwards.
2. It broadcasts a vote request. Others grant one vote per term, and none while they hear a
   live leader. The candidate counts only votes that came back through the broker, its own
   included, so a node that cannot hear Redis never wins.
3. With a majority of its member table it takes the leader key with ``SET NX PX lease``; Redis,
   not the vote, decides. The same script publishes the first heartbeat.
4. The leader renews the key with compare-and-extend every heartbeat. Its lease runs from the
   moment the renewal was *sent*, so its own view ends before Redis's TTL does, and a follower
   stands only an election timeout (> lease) after the last heartbeat it heard, which left the
   leader after the renewal that backed it. So no two nodes' lease readings overlap.
5. ``is_leader(now)`` compares ``now`` with the lease end at read time: a node that was paused
   answers "not leader" before it has processed anything.

What it costs, and why it stays cheap as the group grows:

- The leader sends one command per heartbeat: the script that renews the key also publishes the
  heartbeat.
- Followers announce themselves (*presence*) so that the others can count a majority and the
  leader can name a successor. Every node hears every presence, so a fixed rate would cost each
  node O(N) messages per interval; instead the interval grows with the group
  (:meth:`Timing.presence_interval`), and the group as a whole announces itself about once per
  heartbeat whatever its size. A member is forgotten after three of its intervals
  (:meth:`Timing.member_expiry_for`), so a lost beat never drops a live one.
- Nothing ticks at a fixed rate: :attr:`Election.next_tick_at` says when the next timer is due
  (a renewal, a presence beat, an election deadline), and the runtime ticks then. An idle
  follower wakes a few times a second, not every heartbeat.

Contention: terms come from Redis, so the latest candidate of a round always wins it, and a
node that hears a request stops waiting to stand. A newer term voids the round in progress, so
what matters is how many nodes stand before they hear it: the probe keeps nodes from standing
on a stale view (a loaded host reads its timers before its backlog); the random spread widens
with the group (x N/4 beyond four members), so about as many nodes stand per second in a
group of 100 as in one of 4; a candidate asks members that have not voted (a late joiner) on
their own channel, and waits as long as votes keep coming. Each time a node stands without a
leader coming of it, the spread of its next timeouts doubles (up to 4x, :data:`MAX_BACKOFF`);
hearing a leader resets it. None of this lengthens a crash failover in a small group beyond
the probe's round trip.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from .messages import Kind, Message, RejectReason

__all__ = [
    "Acquire",
    "AllocateTerm",
    "Cause",
    "Command",
    "Demoted",
    "Elected",
    "Election",
    "Event",
    "LeaderChanged",
    "MemberInfo",
    "NodeIdConflict",
    "Output",
    "Release",
    "Renew",
    "Role",
    "RoleChanged",
    "Send",
    "Status",
    "Timing",
]


class Role(str, Enum):
    """A node's part in the election."""

    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


class Cause(str, Enum):
    """Why a role changed, in a few stable words: the ``reason`` beside it says it in a
    sentence (with ids and terms), this is what metrics label and tests compare."""

    ELECTION_TIMEOUT = "election_timeout"
    """A follower heard no leader for its election timeout and stood."""
    NAMED_SUCCESSOR = "named_successor"
    """The leader handed over to this node, which stood at once."""
    WON = "won"
    """A candidate won the vote and took the leader key."""
    KEY_HELD = "key_held"
    """A candidate lost: another node holds the leader key."""
    SUPERSEDED = "superseded"
    """A candidate gave way to a newer term (another candidate, or a term allocated meanwhile)."""
    OTHER_LEADER = "other_leader"
    """Another node leads a newer term (a candidate or a leader heard its heartbeat)."""
    TERM_UNAVAILABLE = "term_unavailable"
    """A candidate could not get a usable term from the broker."""
    ACQUIRED_TOO_LATE = "acquired_too_late"
    """The leader key was taken, but its answer came after the lease it would have started."""
    CONNECTION_LOST = "connection_lost"
    """The broker connection broke."""
    LEASE_EXPIRED = "lease_expired"
    """The lease ran out before a renewal succeeded."""
    CANNOT_HEAR_ITSELF = "cannot_hear_itself"
    """A leader stopped hearing its own heartbeats: it cannot know what the group hears."""
    KEY_LOST = "key_lost"
    """A renewal found the leader key no longer this node's."""
    RESIGNED = "resigned"
    """:meth:`LeaderElection.resign`, or a resign request (``fastapi-leader resign``)."""
    LOOP_STALL = "loop_stall"
    """The app's event loop stalled past ``loop_stall_limit``."""
    SHUTDOWN = "shutdown"
    """The node is leaving the group."""
    NODE_ID_CONFLICT = "node_id_conflict"
    """Another live process uses this node id, and this one (the later start) yields."""


@dataclass(frozen=True, slots=True)
class Timing:
    """The protocol's durations, in seconds (see :class:`~fastapi_leader.LeaderSettings`)."""

    heartbeat_interval: float = 0.1
    lease: float = 0.4
    election_timeout_min: float = 0.5
    election_timeout_max: float = 0.7
    member_expiry: float = 1.0

    def presence_interval(self, group_size: int) -> float:
        """The longest gap between a follower's presence beats in a group of ``group_size``
        members (as this node counts them).

        Small groups beat three times per ``member_expiry``. From ``member_expiry / 3 /
        heartbeat_interval`` members on (4 at the defaults), the gap is ``group_size``
        heartbeats: the group then announces itself about once per heartbeat in all, and each
        node handles about two messages per heartbeat (the leader's and one presence) however
        large the group grows. Each gap is drawn in [3/4, 1] of this, so that nodes started
        together do not stay in step and flood the broker in bursts."""
        return max(self.member_expiry / 3, group_size * self.heartbeat_interval)

    def member_expiry_for(self, group_size: int) -> float:
        """How long a member of a group of ``group_size`` may stay silent before this node
        forgets it: ``member_expiry``, or three of the group's longest presence gaps if that is
        more, so that one lost beat never drops a live member.

        The sender spaces its beats by *its* count of the group and the receiver expires them
        by *its own*. They agree in a settled group; a node that has just joined counts fewer
        members and may forget some for a while, but every expiry window lets it hear about
        three times as many as it counts, so its table fills within a few windows. Meanwhile
        only its own majority count is off, and Redis, not the count, keeps leaderships
        apart."""
        return max(self.member_expiry, 3 * group_size * self.heartbeat_interval)


# ---- commands: what the runtime must do -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Publish ``message`` on the group's broadcast channel, or on node ``to``'s own channel."""

    message: Message
    to: str | None = None


@dataclass(frozen=True, slots=True)
class AllocateTerm:
    """Ask Redis for a new term above ``floor``; answer with :meth:`Election.term_allocated`."""

    floor: int


@dataclass(frozen=True, slots=True)
class Acquire:
    """``SET leader-key "<node>:<term>" NX PX ttl`` and, if set, publish ``announce``; answer with
    :meth:`Election.acquire_result`, passing the monotonic time read *before* sending."""

    term: int
    ttl: float
    announce: Message


@dataclass(frozen=True, slots=True)
class Renew:
    """Extend the leader key's TTL only if it still holds ``"<node>:<term>"``, and if so publish
    ``announce``; answer with :meth:`Election.renew_result`."""

    term: int
    ttl: float
    announce: Message


@dataclass(frozen=True, slots=True)
class Release:
    """Delete the leader key only if it holds ``"<node>:<term>"``, and if so publish
    ``announce`` (a handover). No answer is needed."""

    term: int
    announce: Message | None


Command = Send | AllocateTerm | Acquire | Renew | Release


# ---- events: what the application hears ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Elected:
    """This node became leader; ``term`` is its fencing token."""

    term: int


@dataclass(frozen=True, slots=True)
class Demoted:
    """This node stopped being leader of ``term``."""

    term: int
    reason: str
    cause: Cause


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """The leader this node knows of changed (``None``: no live leader known).

    ``last_heard_at``, when the leader is gone (``None``): the ``now`` at which this node last
    heard it (its own demotion's, for a leader that stopped leading), where the leaderless
    time began as far as this node can tell."""

    leader_id: str | None
    term: int
    last_heard_at: float | None = None


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """This node's role changed; one log line each."""

    old: Role
    new: Role
    term: int
    reason: str
    cause: Cause


@dataclass(frozen=True, slots=True)
class NodeIdConflict:
    """Another live process sends as this node's id (two processes given one node id).

    Of the two, the later start (the larger incarnation) yields: it hands over if it leads and
    does not stand while the other is heard; the earlier one goes on as if alone. Both report
    it, so the misconfiguration shows on whichever node the operator reads. ``resolved`` is
    set once the other has not been heard for a member expiry (it died or was renamed), and
    the yielding node may stand again."""

    node_id: str
    other_incarnation: int
    yielding: bool
    resolved: bool = False


Event = Elected | Demoted | LeaderChanged | RoleChanged | NodeIdConflict
Output = Command | Event


# ---- snapshots --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A live member as this node sees it."""

    node_id: str
    url: str | None
    last_seen_ago: float
    is_leader: bool


@dataclass(frozen=True, slots=True)
class Status:
    """A node's view of the election at one instant (the lease read at that instant)."""

    node_id: str
    group: str
    role: Role
    is_leader: bool
    leader_id: str | None
    term: int
    fencing_token: int | None
    lease_remaining: float | None
    lease_expires_at: float | None
    """While leading: when the lease ends (the moment the last successful renewal was sent,
    plus the lease), on the clock of ``now``: :meth:`LeaderElection.status` reads
    ``time.monotonic()``, so on Linux it compares across processes. ``None`` otherwise."""
    members: tuple[MemberInfo, ...]
    connected: bool


@dataclass(slots=True)
class _Member:
    last_seen: float
    url: str | None = None


# The largest term a group uses. Terms only grow by one per candidacy, so a real group never
# gets near it (100 elections a second for ~3 million years); a message claiming more is hostile.
# Adopting such a term would wedge the group or worse: terms past 2**53 are not exact in Redis's
# Lua numbers (allocation stops growing, even goes negative), and past 2**63 - 1 the core could
# not build its next message at all (ValueError in every tick and in leave()).
MAX_TERM = 2**53

# How far failed candidacies widen the election timeout's random spread: x2 per candidacy that
# ended without a leader, at most x2**MAX_BACKOFF. Enough for 100 nodes on two cores to settle
# in one or two rounds; small enough that the longest wait (0.5 + 4 x 0.2 = 1.3 s at the
# defaults) keeps liveness within a couple of seconds once faults stop.
MAX_BACKOFF = 2

# A sender evicted from the sequence table could have its old messages replayed; 4096 senders
# is far beyond any real group, and keeps the table's memory bounded under churn (~0.5 MB).
_MAX_TRACKED_SENDERS = 4096


@dataclass(slots=True)
class _Candidacy:
    term: int | None = None  # None while the term is being allocated
    votes: set[str] = field(default_factory=set)
    acquiring: bool = False


class Election:
    """One node's election state machine.

    ``rng`` draws the election timeouts (pass a seeded :class:`random.Random` for reproducible
    runs). ``incarnation`` tells this start of ``node_id`` apart from every other one (the
    runtime draws it from the wall clock and random bits, so that a later start is larger):
    replay protection counts sequence numbers per incarnation, and two live incarnations of one
    id are a configuration error that the core detects (:class:`NodeIdConflict`).
    ``first_seq`` seeds the message sequence.
    """

    def __init__(
        self,
        node_id: str,
        group: str,
        timing: Timing,
        *,
        rng: random.Random,
        url: str | None = None,
        incarnation: int = 0,
        first_seq: int = 0,
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.group = group
        self.timing = timing
        self.url = url
        self._rng = rng
        self._seq = first_seq

        self.role = Role.FOLLOWER
        self.term = 0  # the highest term seen or allocated: the floor for the next allocation
        self.voted_term = -1
        self.voted_for: str | None = None
        self.leader_id: str | None = None
        self.leader_term = 0
        self._leader_heard_at = float("-inf")
        self._lease_term = 0
        self.lease_expires_at = float("-inf")
        self._next_renew_at = float("-inf")
        self._renewing = False
        self._candidacy: _Candidacy | None = None

        self._wait_from = 0.0
        self._wait_share = 1.0  # where in the random spread this wait's deadline falls
        self._probe_seq: int | None = None  # the message we sent ourselves before standing
        self._probe_sent_at = float("-inf")
        self._backoff = 0  # candidacies since a leader was last heard, at most MAX_BACKOFF
        self._presence_sent_at = float("-inf")
        self._presence_gap = 1.0  # this beat's share of the presence interval
        self._next_prune_at = float("-inf")
        self._self_heard_at = float("-inf")
        self.members: dict[str, _Member] = {}
        self._seqs: OrderedDict[tuple[str, int], int] = OrderedDict()
        # Another live incarnation of our id: its incarnation and when it was last heard.
        self._twin: int | None = None
        self._twin_heard_at = float("-inf")
        self._suspended = False  # told not to stand (the app's loop is stalled)
        self.dropped: dict[str, int] = {}

        self.connected = False
        self.started = False
        self.stopped = False

    # ---- reading ------------------------------------------------------------------------------

    def is_leader(self, now: float) -> bool:
        """Whether this node holds a valid lease at ``now``: read at call time, never cached."""
        return self.role is Role.LEADER and now < self.lease_expires_at

    def fencing_token(self, now: float) -> int | None:
        """The term of the current leadership while it is valid, else ``None``."""
        return self._lease_term if self.is_leader(now) else None

    @property
    def election_deadline(self) -> float | None:
        """When a follower or candidate will next stand, if nothing is heard before then."""
        if self.role is Role.LEADER or not self.started or self.stopped:
            return None
        return self._election_deadline()

    @property
    def next_tick_at(self) -> float | None:
        """When :meth:`tick` next has something to do, if no input comes first; ``None`` once
        stopped (or before start). Ticking earlier is harmless, ticking later delays it.

        A leader: its next renewal, or while one is in flight, the end of its lease (its
        answer sets the next beat). Anyone else: the earliest of its election deadline, its
        next presence beat and the next pruning of the member table. The runtime arms one
        timer for this instead of ticking every heartbeat: a deadline that moves later (each
        heartbeat heard pushes the election deadline) costs one early wake-up, not one per
        message.

        A follower's leader that falls silent is reported gone (``LeaderChanged(None)``) at
        the first of these ticks after a lease of silence, at the latest when the follower
        stands; :meth:`status` and the vote read the silence at once. Waking at exactly a
        lease after every heartbeat would cost each follower several wake-ups a second, the
        largest part of an idle group's CPU, for an event nothing in the protocol waits for."""
        if not self.started or self.stopped:
            return None
        if self.role is Role.LEADER:
            due = self.lease_expires_at if self._renewing else self._next_renew_at
            return min(due, self.lease_expires_at, self._next_prune_at)
        stand = self._election_deadline()
        if self._probe_seq is not None:  # its answer, not a tick, stands; unless it is lost
            stand = max(stand, self._probe_sent_at + self._probe_patience())
        return min(stand, self._presence_due(), self._next_prune_at)

    def status(self, now: float) -> Status:
        """A snapshot of this node's view at ``now``."""
        leading = self.is_leader(now)
        role = self.role
        if role is Role.LEADER and not leading:
            role = Role.FOLLOWER  # the lease ran out; the next tick will say so in events
        leader_id = self.node_id if leading else self._live_leader(now)
        members = tuple(
            MemberInfo(
                node_id=node_id,
                url=member.url,
                last_seen_ago=max(0.0, now - member.last_seen),
                is_leader=node_id == leader_id,
            )
            for node_id, member in sorted(self.members.items())
        )
        return Status(
            node_id=self.node_id,
            group=self.group,
            role=role,
            is_leader=leading,
            leader_id=leader_id,
            term=self.term,
            fencing_token=self._lease_term if leading else None,
            lease_remaining=self.lease_expires_at - now if leading else None,
            lease_expires_at=self.lease_expires_at if leading else None,
            members=members,
            connected=self.connected,
        )

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Output]:
        """Join the group as a follower. The node listens for a whole election timeout before
        it may stand, so a joining node never unseats a healthy leader."""
        if self.started:
            return []
        self.started = True
        self.connected = True
        self._new_wait(now)
        self._next_prune_at = now + self.timing.member_expiry / 2
        out: list[Output] = []
        self._presence(now, out, at_once=True)
        return out

    def connection_lost(self, now: float) -> list[Output]:
        """The subscription to the broker broke: this node can no longer hear the group."""
        out: list[Output] = []
        if self.stopped or not self.connected:
            return out
        self.connected = False
        if self.role is Role.LEADER:
            self._step_down(
                now, Cause.CONNECTION_LOST, "lost the broker connection", out, release=True
            )
        elif self.role is Role.CANDIDATE:
            self._become_follower(now, Cause.CONNECTION_LOST, "lost the broker connection", out)
        return out

    def connection_restored(self, now: float) -> list[Output]:
        """The subscription is back: rejoin as a follower that listens before it stands."""
        out: list[Output] = []
        if self.stopped or self.connected:
            return out
        self.connected = True
        self._new_wait(now)
        # At once, not when the next beat is due (a group's beats can be seconds apart): the
        # others may have forgotten us, and we may stand only once we hear ourselves again.
        self._presence(now, out, at_once=True)
        if self.term > 0:
            # Redis may have restarted and lost its term counter. A node that joins now hears
            # our term only with our next beat, seconds away in a large group, and could stand
            # first and be handed term 1: a fencing token below one already used. Push the
            # counter past every term we know (terms are cheap; the answer is not needed).
            out.append(AllocateTerm(floor=self.term))
        return out

    def resign(self, now: float) -> list[Output]:
        """Give up the leadership (if held) and name a successor, staying in the group."""
        out: list[Output] = []
        if self.stopped or self.role is not Role.LEADER:
            return out
        self._hand_over(now, Cause.RESIGNED, "resigned", out)
        return out

    def suspend(self, now: float, reason: str) -> list[Output]:
        """Stop standing for election until :meth:`resume`: a leader hands over (naming a
        successor), a candidate gives up. The runtime calls it when the application this node
        serves has stopped running (its event loop stalled past the limit): such a node would
        renew its lease while doing none of the leader's work."""
        out: list[Output] = []
        if self.stopped or self._suspended:
            return out
        self._suspended = True
        if self.role is Role.LEADER:
            self._hand_over(now, Cause.LOOP_STALL, reason, out)
        elif self.role is Role.CANDIDATE:
            self._become_follower(now, Cause.LOOP_STALL, reason, out)
        return out

    def resume(self, now: float) -> list[Output]:
        """Stand again when an election is due (after :meth:`suspend`); the wait starts now."""
        if self._suspended and not self.stopped:
            self._suspended = False
            self._new_wait(now)
        return []

    @property
    def suspended(self) -> bool:
        """Whether :meth:`suspend` holds this node back from standing."""
        return self._suspended

    def leave(self, now: float) -> list[Output]:
        """Leave the group for good: a leader hands over, anyone else says goodbye. After this
        every input is ignored."""
        out: list[Output] = []
        if self.stopped or not self.started:
            self.stopped = True
            return out
        if self.role is Role.LEADER:
            self._hand_over(now, Cause.SHUTDOWN, "shutting down", out)
        else:
            if self.role is Role.CANDIDATE:
                self._become_follower(now, Cause.SHUTDOWN, "shutting down", out)
            out.append(Send(self._message(Kind.LEAVE)))
        self.stopped = True
        return out

    # ---- timers -------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Output]:
        """Drive timers: the leader renews its lease (or steps down when it has run out),
        followers announce themselves and stand when their election timeout expires."""
        out: list[Output] = []
        if self.stopped or not self.started:
            return out
        if now >= self._next_prune_at:
            self.prune(now)
        held_back = self._twin_yields(now, out) or self._suspended
        if self.role is Role.LEADER:
            self._leader_tick(now, out)
            return out
        self._presence(now, out)
        live_leader = self._live_leader(now)
        if self.leader_id is not None and live_leader is None:
            self._lose_leader(now, out)
        if now >= self._election_deadline():
            if held_back or not (self.connected and self._heard_self(now)):
                self._new_wait(now)  # cannot hear the broker: no point allocating terms
            elif self._probe_seq is None or now >= self._probe_sent_at + self._probe_patience():
                self._probe(now, out)  # stand when it comes back, if still nothing was heard
        return out

    def prune(self, now: float) -> list[Output]:
        """Forget members not heard from within :meth:`Timing.member_expiry_for` the group's
        size. :meth:`tick` calls this every half expiry; members past it already count for
        nothing, so pruning only keeps the table (and :meth:`status`) short."""
        if self.stopped:
            return []
        expiry = self.timing.member_expiry_for(self._group_size())
        horizon = now - expiry
        for node_id in [n for n, m in self.members.items() if m.last_seen < horizon]:
            del self.members[node_id]
        self._next_prune_at = now + expiry / 2
        return []

    # ---- results of commands ------------------------------------------------------------------

    def term_allocated(self, term: int, now: float) -> list[Output]:
        """Redis allocated ``term`` for the pending candidacy."""
        out: list[Output] = []
        candidacy = self._candidacy
        if self.stopped or self.role is not Role.CANDIDATE or candidacy is None:
            return out
        if candidacy.term is not None:
            return out
        if term > MAX_TERM:
            # Only a tampered term counter gets here; standing with it would build messages
            # that every node (this one included) drops.
            self._become_follower(
                now, Cause.TERM_UNAVAILABLE, f"term {term} is beyond the largest usable term", out
            )
            return out
        if term <= self.term:
            # Someone stood in a higher term meanwhile; we owe them our vote, not a contest.
            self._become_follower(now, Cause.SUPERSEDED, f"term {term} already superseded", out)
            return out
        self.term = term
        candidacy.term = term
        self.voted_term, self.voted_for = term, self.node_id
        out.append(Send(self._message(Kind.VOTE_REQUEST, term=term)))
        return out

    def acquire_failed(self, term: int, sent_at: float, now: float) -> list[Output]:
        """:class:`Acquire` got no answer (Redis unreachable, a timeout). No answer is not
        "no": the key may be ours. Give it back in case it is, and stand again later rather
        than lead on a lease whose start we cannot date."""
        out = self.acquire_result(term, False, sent_at, now)
        if not self.stopped:
            out.append(Release(term=term, announce=None))
        return out

    def term_failed(self, now: float) -> list[Output]:
        """The term could not be allocated (Redis unreachable): give up this candidacy."""
        out: list[Output] = []
        if not self.stopped and self.role is Role.CANDIDATE:
            self._become_follower(now, Cause.TERM_UNAVAILABLE, "could not allocate a term", out)
        return out

    def acquire_result(self, term: int, acquired: bool, sent_at: float, now: float) -> list[Output]:
        """The answer to :class:`Acquire`; ``sent_at`` was read just before it was sent."""
        out: list[Output] = []
        candidacy = self._candidacy
        standing = (
            not self.stopped
            and self.role is Role.CANDIDATE
            and candidacy is not None
            and candidacy.term == term
        )
        if acquired and (not standing or sent_at + self.timing.lease <= now):
            # We hold the key but no longer want it (or the answer came too late to use):
            # give it back now rather than block the group until its TTL runs out.
            out.append(Release(term=term, announce=None))
            if standing:
                self._become_follower(now, Cause.ACQUIRED_TOO_LATE, "lease acquired too late", out)
            return out
        if not standing:
            return out
        if not acquired:
            self._become_follower(now, Cause.KEY_HELD, "leader key is held", out)
            return out
        self._candidacy = None
        self._set_role(Role.LEADER, Cause.WON, "won the election and the leader key", out)
        self._lease_term = term
        self.lease_expires_at = sent_at + self.timing.lease
        self._next_renew_at = sent_at + self.timing.heartbeat_interval
        self._renewing = False
        out.append(Elected(term=term))
        self._set_leader(self.node_id, term, now, out)
        return out

    def renew_result(
        self, term: int, renewed: bool | None, sent_at: float, now: float
    ) -> list[Output]:
        """The answer to :class:`Renew`: ``True`` renewed, ``False`` the key is not ours any
        more, ``None`` the command failed (the lease then simply runs out)."""
        out: list[Output] = []
        if self.role is not Role.LEADER or term != self._lease_term or self.stopped:
            return out
        self._renewing = False
        # A failed renewal is retried a beat after it was sent, like a successful one, not at
        # once: with Redis unreachable, failures come back fast and would hammer it.
        self._next_renew_at = sent_at + self.timing.heartbeat_interval
        if renewed is None:
            return out
        if not renewed:
            self._step_down(now, Cause.KEY_LOST, "leader key lost", out, release=False)
            return out
        self.lease_expires_at = max(self.lease_expires_at, sent_at + self.timing.lease)
        return out

    # ---- messages -----------------------------------------------------------------------------

    def receive(self, message: Message, now: float) -> list[Output]:
        """Handle one message that came back through the broker."""
        out: list[Output] = []
        if self.stopped or not self.started or message.group != self.group:
            return out
        if message.term > MAX_TERM:
            # Checked before the sequence table, which such a message must not touch either.
            self._count(RejectReason.MALFORMED.value)
            return out
        if not self._fresh(message):
            self._count(RejectReason.REPLAY.value)
            return out
        sender = message.sender
        if sender == self.node_id and message.incarnation != self.incarnation:
            self._on_twin(message, now, out)
            return out
        if message.kind in (Kind.LEAVE, Kind.HANDOVER):
            self.members.pop(sender, None)
        elif message.kind is not Kind.RESIGN_REQUEST:  # an operator's tool, not a member
            self._saw(sender, now, message.url)
        if sender == self.node_id:
            self._self_heard_at = now
        # A vote is not a term anyone stood in, and a resign request only names the term it
        # asks to end: neither moves this node's term.
        if message.term > self.term and message.kind not in (Kind.VOTE, Kind.RESIGN_REQUEST):
            self.term = message.term
        handler = _HANDLERS[message.kind]
        handler(self, message, now, out)
        return out

    def _on_twin(self, m: Message, now: float, out: list[Output]) -> None:
        # Another process sends as us. Its messages are not ours (they would pass for our own
        # echo: "I hear myself") nor a peer's (the member table has one entry per id), so they
        # are counted and go no further; only its term counts, as a floor for ours.
        self._count("duplicate_node_id")
        if m.incarnation == 0 or m.kind not in (Kind.HEARTBEAT, Kind.PRESENCE):
            # Evidence of a live twin is its beats, from a start that drew an incarnation. A
            # lone handover or goodbye under our name (or one with no incarnation, as anyone
            # can forge in a group without a secret) is dropped, and changes nothing here.
            return
        self.term = max(self.term, m.term)
        self._twin_heard_at = now
        if self._twin == m.incarnation:
            return
        self._twin = m.incarnation
        yielding = self.incarnation > m.incarnation  # the later start gives way
        out.append(
            NodeIdConflict(node_id=self.node_id, other_incarnation=m.incarnation, yielding=yielding)
        )
        if yielding:
            if self.role is Role.LEADER:
                self._hand_over(
                    now, Cause.NODE_ID_CONFLICT, "another process uses this node id", out
                )
            elif self.role is Role.CANDIDATE:
                self._become_follower(
                    now, Cause.NODE_ID_CONFLICT, "another process uses this node id", out
                )

    def _twin_yields(self, now: float, out: list[Output] | None = None) -> bool:
        """Whether a live twin holds us back from standing; reports the end of a conflict."""
        if self._twin is None:
            return False
        if now - self._twin_heard_at <= self.timing.member_expiry_for(self._group_size()):
            return self.incarnation > self._twin
        if out is not None:
            yielding = self.incarnation > self._twin
            out.append(
                NodeIdConflict(
                    node_id=self.node_id,
                    other_incarnation=self._twin,
                    yielding=yielding,
                    resolved=True,
                )
            )
            self._twin = None
        return False

    def _may_stand(self, now: float) -> bool:
        return not self._suspended and not self._twin_yields(now)

    def _on_heartbeat(self, m: Message, now: float, out: list[Output]) -> None:
        if m.sender == self.node_id:
            return
        if self.role is Role.LEADER:
            if m.term > self._lease_term:
                # Only the key's holder can publish a heartbeat: ours is gone.
                self._step_down(
                    now, Cause.OTHER_LEADER, f"{m.sender} leads term {m.term}", out, release=False
                )
            else:
                return  # a stale heartbeat of an older leadership
        live = self._live_leader(now)
        if live is not None and live != m.sender and m.term < self.leader_term:
            return  # delayed beat of an older leader
        if self.role is Role.CANDIDATE:
            self._become_follower(now, Cause.OTHER_LEADER, f"{m.sender} leads term {m.term}", out)
        self._set_leader(m.sender, m.term, now, out)
        self._wait_from = now

    def _on_presence(self, m: Message, now: float, out: list[Output]) -> None:
        if m.sender == self.node_id and m.seq == self._probe_seq:
            self._probe_seq = None
            if self.role is not Role.LEADER and self.connected and now >= self._election_deadline():
                # Not for a named successor (see _on_handover): only a timeout means that the
                # group went a whole round without electing anyone.
                self._backoff = min(self._backoff + 1, MAX_BACKOFF)
                self._stand(now, out, Cause.ELECTION_TIMEOUT, "election timeout")
            return
        if m.sender == self.leader_id and m.sender != self.node_id:
            # The leader we followed now beats as a follower: it stepped down.
            self._lose_leader(now, out)
        candidacy = self._candidacy
        if (
            self.role is Role.CANDIDATE
            and candidacy is not None
            and candidacy.term is not None
            and m.sender != self.node_id
            and m.sender not in candidacy.votes
        ):
            # A member that has not voted: it joined after our request went out, or its vote
            # was lost. Ask it on its own channel (one delivery, not a broadcast). Without
            # this, a node that started a moment too late would hear no election, stand when
            # its own wait ran out, and its newer term would void ours: with a group starting
            # over a second on a loaded host, that chain kept 100 nodes leaderless.
            ask = self._message(Kind.VOTE_REQUEST, term=candidacy.term)
            out.append(Send(ask, to=m.sender))

    def _on_vote_request(self, m: Message, now: float, out: list[Output]) -> None:
        candidacy = self._candidacy
        if m.sender == self.node_id:
            if self.role is Role.CANDIDATE and candidacy is not None and candidacy.term == m.term:
                candidacy.votes.add(self.node_id)
                self._check_majority(now, out)
            return
        if self.is_leader(now) or self._live_leader(now) is not None:
            return  # leader stickiness: a live leader is never voted out
        if self.role is Role.CANDIDATE:
            if candidacy is None or candidacy.term is None or m.term <= candidacy.term:
                return
            self._become_follower(
                now, Cause.SUPERSEDED, f"{m.sender} stands in higher term {m.term}", out
            )
        if m.term < self.term or m.term < self.voted_term:
            return  # an older election: the winner must not carry a stale fencing token
        if m.term == self.voted_term and self.voted_for != m.sender:
            return  # one vote per term
        self.voted_term, self.voted_for = m.term, m.sender
        self._wait_from = now  # give the candidate time to win before standing ourselves
        out.append(Send(self._message(Kind.VOTE, term=m.term, target=m.sender), to=m.sender))

    def _on_vote(self, m: Message, now: float, out: list[Output]) -> None:
        candidacy = self._candidacy
        if m.target != self.node_id or candidacy is None or candidacy.term != m.term:
            return
        if self.role is Role.CANDIDATE and m.sender not in candidacy.votes:
            candidacy.votes.add(m.sender)
            # Votes still coming in: the round is slow (a loaded host), not lost. Standing
            # again now would void every vote cast so far with a newer term.
            self._wait_from = now
            self._check_majority(now, out)

    def _on_handover(self, m: Message, now: float, out: list[Output]) -> None:
        if m.sender == self.node_id:
            return
        if self.leader_id == m.sender:
            self._lose_leader(now, out)
        if m.target == self.node_id and self.role is Role.FOLLOWER and self.connected:
            self._stand(
                now, out, Cause.NAMED_SUCCESSOR, f"named successor of {m.sender}"
            )  # no timeout to wait out
        elif self.role is Role.FOLLOWER:
            self._new_wait(now)  # give the successor its round

    def _on_leave(self, m: Message, now: float, out: list[Output]) -> None:
        if self.leader_id == m.sender and m.sender != self.node_id:
            self._lose_leader(now, out)

    def _on_resign_request(self, m: Message, now: float, out: list[Output]) -> None:
        # Only the leadership the request names ends: a request for an older term (delayed,
        # or replayed after this node forgot the sender's sequence) leaves a newer one alone.
        if m.target != self.node_id or not self.is_leader(now) or m.term != self._lease_term:
            return
        self._hand_over(now, Cause.RESIGNED, f"asked to resign by {m.sender}", out)

    # ---- transitions --------------------------------------------------------------------------

    def _leader_tick(self, now: float, out: list[Output]) -> None:
        if not self.is_leader(now):
            self._step_down(
                now,
                Cause.LEASE_EXPIRED,
                "lease expired before it could be renewed",
                out,
                release=True,
            )
            return
        if not self._heard_self(now):
            self._step_down(
                now, Cause.CANNOT_HEAR_ITSELF, "cannot hear its own heartbeats", out, release=True
            )
            return
        # Half a beat of slack: a tick that comes a little early (a timer armed for a deadline
        # that has since moved, scheduler jitter) must not skip a whole beat.
        if not self._renewing and now >= self._next_renew_at - self.timing.heartbeat_interval / 2:
            self._renewing = True
            beat = self._message(Kind.HEARTBEAT, term=self._lease_term, url=self.url)
            out.append(Renew(term=self._lease_term, ttl=self.timing.lease, announce=beat))

    def _stand(self, now: float, out: list[Output], cause: Cause, reason: str) -> None:
        if not self._may_stand(now):
            self._new_wait(now)
            return
        self._lose_leader(now, out)
        self._candidacy = _Candidacy()
        self._set_role(Role.CANDIDATE, cause, reason, out)
        self._new_wait(now)
        out.append(AllocateTerm(floor=self.term))

    def _check_majority(self, now: float, out: list[Output]) -> None:
        candidacy = self._candidacy
        if candidacy is None or candidacy.term is None or candidacy.acquiring:
            return
        if self.node_id not in candidacy.votes:
            return  # our own request has not come back: we cannot hear the broker
        electorate = set(self._live_members(now)) | candidacy.votes
        if 2 * len(candidacy.votes) <= len(electorate):
            return
        candidacy.acquiring = True
        beat = self._message(Kind.HEARTBEAT, term=candidacy.term, url=self.url)
        out.append(Acquire(term=candidacy.term, ttl=self.timing.lease, announce=beat))

    def _hand_over(self, now: float, cause: Cause, reason: str, out: list[Output]) -> None:
        term = self._lease_term
        successor = self._pick_successor(now)
        self._demote(now, cause, reason, out)
        if successor is None:
            announce = self._message(Kind.LEAVE, term=term)
        else:
            announce = self._message(Kind.HANDOVER, term=term, target=successor)
        out.append(Release(term=term, announce=announce))

    def _pick_successor(self, now: float) -> str | None:
        # The member heard from most recently is the one most likely still connected.
        live = [(m.last_seen, n) for n, m in self.members.items() if n != self.node_id]
        horizon = now - self.timing.member_expiry_for(self._group_size())
        live = [item for item in live if item[0] >= horizon]
        return max(live)[1] if live else None

    def _step_down(
        self, now: float, cause: Cause, reason: str, out: list[Output], *, release: bool
    ) -> None:
        term = self._lease_term
        self._demote(now, cause, reason, out)
        if release:
            out.append(Release(term=term, announce=None))

    def _demote(self, now: float, cause: Cause, reason: str, out: list[Output]) -> None:
        term = self._lease_term
        self.lease_expires_at = float("-inf")
        self._renewing = False
        self._set_role(Role.FOLLOWER, cause, reason, out)
        out.append(Demoted(term=term, reason=reason, cause=cause))
        self._lose_leader(now, out)
        self._new_wait(now)

    def _become_follower(self, now: float, cause: Cause, reason: str, out: list[Output]) -> None:
        self._candidacy = None
        self._set_role(Role.FOLLOWER, cause, reason, out)
        self._new_wait(now)

    def _set_role(self, role: Role, cause: Cause, reason: str, out: list[Output]) -> None:
        if role is not self.role:
            out.append(
                RoleChanged(old=self.role, new=role, term=self.term, reason=reason, cause=cause)
            )
            self.role = role

    def _set_leader(self, leader_id: str, term: int, now: float, out: list[Output]) -> None:
        self._leader_heard_at = now
        self._backoff = 0  # the group elects: the next contest starts from the configured range
        changed = leader_id != self.leader_id
        self.leader_id, self.leader_term = leader_id, term
        if changed:
            out.append(LeaderChanged(leader_id=leader_id, term=term))

    def _lose_leader(self, now: float, out: list[Output]) -> None:
        if self.leader_id is None:
            return
        if self.leader_id != self.node_id:
            # A silent leader no longer counts in the electorate, or a two-node group could
            # never reach a majority until the member expired.
            self.members.pop(self.leader_id, None)
        heard_at = now if self.leader_id == self.node_id else self._leader_heard_at
        self.leader_id = None
        out.append(LeaderChanged(leader_id=None, term=self.leader_term, last_heard_at=heard_at))

    def _new_wait(self, now: float) -> None:
        self._wait_from = now
        self._wait_share = self._rng.random()
        self._probe_seq = None

    def _probe(self, now: float, out: list[Output]) -> None:
        # The wait ran out, but on a loaded host the heartbeat or vote request that would have
        # reset it may be queued, unread, on our own subscription: standing now would void a
        # live leader's or a candidate's round with a newer term (on two cores, 100 nodes
        # starting together stood 30 candidacies deep this way). So first send ourselves a
        # message on our own channel (one delivery): Redis delivers it after everything it
        # delivered to us before, so when it comes back we have read all of that, and we
        # stand only if the wait is still over. On an idle host it costs a round trip.
        probe = self._message(Kind.PRESENCE, url=self.url)
        self._probe_seq, self._probe_sent_at = probe.seq, now
        out.append(Send(probe, to=self.node_id))

    def _probe_patience(self) -> float:
        # A probe that never came back was lost (or we are cut off): send another.
        return self.timing.election_timeout_min

    def _election_deadline(self) -> float:
        # The random spread widens with the group beyond four members, so that as many nodes
        # stand per second in a group of 100 as in a group of 4: the first of N waits still
        # ends within [min, max] (the earliest of N draws over a spread N/4 times wider), but
        # the rest stay clear of its round. Read against the group's size now, like the
        # presence beat: a node that has just joined counts one member.
        timing = self.timing
        spread = timing.election_timeout_max - timing.election_timeout_min
        spread *= (1 << self._backoff) * max(1.0, self._group_size() / 4)
        return self._wait_from + timing.election_timeout_min + self._wait_share * spread

    def _presence(self, now: float, out: list[Output], *, at_once: bool = False) -> None:
        if at_once or now >= self._presence_due():
            self._presence_sent_at = now
            self._presence_gap = self._rng.uniform(0.75, 1.0)
            out.append(Send(self._message(Kind.PRESENCE, url=self.url)))

    def _presence_due(self) -> float:
        # Read against the group's size now, not when the last beat left: a node that has just
        # joined counts one member, and would otherwise beat again far too soon.
        gap = self._presence_gap * self.timing.presence_interval(self._group_size())
        return self._presence_sent_at + gap

    def _group_size(self) -> int:
        return max(1, len(self.members))

    # ---- helpers ------------------------------------------------------------------------------

    def _live_leader(self, now: float) -> str | None:
        if self.leader_id is None or self.leader_id == self.node_id:
            return None
        # A leader unheard for a whole lease cannot still hold one (its lease ran from before
        # the beat we heard), so from then on it no longer shields itself from votes.
        if now - self._leader_heard_at >= self.timing.lease:
            return None
        return self.leader_id

    def _heard_self(self, now: float) -> bool:
        # A leader hears its own heartbeat every beat; a follower only its presence, whose gaps
        # grow with the group.
        if self.role is Role.LEADER:
            window = self.timing.member_expiry
        else:
            window = self.timing.member_expiry_for(self._group_size())
        return now - self._self_heard_at <= window

    def _live_members(self, now: float) -> list[str]:
        horizon = now - self.timing.member_expiry_for(self._group_size())
        return [n for n, m in self.members.items() if m.last_seen >= horizon]

    def _saw(self, node_id: str, now: float, url: str | None) -> None:
        member = self.members.get(node_id)
        if member is None:
            self.members[node_id] = _Member(last_seen=now, url=url)
        else:
            member.last_seen = now
            if url is not None:
                member.url = url

    def _fresh(self, m: Message) -> bool:
        # Per incarnation: a process that restarts under its id, or a second process given
        # the same id, counts from its own start, whatever the other one reached.
        sender = (m.sender, m.incarnation)
        last = self._seqs.get(sender)
        if last is not None and m.seq <= last:
            return False
        self._seqs[sender] = m.seq
        self._seqs.move_to_end(sender)
        if len(self._seqs) > _MAX_TRACKED_SENDERS:
            self._seqs.popitem(last=False)
        return True

    def _count(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _message(
        self,
        kind: Kind,
        *,
        term: int | None = None,
        target: str | None = None,
        url: str | None = None,
    ) -> Message:
        self._seq += 1
        return Message(
            kind=kind,
            group=self.group,
            sender=self.node_id,
            term=self.term if term is None else term,
            seq=self._seq,
            target=target,
            url=url,
            incarnation=self.incarnation,
        )


_HANDLERS = {
    Kind.HEARTBEAT: Election._on_heartbeat,
    Kind.PRESENCE: Election._on_presence,
    Kind.VOTE_REQUEST: Election._on_vote_request,
    Kind.VOTE: Election._on_vote,
    Kind.HANDOVER: Election._on_handover,
    Kind.LEAVE: Election._on_leave,
    Kind.RESIGN_REQUEST: Election._on_resign_request,
}
