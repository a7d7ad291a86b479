"""A deterministic discrete-event simulator for the election core.

Nodes are :class:`~fastapi_leader.core.Election` instances, each with its own monotonic clock
(an offset from simulated time: no clock agreement). A simulated Redis executes the atomic key
operations at the instant a command reaches it and fans published messages out to subscribers,
in order per subscriber, as Redis does. Everything random comes from one seeded generator, so a
seed replays exactly.

Faults: message drops and duplicates, random latency, node crashes and restarts, joins, pauses
(SIGSTOP: the node handles nothing until resumed, then everything at once), a node's
subscription cut and restored, and Redis restarts (keys and subscriptions lost).

Guarantees are checked after every event; a violation raises :class:`Violation` naming the seed.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi_leader.core import (
    Acquire,
    AllocateTerm,
    Demoted,
    Elected,
    Election,
    Output,
    Release,
    Renew,
    Role,
    Send,
    Timing,
)
from fastapi_leader.messages import Message


class Violation(AssertionError):
    """A protocol guarantee was broken in a simulated run."""


@dataclass
class Faults:
    """Fault rates and the latency model of one run."""

    max_delay: float = 0.05  # one-way latency between a node and Redis: uniform in [0, max]
    drop: float = 0.0  # probability that a delivery to one subscriber is lost
    duplicate: float = 0.0  # probability that a delivery is repeated
    tick_jitter: float = 0.01  # how late a node's timer fires, at most
    # A host's CPUs, shared by every node: each input a node handles (a message, a timer, a
    # command's answer) takes `cpu_cost` seconds of one of `cores` CPUs, in arrival order, so
    # a flood of messages delays everything behind it, as on a loaded machine. 0: no limit.
    cores: int = 0
    cpu_cost: float = 0.0


@dataclass
class SimRedis:
    """The leader key, the term counter, and an up/down switch."""

    keys: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (value, expires)
    up: bool = True

    def get(self, key: str, now: float) -> str | None:
        item = self.keys.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self.keys[key]
            return None
        return item[0]


LEADER_KEY = "leader"
TERM_KEY = "term"


class Node:
    """One simulated process: an Election plus what the runtime would keep around it."""

    def __init__(self, sim: Simulation, node_id: str, incarnation: int) -> None:
        self.sim = sim
        self.node_id = node_id
        self.offset = sim.rng.uniform(-1000.0, 1000.0)  # its monotonic clock's origin
        self.core = Election(
            node_id,
            "sim",
            sim.timing,
            rng=random.Random(sim.rng.random()),
            first_seq=incarnation * 10**9,
        )
        self.alive = True
        self.paused = False
        self.subscribed = True
        self.inbound_drop = 0.0  # a lossy link to this node alone
        self.backlog: list[Callable[[], None]] = []
        self.timer_at: float | None = None  # simulated time its one timer fires (next_tick_at)
        self.timer_due = 0.0  # the deadline it was armed for (timer_at is a little later)
        self.command_free_at = 0.0  # commands leave one connection in order

    def local(self, t: float) -> float:
        return t + self.offset

    @property
    def now(self) -> float:
        return self.local(self.sim.time)


@dataclass(order=True)
class _Event:
    time: float
    order: int
    action: Callable[[], None] = field(compare=False)


class Simulation:
    """One seeded run. Build it, add nodes and faults, then :meth:`run_until`."""

    def __init__(self, seed: int, timing: Timing | None = None, faults: Faults | None = None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.timing = timing or Timing()
        self.faults = faults or Faults()
        self.time = 0.0
        self.redis = SimRedis()
        self.nodes: dict[str, Node] = {}
        self._queue: list[_Event] = []
        self._order = 0
        self._incarnations: dict[str, int] = {}
        self._deliver_free: dict[str, float] = {}  # per-subscriber FIFO
        self._cpus_free = [0.0] * self.faults.cores  # when each CPU is next idle
        self._leading: set[Node] = set()  # nodes whose role became leader (see leaders())
        self.log: list[str] = []
        # What the checks need.
        self.elections: list[tuple[float, str, int]] = []  # (time, node, term)
        # Every new leadership's token must exceed this: the highest token so far, lowered
        # only when every record of it is gone (all who knew it dead, Redis restarted). Tokens
        # grow "across a Redis restart while nodes stay up", not when nothing stays up.
        self.token_floor = 0
        self.faults_active = 0
        self.last_fault_end = 0.0

    # ---- scheduling ---------------------------------------------------------------------------

    def at(self, time: float, action: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._queue, _Event(max(time, self.time), self._order, action))

    def run_until(self, end: float, check: Callable[[Simulation], None] | None = None) -> None:
        while self._queue and self._queue[0].time <= end:
            event = heapq.heappop(self._queue)
            self.time = event.time
            event.action()
            self.check_safety()
            if check is not None:
                check(self)
        self.time = end

    def fail(self, what: str) -> None:
        tail = "\n".join(self.log[-40:])
        raise Violation(f"seed {self.seed} at t={self.time:.4f}: {what}\nlast events:\n{tail}")

    def note(self, text: str) -> None:
        self.log.append(f"{self.time:9.4f} {text}")

    # ---- nodes --------------------------------------------------------------------------------

    def add_node(self, node_id: str | None = None) -> Node:
        node_id = node_id or f"n{len(self._incarnations)}"
        incarnation = self._incarnations.get(node_id, 0) + 1
        self._incarnations[node_id] = incarnation
        node = Node(self, node_id, incarnation)
        self.nodes[node_id] = node
        self.note(f"{node_id} starts")
        self._apply(node, node.core.start(node.now))
        return node

    def _on(self, node: Node, action: Callable[[], None]) -> Callable[[], None]:
        """Wrap an action on a node: dropped if the node died, deferred while it is paused,
        and with a CPU model, run only once a CPU is free for it."""
        if self.faults.cores and self.faults.cpu_cost:
            return self._on_cpu(node, self._on_now(node, action))
        return self._on_now(node, action)

    def _on_cpu(self, node: Node, run: Callable[[], None]) -> Callable[[], None]:
        def queue() -> None:
            if not node.alive:
                return
            # Arrivals are handled in order, so start times never go backwards: FIFO per node.
            cpu = min(range(len(self._cpus_free)), key=self._cpus_free.__getitem__)
            start = max(self.time, self._cpus_free[cpu])
            self._cpus_free[cpu] = start + self.faults.cpu_cost
            self.at(start, run)

        return queue

    def _on_now(self, node: Node, action: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            if not node.alive or self.nodes.get(node.node_id) is not node:
                return
            if node.paused:
                node.backlog.append(action)
                return
            action()

        return run

    def _arm_timer(self, node: Node) -> None:
        """One timer per node, at the core's ``next_tick_at``, as the runtime arms it: nothing
        else ticks, so a deadline the core forgets to report is a deadline that never fires.
        Armed again only when the deadline moves earlier; a deadline that moved later costs
        one early tick."""
        deadline = node.core.next_tick_at
        if deadline is None:
            return
        # Late, never early, as a scheduler is; and at least a hair late: with float offsets,
        # exactly "at" could read a local time a ulp before the deadline, and the timer would
        # fire forever at the same instant.
        due = deadline - node.offset + 1e-9
        if node.timer_at is not None and (node.timer_due <= due or node.timer_at <= self.time):
            # Early enough; or fired already, its tick waiting for a CPU: that tick re-arms.
            return
        node.timer_due = due
        at = node.timer_at = due + self.rng.uniform(0, self.faults.tick_jitter)

        def fire() -> None:
            if node.timer_at != at:
                return
            node.timer_at = None
            self._apply(node, node.core.tick(node.now))

        self.at(at, self._on(node, fire))

    # ---- the runtime's job: carry out commands ------------------------------------------------

    def _apply(self, node: Node, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, Elected):
                self.note(f"{node.node_id} ELECTED term {output.term}")
                self.elections.append((self.time, node.node_id, output.term))
                if output.term <= self.token_floor:
                    self.fail(f"fencing token {output.term} after {self.token_floor}")
                self.token_floor = output.term
            elif isinstance(output, Demoted):
                self.note(f"{node.node_id} demoted term {output.term}: {output.reason}")
            elif isinstance(output, Send | AllocateTerm | Acquire | Renew | Release):
                self._command(node, output)
        if node.core.role is Role.LEADER:
            self._leading.add(node)
        self._arm_timer(node)

    def _latency(self) -> float:
        return self.rng.uniform(0, self.faults.max_delay)

    def _command(self, node: Node, command: Any) -> None:
        sent_at = node.now
        # One command connection per node: commands reach Redis in the order they were sent.
        arrive = max(self.time + self._latency(), node.command_free_at)
        node.command_free_at = arrive

        def execute() -> None:
            result = self._execute(node, command) if self.redis.up else _FAILED
            back = self.time + self._latency()
            self.at(back, self._on(node, lambda: self._result(node, command, result, sent_at)))

        self.at(arrive, execute)

    def _execute(self, node: Node, command: Any) -> Any:
        redis, now = self.redis, self.time
        holder = f"{node.node_id}:{getattr(command, 'term', '')}"
        if isinstance(command, Send):
            self._publish(command.message, command.to)
            return None
        if isinstance(command, AllocateTerm):
            current = int(redis.get(TERM_KEY, now) or 0)
            term = max(current, command.floor) + 1
            redis.keys[TERM_KEY] = (str(term), math.inf)
            return term
        if isinstance(command, Acquire):
            counter = int(redis.get(TERM_KEY, now) or 0)
            if redis.get(LEADER_KEY, now) is not None or counter > command.term:
                return False
            redis.keys[LEADER_KEY] = (holder, now + command.ttl)
            self._publish(command.announce, None)
            return True
        if isinstance(command, Renew):
            if redis.get(LEADER_KEY, now) != holder:
                return False
            redis.keys[LEADER_KEY] = (holder, now + command.ttl)
            self._publish(command.announce, None)
            return True
        if isinstance(command, Release):
            if redis.get(LEADER_KEY, now) != holder:
                return False
            del redis.keys[LEADER_KEY]
            if command.announce is not None:
                self._publish(command.announce, None)
            return True
        raise AssertionError(command)

    def _result(self, node: Node, command: Any, result: Any, sent_at: float) -> None:
        now = node.now
        core = node.core
        if isinstance(command, AllocateTerm):
            out = core.term_failed(now) if result is _FAILED else core.term_allocated(result, now)
        elif isinstance(command, Acquire):
            out = core.acquire_result(command.term, result is True, sent_at, now)
        elif isinstance(command, Renew):
            renewed = None if result is _FAILED else bool(result)
            out = core.renew_result(command.term, renewed, sent_at, now)
        else:
            return
        self._apply(node, out)

    def _publish(self, message: Message, to: str | None) -> None:
        for node in list(self.nodes.values()):
            if not node.alive or not node.subscribed:
                continue
            if to is not None and node.node_id != to:
                continue
            if self.rng.random() < max(self.faults.drop, node.inbound_drop):
                continue
            copies = 2 if self.rng.random() < self.faults.duplicate else 1
            for _ in range(copies):
                arrive = max(self.time + self._latency(), self._deliver_free.get(node.node_id, 0))
                self._deliver_free[node.node_id] = arrive
                self.at(arrive, self._deliver(node, message))

    def _deliver(self, node: Node, message: Message) -> Callable[[], None]:
        def deliver() -> None:
            if node.subscribed:
                self._apply(node, node.core.receive(message, node.now))

        return self._on(node, deliver)

    # ---- faults -------------------------------------------------------------------------------

    def _fault(
        self, start: float, duration: float, begin: Callable[[], None], end: Callable[[], None]
    ) -> None:
        def on() -> None:
            self.faults_active += 1
            begin()

        def off() -> None:
            end()
            self.faults_active -= 1
            self.last_fault_end = max(self.last_fault_end, self.time)

        self.at(start, on)
        self.at(start + duration, off)

    def crash(self, node_id: str, at: float, restart_after: float | None = None) -> None:
        """kill -9: the node vanishes; optionally the same id restarts later, fresh."""

        def begin() -> None:
            node = self.nodes.get(node_id)
            if node is not None and node.alive:
                node.alive = False
                self.note(f"{node_id} CRASHES")
                self._forget()

        def end() -> None:
            if restart_after is not None:
                self.add_node(node_id)

        self._fault(at, restart_after or 0.0, begin, end)

    def stop(self, node_id: str, at: float) -> None:
        """Graceful shutdown: the node leaves (handing over if it leads), then exits."""

        def begin() -> None:
            node = self.nodes.get(node_id)
            if node is None or not node.alive or node.paused:
                return
            self.note(f"{node_id} leaves")
            self._apply(node, node.core.leave(node.now))

            def exit_() -> None:
                node.alive = False
                self._forget()

            self.at(self.time + 0.2, exit_)  # the process exits once its last commands are out

        self._fault(at, 0.0, begin, lambda: None)

    def pause(self, node_id: str, at: float, duration: float) -> None:
        """SIGSTOP for ``duration``, then SIGCONT: the backlog is handled at resume time."""

        def begin() -> None:
            node = self.nodes.get(node_id)
            if node is not None and node.alive:
                node.paused = True
                self.note(f"{node_id} PAUSED")

        def end() -> None:
            node = self.nodes.get(node_id)
            if node is None or not node.paused:
                return
            node.paused = False
            self.note(f"{node_id} resumed")
            backlog, node.backlog = node.backlog, []
            for action in backlog:
                if node.paused or not node.alive:
                    node.backlog.append(action)
                    continue
                action()
                # A resumed node works through its backlog one message at a time, and a second
                # leader may exist between two of them: checked after the whole backlog, a
                # lease that a stale message wrongly extended would be gone again.
                self.check_safety()

        self._fault(at, duration, begin, end)

    def cut(self, node_id: str, at: float, duration: float) -> None:
        """The node's subscriber connection is cut, then restored."""

        def begin() -> None:
            node = self.nodes.get(node_id)
            if node is not None and node.alive:
                node.subscribed = False
                self.note(f"{node_id} subscription CUT")
                self._on(node, lambda: self._apply(node, node.core.connection_lost(node.now)))()

        def end() -> None:
            node = self.nodes.get(node_id)
            if node is not None and node.alive and not node.subscribed:
                node.subscribed = True
                self.note(f"{node_id} subscription back")
                self._on(node, lambda: self._apply(node, node.core.connection_restored(node.now)))()

        self._fault(at, duration, begin, end)

    def restart_redis(self, at: float, duration: float) -> None:
        """Redis goes down (every subscription breaks, keys are lost) and comes back."""

        def begin() -> None:
            self.note("REDIS DOWN")
            self.redis.up = False
            self.redis.keys.clear()
            self._forget()
            for node in list(self.nodes.values()):
                if node.alive:
                    node.subscribed = False
                    self._on(node, lambda n=node: self._apply(n, n.core.connection_lost(n.now)))()

        def end() -> None:
            self.note("redis up")
            self.redis.up = True
            for node in list(self.nodes.values()):
                if node.alive:
                    node.subscribed = True
                    restore = lambda n=node: self._apply(n, n.core.connection_restored(n.now))  # noqa: E731
                    self.at(self.time + self._latency(), self._on(node, restore))

        self._fault(at, duration, begin, end)

    # ---- checks -------------------------------------------------------------------------------

    def leaders(self) -> list[Node]:
        """Nodes whose own lease reading says valid right now (paused ones included)."""
        # Only nodes that became leader can be: checked after every event, scanning every node
        # would make 100-node runs crawl.
        self._leading = {n for n in self._leading if n.alive and n.core.role is Role.LEADER}
        found = [n for n in self._leading if n.core.is_leader(n.now)]
        return sorted(found, key=lambda n: n.node_id)

    def check_safety(self) -> None:
        leaders = self.leaders()
        if len(leaders) > 1:
            names = ", ".join(f"{n.node_id}(term {n.core.fencing_token(n.now)})" for n in leaders)
            self.fail(f"two valid leases at once: {names}")

    def _forget(self) -> None:
        """After a crash, an exit or a Redis restart: the group can only promise tokens above
        the highest term something still remembers (Redis's counter, or a live node)."""
        remembered = [int(self.redis.get(TERM_KEY, self.time) or 0)]
        remembered += [n.core.term for n in self.nodes.values() if n.alive]
        self.token_floor = min(self.token_floor, max(remembered))


_FAILED = object()
