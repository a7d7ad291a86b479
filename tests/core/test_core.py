"""The election core driven by hand, in memory: inputs with explicit ``now``, outputs compared.

The harness is deliberately tiny (tests/sim/ is the place for whole clusters): a :class:`Node`
wraps one :class:`Election`, makes messages from other members with fresh sequence numbers, and
can feed back what the node itself published, as the broker would. Outputs are compared as short
strings (:func:`shape`) so a table row reads like the protocol: reasons are left out on purpose.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from fastapi_leader.core import (
    Acquire,
    AllocateTerm,
    Cause,
    Demoted,
    Elected,
    Election,
    LeaderChanged,
    NodeIdConflict,
    Output,
    Release,
    Renew,
    Role,
    RoleChanged,
    Send,
    Timing,
)
from fastapi_leader.messages import Kind, Message

GROUP = "g"
TIMING = Timing()
HB = TIMING.heartbeat_interval
LEASE = TIMING.lease
TMIN = TIMING.election_timeout_min
TMAX = TIMING.election_timeout_max
EXPIRY = TIMING.member_expiry
EPS = 1e-6


# ---- harness ----------------------------------------------------------------------------------


def shape(outputs: list[Output]) -> list[str]:
    """Each output as one short line: kind, target and term; no reasons, no sequence numbers."""
    lines = []
    for o in outputs:
        if isinstance(o, Send):
            m = o.message
            line = f"send {m.kind.name} term={m.term}"
            line += f" target={m.target}" if m.target else ""
            line += f" to={o.to}" if o.to else ""
        elif isinstance(o, AllocateTerm):
            line = f"allocate-term floor={o.floor}"
        elif isinstance(o, Acquire):
            line = f"acquire term={o.term}"
        elif isinstance(o, Renew):
            line = f"renew term={o.term}"
        elif isinstance(o, Release):
            line = f"release term={o.term}"
            if o.announce is not None:
                line += f" announce={o.announce.kind.name}"
                line += f" target={o.announce.target}" if o.announce.target else ""
        elif isinstance(o, Elected):
            line = f"elected term={o.term}"
        elif isinstance(o, Demoted):
            line = f"demoted term={o.term}"
        elif isinstance(o, LeaderChanged):
            line = f"leader={o.leader_id}"
        elif isinstance(o, RoleChanged):
            line = f"role {o.old.value}->{o.new.value}"
        elif isinstance(o, NodeIdConflict):
            line = f"conflict other={o.other_incarnation} yielding={o.yielding}"
            line += " resolved" if o.resolved else ""
        else:  # pragma: no cover - a new output type must be added here
            raise AssertionError(f"unknown output {o!r}")
        lines.append(line)
    return lines


def without_presence(outputs: list[Output]) -> list[Output]:
    return [o for o in outputs if not (isinstance(o, Send) and o.message.kind is Kind.PRESENCE)]


def of(outputs: list[Output], cls: type) -> list[Any]:
    return [o for o in outputs if isinstance(o, cls)]


class Node:
    """One :class:`Election` fed by hand."""

    def __init__(
        self, node_id: str = "a", *, seed: int = 0, url: str | None = None, incarnation: int = 0
    ) -> None:
        self.e = Election(
            node_id, GROUP, TIMING, rng=random.Random(seed), url=url, incarnation=incarnation
        )
        self._peer_seq = itertools.count(1)
        self.acquires: list[Acquire] = []  # what the candidacy asked for
        self.next_tick = 0.0  # where keep_leading left off

    @property
    def id(self) -> str:
        return self.e.node_id

    def msg(
        self,
        kind: Kind,
        sender: str,
        term: int = 0,
        *,
        target: str | None = None,
        seq: int | None = None,
        incarnation: int = 0,
    ) -> Message:
        """A message from another member, with a fresh sequence number unless given."""
        return Message(
            kind=kind,
            group=GROUP,
            sender=sender,
            term=term,
            seq=next(self._peer_seq) if seq is None else seq,
            target=target,
            incarnation=incarnation,
        )

    def hear(self, kind: Kind, sender: str, now: float, term: int = 0, **kw: Any) -> list[Output]:
        return self.e.receive(self.msg(kind, sender, term, **kw), now)

    def echo(self, outputs: list[Output], now: float) -> list[Output]:
        """Deliver back the messages this node published (broadcast or to itself)."""
        result: list[Output] = []
        for o in outputs:
            if isinstance(o, Send) and o.to in (None, self.id):
                result += self.e.receive(o.message, now)
        return result

    def join(self, now: float = 0.0) -> None:
        """Start, and hear its own presence back: a connected follower."""
        self.echo(self.e.start(now), now)

    def stand(self) -> tuple[float, int]:
        """Tick at the election deadline and hear the probe it sends itself back; return
        (when, the floor it asked a term above)."""
        deadline = self.e.election_deadline
        assert deadline is not None
        [allocate] = of(self.tick_and_echo(deadline), AllocateTerm)
        return deadline, allocate.floor

    def tick_and_echo(self, now: float) -> list[Output]:
        """Tick, and deliver back at once what the node sent itself (its presence beat, the
        probe it sends before standing): a connected node on an idle broker."""
        out = self.e.tick(now)
        return out + self.echo(out, now)

    def candidate(self, term: int | None = None) -> tuple[float, int]:
        """A node alone in its group that stood, got ``term`` and heard its own request back
        (so its Acquire is in ``self.acquires``, not yet answered)."""
        self.join()
        at, floor = self.stand()
        term = floor + 1 if term is None else term
        request = self.e.term_allocated(term, at)
        assert shape(request) == [f"send VOTE_REQUEST term={term}"]
        self.acquires += of(self.echo(request, at), Acquire)
        return at, term

    def lead(self) -> tuple[float, int]:
        """Elect this node alone; return (sent_at of its acquire, its term)."""
        at, term = self.candidate()
        [acquire] = self.acquires
        out = self.e.acquire_result(acquire.term, True, sent_at=at, now=at + 0.001)
        assert of(out, Elected) == [Elected(term=term)]
        self.next_tick = at + HB
        return at, term

    def keep_leading(self, start: float, until: float, *, echo: bool = True) -> list[Output]:
        """Tick every heartbeat from ``start`` to ``until``; every renewal succeeds at once and
        (if ``echo``) its heartbeat comes back. Returns everything that was output."""
        log: list[Output] = []
        now = start
        while now <= until + EPS:
            out = self.e.tick(now)
            log += out
            for renew in of(out, Renew):
                log += self.e.renew_result(renew.term, True, sent_at=now, now=now)
                if echo:
                    log += self.e.receive(renew.announce, now)
            now = round(now + HB, 9)
        self.next_tick = now
        return log


def snapshot(e: Election, now: float) -> tuple[Any, ...]:
    return (
        e.role,
        e.term,
        e.voted_term,
        e.voted_for,
        e.leader_id,
        e.election_deadline,
        e.status(now),
        {n: (m.last_seen, m.url) for n, m in e.members.items()},
    )


# ---- joining ----------------------------------------------------------------------------------


def test_fresh_node_is_a_follower_and_announces_itself() -> None:
    node = Node("a", url="http://a:8000")
    out = node.e.start(0.0)
    assert shape(out) == ["send PRESENCE term=0"]
    assert out[0].message.url == "http://a:8000"
    assert node.e.role is Role.FOLLOWER
    assert not node.e.is_leader(0.0)
    status = node.e.status(0.0)
    assert (status.role, status.leader_id, status.fencing_token) == (Role.FOLLOWER, None, None)


def test_start_twice_is_ignored() -> None:
    node = Node()
    node.e.start(0.0)
    assert node.e.start(0.1) == []


@pytest.mark.parametrize("seed", range(12))
def test_joining_node_does_not_stand_before_election_timeout_min(seed: int) -> None:
    node = Node(seed=seed)
    node.join(0.0)
    first_stand = None
    for step in range(1, 201):
        now = step * 0.005
        out = node.tick_and_echo(now)
        if of(out, AllocateTerm):
            first_stand = now
            break
    assert first_stand is not None, "never stood"
    assert TMIN <= first_stand <= TMAX + 0.005


def test_election_timeout_is_drawn_from_the_seeded_rng() -> None:
    deadlines = []
    for seed in (1, 1, 2, 3):
        node = Node(seed=seed)
        node.join(0.0)
        deadlines.append(node.e.election_deadline)
    assert deadlines[0] == deadlines[1]  # a seed replays exactly
    assert len(set(deadlines)) == 3  # and different seeds draw different waits
    assert all(deadline is not None and TMIN <= deadline <= TMAX for deadline in deadlines)


def _hears_only_others(node: Node) -> None:
    node.e.start(0.0)
    for step in range(30):
        node.hear(Kind.PRESENCE, "b", step * 0.1)


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(lambda n: n.e.start(0.0), id="never-heard-itself"),
        pytest.param(_hears_only_others, id="hears-only-others"),
        pytest.param(lambda n: (n.join(0.0), n.e.connection_lost(0.1)), id="disconnected"),
    ],
)
def test_regression_node_that_cannot_hear_the_broker_never_stands(
    setup: Callable[[Node], Any],
) -> None:
    # Only the connected can lead: without its own messages coming back a node must not even
    # allocate a term.
    node = Node()
    setup(node)
    for step in range(1, 301):
        assert of(node.e.tick(step * 0.01), AllocateTerm) == []
    assert node.e.role is Role.FOLLOWER


# ---- standing and winning -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "term", "floor"),
    [
        (None, 0, 0),
        (Kind.PRESENCE, 5, 5),
        (Kind.HEARTBEAT, 41, 41),
        (Kind.VOTE_REQUEST, 17, 17),
        (Kind.VOTE, 99, 0),  # a vote is not a term anyone stood in
    ],
)
def test_standing_asks_for_a_term_above_the_highest_seen(
    kind: Kind | None, term: int, floor: int
) -> None:
    node = Node("a")
    node.join(0.0)
    if kind is not None:
        node.hear(kind, "b", 0.01, term, target="a" if kind is Kind.VOTE else None)
    deadline = node.e.election_deadline
    assert deadline is not None
    out = without_presence(node.tick_and_echo(deadline))
    # (a leader heard at 0.01 is first reported gone: its lease cannot outlast the timeout)
    assert shape(out)[-2:] == ["role follower->candidate", f"allocate-term floor={floor}"]
    assert node.e.role is Role.CANDIDATE


@pytest.mark.parametrize(
    ("allocated", "expected", "role"),
    [
        (1, ["send VOTE_REQUEST term=1"], Role.CANDIDATE),
        (1000, ["send VOTE_REQUEST term=1000"], Role.CANDIDATE),
    ],
)
def test_allocated_term_is_broadcast_as_a_vote_request(
    allocated: int, expected: list[str], role: Role
) -> None:
    node = Node()
    node.join(0.0)
    at, _ = node.stand()
    out = node.e.term_allocated(allocated, at)
    assert shape(out) == expected
    assert out[0].to is None  # broadcast
    assert node.e.role is role
    assert (node.e.term, node.e.voted_term, node.e.voted_for) == (allocated, allocated, node.id)


@pytest.mark.parametrize("allocated", [3, 10])
def test_superseded_term_returns_candidate_to_follower(allocated: int) -> None:
    node = Node()
    node.join(0.0)
    at, _ = node.stand()
    node.hear(Kind.PRESENCE, "b", at, 10)  # someone is already at term 10
    assert shape(node.e.term_allocated(allocated, at)) == ["role candidate->follower"]


@pytest.mark.parametrize(
    ("peers", "votes", "wins"),
    [
        (0, 0, True),
        (1, 0, False),
        (1, 1, True),
        (2, 0, False),
        (2, 1, True),
        (2, 2, True),
        (3, 1, False),
        (3, 2, True),
        (3, 3, True),
        (4, 1, False),
        (4, 2, True),
        (6, 2, False),
        (6, 3, True),
    ],
)
def test_majority_of_live_members_triggers_exactly_one_acquire(
    peers: int, votes: int, wins: bool
) -> None:
    node = Node("a")
    node.join(0.0)
    names = [f"p{i}" for i in range(peers)]
    for name in names:
        node.hear(Kind.PRESENCE, name, 0.01)
    at, floor = node.stand()
    term = floor + 1
    request = node.e.term_allocated(term, at)
    log = node.echo(request, at)  # our own request counts as our vote
    for name in names[:votes]:
        log += node.hear(Kind.VOTE, name, at, term, target="a")
    acquires = of(log, Acquire)
    assert len(acquires) == (1 if wins else 0)
    if wins:
        [acquire] = acquires
        assert (acquire.term, acquire.ttl) == (term, LEASE)
        assert (acquire.announce.kind, acquire.announce.term) == (Kind.HEARTBEAT, term)


def test_regression_majority_without_own_vote_heard_back_does_not_acquire() -> None:
    # Only the connected can lead: two of three votes are a majority, but while our own request
    # has not come back through the broker we cannot know we hear it.
    node = Node("a")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "b", 0.01)
    node.hear(Kind.PRESENCE, "c", 0.01)
    at, floor = node.stand()
    term = floor + 1
    request = node.e.term_allocated(term, at)
    assert of(node.hear(Kind.VOTE, "b", at, term, target="a"), Acquire) == []
    assert of(node.hear(Kind.VOTE, "c", at, term, target="a"), Acquire) == []
    assert len(of(node.echo(request, at), Acquire)) == 1


@pytest.mark.parametrize(
    ("sender", "term_offset", "target"),
    [
        pytest.param("b", -1, "a", id="older-term"),
        pytest.param("b", 1, "a", id="newer-term"),
        pytest.param("b", 0, "c", id="vote-for-someone-else"),
        pytest.param("a", 0, "a", id="duplicate-own"),
    ],
)
def test_votes_that_do_not_count(sender: str, term_offset: int, target: str) -> None:
    node = Node("a")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "b", 0.01)
    node.hear(Kind.PRESENCE, "c", 0.01)
    at, floor = node.stand()
    term = floor + 1
    node.echo(node.e.term_allocated(term, at), at)  # own vote: 1 of 3
    out = node.hear(Kind.VOTE, sender, at, term + term_offset, target=target)
    assert of(out, Acquire) == []
    # the real second vote still wins
    assert len(of(node.hear(Kind.VOTE, "c", at, term, target="a"), Acquire)) == 1


def test_acquired_key_makes_the_candidate_leader() -> None:
    node = Node("a")
    at, term = node.candidate()
    assert [(a.term, a.ttl) for a in node.acquires] == [(term, LEASE)]
    out = node.e.acquire_result(term, True, sent_at=at, now=at + 0.002)
    assert shape(out) == ["role candidate->leader", f"elected term={term}", "leader=a"]
    assert node.e.is_leader(at + 0.002)
    assert node.e.fencing_token(at + 0.002) == term


@pytest.mark.parametrize(
    ("offset", "leading"),
    [
        (0.0, True),
        (LEASE / 2, True),
        (LEASE - EPS, True),
        (LEASE, False),
        (LEASE + EPS, False),
        (1e6, False),
    ],
)
def test_regression_lease_is_read_at_call_time_from_sent_at(offset: float, leading: bool) -> None:
    # A paused leader must answer "not leader" before it processes anything: no tick here.
    node = Node()
    sent_at, term = node.lead()
    assert node.e.is_leader(sent_at + offset) is leading
    assert node.e.fencing_token(sent_at + offset) == (term if leading else None)


def test_acquire_refused_returns_candidate_to_follower() -> None:
    node = Node("a")
    at, term = node.candidate()
    out = node.e.acquire_result(term, False, sent_at=at, now=at + 0.002)
    assert shape(out) == ["role candidate->follower"]
    assert not node.e.is_leader(at + 0.002)
    deadline = node.e.election_deadline
    # It stood on a timeout and no leader came of it: its next wait is drawn from a doubled
    # spread (see test_failed_candidacies_widen_the_timeout_spread).
    widest = TMIN + 2 * (TMAX - TMIN)
    assert deadline is not None and at + 0.002 + TMIN <= deadline <= at + 0.002 + widest


CANDIDACY_ENDERS = [
    pytest.param(lambda n, at, t: n.hear(Kind.HEARTBEAT, "b", at, t + 1), id="heard-a-leader"),
    pytest.param(
        lambda n, at, t: n.hear(Kind.VOTE_REQUEST, "b", at, t + 1), id="higher-term-request"
    ),
    pytest.param(lambda n, at, t: n.e.connection_lost(at), id="connection-lost"),
    pytest.param(
        lambda n, at, t: n.tick_and_echo(n.e.election_deadline or 0.0),
        id="timed-out-and-stood-again",
    ),
    pytest.param(lambda n, at, t: n.e.leave(at), id="left"),
]


@pytest.mark.parametrize("end", CANDIDACY_ENDERS)
def test_regression_acquire_success_after_candidacy_ended_is_released(
    end: Callable[[Node, float, int], Any],
) -> None:
    node = Node("a")
    at, term = node.candidate()
    end(node, at, term)
    out = node.e.acquire_result(term, True, sent_at=at, now=at + 0.002)
    assert out == [Release(term=term, announce=None)]
    assert not node.e.is_leader(at + 0.002)


def test_regression_acquire_answer_later_than_the_lease_is_released() -> None:
    node = Node("a")
    at, term = node.candidate()
    out = node.e.acquire_result(term, True, sent_at=at, now=at + LEASE)
    assert shape(out) == [f"release term={term}", "role candidate->follower"]
    assert not node.e.is_leader(at + LEASE)


# ---- leading ------------------------------------------------------------------------------------


def test_leader_renews_on_tick_once_per_beat() -> None:
    node = Node("a", url="http://a")
    sent_at, term = node.lead()
    assert node.e.tick(sent_at + HB / 2 - 0.01) == []  # too early even with the slack
    [renew] = node.e.tick(sent_at + HB)
    assert (renew.term, renew.ttl) == (term, LEASE)
    assert (renew.announce.kind, renew.announce.term) == (Kind.HEARTBEAT, term)
    assert renew.announce.url == "http://a"
    assert node.e.tick(sent_at + 2 * HB) == []  # one renewal in flight at a time


@pytest.mark.parametrize(
    ("renewed", "expected"),
    [
        (True, []),
        (None, []),
        (False, ["role leader->follower", "demoted term={term}", "leader=None"]),
    ],
)
def test_renew_result(renewed: bool | None, expected: list[str]) -> None:
    node = Node("a")
    sent_at, term = node.lead()
    renew_sent = sent_at + HB
    node.e.tick(renew_sent)
    out = node.e.renew_result(term, renewed, sent_at=renew_sent, now=renew_sent + 0.001)
    assert shape(out) == [line.format(term=term) for line in expected]
    assert of(out, Release) == []  # the key is not ours to delete, or the command failed
    new_end = renew_sent + LEASE
    old_end = sent_at + LEASE
    if renewed:
        assert node.e.is_leader(new_end - EPS)
        assert not node.e.is_leader(new_end)
    elif renewed is None:
        assert node.e.is_leader(old_end - EPS)
        assert not node.e.is_leader(old_end)
    else:
        assert node.e.role is Role.FOLLOWER
        assert not node.e.is_leader(renew_sent + 0.001)


def test_regression_failed_renewals_end_the_lease_and_the_next_tick_releases() -> None:
    node = Node("a")
    sent_at, term = node.lead()
    node.e.tick(sent_at + HB)
    assert node.e.renew_result(term, None, sent_at=sent_at + HB, now=sent_at + HB) == []
    lease_end = sent_at + LEASE
    assert node.e.role is Role.LEADER and not node.e.is_leader(lease_end)
    out = node.e.tick(lease_end)
    assert shape(out) == [
        "role leader->follower",
        f"demoted term={term}",
        "leader=None",
        f"release term={term}",
    ]


def test_renew_result_of_another_term_is_ignored() -> None:
    node = Node("a")
    sent_at, term = node.lead()
    node.e.tick(sent_at + HB)
    assert node.e.renew_result(term - 1, False, sent_at=sent_at + HB, now=sent_at + HB) == []
    assert node.e.is_leader(sent_at + HB)


@pytest.mark.parametrize(
    ("echo", "others", "steps_down"),
    [(True, False, False), (False, False, True), (False, True, True)],
    ids=["hears-itself", "hears-nothing", "hears-only-others"],
)
def test_regression_leader_that_cannot_hear_itself_steps_down(
    echo: bool, others: bool, steps_down: bool
) -> None:
    node = Node("a")
    sent_at, term = node.lead()  # last heard itself at sent_at (its own vote request)
    log: list[Output] = []
    for step in range(1, 31):
        log += node.keep_leading(node.next_tick, sent_at + step * HB, echo=echo)
        if others:
            log += node.hear(Kind.PRESENCE, "b", sent_at + step * HB)
    demoted = of(log, Demoted)
    if not steps_down:
        assert demoted == []
        assert node.e.is_leader(sent_at + 3 * EXPIRY)
        return
    assert len(demoted) == 1
    # It led while its last echo was recent, and stepped down at the first tick after.
    index = log.index(demoted[0])
    assert of(log[index:], Release) == [Release(term=term, announce=None)]
    renewals_before = len(of(log[:index], Renew))
    assert round(EXPIRY / HB) - 1 <= renewals_before <= round(EXPIRY / HB)
    assert node.e.role is Role.FOLLOWER


def test_connection_lost_demotes_a_leader_and_releases() -> None:
    node = Node("a")
    sent_at, term = node.lead()
    out = node.e.connection_lost(sent_at + 0.05)
    assert shape(out) == [
        "role leader->follower",
        f"demoted term={term}",
        "leader=None",
        f"release term={term}",
    ]
    assert not node.e.is_leader(sent_at + 0.05)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda n: n.join(0.0), [], id="follower"),
        pytest.param(lambda n: n.candidate(), ["role candidate->follower"], id="candidate"),
    ],
)
def test_connection_lost_on_non_leaders(make: Callable[[Node], Any], expected: list[str]) -> None:
    node = Node("a")
    make(node)
    assert shape(node.e.connection_lost(0.8)) == expected
    assert node.e.connection_lost(0.9) == []  # once
    assert node.e.role is Role.FOLLOWER and not node.e.connected


def test_regression_restored_connection_waits_a_whole_election_timeout() -> None:
    node = Node("a")
    node.join(0.0)
    node.e.connection_lost(0.2)
    for step in range(3, 21):  # ticks while cut off: never stands
        assert of(node.e.tick(step * 0.1), AllocateTerm) == []
    restored_at = 2.05
    node.echo(node.e.connection_restored(restored_at), restored_at)
    deadline = node.e.election_deadline
    assert deadline is not None and restored_at + TMIN <= deadline <= restored_at + TMAX
    first_stand = None
    for step in range(1, 101):
        now = restored_at + step * 0.01
        out = node.tick_and_echo(now)  # presence beats come back now
        if of(out, AllocateTerm):
            first_stand = now
            break
    assert first_stand is not None
    assert restored_at + TMIN <= first_stand <= restored_at + TMAX + 0.01


# ---- voting -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("silence", "request_term", "voted"),
    [
        (0.0, 6, False),
        (0.05, 6, False),
        (LEASE - EPS, 6, False),
        (LEASE - EPS, 1000, False),
        (LEASE, 6, True),
        (LEASE + 0.1, 1000, True),
    ],
)
def test_regression_live_leader_is_never_voted_out(
    silence: float, request_term: int, voted: bool
) -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.HEARTBEAT, "l", 0.1, 5)
    out = node.hear(Kind.VOTE_REQUEST, "c", 0.1 + silence, request_term)
    expected = [f"send VOTE term={request_term} target=c to=c"] if voted else []
    assert shape(out) == expected


def test_vote_is_granted_once_the_leader_has_been_silent_for_a_lease() -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.HEARTBEAT, "l", 0.1, 5)
    assert node.hear(Kind.VOTE_REQUEST, "c", 0.2, 6) == []
    out = node.hear(Kind.VOTE_REQUEST, "c", 0.1 + LEASE, 6)
    assert shape(out) == ["send VOTE term=6 target=c to=c"]
    assert (node.e.voted_term, node.e.voted_for) == (6, "c")


@pytest.mark.parametrize(
    ("sender", "term", "voted"),
    [
        pytest.param("c2", 7, False, id="second-candidate-same-term"),
        pytest.param("c1", 7, True, id="same-candidate-asks-again"),
        pytest.param("c2", 8, True, id="higher-term"),
        pytest.param("c2", 6, False, id="lower-term"),
    ],
)
def test_one_vote_per_term(sender: str, term: int, voted: bool) -> None:
    node = Node("f")
    node.join(0.0)
    assert shape(node.hear(Kind.VOTE_REQUEST, "c1", 0.1, 7)) == ["send VOTE term=7 target=c1 to=c1"]
    out = node.hear(Kind.VOTE_REQUEST, sender, 0.11, term)
    expected = [f"send VOTE term={term} target={sender} to={sender}"] if voted else []
    assert shape(out) == expected


@pytest.mark.parametrize("seen", [Kind.HEARTBEAT, Kind.PRESENCE, Kind.VOTE_REQUEST])
def test_request_below_the_highest_term_seen_gets_no_vote(seen: Kind) -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(seen, "x", 0.0, 10)
    assert node.hear(Kind.VOTE_REQUEST, "c", 0.0 + LEASE + 0.1, 9) == []


def test_granting_a_vote_restarts_the_wait() -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.VOTE_REQUEST, "c", 0.3, 1)
    assert of(node.e.tick(0.3 + TMIN - EPS), AllocateTerm) == []


@pytest.mark.parametrize(
    ("request_term_offset", "expected"),
    [
        (1, ["role candidate->follower", "send VOTE term={t1} target=c to=c"]),
        (0, []),
        (-1, []),
    ],
)
def test_candidate_hearing_a_request_steps_down_only_for_a_higher_term(
    request_term_offset: int, expected: list[str]
) -> None:
    node = Node("a")
    at, term = node.candidate(term=5)
    out = node.hear(Kind.VOTE_REQUEST, "c", at, term + request_term_offset)
    assert shape(out) == [line.format(t1=term + 1) for line in expected]
    assert node.e.role is (Role.FOLLOWER if request_term_offset > 0 else Role.CANDIDATE)


@pytest.mark.parametrize("leader_term", [1, 5, 6])
def test_candidate_hearing_a_leader_becomes_follower(leader_term: int) -> None:
    node = Node("a")
    at, _ = node.candidate(term=5)
    out = node.hear(Kind.HEARTBEAT, "l", at, leader_term)
    assert shape(out) == ["role candidate->follower", "leader=l"]
    assert node.e.status(at).leader_id == "l"


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (1, ["role leader->follower", "demoted term={t}", "leader=None", "leader=b"]),
        (0, []),
        (-1, []),
    ],
)
def test_leader_hearing_a_heartbeat_steps_down_only_for_a_higher_term(
    offset: int, expected: list[str]
) -> None:
    node = Node("a")
    sent_at, term = node.lead()
    out = node.hear(Kind.HEARTBEAT, "b", sent_at + 0.01, term + offset)
    assert shape(out) == [line.format(t=term) for line in expected]
    assert of(out, Release) == []  # the key is the other leader's now
    assert node.e.is_leader(sent_at + 0.01) is (offset <= 0)


def test_leader_ignores_vote_requests() -> None:
    node = Node("a")
    sent_at, term = node.lead()
    assert node.hear(Kind.VOTE_REQUEST, "c", sent_at + 0.01, term + 10) == []
    assert node.e.is_leader(sent_at + 0.01)


# ---- handing over -------------------------------------------------------------------------------


def _leader_with_members(heard: dict[str, float]) -> tuple[Node, float, int]:
    """A leader (alone when elected) that then heard presences at the given offsets from its
    election; it keeps renewing until the last of them."""
    node = Node("a")
    sent_at, term = node.lead()
    for name, offset in sorted(heard.items(), key=lambda item: item[1]):
        node.keep_leading(node.next_tick, sent_at + offset)
        node.hear(Kind.PRESENCE, name, sent_at + offset)
    return node, sent_at, term


@pytest.mark.parametrize(
    ("heard", "resign_offset", "announce"),
    [
        pytest.param({"b": 0.1, "c": 0.2}, 0.25, "announce=HANDOVER target=c", id="latest-c"),
        pytest.param({"c": 0.1, "b": 0.2}, 0.25, "announce=HANDOVER target=b", id="latest-b"),
        pytest.param({}, 0.05, "announce=LEAVE", id="alone"),
        pytest.param({"b": 0.1}, 0.1 + EXPIRY + 0.05, "announce=LEAVE", id="only-expired"),
        pytest.param(
            {"b": 0.1, "c": 0.9}, 0.1 + EXPIRY + 0.05, "announce=HANDOVER target=c", id="one-live"
        ),
    ],
)
@pytest.mark.parametrize("how", ["resign", "leave"])
def test_leader_hands_over_to_the_most_recently_heard_member(
    how: str, heard: dict[str, float], resign_offset: float, announce: str
) -> None:
    node, sent_at, term = _leader_with_members(heard)
    now = sent_at + resign_offset
    node.keep_leading(node.next_tick, now - HB / 2)
    assert node.e.is_leader(now)
    out = getattr(node.e, how)(now)
    assert shape(out) == [
        "role leader->follower",
        f"demoted term={term}",
        "leader=None",
        f"release term={term} {announce}",
    ]
    assert not node.e.is_leader(now)
    assert node.e.stopped is (how == "leave")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda n: n.join(0.0), ["send LEAVE term=0"], id="follower"),
        pytest.param(
            lambda n: n.candidate(term=4),
            ["role candidate->follower", "send LEAVE term=4"],
            id="candidate",
        ),
    ],
)
def test_non_leader_leaves_with_a_goodbye(make: Callable[[Node], Any], expected: list[str]) -> None:
    node = Node("a")
    make(node)
    assert shape(node.e.leave(0.9)) == expected
    assert node.e.stopped


def test_resign_on_a_follower_does_nothing() -> None:
    node = Node("a")
    node.join(0.0)
    assert node.e.resign(0.1) == []
    assert not node.e.stopped


# ---- resign requests (fastapi-leader resign) ---------------------------------------------------


def test_leader_asked_to_resign_hands_over_to_its_latest_member() -> None:
    node, sent_at, term = _leader_with_members({"b": 0.1, "c": 0.2})
    now = sent_at + 0.25
    node.keep_leading(node.next_tick, now - HB / 2)
    out = node.hear(Kind.RESIGN_REQUEST, "cli-1", now, term, target="a")
    assert shape(out) == [
        "role leader->follower",
        f"demoted term={term}",
        "leader=None",
        f"release term={term} announce=HANDOVER target=c",
    ]
    [demoted] = of(out, Demoted)
    assert demoted.cause is Cause.RESIGNED
    assert "cli-1" in demoted.reason
    assert not node.e.is_leader(now)
    assert not node.e.stopped  # it stays in the group, as a follower


@pytest.mark.parametrize(
    ("term_offset", "target"),
    [
        pytest.param(-1, "a", id="older-term"),
        pytest.param(1, "a", id="newer-term"),
        pytest.param(0, "b", id="another-target"),
    ],
)
def test_resign_request_for_another_leadership_is_ignored(term_offset: int, target: str) -> None:
    node, sent_at, term = _leader_with_members({"b": 0.1})
    now = sent_at + 0.15
    node.keep_leading(node.next_tick, now - HB / 2)
    assert node.hear(Kind.RESIGN_REQUEST, "cli-1", now, term + term_offset, target=target) == []
    assert node.e.is_leader(now)
    assert node.e.term == term  # a request names a term; it never moves this node's


def test_resign_request_to_a_follower_does_nothing() -> None:
    node = Node("a")
    node.join(0.0)
    node.hear(Kind.HEARTBEAT, "l", 0.1, 3)
    assert node.hear(Kind.RESIGN_REQUEST, "cli-1", 0.15, 3, target="a") == []
    assert (node.e.role, node.e.leader_id) == (Role.FOLLOWER, "l")


def test_resign_request_sender_never_becomes_a_member() -> None:
    # Else the tool would count in the electorate and could be named successor.
    node, sent_at, term = _leader_with_members({})
    now = sent_at + 0.05
    out = node.hear(Kind.RESIGN_REQUEST, "cli-1", now, term, target="a")
    assert "cli-1" not in node.e.members
    assert shape(of(out, Release)) == [f"release term={term} announce=LEAVE"]


def test_replayed_resign_request_is_dropped_and_counted() -> None:
    node, sent_at, term = _leader_with_members({"b": 0.1})
    now = sent_at + 0.15
    node.keep_leading(node.next_tick, now - HB / 2)
    request = node.msg(Kind.RESIGN_REQUEST, "cli-1", term, target="b", seq=5)
    node.e.receive(request, now)  # for b: ignored, but its sequence number is now used
    replay = node.msg(Kind.RESIGN_REQUEST, "cli-1", term, target="a", seq=5)
    assert node.e.receive(replay, now) == []
    assert node.e.dropped == {"replay": 1}
    assert node.e.is_leader(now)


AFTER_LEAVE = [
    pytest.param(lambda n, t: n.e.tick(t), id="tick"),
    pytest.param(lambda n, t: n.e.prune(t), id="prune"),
    pytest.param(lambda n, t: n.e.start(t), id="start"),
    pytest.param(lambda n, t: n.e.leave(t), id="leave"),
    pytest.param(lambda n, t: n.e.resign(t), id="resign"),
    pytest.param(lambda n, t: n.e.connection_lost(t), id="connection-lost"),
    pytest.param(lambda n, t: n.e.connection_restored(t), id="connection-restored"),
    pytest.param(lambda n, t: n.e.term_allocated(99, t), id="term-allocated"),
    pytest.param(lambda n, t: n.e.term_failed(t), id="term-failed"),
    pytest.param(lambda n, t: n.e.renew_result(1, True, t, t), id="renew-result"),
    pytest.param(lambda n, t: n.e.acquire_result(99, False, t, t), id="acquire-refused"),
    pytest.param(lambda n, t: n.hear(Kind.HEARTBEAT, "l", t, 50), id="heartbeat"),
    pytest.param(lambda n, t: n.hear(Kind.VOTE_REQUEST, "c", t, 50), id="vote-request"),
    pytest.param(lambda n, t: n.hear(Kind.HANDOVER, "l", t, 50, target="a"), id="handover"),
    pytest.param(lambda n, t: n.hear(Kind.PRESENCE, "b", t), id="presence"),
    pytest.param(
        lambda n, t: n.hear(Kind.RESIGN_REQUEST, "cli", t, 1, target="a"), id="resign-request"
    ),
]


@pytest.mark.parametrize("when", ["follower", "leader"])
@pytest.mark.parametrize("step", AFTER_LEAVE)
def test_every_input_after_leave_returns_nothing(
    when: str, step: Callable[[Node, float], list[Output]]
) -> None:
    node = Node("a")
    if when == "leader":
        node.lead()
    else:
        node.join(0.0)
    node.e.leave(1.0)
    for now in (1.0, 1.5, 5.0):
        assert step(node, now) == []
    assert node.e.role is Role.FOLLOWER
    assert not node.e.is_leader(1.0)


def test_key_acquired_after_leave_is_released() -> None:
    # The one answer after leave(): a key taken by an Acquire still in flight is given back
    # rather than left to block the group until its TTL ends.
    node = Node("a")
    at, term = node.candidate()
    node.e.leave(at)
    assert node.e.acquire_result(term, True, sent_at=at, now=at) == [Release(term, None)]


@pytest.mark.parametrize(
    ("follows_sender", "expected"),
    [
        (True, ["leader=None", "role follower->candidate", "allocate-term floor=7"]),
        (False, ["role follower->candidate", "allocate-term floor=7"]),
    ],
)
def test_regression_named_successor_stands_at_once(
    follows_sender: bool, expected: list[str]
) -> None:
    node = Node("s")
    node.join(0.0)
    if follows_sender:
        node.hear(Kind.HEARTBEAT, "l", 0.1, 7)
    else:
        node.hear(Kind.PRESENCE, "x", 0.1, 7)
    out = node.hear(Kind.HANDOVER, "l", 0.12, 7, target="s")  # long before any timeout
    assert shape(out) == expected
    assert node.e.role is Role.CANDIDATE


def test_disconnected_successor_does_not_stand() -> None:
    node = Node("s")
    node.join(0.0)
    node.e.connection_lost(0.05)
    assert node.hear(Kind.HANDOVER, "l", 0.1, 7, target="s") == []
    assert node.e.role is Role.FOLLOWER


def test_handover_to_another_node_restarts_the_wait() -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.HEARTBEAT, "l", 0.05, 7)
    before = node.e.election_deadline
    assert before is not None and before <= 0.05 + TMAX
    out = node.hear(Kind.HANDOVER, "l", 0.4, 7, target="s")
    assert shape(out) == ["leader=None"]
    after = node.e.election_deadline
    assert after is not None and 0.4 + TMIN <= after <= 0.4 + TMAX
    for now in (before, 0.4 + TMIN - EPS):
        assert of(node.e.tick(now), AllocateTerm) == []  # the successor gets its round


# ---- replays, members, status -------------------------------------------------------------------

REPLAYABLE = [
    pytest.param(Kind.HEARTBEAT, None, id="heartbeat"),
    pytest.param(Kind.PRESENCE, None, id="presence"),
    pytest.param(Kind.VOTE_REQUEST, None, id="vote-request"),
    pytest.param(Kind.HANDOVER, "f", id="handover-naming-us"),
    pytest.param(Kind.LEAVE, None, id="leave"),
]


@pytest.mark.parametrize("replay_seq", [100, 99, 1, 0])
@pytest.mark.parametrize(("kind", "target"), REPLAYABLE)
def test_regression_replayed_messages_are_dropped_and_counted(
    kind: Kind, target: str | None, replay_seq: int
) -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "x", 0.05, seq=50)
    first = node.msg(kind, "x", 3, target=target, seq=100)
    node.e.receive(first, 0.1)
    if kind is Kind.HANDOVER:
        node.e.term_failed(0.1)  # end the candidacy the handover started
    before = snapshot(node.e, 0.5)
    replay = node.msg(kind, "x", 9, target=target, seq=replay_seq)
    assert node.e.receive(replay, 0.3) == []
    assert node.e.receive(first, 0.35) == []
    assert node.e.dropped == {"replay": 2}
    assert snapshot(node.e, 0.5) == before


def test_replay_of_a_heartbeat_does_not_keep_a_leader_alive() -> None:
    node = Node("f")
    node.join(0.0)
    beat = node.msg(Kind.HEARTBEAT, "l", 4)
    node.e.receive(beat, 0.1)
    node.e.receive(beat, 0.4)
    assert node.e.status(0.1 + LEASE).leader_id is None
    assert shape(node.hear(Kind.VOTE_REQUEST, "c", 0.1 + LEASE, 5)) == [
        "send VOTE term=5 target=c to=c"
    ]


def test_new_sequence_numbers_are_accepted_after_a_replay() -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "x", 0.0, seq=10)
    node.hear(Kind.PRESENCE, "x", 0.1, seq=10)
    node.hear(Kind.PRESENCE, "x", 0.2, seq=11)
    assert node.e.dropped == {"replay": 1}
    assert node.e.members["x"].last_seen == 0.2


@pytest.mark.parametrize(
    ("heard_at", "prune_at", "kept"),
    [
        (0.0, 0.5, True),
        (0.0, EXPIRY, True),
        (0.0, EXPIRY + EPS, False),
        (0.5, 1.2, True),
        (0.5, 5.0, False),
    ],
)
def test_prune_forgets_members_not_heard_within_member_expiry(
    heard_at: float, prune_at: float, kept: bool
) -> None:
    node = Node("f")
    node.e.start(0.0)
    node.hear(Kind.PRESENCE, "b", heard_at)
    node.hear(Kind.PRESENCE, "c", prune_at)  # always fresh
    assert node.e.prune(prune_at) == []
    assert ("b" in node.e.members) is kept
    assert "c" in node.e.members
    assert [m.node_id for m in node.e.status(prune_at).members] == (["b", "c"] if kept else ["c"])


@pytest.mark.parametrize(("kind", "target"), [(Kind.LEAVE, None), (Kind.HANDOVER, "z")])
def test_leaving_member_is_forgotten_at_once(kind: Kind, target: str | None) -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "b", 0.1)
    node.hear(kind, "b", 0.2, target=target)
    assert "b" not in node.e.members


@pytest.mark.parametrize(
    ("offset", "role", "leader_id", "leading"),
    [
        (0.0, Role.LEADER, "a", True),
        (LEASE / 2, Role.LEADER, "a", True),
        (LEASE - EPS, Role.LEADER, "a", True),
        (LEASE, Role.FOLLOWER, None, False),
        (1e6, Role.FOLLOWER, None, False),
    ],
)
def test_regression_status_reports_leader_only_while_the_lease_holds(
    offset: float, role: Role, leader_id: str | None, leading: bool
) -> None:
    node = Node("a", url="http://a")
    sent_at, term = node.lead()
    now = sent_at + offset  # no tick: the lease ran out without the core hearing of it
    status = node.e.status(now)
    assert (status.role, status.is_leader, status.leader_id) == (role, leading, leader_id)
    assert status.is_leader is node.e.is_leader(now)
    assert status.fencing_token == (term if leading else None)
    assert status.term == term
    if leading:
        assert status.lease_remaining == pytest.approx(LEASE - offset)
        assert status.lease_expires_at == sent_at + LEASE  # the same end, on the same clock
    else:
        assert status.lease_remaining is None
        assert status.lease_expires_at is None
    assert [(m.node_id, m.is_leader) for m in status.members] == [("a", leading)]


@pytest.mark.parametrize(("offset", "leader_id"), [(0.0, "l"), (LEASE - EPS, "l"), (LEASE, None)])
def test_follower_status_names_a_live_leader(offset: float, leader_id: str | None) -> None:
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.HEARTBEAT, "l", 0.1, 3)
    status = node.e.status(0.1 + offset)
    assert (status.role, status.is_leader, status.fencing_token) == (Role.FOLLOWER, False, None)
    assert status.leader_id == leader_id
    assert {m.node_id: m.is_leader for m in status.members}["l"] is (leader_id == "l")


# ---- cost: presence beats, member expiry, timers --------------------------------------------


def _with_members(count: int, now: float = 0.0, node_id: str = "a") -> Node:
    """A connected follower that has heard ``count - 1`` others (``count`` members in all)."""
    node = Node(node_id)
    node.join(now)
    for i in range(count - 1):
        node.hear(Kind.PRESENCE, f"m{i:03}", now)
    return node


@pytest.mark.parametrize(
    ("size", "gap", "expiry"),
    [
        (1, EXPIRY / 3, EXPIRY),
        (3, EXPIRY / 3, EXPIRY),
        (4, 4 * HB, 12 * HB),  # from here the group as a whole beats about once per heartbeat
        (10, 10 * HB, 30 * HB),
        (50, 50 * HB, 150 * HB),
        (100, 100 * HB, 300 * HB),
    ],
)
def test_presence_gap_and_member_expiry_grow_with_the_group(
    size: int, gap: float, expiry: float
) -> None:
    assert TIMING.presence_interval(size) == pytest.approx(gap)
    assert TIMING.member_expiry_for(size) == pytest.approx(expiry)
    # three beats per expiry: one lost beat never drops a live member
    assert TIMING.member_expiry_for(size) == pytest.approx(3 * TIMING.presence_interval(size))


@pytest.mark.parametrize("size", [1, 3, 10, 50])
def test_follower_beats_within_three_quarters_to_all_of_its_groups_gap(size: int) -> None:
    node = _with_members(size)
    gap = TIMING.presence_interval(size)
    beats = []
    now = 0.0
    while len(beats) < 6:
        due = node.e.next_tick_at
        assert due is not None
        now = max(now, due)
        out = node.e.tick(now)
        if any(
            isinstance(o, Send) and o.message.kind is Kind.PRESENCE and o.to is None for o in out
        ):
            beats.append(now)
        for i in range(size - 1):  # the others beat too, so nobody expires
            node.hear(Kind.PRESENCE, f"m{i:03}", now)
        node.e._wait_from = now  # keep it from standing: this test is about beats only
    gaps = [b - a for a, b in itertools.pairwise([0.0, *beats])]
    assert all(0.75 * gap - EPS <= g <= gap + EPS for g in gaps), (gap, gaps)


def test_regression_live_member_beating_at_its_groups_pace_is_never_pruned() -> None:
    # Members of a 50-node group beat every few seconds; an expiry that did not grow with the
    # group would drop each of them between two of its beats.
    node = _with_members(50)
    gap = TIMING.presence_interval(50)
    for beat in range(1, 6):
        now = beat * gap
        node.e.prune(now - EPS)
        assert len(node.e.members) == 50
        for i in range(49):
            node.hear(Kind.PRESENCE, f"m{i:03}", now)
        node.echo([Send(node.e._message(Kind.PRESENCE))], now)
    node.e.prune(5 * gap + TIMING.member_expiry_for(50) + EPS)
    assert len(node.e.members) == 0  # and silent members do go, at three gaps


def test_regression_follower_of_a_large_group_stands_after_hearing_itself_seconds_ago() -> None:
    # A follower hears itself only through its own presence beats, seconds apart in a large
    # group: it must still count as connected when its election timeout runs out.
    node = _with_members(50)  # it last heard itself at 0
    node.hear(Kind.HEARTBEAT, "m000", 2 * EXPIRY, 3)  # its leader beat until then
    deadline = node.e.election_deadline
    assert deadline is not None and deadline > 2 * EXPIRY + TMIN
    out = node.tick_and_echo(deadline)
    assert of(out, AllocateTerm) == [AllocateTerm(floor=3)]


@pytest.mark.parametrize("term", [0, 7])
def test_restored_connection_announces_itself_and_pushes_the_term_counter(term: int) -> None:
    node = _with_members(50)
    if term:
        node.hear(Kind.PRESENCE, "m000", 0.1, term)
    node.e.connection_lost(0.2)
    out = node.e.connection_restored(0.3)  # long before its next beat would be due
    # Redis may have restarted without its counter: a newcomer must not get an old term.
    expected = [f"send PRESENCE term={term}"] + ([f"allocate-term floor={term}"] if term else [])
    assert shape(out) == expected
    assert node.e.role is Role.FOLLOWER
    assert node.e.term_allocated(term + 1, 0.31) == []  # the answer changes nothing


def test_next_tick_at_of_a_follower_is_its_earliest_deadline() -> None:
    node = _with_members(3)
    election = node.e.election_deadline
    assert election is not None
    presence = node.e._presence_due()
    assert 0.75 * EXPIRY / 3 <= presence <= EXPIRY / 3
    assert node.e.next_tick_at == min(election, EXPIRY / 2, presence)
    node.hear(Kind.HEARTBEAT, "m000", 0.05, 2)
    election = node.e.election_deadline
    assert election is not None and election >= 0.05 + TMIN
    assert node.e.next_tick_at == min(election, presence)
    # A silent leader is no deadline of its own: it is reported gone at the next tick.
    node.echo(node.e.tick(presence), presence)
    assert presence < 0.05 + LEASE < election
    assert shape(node.e.tick(0.05 + LEASE)) == ["leader=None"]


@pytest.mark.parametrize("renewed", [True, None], ids=["renewed", "failed"])
def test_next_tick_at_of_a_leader_is_its_next_beat_or_while_renewing_its_lease_end(
    renewed: bool | None,
) -> None:
    node = Node("a")
    sent_at, term = node.lead()
    assert node.e.next_tick_at == sent_at + HB
    assert len(of(node.e.tick(sent_at + HB), Renew)) == 1
    assert node.e.next_tick_at == sent_at + LEASE  # nothing is due before its answer
    node.e.renew_result(term, renewed, sent_at=sent_at + HB, now=sent_at + HB + 0.001)
    # renewed or not, the next attempt is a beat after this one was sent, never at once
    assert node.e.next_tick_at == pytest.approx(sent_at + 2 * HB)


def test_next_tick_at_is_none_before_start_and_after_leave() -> None:
    node = Node("a")
    assert node.e.next_tick_at is None
    node.join(0.0)
    assert node.e.next_tick_at is not None
    node.e.leave(0.1)
    assert node.e.next_tick_at is None


@pytest.mark.parametrize("size", [1, 4, 8, 40, 100])
def test_election_spread_widens_with_the_group_beyond_four(size: int) -> None:
    widest = TMIN + (TMAX - TMIN) * max(1.0, size / 4)
    deadlines = []
    for seed in range(20):
        node = Node("a", seed=seed)
        node.join(0.0)
        for i in range(size - 1):
            node.hear(Kind.PRESENCE, f"m{i:03}", 0.0)
        deadline = node.e.election_deadline
        assert deadline is not None and TMIN <= deadline <= widest
        deadlines.append(deadline)
    assert (max(deadlines) > TMAX) is (size > 4)


def test_failed_candidacies_widen_the_timeout_spread_until_a_leader_is_heard() -> None:
    node = Node("a")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "b", 0.0)
    node.hear(Kind.PRESENCE, "c", 0.0)
    spreads = []
    now = 0.0
    for _ in range(4):  # stand on a timeout, lose (nobody votes), and again
        while node.e.role is Role.FOLLOWER:  # tick as the runtime would; beats come back
            due = node.e.next_tick_at
            assert due is not None
            now = due
            node.echo(node.e.tick(now), now)
        node.e.term_failed(now)
        for peer in ("b", "c"):
            node.hear(Kind.PRESENCE, peer, now)
        spreads.append(node.e._backoff)
    assert spreads == [1, 2, 2, 2]  # x2, x4, then capped
    widest = now + TMIN + (TMAX - TMIN) * 4
    deadline = node.e.election_deadline
    assert deadline is not None and deadline <= widest
    node.hear(Kind.HEARTBEAT, "b", now + 0.01, 9)
    assert node.e._backoff == 0  # the group elected: back to the configured range
    deadline = node.e.election_deadline
    assert deadline is not None and deadline <= now + 0.01 + TMAX


def test_named_successor_stands_without_widening_its_spread() -> None:
    node = Node("s")
    node.join(0.0)
    node.hear(Kind.HANDOVER, "l", 0.1, 7, target="s")
    assert node.e.role is Role.CANDIDATE and node.e._backoff == 0


@pytest.mark.parametrize(
    ("sender", "asked"),
    [
        pytest.param("late", True, id="member-that-has-not-voted"),
        pytest.param("voter", False, id="member-that-voted"),
        pytest.param("a", False, id="itself"),
    ],
)
def test_regression_candidate_asks_a_member_that_has_not_voted_on_its_own_channel(
    sender: str, asked: bool
) -> None:
    # A node that started just after the request went out heard no election, stood when its
    # own wait ran out, and its newer term voided the round: 100 nodes starting together
    # stayed leaderless for seconds.
    node = Node("a")
    node.join(0.0)
    for peer in ("voter", "x", "y"):
        node.hear(Kind.PRESENCE, peer, 0.0)
    at, floor = node.stand()
    term = floor + 1
    node.echo(node.e.term_allocated(term, at), at)
    node.hear(Kind.VOTE, "voter", at, term, target="a")
    out = node.hear(Kind.PRESENCE, sender, at + 0.01)
    expected = [f"send VOTE_REQUEST term={term} to={sender}"] if asked else []
    assert shape(out) == expected


def test_each_new_vote_restarts_the_candidates_wait() -> None:
    node = Node("a")
    node.join(0.0)
    for peer in "bcdef":
        node.hear(Kind.PRESENCE, peer, 0.0)
    at, floor = node.stand()
    term = floor + 1
    node.echo(node.e.term_allocated(term, at), at)
    first = node.e.election_deadline
    assert first is not None
    late = first - 0.01  # a slow round: the second vote comes just before the wait ends
    node.hear(Kind.VOTE, "b", late, term, target="a")
    deadline = node.e.election_deadline
    assert deadline is not None and deadline >= late + TMIN
    node.hear(Kind.VOTE, "b", deadline - 0.01, term, target="a")  # the same vote again
    assert node.e.election_deadline == deadline


# ---- standing on an up-to-date view -----------------------------------------------------------


def _due_follower() -> tuple[Node, float, list[Output]]:
    """A connected follower of a leader that fell silent, ticked at its election deadline."""
    node = Node("f")
    node.join(0.0)
    node.hear(Kind.PRESENCE, "x", 0.0)
    node.hear(Kind.HEARTBEAT, "l", 0.1, 4)
    deadline = node.e.election_deadline
    assert deadline is not None
    return node, deadline, node.e.tick(deadline)


def test_regression_due_follower_first_sends_itself_a_probe_on_its_own_channel() -> None:
    # On a loaded host the timer fires while the heartbeat or vote request that would have
    # reset the wait sits unread on the subscription: standing at once voided live rounds.
    node, deadline, out = _due_follower()
    [probe] = [o for o in out if isinstance(o, Send) and o.to == "f"]
    assert probe.message.kind is Kind.PRESENCE
    assert of(out, AllocateTerm) == [] and node.e.role is Role.FOLLOWER
    # Nothing else is due until the probe is back, or given up as lost.
    assert node.e.next_tick_at == min(deadline + TMIN, node.e._presence_due())
    back = node.e.receive(probe.message, deadline + 0.001)
    assert shape(back)[-2:] == ["role follower->candidate", "allocate-term floor=4"]


@pytest.mark.parametrize(
    ("heard", "kind"),
    [
        pytest.param("l", Kind.HEARTBEAT, id="the-leader-after-all"),
        pytest.param("c", Kind.VOTE_REQUEST, id="a-candidate"),
    ],
)
def test_regression_what_was_read_before_the_probe_came_back_stops_the_stand(
    heard: str, kind: Kind
) -> None:
    node, deadline, out = _due_follower()
    [probe] = [o for o in out if isinstance(o, Send) and o.to == "f"]
    node.hear(kind, heard, deadline + 0.001, 5)  # queued before the probe, read first
    assert of(node.e.receive(probe.message, deadline + 0.002), AllocateTerm) == []
    assert node.e.role is Role.FOLLOWER


def test_lost_probe_is_sent_again() -> None:
    node, deadline, out = _due_follower()
    [first] = [o for o in out if isinstance(o, Send) and o.to == "f"]
    beats = [o for o in out if isinstance(o, Send) and o.to is None]
    node.echo(beats, deadline)  # its presence beat comes back; the probe does not
    assert node.e.tick(deadline + TMIN / 2) == []  # still waiting for it
    again = [o for o in node.e.tick(deadline + TMIN) if isinstance(o, Send) and o.to == "f"]
    assert len(again) == 1 and again[0].message.seq > first.message.seq
    assert of(node.e.receive(first.message, deadline + TMIN), AllocateTerm) == []  # stale
    assert len(of(node.e.receive(again[0].message, deadline + TMIN), AllocateTerm)) == 1


# ---- one id, two processes; a suspended node; an acquire with no answer ---------------------


def twin_beat(node: Node, now: float, incarnation: int, *, term: int = 0) -> list[Output]:
    """A presence beat from another process that uses ``node``'s own id."""
    return node.hear(Kind.PRESENCE, node.id, now, term, incarnation=incarnation)


def test_earlier_start_reports_a_twin_and_keeps_leading() -> None:
    node = Node("a", incarnation=5)
    at, _ = node.lead()
    out = twin_beat(node, at + 0.05, incarnation=9)
    assert shape(out) == ["conflict other=9 yielding=False"]
    assert node.e.is_leader(at + 0.05)
    assert node.e.dropped["duplicate_node_id"] == 1
    assert twin_beat(node, at + 0.1, incarnation=9) == []  # reported once, counted each time
    assert node.e.dropped["duplicate_node_id"] == 2


def test_later_start_hands_over_and_does_not_stand_while_its_twin_beats() -> None:
    node = Node("a", incarnation=9)
    at, _ = node.lead()
    node.hear(Kind.PRESENCE, "b", at)
    out = twin_beat(node, at + 0.05, incarnation=5)
    assert shape(without_presence(out))[:2] == [
        "conflict other=5 yielding=True",
        "role leader->follower",
    ]
    assert not node.e.is_leader(at + 0.05)
    # The twin goes on beating: the later start never stands, however long it waits.
    now = at + 0.05
    while now < at + 10 * TMAX:
        now = round(now + HB, 9)
        node.hear(Kind.PRESENCE, "b", now)
        twin_beat(node, now, incarnation=5)
        assert not of(node.tick_and_echo(now), AllocateTerm)
    # Silent for a member expiry (it died): the conflict is over and the node stands again.
    quiet = now + TIMING.member_expiry_for(2) + EPS
    out = node.tick_and_echo(quiet)
    assert "conflict other=5 yielding=True resolved" in shape(out)
    stood = False
    t = quiet
    while t < quiet + 2 * TMAX and not stood:
        t = round(t + HB, 9)
        node.hear(Kind.PRESENCE, "b", t)
        stood = bool(of(node.tick_and_echo(t), AllocateTerm))
    assert stood


@pytest.mark.parametrize(
    ("kind", "incarnation"),
    [(Kind.LEAVE, 5), (Kind.HANDOVER, 5), (Kind.PRESENCE, 0), (Kind.HEARTBEAT, 0)],
)
def test_lone_goodbyes_and_unnumbered_messages_under_our_id_are_no_evidence_of_a_twin(
    kind: Kind, incarnation: int
) -> None:
    # Anyone can forge these in a group without a secret: they are dropped and change nothing.
    node = Node("a", incarnation=9)
    at, term = node.lead()
    target = "b" if kind is Kind.HANDOVER else None
    out = node.hear(kind, "a", at + 0.05, term, incarnation=incarnation, target=target)
    assert out == []
    assert node.e.is_leader(at + 0.05)
    assert node.e.dropped["duplicate_node_id"] == 1


def test_a_twins_term_is_a_floor_for_the_next_allocation() -> None:
    node = Node("a", incarnation=5)
    node.join(0.0)
    twin_beat(node, 0.01, incarnation=9, term=40)
    _, floor = node.stand()
    assert floor == 40


def test_suspended_leader_hands_over_and_stands_again_only_after_resume() -> None:
    node = Node("a")
    at, _ = node.lead()
    node.hear(Kind.PRESENCE, "b", at)
    out = node.e.suspend(at + 0.1, "loop stalled")
    assert "role leader->follower" in shape(out)
    assert [o.announce.kind for o in of(out, Release) if o.announce] == [Kind.HANDOVER]
    assert node.e.suspended
    assert node.e.suspend(at + 0.2, "loop stalled") == []  # once
    now = at + 0.1
    while now < at + 10 * TMAX:
        now = round(now + HB, 9)
        node.hear(Kind.PRESENCE, "b", now)
        assert not of(node.tick_and_echo(now), AllocateTerm)
    # Even named as successor it does not stand.
    assert not of(node.hear(Kind.HANDOVER, "b", now, 2, target="a"), AllocateTerm)
    resumed_at = now
    assert node.e.resume(resumed_at) == []
    assert not node.e.suspended
    deadline = node.e.election_deadline
    assert deadline is not None and deadline >= resumed_at + TMIN - EPS  # a fresh wait


def test_suspended_candidate_gives_up() -> None:
    node = Node("a")
    node.candidate()
    out = node.e.suspend(1.0, "loop stalled")
    assert shape(out) == ["role candidate->follower"]


def test_acquire_with_no_answer_gives_the_key_back_and_stays_a_follower() -> None:
    node = Node("a")
    at, term = node.candidate()
    out = node.e.acquire_failed(term, sent_at=at, now=at + 0.5)
    assert "role candidate->follower" in shape(out)
    assert of(out, Release) == [Release(term, None)]
    assert not node.e.is_leader(at + 0.5)
