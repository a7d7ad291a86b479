"""The ``fastapi-leader`` command line: ask a group who leads, watch it, move the lead, and check
a configuration before deploying it, from a laptop or a pod, without deploying anything.

::

    fastapi-leader status [--json]   # leader, term, lease, members; exit 0 led, 1 not, 2 error
    fastapi-leader watch             # one timestamped line per change, until Ctrl-C
    fastapi-leader resign            # ask the leader to hand over; says who leads after
    fastapi-leader check             # settings, Redis, topology, ACL, round trip: one line each
    fastapi-leader acl               # the least-privilege ACL rule for these settings

Settings come from the ``LEADER_*`` environment (and ``.env``), as the nodes read them, or from
flags (``--redis-url``, ``--group`` ...), which win; they are validated by
:class:`~fastapi_leader.LeaderSettings`, so a bad value reads as it would at a node's start.

The tool observes: it subscribes to the group's broadcast channel and reads the leader key, and
never announces itself, so it joins nothing and counts in no vote. The only messages it sends are
``resign``'s request to the leader and ``check``'s goodbyes (a ``LEAVE`` from an id no node knows,
which changes nothing); only ``check`` writes the keys, and only while no node of the group is
heard (a leadership of its own, from term to release). Every failure is one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import AuthenticationError, RedisError

from .core import Timing
from .messages import Codec, Kind, Message, MessageRejected, looks_signed
from .redis_url import parse_broker_url
from .settings import LeaderSettings, SettingsError
from .transport.base import BrokerUnavailable, Names
from .transport.redis import RedisTransport, acl_rule, close_pubsub

__all__ = ["main"]

PROG = "fastapi-leader"

# Exit codes of every subcommand: 0 as hoped (a leader is known, the lead moved, no problem
# found), 1 not (no leader, the lead did not move, a problem found), 2 the tool could not tell
# (bad settings, Redis unreachable).
EXIT_OK, EXIT_NO, EXIT_ERROR = 0, 1, 2

# Seconds allowed to connect and for any one command: generous, because the tool may run far
# from Redis, and check measures a slow round trip instead of timing out on it.
DEFAULT_TIMEOUT = 5.0

# The longest status listens for members, whatever the group's size.
MAX_LISTEN = 10.0

# check: a round trip of this share of the heartbeat is worth a warning (renewals and
# failovers take noticeably longer), of this share of the lease a problem (a renewal's answer
# then eats a quarter of the lease: a loaded moment costs the lead).
RTT_WARN_SHARE_OF_HEARTBEAT = 0.25
RTT_PROBLEM_SHARE_OF_LEASE = 0.25
RTT_SAMPLES = 10

_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class CliError(Exception):
    """A failure told as one line (exit 2)."""


# ---- reading the group --------------------------------------------------------------------------


@dataclass
class _Member:
    url: str | None
    last_seen: float  # monotonic


@dataclass
class GroupView:
    """What an observer heard on a group's broadcast channel: the members with their URLs and
    when each was last heard, the latest leader heartbeat, and what could not be read."""

    codec: Codec
    own_id: str
    members: dict[str, _Member] = field(default_factory=dict)
    beat_leader: str | None = None
    beat_term: int = 0
    beat_at: float = -math.inf
    heard: int = 0
    signed_heard: int = 0  # messages carrying a signature (checked or not)
    rejected: Counter[str] = field(default_factory=Counter)

    def take(self, data: bytes, now: float) -> Message | None:
        """Decode and apply one raw message; None if it was dropped (counted by reason)."""
        self.heard += 1
        self.signed_heard += looks_signed(data)
        try:
            message = self.codec.decode(data)
        except MessageRejected as exc:
            self.rejected[exc.reason.value] += 1
            return None
        if message.sender == self.own_id:
            return message
        if message.kind in (Kind.LEAVE, Kind.HANDOVER):
            # A goodbye ends a membership; a handover only a leadership (after resign() the
            # node stays; after a shutdown it falls silent and expires like any other).
            if message.kind is Kind.LEAVE:
                self.members.pop(message.sender, None)
            if message.sender == self.beat_leader:
                self.beat_leader = None
        elif message.kind is not Kind.RESIGN_REQUEST:
            member = self.members.setdefault(message.sender, _Member(message.url, now))
            member.last_seen = now
            member.url = message.url or member.url
        if message.kind is Kind.HEARTBEAT and message.term >= self.beat_term:
            self.beat_leader, self.beat_term, self.beat_at = message.sender, message.term, now
        return message

    @property
    def signing_mismatch(self) -> str | None:
        """Why this observer cannot read the group's messages, if it cannot."""
        if not self.rejected or self.heard > sum(self.rejected.values()):
            return None  # nothing heard, or some messages read: the keys match
        if not self.codec.signed and self.signed_heard:
            return "the group signs its messages: set LEADER_SECRET (or --secret) to its key"
        if self.codec.signed and not self.signed_heard:
            return "the group does not sign its messages: unset LEADER_SECRET"
        if self.rejected["bad_signature"]:
            return "LEADER_SECRET is not the group's key: its signatures do not verify"
        return None


@dataclass(frozen=True)
class LeaderKey:
    """The leader key as read from Redis."""

    leader_id: str | None
    term: int | None
    ttl: float | None  # seconds; None when the user may not read it (PTTL denied)
    read_at: float  # monotonic
    term_counter: int


class Observer:
    """A passive connection to one group: a subscription (through the nodes' own transport, so
    reconnection and errors behave alike) plus a plain client for the keys."""

    def __init__(self, settings: LeaderSettings, timeout: float) -> None:
        self.settings = settings
        self.names = Names(settings.channel_prefix, settings.group, f"cli-{uuid.uuid4().hex[:12]}")
        keys = settings.message_keys
        # Signs as a node would, with every key while one is being rotated.
        self.codec = Codec(settings.group, keys, signers=max(1, len(keys)))
        self.view = GroupView(self.codec, self.names.node_id)
        self.timeout = timeout
        self.inbox: asyncio.Queue[tuple[str, bytes | None, float]] = asyncio.Queue()
        try:
            self.transport = RedisTransport(
                settings.redis_url,
                self.names,
                connect_timeout=timeout,
                command_timeout=timeout,
                ssl_options=settings.redis_ssl_options,
                sentinel_password=(
                    None
                    if settings.sentinel_password is None
                    else settings.sentinel_password.get_secret_value()
                ),
            )
            # A cluster or the sentinels' primary: the keys are read through the transport's
            # own client, which knows where they live (set once it has started).
            self._own_client = parse_broker_url(settings.redis_url).topology == "standalone"
            self._client: Redis | RedisCluster | None = None
            if self._own_client:
                self._client = Redis.from_url(
                    settings.redis_url,
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                    **settings.redis_ssl_options,
                )
        except ValueError as exc:  # the transport's message hides the password
            raise CliError(str(exc)) from None
        self.seq = 0  # of the last message this tool built
        self._incarnation = time.time_ns() // 1000

    # Sink: what the transport reports, queued for the coroutine reading it.
    def message_received(self, data: bytes) -> None:
        self.inbox.put_nowait(("message", data, time.monotonic()))

    def connection_lost(self) -> None:
        self.inbox.put_nowait(("lost", None, time.monotonic()))

    def connection_restored(self) -> None:
        self.inbox.put_nowait(("restored", None, time.monotonic()))

    async def __aenter__(self) -> Observer:
        try:
            await self.transport.start(self)
        except BaseException:
            await self.aclose()
            raise
        if self._client is None:
            self._client = self.transport.key_client()
        return self

    @property
    def reads_through_transport(self) -> bool:
        """Whether the keys are read through the transport's client (cluster, Sentinel)."""
        return not self._own_client

    @property
    def client(self) -> Redis | RedisCluster:
        """The client that reads the group's keys (once entered)."""
        if self._client is None:
            raise RuntimeError("the observer has not started")
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the subscription and the client; never raises."""
        await self.transport.close()
        if self._own_client and self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.aclose(), self.timeout)

    async def command(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """One command on the plain client; a failure is one line (:class:`CliError`)."""
        try:
            return await asyncio.wait_for(call(), self.timeout)
        except _REDIS_ERRORS as exc:
            raise CliError(
                f"Redis at {self.settings.redis_url_redacted}: {what} failed: {_describe(exc)}"
            ) from None

    async def read_key(self, *, with_ttl: bool = True) -> LeaderKey:
        """The leader key's holder and TTL (unless not ``with_ttl``), and the term counter."""
        names = self.names
        holder = await self.command("GET", lambda: self.client.get(names.leader_key))
        read_at = time.monotonic()
        counter = await self.command("GET", lambda: self.client.get(names.term_key))
        ttl: float | None = None
        if with_ttl:
            try:
                # Not among the commands a node's ACL user may run: read it when allowed.
                pttl = await asyncio.wait_for(self.client.pttl(names.leader_key), self.timeout)
                ttl = pttl / 1000 if pttl >= 0 else None
            except _REDIS_ERRORS:
                ttl = None
        leader_id: str | None = None
        term: int | None = None
        if holder is not None:
            # The key holds "<node id>:<term>" (Names.holder); node ids never contain ':'.
            node, _, number = holder.decode(errors="replace").rpartition(":")
            leader_id, term = node or None, int(number) if number.isdigit() else None
        return LeaderKey(leader_id, term, ttl, read_at, int(counter or 0))

    async def next_event(self, until: float) -> tuple[str, bytes | None, float] | None:
        """The next thing the subscription reported, or None at monotonic ``until``."""
        remaining = until - time.monotonic()
        if remaining <= 0 and self.inbox.empty():
            return None
        try:
            return await asyncio.wait_for(self.inbox.get(), max(remaining, 0))
        except asyncio.TimeoutError:
            return None

    async def listen(self, until: float | Callable[[], float]) -> None:
        """Apply every message heard until the (possibly moving) deadline."""
        while True:
            deadline = until() if callable(until) else until
            event = await self.next_event(deadline)
            if event is None:
                return
            kind, data, at = event
            if kind == "message" and data is not None:
                self.view.take(data, at)

    def message(self, kind: Kind, *, term: int = 0, target: str | None = None) -> bytes:
        """A message from this tool, signed as the group's are."""
        self.seq += 1
        return self.codec.encode(
            Message(
                kind=kind,
                group=self.settings.group,
                sender=self.names.node_id,
                term=term,
                seq=self.seq,
                target=target,
                incarnation=self._incarnation,
            )
        )


def _timing(settings: LeaderSettings) -> Timing:
    return Timing(
        heartbeat_interval=settings.heartbeat_interval,
        lease=settings.lease,
        election_timeout_min=settings.election_timeout_min,
        election_timeout_max=settings.election_timeout_max,
        member_expiry=settings.member_expiry,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if not text:
        return "no reply in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


# ---- status -------------------------------------------------------------------------------------


async def _status(settings: LeaderSettings, args: argparse.Namespace, out: TextIO) -> int:
    timing = _timing(settings)
    async with Observer(settings, args.timeout) as observer:
        started = time.monotonic()
        view = observer.view
        if args.listen is not None:
            await observer.listen(started + args.listen)
        else:
            # Every member beats at least once per presence interval of the group's size, so
            # listen that long (plus a beat), and longer as more members turn up.
            def deadline() -> float:
                size = max(1, len(view.members))
                wait = timing.presence_interval(size) + timing.heartbeat_interval
                return started + min(wait, MAX_LISTEN)

            await observer.listen(deadline)
        listened = time.monotonic() - started
        # Read after listening, so the lease is read as it is now, not as it was.
        key = await observer.read_key()
    now = time.monotonic()
    leader_id = key.leader_id
    lease: float | None = None
    lease_source = None
    if leader_id is not None and key.ttl is not None:
        lease, lease_source = max(0.0, key.ttl - (now - key.read_at)), "redis"
    elif leader_id is not None and view.beat_leader == leader_id:
        # The heartbeat leaves the leader in the script that renewed the key for a lease.
        lease, lease_source = max(0.0, timing.lease - (now - view.beat_at)), "heartbeat"
    members = [
        {
            "node_id": node_id,
            "url": member.url,
            "last_seen_ago": round(max(0.0, now - member.last_seen), 3),
            "is_leader": node_id == leader_id,
        }
        for node_id, member in sorted(view.members.items())
    ]
    notes = []
    mismatch = view.signing_mismatch
    if mismatch:
        notes.append(f"members unknown: {mismatch}")
    if leader_id is not None and view.beat_leader != leader_id and not mismatch:
        notes.append(f"no heartbeat heard from {leader_id} in {listened:.2f} s")
    result = {
        "group": settings.group,
        "leader_id": leader_id,
        "term": key.term if leader_id is not None else None,
        "term_counter": key.term_counter,
        "lease_remaining": None if lease is None else round(lease, 3),
        "lease_source": lease_source,
        "members": members,
        "listened": round(listened, 3),
        "notes": notes,
    }
    if args.json:
        print(json.dumps(result, indent=2), file=out)
    else:
        print(f"group    {settings.group} on {settings.redis_url_redacted}", file=out)
        if leader_id is None:
            print(f"leader   none (last term {key.term_counter})", file=out)
        else:
            left = "" if lease is None else f", lease {lease:.2f} s left"
            estimated = " (estimated from its heartbeat)" if lease_source == "heartbeat" else ""
            print(f"leader   {leader_id} (term {key.term}{left}{estimated})", file=out)
        print(f"members  {len(members)} heard in {listened:.2f} s", file=out)
        width = max(map(len, view.members), default=0)
        for m in members:
            mark = "  leader" if m["is_leader"] else ""
            url = m["url"] or "-"
            print(
                f"  {m['node_id']:<{width}}  {url}  seen {m['last_seen_ago']:.2f} s ago{mark}",
                file=out,
            )
        for note in notes:
            print(f"note     {note}", file=out)
    return EXIT_OK if leader_id is not None else EXIT_NO


# ---- watch --------------------------------------------------------------------------------------


async def _watch(settings: LeaderSettings, args: argparse.Namespace, out: TextIO) -> int:
    timing = _timing(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Not on Windows' loops, nor off the main thread (main() called by a program of its own).
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    ends_at = math.inf if args.duration is None else time.monotonic() + args.duration

    def say(line: str) -> None:
        print(f"{_clock()} {line}", file=out, flush=True)

    async with Observer(settings, args.timeout) as observer:
        view = observer.view
        key = await observer.read_key(with_ttl=False)
        leader, term = key.leader_id, key.term or 0
        leaderless_since: float | None = None
        if leader is None:
            leaderless_since = time.monotonic()
            say("no leader")
        else:
            # Its next heartbeat is due within a beat; count its silence from the key's read.
            view.beat_leader, view.beat_term, view.beat_at = leader, term, key.read_at
            say(f"leader is {leader} (term {term})")
        members: set[str] = set()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set() and time.monotonic() < ends_at:
                # Wake at least every beat, to notice a leader that fell silent.
                wake_at = min(ends_at, time.monotonic() + timing.heartbeat_interval)
                next_event = asyncio.ensure_future(observer.next_event(wake_at))
                await asyncio.wait({next_event, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():  # Ctrl-C
                    next_event.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await next_event
                    break
                event, now = next_event.result(), time.monotonic()
                message: Message | None = None
                if event is not None:
                    kind, data, at = event
                    if kind == "lost":
                        say("lost the connection to Redis; reconnecting")
                    elif kind == "restored":
                        say("connection to Redis restored")
                    elif data is not None:
                        message = view.take(data, at)
                        mismatch = view.signing_mismatch
                        if mismatch:
                            raise CliError(f"cannot read the group's messages: {mismatch}")
                if message is not None and leader is not None and message.sender == leader:
                    if message.kind is Kind.HANDOVER:
                        say(f"{leader} hands over to {message.target} (term {message.term})")
                        leader, leaderless_since = None, now
                    elif message.kind is Kind.LEAVE:
                        say(f"{leader} leaves the group, naming no successor")
                        leader, leaderless_since = None, now
                if leader is not None and now - view.beat_at >= timing.lease:
                    # Silent for a lease: it cannot hold one any more.
                    say(f"no leader: {leader} silent for {now - view.beat_at:.2f} s")
                    leader, leaderless_since, view.beat_leader = None, view.beat_at, None
                beat = (view.beat_leader, view.beat_term)
                if view.beat_leader is not None and beat != (leader, term):
                    gap = ""
                    if leaderless_since is not None:
                        gap = f" after {view.beat_at - leaderless_since:.2f} s without one"
                    leader, term, leaderless_since = view.beat_leader, view.beat_term, None
                    say(f"leader is {leader} (term {term}){gap}")
                horizon = now - timing.member_expiry_for(max(1, len(view.members)))
                for node_id in [n for n, m in view.members.items() if m.last_seen < horizon]:
                    del view.members[node_id]
                for node_id in sorted(set(view.members) - members):
                    url = view.members[node_id].url
                    say(f"member {node_id} joined" + (f" ({url})" if url else ""))
                for node_id in sorted(members - set(view.members)):
                    say(f"member {node_id} left")
                members = set(view.members)
        finally:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
    return EXIT_OK


# ---- resign -------------------------------------------------------------------------------------


async def _resign(settings: LeaderSettings, args: argparse.Namespace, out: TextIO) -> int:
    timing = _timing(settings)
    async with Observer(settings, args.timeout) as observer:
        view = observer.view
        key = await observer.read_key(with_ttl=False)
        leader, term = key.leader_id, key.term
        if leader is None or term is None:
            print(f"no leader in group {settings.group}: nothing to resign", file=out)
            return EXIT_NO
        # Hear a few heartbeats first: they tell whether our request would be read at all.
        started = time.monotonic()
        await observer.listen(started + 3 * timing.heartbeat_interval)
        mismatch = view.signing_mismatch
        if mismatch:
            raise CliError(f"not sending the resign request: {mismatch}")
        request = observer.message(Kind.RESIGN_REQUEST, term=term, target=leader)
        await observer.transport.publish(request, to=leader)
        asked_at = time.monotonic()
        print(f"asked {leader} (term {term}) to hand over", file=out, flush=True)
        # The successor stands at once; allow a few election rounds on a loaded group.
        deadline = asked_at + args.wait
        handed_over = False
        while True:
            event = await observer.next_event(deadline)
            if event is None:
                break
            kind, data, at = event
            if kind != "message" or data is None:
                continue
            message = view.take(data, at)
            if message is None:
                continue
            if message.sender == leader and message.kind in (Kind.HANDOVER, Kind.LEAVE):
                handed_over = True
                successor = f" to {message.target}" if message.target else ""
                print(f"{leader} handed over{successor}", file=out, flush=True)
            if message.kind is Kind.HEARTBEAT and message.term > term:
                took = at - asked_at
                if message.sender == leader:
                    print(
                        f"{leader} leads again (term {message.term}, after {took:.2f} s): "
                        "no other member took over",
                        file=out,
                    )
                    return EXIT_NO
                print(f"{message.sender} leads (term {message.term}, after {took:.2f} s)", file=out)
                return EXIT_OK
        if handed_over:
            print(f"no new leader within {args.wait:g} s", file=out)
        else:
            print(
                f"{leader} did not hand over within {args.wait:g} s (a node older than the "
                "resign request, or one that reads another key?)",
                file=out,
            )
        return EXIT_NO


# ---- check --------------------------------------------------------------------------------------


class _Findings:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.problems = 0

    def ok(self, topic: str, text: str) -> None:
        self._say("ok", topic, text)

    def warn(self, topic: str, text: str) -> None:
        self._say("warning", topic, text)

    def problem(self, topic: str, text: str) -> None:
        self.problems += 1
        self._say("problem", topic, text)

    def _say(self, level: str, topic: str, text: str) -> None:
        print(f"{level:<8} {topic}: {text}", file=self.out, flush=True)


async def _check(settings: LeaderSettings, args: argparse.Namespace, out: TextIO) -> int:
    found = _Findings(out)
    timing = _timing(settings)
    found.ok(
        "settings",
        f"group {settings.group}, heartbeat {timing.heartbeat_interval:g} s, lease "
        f"{timing.lease:g} s, election timeout {timing.election_timeout_min:g} to "
        f"{timing.election_timeout_max:g} s, messages "
        + ("signed" if settings.secret is not None else "not signed"),
    )
    if settings.redis_url.startswith("memory://"):
        found.problem("redis", "memory:// elects within one process only; give a Redis URL")
        return EXIT_NO
    observer = Observer(settings, args.timeout)
    try:
        if observer.reads_through_transport:
            await _check_through_transport(observer, settings, timing, found)
        else:
            await _check_with(observer, settings, timing, found)
    finally:
        await observer.aclose()
    return EXIT_NO if found.problems else EXIT_OK


async def _check_through_transport(
    observer: Observer, settings: LeaderSettings, timing: Timing, found: _Findings
) -> None:
    """A cluster or Sentinel URL: start a node's transport, whose own start checks (server
    version, the primary, pub/sub and scripts allowed) are those a node meets, then measure
    the round trip."""
    url = settings.redis_url_redacted
    started = time.monotonic()
    try:
        await observer.__aenter__()
    except BrokerUnavailable as exc:
        found.problem("redis", str(exc).splitlines()[0])
        return
    found.ok(
        "redis",
        f"reached {url} and started as a node would in "
        f"{1000 * (time.monotonic() - started):.1f} ms: server version, primary, pub/sub and "
        "scripts accepted",
    )
    await _check_round_trip(observer, timing, found)
    found.warn(
        "acl",
        "the command-by-command ACL and key checks run on redis:// URLs only; "
        "compare the user's rules with `fastapi-leader acl`",
    )


async def _check_with(
    observer: Observer, settings: LeaderSettings, timing: Timing, found: _Findings
) -> None:
    client, names = observer.client, observer.names
    assert isinstance(client, Redis)  # a redis:// URL: the observer's own client
    url = settings.redis_url_redacted
    started = time.monotonic()
    try:
        await asyncio.wait_for(client.ping(), observer.timeout)
    except AuthenticationError as exc:
        wrong = "WRONGPASS" in str(exc) or "invalid username-password" in str(exc)
        found.problem(
            "redis",
            f"{url} refused: "
            + (
                "wrong user name or password in LEADER_REDIS_URL"
                if wrong
                else "the server requires a password: put it in LEADER_REDIS_URL as "
                "redis://:PASSWORD@host:6379/0 (or redis://USER:PASSWORD@host:6379/0)"
            ),
        )
        return
    except _REDIS_ERRORS as exc:
        found.problem("redis", f"cannot reach {url}: {_describe(exc)}")
        return
    found.ok("redis", f"reached {url} in {1000 * (time.monotonic() - started):.1f} ms")

    await _check_topology(client, found, observer.timeout)

    # Subscribe on a connection of our own first, to tell a refused SUBSCRIBE apart from the
    # scripts the transport loads when it starts.
    pubsub = client.pubsub()
    try:
        await asyncio.wait_for(
            pubsub.subscribe(names.broadcast, names.own_channel), observer.timeout
        )
        confirmed = 0
        deadline = time.monotonic() + observer.timeout
        while confirmed < 2 and time.monotonic() < deadline:
            frame = await pubsub.get_message(timeout=0.1)
            if frame is not None and frame["type"] == "subscribe":
                confirmed += 1
        if confirmed < 2:
            raise asyncio.TimeoutError()
    except _REDIS_ERRORS as exc:
        found.problem(
            "subscribe",
            f"cannot subscribe to {names.broadcast} and {names.node_channel('*')}: "
            f"{_describe(exc)} (grant the rules `fastapi-leader acl` prints)",
        )
        return
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close_pubsub(pubsub), observer.timeout)
    found.ok("subscribe", f"{names.broadcast} and {names.node_channel('*')}")

    try:
        await observer.transport.start(observer)
    except BrokerUnavailable as exc:
        found.problem("scripts", f"{exc} (grant the rules `fastapi-leader acl` prints)")
        return
    found.ok("scripts", "the four election scripts load (and run, below)")

    # First the round trip (it also listens to the group): a slow link is the finding that
    # explains whatever fails after it.
    await _check_round_trip(observer, timing, found)

    # Is the group running? Then leave its keys alone: a node's scripts only write the leader
    # key they hold, and taking it, even for a moment, would cost a real candidate its round.
    key = await observer.read_key(with_ttl=False)  # within the nodes' rights: no PTTL
    await observer.listen(
        time.monotonic() + timing.presence_interval(1) + timing.heartbeat_interval
    )
    running = key.leader_id is not None or _heard_the_group(observer)
    leave = observer.message(Kind.LEAVE)
    failure = await (_read_keys(observer) if running else _write_keys(observer, leave))
    if failure:
        # Redis names what the ACL refused: running a script at all, or a key it touches.
        found.problem("scripts" if "'evalsha'" in failure else "keys", failure)
        return
    if running:
        found.ok(
            "keys",
            f"{names.leader_key} and {names.term_key} readable by the scripts; the group is "
            "running, so writes were not tried (run check before starting it to try them)",
        )
    else:
        found.ok("keys", f"{names.leader_key} and {names.term_key}: the scripts read and write")

    mismatch = observer.view.signing_mismatch
    if mismatch:
        found.problem("signing", mismatch)
    elif observer.view.members:
        found.ok("signing", "the group's messages verify with these settings")


def _heard_the_group(observer: Observer) -> bool:
    """Whether anything but this tool's own messages was heard (read or not)."""
    view = observer.view
    return bool(view.members) or sum(view.rejected.values()) > 0


async def _read_keys(observer: Observer) -> str | None:
    """Run the scripts that only read while the key is someone else's: holders that cannot
    match, so each one reads its key and changes nothing."""
    transport, lease = observer.transport, observer.settings.lease
    try:
        await transport.renew(0, lease, b"")
        await transport.release(0, None)
    except BrokerUnavailable as exc:
        return str(exc)
    return None


async def _write_keys(observer: Observer, announce: bytes) -> str | None:
    """A whole leadership of this tool's own, each step announced with a goodbye from an id no
    node knows (which changes nothing for them): what a node's scripts do, in order."""
    # Held for the command timeout, not the lease: the round trip is judged above, and a slow
    # link must not fail this step too. A group starting meanwhile waits that long at most.
    transport, lease = observer.transport, max(observer.settings.lease, observer.timeout)
    step = "allocate_term (GET, SET, INCR)"
    try:
        term = await transport.allocate_term(0)
        step = "acquire (GET, SET NX PX, PUBLISH)"
        if not await transport.acquire(term, lease, announce):
            return f"{step}: the leader key was taken meanwhile: is the group starting?"
        step = "renew (GET, PEXPIRE, PUBLISH)"
        if not await transport.renew(term, lease, announce):
            return f"{step}: the key this check took is gone (taken over, or expired)"
        step = "release (GET, DEL, PUBLISH)"
        await transport.release(term, announce)
    except BrokerUnavailable as exc:
        return f"{step}: {exc}"
    return None


async def _check_topology(client: Redis, found: _Findings, timeout: float) -> None:
    try:
        # HELLO needs no permission, so a least-privilege user can run it too.
        raw = await asyncio.wait_for(
            client.execute_command("HELLO", "2"),  # type: ignore[no-untyped-call]
            timeout,
        )
        hello = dict(zip(raw[::2], raw[1::2], strict=False))
        info = {_text(k): _text(v) for k, v in hello.items() if isinstance(v, (bytes, str, int))}
    except _REDIS_ERRORS as exc:
        found.warn("topology", f"not detected (HELLO: {_describe(exc)})")
        return
    server, version = info.get("server", "redis"), info.get("version", "?")
    mode, role = info.get("mode", "?"), info.get("role", "?")
    described = f"{server} {version}, {mode}, {role}"
    if mode == "sentinel":
        found.problem("topology", f"{described}: a Sentinel, not a server; give the primary's URL")
    elif mode == "cluster":
        found.problem(
            "topology", f"{described}: a cluster node; the group's keys and channels need one node"
        )
    elif role not in ("master", "primary"):
        found.problem("topology", f"{described}: a read-only replica; give the primary's URL")
    elif _older_than(version, (6, 2)):
        found.warn("topology", f"{described}: ACL channel rules (acl) need 6.2 or later")
    else:
        found.ok("topology", described)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _older_than(version: str, least: tuple[int, int]) -> bool:
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < least


async def _check_round_trip(observer: Observer, timing: Timing, found: _Findings) -> None:
    client = observer.client
    samples = []
    for _ in range(RTT_SAMPLES):
        sent = time.monotonic()
        try:
            await asyncio.wait_for(client.ping(), observer.timeout)
        except _REDIS_ERRORS as exc:
            found.problem("round trip", f"PING failed: {_describe(exc)}")
            return
        samples.append(time.monotonic() - sent)
    # And once through pub/sub, as a heartbeat travels: published, then heard back.
    own = observer.names.node_id
    heard_back: float | None = None
    try:
        probe = observer.message(Kind.LEAVE)
        probe_seq = observer.seq  # the goodbyes of the key checks may still be queued
        sent = time.monotonic()
        await observer.transport.publish(probe)
        deadline = sent + observer.timeout
        while heard_back is None:
            event = await observer.next_event(deadline)
            if event is None:
                break
            kind, data, at = event
            if kind == "message" and data is not None:
                message = observer.view.take(data, at)
                if message is not None and (message.sender, message.seq) == (own, probe_seq):
                    heard_back = at - sent
    except BrokerUnavailable as exc:
        found.problem("publish", f"{exc} (grant the rules `fastapi-leader acl` prints)")
        return
    if heard_back is None:
        found.problem("publish", f"published on {observer.names.broadcast} but never heard it")
        return
    found.ok("publish", f"{observer.names.broadcast}: heard back in {1000 * heard_back:.1f} ms")
    median, worst = statistics.median(samples), max(samples)
    text = (
        f"median {1000 * median:.1f} ms, max {1000 * worst:.1f} ms over {RTT_SAMPLES} PINGs; "
        f"heartbeat {1000 * timing.heartbeat_interval:g} ms, lease {1000 * timing.lease:g} ms"
    )
    if median >= RTT_PROBLEM_SHARE_OF_LEASE * timing.lease:
        found.problem(
            "round trip",
            f"{text}: too slow, a renewal's answer would take a quarter of the lease or more "
            "(raise LEADER_LEASE and the election timeouts, or run nearer to Redis)",
        )
    elif median >= RTT_WARN_SHARE_OF_HEARTBEAT * timing.heartbeat_interval:
        found.warn("round trip", f"{text}: slow for these timings; failovers take longer")
    else:
        found.ok("round trip", text)


# ---- acl ----------------------------------------------------------------------------------------


async def _acl(settings: LeaderSettings, args: argparse.Namespace, out: TextIO) -> int:
    rules = " ".join(acl_rule(settings))
    if args.rules_only:
        print(rules, file=out)
    else:
        user = args.user or f"{settings.group}-leader"
        print(f"ACL SETUSER {user} reset on >PASSWORD {rules}", file=out)
    return EXIT_OK


# ---- the command line ---------------------------------------------------------------------------

# Flags that set a LeaderSettings field, and the field.
_SETTING_FLAGS = {
    "--redis-url": "redis_url",
    "--group": "group",
    "--channel-prefix": "channel_prefix",
    "--secret": "secret",
    "--previous-secret": "previous_secret",
    "--heartbeat-interval": "heartbeat_interval",
    "--lease": "lease",
    "--election-timeout-min": "election_timeout_min",
    "--election-timeout-max": "election_timeout_max",
    "--member-expiry": "member_expiry",
}


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a flag given before the subcommand is not reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group("settings (default: the LEADER_* environment and .env)")
    for flag, name in _SETTING_FLAGS.items():
        env = f"LEADER_{name.upper()}"
        hint = " (visible in ps: prefer the variable)" if "secret" in name else ""
        group.add_argument(flag, dest=f"setting_{name}", metavar="VALUE", help=f"{env}{hint}")
    group.add_argument(
        "--profile",
        choices=("fast", "economy"),
        help="the timings of LeaderSettings.fast() or .economy(), as the group's nodes use them "
        "(timing flags still win)",
    )
    group.add_argument("--env-file", metavar="PATH", help="read LEADER_* from this file, not .env")
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"to connect, and for each command (default {DEFAULT_TIMEOUT:g})",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Ask a fastapi-leader group who leads, watch it, move the lead, check a "
        "configuration.",
        epilog="Exit codes: 0 as hoped, 1 not (no leader, lead not moved, a problem found), "
        "2 could not tell (bad settings, Redis unreachable).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser(
        "status", parents=[common], help="leader, term, lease and members (exit 1: no leader)"
    )
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument(
        "--listen",
        type=float,
        metavar="SECONDS",
        help="how long to listen for members (default: one presence interval of the group)",
    )
    status.set_defaults(run=_status)

    watch = commands.add_parser(
        "watch", parents=[common], help="one timestamped line per change, until Ctrl-C"
    )
    watch.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    watch.set_defaults(run=_watch)

    resign = commands.add_parser(
        "resign", parents=[common], help="ask the leader to hand over; say who leads after"
    )
    resign.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a new leader (default 10)",
    )
    resign.set_defaults(run=_resign)

    check = commands.add_parser(
        "check", parents=[common], help="check settings, Redis, ACL and round trip before deploying"
    )
    check.set_defaults(run=_check)

    acl = commands.add_parser("acl", parents=[common], help="print the least-privilege ACL rule")
    acl.add_argument("--user", help="the user's name (default: <group>-leader)")
    acl.add_argument("--rules-only", action="store_true", help="print the rules alone")
    acl.set_defaults(run=_acl)
    return parser


def _settings(args: argparse.Namespace) -> LeaderSettings:
    given: dict[str, Any] = {
        name: getattr(args, f"setting_{name}")
        for name in _SETTING_FLAGS.values()
        if hasattr(args, f"setting_{name}")
    }
    if hasattr(args, "env_file"):
        given["_env_file"] = args.env_file
    profile = getattr(args, "profile", None)
    if profile == "fast":
        return LeaderSettings.fast(**given)
    if profile == "economy":
        return LeaderSettings.economy(**given)
    return LeaderSettings(**given)


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``), writing to ``out`` and
    ``err`` (default: stdout and stderr); return the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    def fail(line: str, code: int = EXIT_ERROR) -> int:
        print(f"{PROG}: {line}", file=err, flush=True)
        return code

    args = _parser().parse_args(argv)
    if not hasattr(args, "timeout"):
        args.timeout = DEFAULT_TIMEOUT
    # The transport logs its reconnections; the tool says what matters in its own lines.
    package_log = logging.getLogger("fastapi_leader")
    if not package_log.handlers:
        package_log.addHandler(logging.NullHandler())
    try:
        settings = _settings(args)
    except SettingsError as exc:
        first = str(exc).splitlines()[0]
        if args.command == "check":  # a finding like any other
            _Findings(out).problem("settings", first)
            return EXIT_NO
        return fail(f"invalid setting: {first}")
    try:
        code: int = asyncio.run(args.run(settings, args, out))
    except (CliError, BrokerUnavailable) as exc:
        return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except Exception as exc:  # one line, as promised, whatever it was
        return fail(f"unexpected error: {_describe(exc)}")
    return code
