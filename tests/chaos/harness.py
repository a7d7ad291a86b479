"""The chaos run: a real Redis, node processes behind fault proxies, a seeded schedule.

:func:`run_chaos` starts a private Redis (append-only file, fsync on every write, so that a
restart keeps the events; see ``redis-wipe`` for the election's keys), one
:class:`~tests.chaos.proxy.FaultProxy` per node slot, and the node processes; then it publishes
events at a steady rate while it works through the schedule, one fault at a time:

1. inject the fault, keep it for its duration, end it;
2. wait until the group agrees on one leader again (the figures themselves are taken later,
   from the log);
3. for kill-*/term-*: restart the node and watch that its return does not unseat the leader;
4. stay quiet for the step's gap.

When the time is up, it waits for every acknowledged event to be delivered, stops the nodes
gracefully (each must hand over and exit cleanly), and checks the whole log
(:mod:`tests.chaos.checks`). Every process runs in a session of its own and is killed (its
whole group) in ``finally``, and also when this process dies (``PR_SET_PDEATHSIG``, the Redis
server included); every wait has a timeout, and a watchdog bounds the whole run. The
processes, the reports and the waits are :mod:`harness`'s, shared with the benchmarks.

``topology`` ``sentinel`` or ``cluster`` runs the same nodes, workload and checks on a
replicated Redis instead (:mod:`harness.topologies`: a primary, a replica and 3 sentinels; or
3 primaries with a replica each), which the nodes reach by its own URL (``redis+sentinel://``,
``redis+cluster://``), without proxies: Sentinel names the primary's real address, and a
cluster's slot map and MOVED replies the real nodes, so a proxy would see only part of the
traffic. Those runs inject their topology's failover and the faults done to node processes
(:data:`~tests.chaos.faults.TOPOLOGY_FAULTS`); see :meth:`Chaos._failover` for what is
measured and checked, and :mod:`tests.chaos.workload` for what counts as an acknowledged event
when replication is asynchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from redis.exceptions import RedisError

from fastapi_leader.testing import RedisServer
from fastapi_leader.transport.base import Names
from harness import processes
from harness.reports import parse
from harness.topologies import ClusterTopology, SentinelTopology, heal_link
from harness.waiting import Changes, until

from . import checks
from .checks import Record, View
from .faults import (
    KINDS,
    LAGGING_SECONDS,
    LOOP_STALL_LIMIT,
    TOPOLOGY_FAULTS,
    Step,
    check_faults,
    describe,
    schedule,
)
from .proxy import CONNECTION_KINDS, FaultProxy
from .workload import NODE_KINDS, NodeKind, NodeSpec, direct_client

PREFIX = "fastapi-leader"

# Starting a node process (imports: FastAPI, pydantic, redis, APScheduler) takes ~1 s here;
# a loaded 2-core box, several at once, far more.
JOIN_TIMEOUT = 60.0
# A graceful stop hands over in milliseconds; the app's lifespan may take a second or two.
STOP_TIMEOUT = 10.0
# After a fault, the harness waits this long for the group to agree before it gives up on the
# run (the figures and their bounds are checked afterwards, from the log).
SETTLE_TIMEOUT = 30.0
# Agreement must last this long before the harness moves on: a node may find out only now
# that a connection of its went silent during the fault.
SETTLE_STABLE = 1.0
# How long after a node rejoined the leader must not change: two of the largest election
# timeouts, so a joining node that stood at once would be seen.
JOIN_WATCH = 1.6
# At the end, acknowledged events have this long to be delivered.
DRAIN_TIMEOUT = 20.0
# The whole run may take this much longer than its duration before it is stopped: startup,
# a last step, the drain and the shutdown take well under a minute.
WATCHDOG_MARGIN = 300.0
# Lines of a node's stderr quoted with a traceback.
TRACEBACK_LINES = 12


@dataclass
class ChaosConfig:
    """One run. The defaults are the short (CI) run."""

    seed: int
    duration: float = 100.0
    """Seconds of faults; startup, the drain and the shutdown come on top (about 15 s)."""
    nodes: int = 3
    kind: str = "builtin"
    faults: Sequence[str] | None = None
    """The fault kinds to mix; by default every one the topology can run."""
    topology: str = "standalone"
    """``standalone`` (one server behind fault proxies), ``sentinel`` or ``cluster``."""
    steps: int | None = None
    """Stop after this many faults (even if time is left)."""
    sabotage: str | None = None
    """Run every node with ``CHAOS_SABOTAGE`` set to this (builtin nodes only)."""
    leader_bound: float = 5.0
    """After a fault ends, one leader within this (s). The protocol's own figure is the
    largest election timeout plus a round (~0.9 s); a node must also notice a dead connection
    (up to ~1.75 s) and resubscribe (backoff up to ~1.5 s)."""
    agree_bound: float = 6.0
    """After a fault ends, every running node names that leader within this (s)."""
    event_rate: float = 20.0
    log_dir: Path | None = None
    """Where node logs go; by default a temporary directory, removed after a clean run."""

    @property
    def kinds(self) -> tuple[str, ...]:
        """The fault kinds of this run (``faults``, or the topology's default)."""
        if self.faults is None:
            return TOPOLOGY_FAULTS.get(self.topology, KINDS)
        return tuple(self.faults)

    def replay(self) -> str:
        """The command that replays this run: every option that shapes the schedule or the
        nodes, where it differs from the command line's default."""
        command = f"python -m tests.chaos --seed {self.seed} --duration {self.duration:g}"
        if self.topology != ChaosConfig.topology:
            command += f" --topology {self.topology}"
        if self.kind != ChaosConfig.kind:
            command += f" --kind {self.kind}"
        if self.nodes != ChaosConfig.nodes:
            command += f" --nodes {self.nodes}"
        if self.kinds != TOPOLOGY_FAULTS.get(self.topology, KINDS):
            command += f" --faults {','.join(self.kinds)}"
        if self.steps is not None:
            command += f" --steps {self.steps}"
        if self.sabotage:
            command += f" --sabotage {self.sabotage}"
        return command

    out: TextIO = field(default_factory=lambda: sys.stdout)


@dataclass
class StepResult:
    step: Step
    target: str | None
    started: float
    ended: float
    restarted: float | None = None
    """kill-*/term-*: when the node was started again (the fault's recovery is measured up to
    then; its return is measured on its own)."""
    join_window: tuple[float, float] | None = None
    recovery: checks.Recovery | None = None
    failover: float | None = None
    """For faults on the leader: how long after the fault began another node was elected."""
    rejoin: checks.Recovery | None = None
    """kill-*/term-*: from the restarted node's ``joined`` report, how long until it (and
    everyone) named the leader."""
    led: bool = False
    """loop-stall*: the stalled node was the leader when the stall began."""
    promoted: float | None = None
    """*-failover: when the new primary answered as one (``started`` is the kill)."""
    restore_window: tuple[float, float] | None = None
    """*-failover: from the old primary's restart to a moment after the topology was whole
    again; no leadership may change in it."""
    token_before: int | None = None
    """*-failover: the leader's fencing token when its primary was killed."""
    first_elected: Record | None = None
    """*-failover: the first ``elected`` report after the kill."""
    cut_at: float | None = None
    """*-failover ``lagging``: when the replica's link was down (writes since are surely lost
    in the failover)."""


@dataclass
class ChaosResult:
    config: ChaosConfig
    steps: list[StepResult]
    records: list[Record]
    violations: list[str]
    summary: dict[str, Any]
    log_dir: Path

    @property
    def ok(self) -> bool:
        return not self.violations


def _open_log(path: Path) -> BinaryIO:
    """A node's stderr file (the child keeps its own descriptor)."""
    return open(path, "wb")


_LAUNCHER = """
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def _dying_with_us(directory: Path) -> str:
    """A launcher for the Redis server binary that makes the kernel kill the server when the
    thread that started it dies (the harness's worker thread: it lives as long as the
    harness). The server keeps the launcher's pid, so signals reach it as before."""
    launcher = directory / "redis-server"
    launcher.write_text(f"#!{sys.executable}\n" + _LAUNCHER.format(real=RedisServer().binary))
    launcher.chmod(0o755)
    return str(launcher)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NodeProcess:
    """One node slot: a fixed id, proxy and port; a new process (a new life) per start."""

    def __init__(self, harness: Chaos, index: int, proxy: FaultProxy | None, url: str) -> None:
        self.harness = harness
        self.name = f"n{index}"
        self.proxy = proxy
        """The node's fault proxy (standalone runs); None: the node reaches Redis at ``url``."""
        self.spec = NodeSpec(self.name, url, _free_port())
        self.life = 0
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.expected_exit = ""  # "kill" / "term": the harness asked for it
        self.paused = False
        self.stderr_paths: list[Path] = []

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self) -> None:
        harness = self.harness
        kind = harness.kind
        assert kind is not None
        self.life += 1
        self.expected_exit = ""
        self.paused = False
        stderr_path = harness.log_dir / f"{self.name}.{self.life}.stderr"
        self.stderr_paths.append(stderr_path)
        env = processes.clean_env(
            LEADER_REDIS_URL=self.spec.redis_url,
            LEADER_GROUP=harness.group,
            LEADER_CHANNEL_PREFIX=PREFIX,
            LEADER_NODE_ID=self.name,
            LEADER_LOOP_STALL_LIMIT=str(LOOP_STALL_LIMIT),
            **kind.env(self.spec),
        )
        if harness.config.sabotage:
            env["CHAOS_SABOTAGE"] = harness.config.sabotage
            # The long-lease sabotage cuts the key's TTL on a connection no fault touches.
            assert harness.redis is not None
            env["CHAOS_DIRECT_REDIS_URL"] = harness.redis.url
        with _open_log(stderr_path) as stderr:
            self.process = await processes.spawn(
                kind.command(self.spec),
                env=env,
                cwd=harness.log_dir,  # no .env file there
                stderr=stderr,
            )
        harness.live_groups.add(self.process.pid)
        harness.record(self.name, self.life, "spawn", pid=self.process.pid)
        self.reader = asyncio.create_task(self._read(self.process, self.life))

    async def _read(self, process: asyncio.subprocess.Process, life: int) -> None:
        harness = self.harness
        assert process.stdout is not None
        try:
            async for line in process.stdout:
                report = parse(line)
                if report is None:
                    harness.violation(f"{self.name}: unparsable output line {line[:200]!r}")
                    continue
                harness.add(Record(report.t, self.name, life, report.ev, report.data))
        finally:
            code = await process.wait()
            processes.forget(process.pid)
            harness.live_groups.discard(process.pid)
            if life == self.life:
                expected = self.expected_exit
                if not expected:
                    harness.crashes += 1
                    harness.violation(
                        f"{self.name} (life {life}) exited on its own with code {code}"
                    )
                elif expected == "term" and not self.stopped_gracefully(life, code):
                    harness.violation(
                        f"{self.name} (life {life}) exited with code {code} after SIGTERM, "
                        "without a graceful stop"
                    )
            harness.record(self.name, life, "exit", code=code)

    def stopped_gracefully(self, life: int, code: int) -> bool:
        """Exit 0; or killed by the SIGTERM it handled (uvicorn re-raises it once it has shut
        down), after reporting that it left."""
        if code == 0:
            return True
        left = any(
            r.node == self.name and r.life == life and r.ev == "left" for r in self.harness.records
        )
        return code == -signal.SIGTERM and left

    def signal(self, signum: signal.Signals) -> float:
        """Send ``signum`` to the node process and log it; return when it was sent."""
        assert self.process is not None
        what = {
            signal.SIGKILL: "kill",
            signal.SIGTERM: "term",
            signal.SIGSTOP: "stop",
            signal.SIGCONT: "cont",
        }[signum]
        if what in ("kill", "term"):
            self.expected_exit = what
        # Logged before it is sent: the log never shows a report from a process "after" it
        # was killed that it in fact wrote before.
        sent_at = time.monotonic()
        self.harness.record(self.name, self.life, what, t=sent_at)
        processes.send(self.process.pid, signum)
        self.paused = signum == signal.SIGSTOP
        return sent_at

    async def command(self, line: str) -> None:
        """One command to the node (see :mod:`tests.chaos.steering`)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def wait_exit(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except asyncio.TimeoutError:
            return None

    def kill_group(self) -> None:
        """SIGCONT and SIGKILL the process group (cleanup; not a fault)."""
        if self.process is None or self.process.returncode is not None:
            return
        if not self.expected_exit:
            self.expected_exit = "kill"
        processes.kill_group(self.process.pid)


class Chaos:
    """One run; see :func:`run_chaos`."""

    def __init__(self, config: ChaosConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.group = f"chaos-{config.seed}-{uuid.uuid4().hex[:6]}"
        self.names = Names(PREFIX, self.group, "harness")
        self.records: list[Record] = []
        self.view = View()
        self.violations: list[str] = []
        self.live_groups: set[int] = set()
        """The node processes of this run not reaped yet (earlier lives included)."""
        self.nodes: list[NodeProcess] = []
        self.proxies: list[FaultProxy] = []
        self.redis: RedisServer | None = None
        self.topology: SentinelTopology | ClusterTopology | None = None
        self.kind: NodeKind | None = None
        self.acknowledged: list[str] = []
        self.delivered: set[str] = set()
        self.publishes: list[tuple[float, float, str]] = []
        """(began, ended, outcome) of every publish: ``acked``, ``failed``, ``primary-only``."""
        self.publish_failures = 0
        self.publishing = True
        self.crashes = 0
        self.steps: list[StepResult] = []
        self.stalls: list[tuple[str, float, float]] = []
        """loop-stall*: (node, stall began, stall ended), by the node's own reports."""
        self.started = time.monotonic()
        self._changed = Changes()
        self._rng = random.Random(config.seed)

    # ---- the log ---------------------------------------------------------------------------

    def add(self, record: Record) -> None:
        self.records.append(record)
        self.view.apply(record)
        self._changed.pulse()

    def record(self, node: str, life: int, ev: str, t: float | None = None, **data: Any) -> None:
        self.add(Record(time.monotonic() if t is None else t, node, life, ev, data))

    def violation(self, text: str) -> None:
        self.violations.append(text)
        self.say(f"VIOLATION: {text}")

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.2f}s] {text}", file=self.config.out, flush=True)

    async def wait_for(self, probe: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``probe()`` is truthy (re-checked on each record, and every 50 ms);
        return its value, or None after ``timeout``."""
        return await until(probe, timeout, self._changed)

    # ---- the group -------------------------------------------------------------------------

    def node(self, name: str) -> NodeProcess:
        return next(n for n in self.nodes if n.name == name)

    def leader(self) -> NodeProcess | None:
        name = self.view.agreed()
        return None if name is None else self.node(name)

    def followers(self, leader: NodeProcess) -> list[NodeProcess]:
        return [n for n in self.nodes if n is not leader and n.running]

    async def joined(self, node: NodeProcess) -> bool:
        life = node.life

        def done() -> bool:
            state = self.view.nodes.get(node.name)
            return bool(state and state.joined) or not node.running or node.life != life

        await self.wait_for(done, JOIN_TIMEOUT)
        state = self.view.nodes.get(node.name)
        if not (state and state.joined):
            self.violation(f"{node.name} (life {life}) did not join within {JOIN_TIMEOUT:.0f} s")
            return False
        return True

    async def settle(self, why: str) -> bool:
        """Wait until every running node has named one leader for SETTLE_STABLE seconds on
        end; a violation after SETTLE_TIMEOUT."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            leader = await self.wait_for(self.view.agreed, remaining)
            if leader is None:
                break
            agreed_since = time.monotonic()

            def changed(leader: str = leader) -> bool:
                return self.view.agreed() != leader

            if not await self.wait_for(changed, SETTLE_STABLE):
                return True
            if time.monotonic() - agreed_since >= SETTLE_STABLE:
                return True
        states = {
            name: (s.alive, s.joined, s.paused, s.leading, s.known)
            for name, s in self.view.nodes.items()
        }
        self.violation(f"no agreed leader {SETTLE_TIMEOUT:.0f} s after {why}: {states}")
        return False

    # ---- events ----------------------------------------------------------------------------

    async def publish_forever(self) -> None:
        seq = 0
        interval = 1.0 / self.config.event_rate
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while self.publishing:
            seq += 1
            live = [n.spec for n in self.nodes if n.running and not n.paused]
            assert self.kind is not None
            began = time.monotonic()
            event_id = await self.kind.publish(seq, live)
            if event_id is None:
                self.publish_failures += 1
                outcome = (
                    "primary-only"
                    if f"e{seq}" in self.kind.primary_only
                    else f"failed: {self.kind.last_error}"
                )
            else:
                self.acknowledged.append(event_id)
                outcome = "acked"
            self.publishes.append((began, time.monotonic(), outcome))
            next_at = max(next_at + interval, loop.time())
            await asyncio.sleep(next_at - loop.time())

    async def stop_publishing(self, publisher: asyncio.Task[None]) -> None:
        """Stop the publisher: by its flag, and by cancelling it (again and again: before
        Python 3.12 a cancellation that lands as a timeout expires inside redis-py can be
        turned into a timeout error, which the publisher counts as a failed publish). A
        publisher that died before is a violation: the events would prove nothing."""
        if publisher.done() and self.publishing:
            error = None if publisher.cancelled() else publisher.exception()
            if error is not None:
                self.violation(f"the publisher died: {error!r}")
        self.publishing = False
        for _ in range(50):
            if publisher.done():
                break
            publisher.cancel()
            await asyncio.wait([publisher], timeout=0.1)
        if not publisher.done():
            self.violation("the publisher did not stop")

    async def drain(self) -> list[str]:
        """Wait until every acknowledged event has been delivered (or DRAIN_TIMEOUT)."""
        wanted = set(self.acknowledged)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        delivered: list[str] = []
        while True:
            assert self.kind is not None
            try:
                delivered = await asyncio.wait_for(self.kind.deliveries(), 5.0)
            except Exception as exc:
                self.say(f"reading deliveries failed: {exc!r}")
            if wanted <= set(delivered) or time.monotonic() > deadline:
                return delivered
            await asyncio.sleep(0.25)

    async def admin(self, *command: Any) -> Any:
        """One command straight to Redis, on a fresh connection (the server may have just
        restarted), tried a few times."""
        assert self.redis is not None
        for attempt in range(5):
            client = direct_client(self.redis.url)
            try:
                return await client.execute_command(*command)  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1)
            finally:
                await client.aclose()
        raise AssertionError("unreachable")

    # ---- faults ----------------------------------------------------------------------------

    async def run_step(self, step: Step) -> StepResult:
        kind = step.kind
        leader = self.leader()
        assert leader is not None, "steps start from an agreed leader"
        followers = sorted(self.followers(leader), key=lambda n: n.name)
        target: NodeProcess | None = None
        if step.target == "leader" or (step.target == "follower" and not followers):
            target = leader
        elif step.target == "follower":
            target = followers[step.pick % len(followers)]
        role = (
            ""
            if target is None
            else f" -> {target.name} ({'leader' if target is leader else 'follower'})"
        )
        self.say(f"step {step.index}: {describe(step)}{role}")
        started = time.monotonic()
        result = StepResult(step, None if target is None else target.name, started, started)

        if kind.startswith(("kill-", "term-")):
            assert target is not None
            if kind.startswith("kill-"):
                result.ended = target.signal(signal.SIGKILL)
                await target.wait_exit(STOP_TIMEOUT)
            else:
                result.ended = target.signal(signal.SIGTERM)
                if await target.wait_exit(STOP_TIMEOUT) is None:
                    self.violation(f"{target.name} did not exit {STOP_TIMEOUT:.0f} s after SIGTERM")
                    target.kill_group()
                    await target.wait_exit(STOP_TIMEOUT)
            await self.settle(f"step {step.index}")
            await asyncio.sleep(step.duration)
            result.restarted = time.monotonic()
            await target.spawn()
            if await self.joined(target):
                await asyncio.sleep(JOIN_WATCH)
                result.join_window = (result.restarted, time.monotonic())
        elif kind.startswith("loop-stall"):
            assert target is not None
            result.led = target is leader
            result.ended = await self._stall_loop(target, step)
        elif kind == "stop-leader":
            assert target is not None
            target.signal(signal.SIGSTOP)
            await asyncio.sleep(step.duration)
            result.ended = target.signal(signal.SIGCONT)
        elif kind in ("sentinel-failover", "cluster-failover"):
            await self._failover(step, result, leader)
        elif kind in ("redis-restart", "redis-wipe"):
            result.ended = await self._restart_redis(step)
        elif kind == "redis-sigstop":
            assert self.redis is not None
            self.redis.pause()
            await asyncio.sleep(step.duration)
            self.redis.resume()
            result.ended = time.monotonic()
        elif kind == "redis-client-pause":
            assert self.redis is not None
            await self.admin("CLIENT", "PAUSE", int(step.duration * 1000), "ALL")
            await asyncio.sleep(step.duration)
            result.ended = started + step.duration
        else:
            assert target is not None
            proxy = target.proxy
            assert proxy is not None, f"{kind} needs the standalone topology's proxies"
            if kind == "net-cut":
                proxy.cut(CONNECTION_KINDS, step.mode)
            elif kind == "net-cut-subscriber":
                proxy.cut({"subscriber"}, step.mode)
            elif kind == "net-cut-command":
                proxy.cut({"command"}, step.mode)
            elif kind == "net-latency":
                proxy.delay(step.latency, step.jitter, random.Random(self._rng.random()))
            elif kind == "net-half-open":
                proxy.half_open()
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
            await asyncio.sleep(step.duration)
            proxy.heal()
            result.ended = time.monotonic()

        await self.settle(f"step {step.index}")
        self.steps.append(result)
        return result

    async def _stall_loop(self, target: NodeProcess, step: Step) -> float:
        """Block ``target``'s app loop for the step's duration; return when it ended (its own
        ``unstalled`` report; the harness's clock if it never came)."""
        life, mark = target.life, len(self.records)
        await target.command(f"stall {step.duration:g} {step.mode}")

        def reported(ev: str) -> Record | None:
            return next(
                (
                    r
                    for r in self.records[mark:]
                    if r.ev == ev and r.node == target.name and r.life == life
                ),
                None,
            )

        ended = await self.wait_for(lambda: reported("unstalled"), step.duration + STOP_TIMEOUT)
        if ended is None:
            self.violation(f"{target.name} did not report the end of its stall")
            return time.monotonic()
        began = reported("stalling")
        if began is not None:
            self.stalls.append((target.name, began.t, ended.t))
        return float(ended.t)

    async def _failover(self, step: Step, result: StepResult, leader: NodeProcess) -> None:
        """sentinel-failover / cluster-failover: SIGKILL the primary (of the group's slot),
        wait until its replica answers as the primary, wait ``step.duration``, then restart
        the killed server as the new primary's replica and wait until the topology is whole
        (a next failover needs a replica to promote).

        The fault "ends" (``ended``, from which the recovery bounds count) when the new
        primary answers: before that nobody can write, so nobody can lead. The restore is
        watched like a node's return: no leadership may change while the replica comes back
        and syncs. Recorded for the figures: the kill, the promotion, the first election after
        the kill and the tokens before and after.

        ``lagging`` (the step's mode) first cuts replication for
        :data:`~tests.chaos.faults.LAGGING_SECONDS` while the group keeps writing, and has
        the leader resign in it, so that the failover surely loses writes, as an asynchronous
        failover may, and among them a whole leadership: its term (the counter's INCR), its
        key, its fence claims and its deliveries; ``prompt`` kills the primary of a replica
        that is up to date (on loopback it lags by well under a millisecond).

        What cannot hold across an asynchronous failover, and is therefore not counted: an
        event that the killed primary had acknowledged and not yet passed to its replica is
        gone from the new primary (Redis lost it, no fence can bring it back: the library's
        documented limit); so the harness acknowledges an event only once ``WAIT`` says the
        replica has it, and counts the others apart (``primary_only``: a lagging failover
        loses some of them, see :mod:`tests.chaos.workload`). Everything else is checked as
        on one server, and holds: the leader's lease (0.4 s) ends before a replica can be
        promoted (failure detection alone takes 1 s), so no two leases overlap; the term
        counter that the lost leadership set back is raised again by the next candidate's
        floor (the highest term it heard), so tokens only grow; and the mover's deliveries are lost
        only together with the checkpoint that covers them (each fenced script is one atomic
        write, replicated whole or not at all), so the next leader redelivers exactly those.
        """
        topology = self.topology
        assert topology is not None
        key = self.names.leader_key
        if step.mode == "lagging":
            if isinstance(topology, SentinelTopology):
                await asyncio.to_thread(topology.cut_replication)
            else:
                await asyncio.to_thread(topology.cut_replication_of, key)
            # The replica's link is down from here: a write the primary takes from now on is
            # surely lost in the failover. (One taken during the cut may have reached the
            # replica with its acknowledgement lost: WAIT said 0, the replica has it.)
            cut_at = result.cut_at = time.monotonic()
            self.say(f"  replication cut for {LAGGING_SECONDS:g} s before the kill")
            # A new leadership that only the doomed primary will have known: its term, its
            # key, its fence claims and deliveries are all lost in the failover.
            await leader.command("resign")

            def successor() -> NodeProcess | None:
                agreed = self.leader()
                return agreed if agreed is not None and agreed is not leader else None

            if await self.wait_for(successor, SETTLE_TIMEOUT) is None:
                self.violation(f"step {step.index}: {leader.name} resigned, nobody took over")
            leader = self.leader() or leader
            self.say(f"  {leader.name} leads (token {self.view_token(leader)}) on the cut primary")
            await asyncio.sleep(max(0.0, cut_at + LAGGING_SECONDS - time.monotonic()))
        result.token_before = self.view_token(leader)
        result.started = time.monotonic()
        if isinstance(topology, SentinelTopology):
            victim = await asyncio.to_thread(topology.kill_primary)
            self.say(f"  primary :{victim.port} killed")
            new = await asyncio.to_thread(topology.wait_for_failover)
        else:
            victim = await asyncio.to_thread(topology.kill_primary_of, key)
            self.say(f"  primary :{victim.port} of the group's slot killed")
            new = await asyncio.to_thread(topology.wait_for_new_primary_of, key, victim)
        result.promoted = result.ended = time.monotonic()
        self.say(f"  :{new.port} promoted after {result.promoted - result.started:.2f} s")
        await self.settle(f"step {step.index}")
        await asyncio.sleep(step.duration)
        restart = time.monotonic()
        await asyncio.to_thread(heal_link, new)
        if isinstance(topology, SentinelTopology):
            await asyncio.to_thread(topology.restore, victim)
        else:
            await asyncio.to_thread(topology.restore, victim, new)
        self.say(f"  :{victim.port} back as a replica after {time.monotonic() - restart:.2f} s")
        result.restarted = restart
        await asyncio.sleep(JOIN_WATCH)
        result.restore_window = (restart, time.monotonic())

    def view_token(self, node: NodeProcess) -> int | None:
        """The fencing token of ``node``'s current leadership, by its last ``elected``."""
        for record in reversed(self.records):
            if record.node == node.name and record.life == node.life and record.ev == "elected":
                token = record.data.get("token")
                return None if token is None else int(token)
        return None

    async def _restart_redis(self, step: Step) -> float:
        redis = self.redis
        assert redis is not None
        wipe = step.kind == "redis-wipe"
        if wipe:
            # Keep the nodes away until the keys are gone: as if Redis came back without them.
            for proxy in self.proxies:
                proxy.refuse_all()
        if step.mode == "kill" and redis.is_running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(redis.pid, signal.SIGKILL)
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(step.duration)
        await asyncio.to_thread(redis.start)
        if wipe:
            await self.admin("DEL", self.names.leader_key, self.names.term_key)
            for proxy in self.proxies:
                proxy.heal()
        return time.monotonic()

    # ---- the run ---------------------------------------------------------------------------

    async def run(self) -> ChaosResult:
        config = self.config
        self.say(
            f"chaos: seed {config.seed}, {config.duration:.0f} s of faults, {config.nodes} "
            f"{config.kind} nodes, group {self.group}; logs in {self.log_dir}"
        )
        self.say(f"replay: {config.replay()}")
        publisher: asyncio.Task[None] | None = None
        observed_until = time.monotonic()
        delivered: list[str] = []
        try:
            if config.topology == "standalone":
                await self._start_standalone()
            else:
                await self._start_topology()
            await asyncio.gather(*(node.spawn() for node in self.nodes))
            joined = await asyncio.gather(*(self.joined(node) for node in self.nodes))
            if all(joined) and await self.settle("startup"):
                publisher = asyncio.create_task(self.publish_forever())
                self.say(f"leader {self.view.agreed()}; faults begin")
                deadline = time.monotonic() + config.duration
                for step in schedule(config.seed, config.kinds):
                    if time.monotonic() >= deadline:
                        break
                    if config.steps is not None and len(self.steps) >= config.steps:
                        break
                    if self.view.agreed() is None and not await self.settle(
                        f"step {step.index - 1}"
                    ):
                        break
                    await self.run_step(step)
                    await asyncio.sleep(step.gap)
                observed_until = time.monotonic()
                await self.stop_publishing(publisher)
                self.say(f"faults over after {len(self.steps)} steps; draining events")
                delivered = await self.drain()
            else:
                observed_until = time.monotonic()
        finally:
            if publisher is not None:
                await self.stop_publishing(publisher)
            await self.shutdown()
        return self.finish(observed_until, delivered)

    async def _start_standalone(self) -> None:
        data_dir = self.log_dir / "redis-data"
        data_dir.mkdir(exist_ok=True)
        self.redis = RedisServer(
            binary=_dying_with_us(self.log_dir),
            extra_args=["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)],
        )
        await asyncio.to_thread(self.redis.start)
        self.kind = NODE_KINDS[self.config.kind](self.redis.url, PREFIX, self.group)
        for index in range(1, self.config.nodes + 1):
            proxy = await FaultProxy(self.redis.port).start()
            self.proxies.append(proxy)
            self.nodes.append(NodeProcess(self, index, proxy, proxy.url))

    async def _start_topology(self) -> None:
        # Every server and sentinel dies with the harness, as the standalone server does.
        binary = _dying_with_us(self.log_dir)
        topology: SentinelTopology | ClusterTopology = (
            SentinelTopology(binary=binary)
            if self.config.topology == "sentinel"
            else ClusterTopology(binary=binary)
        )
        began = time.monotonic()
        # Assigned first: shutdown() stops whatever a setup that fails half-way started.
        self.topology = topology
        await asyncio.to_thread(topology.__enter__)
        self.say(f"{self.config.topology} topology up in {time.monotonic() - began:.1f} s")
        self.kind = NODE_KINDS[self.config.kind](topology.url, PREFIX, self.group)
        for index in range(1, self.config.nodes + 1):
            self.nodes.append(NodeProcess(self, index, None, topology.url))

    async def shutdown(self) -> None:
        """Stop every node gracefully (SIGTERM; each must exit 0), then everything else."""
        try:
            running = [n for n in self.nodes if n.running]
            for node in running:
                if node.paused:
                    node.signal(signal.SIGCONT)
                node.signal(signal.SIGTERM)
            for node in running:
                if await node.wait_exit(STOP_TIMEOUT) is None:
                    self.violation(f"{node.name} did not exit {STOP_TIMEOUT:.0f} s after SIGTERM")
            readers = [n.reader for n in self.nodes if n.reader is not None]
            if readers:
                await asyncio.wait(readers, timeout=5.0)
        finally:
            for node in self.nodes:
                node.kill_group()
            for pgid in list(self.live_groups):
                processes.kill_group(pgid)
            for node in self.nodes:
                await node.wait_exit(5.0)
                if node.reader is not None and not node.reader.done():
                    node.reader.cancel()
            for proxy in self.proxies:
                await proxy.close()
            if self.kind is not None:
                with contextlib.suppress(Exception):
                    await self.kind.close()
            if self.redis is not None:
                if self.redis.is_running:
                    with contextlib.suppress(Exception):
                        self.redis.resume()
                await asyncio.to_thread(self.redis.stop)
            if self.topology is not None:
                await asyncio.to_thread(self.topology.__exit__, None, None, None)

    # ---- verdict ---------------------------------------------------------------------------

    def finish(self, observed_until: float, delivered: list[str]) -> ChaosResult:
        config = self.config
        records = sorted(self.records, key=lambda r: r.t)
        violations = self.violations

        for problem in checks.check_terms(records, observed_until):
            violations.append(problem)
        duals = checks.dual_leases(records, observed_until)
        unexcused = [d for d in duals if d.unexcused > 1e-6]
        for dual in unexcused:
            violations.append(
                f"two valid leases for {dual.unexcused * 1000:.1f} ms from {dual.start:.3f}: "
                f"{dual.first.node} (term {dual.first.term}, {dual.first.how_ended}) and "
                f"{dual.second.node} (term {dual.second.term})"
            )
        starts = [result.started for result in self.steps[1:]] + [observed_until]
        for result, next_start in zip(self.steps, starts, strict=True):
            violations += self.evaluate(result, records, next_start)
        violations += self.tracebacks()
        events = checks.count_events(self.acknowledged, delivered)
        primary_only = set(self.kind.primary_only) if self.kind is not None else set()
        events["primary_only"] = len(primary_only)
        events["primary_only_lost"] = len(primary_only - set(delivered))
        self.delivered = set(delivered)
        if events["lost"]:
            missing = sorted(set(self.acknowledged) - set(delivered))[:10]
            violations.append(f"{events['lost']} events lost, e.g. {missing}")
        if events["duplicated"]:
            twice = [i for i, n in Counter(delivered).items() if n > 1][:10]
            violations.append(f"{events['duplicated']} duplicate deliveries, e.g. {twice}")
        if not self.steps:
            violations.append("no fault was injected (the group never agreed on a leader?)")
        elif not events["published"]:
            violations.append("no event was acknowledged: the workload checked nothing")

        summary = self.summarize(records, observed_until, duals, events)
        self.save(records)
        verdict = ChaosResult(config, self.steps, records, violations, summary, self.log_dir)
        print(format_summary(verdict), file=config.out, flush=True)
        return verdict

    def evaluate(self, result: StepResult, records: list[Record], next_start: float) -> list[str]:
        """Figures of one step, and the violations among them."""
        config = self.config
        problems = []
        what = f"step {result.step.index} ({result.step.kind})"
        until = next_start if result.restarted is None else result.restarted
        rec = result.recovery = checks.recovery(records, result.ended, until)
        if rec.leader_after is None or rec.leader_after > config.leader_bound:
            problems.append(
                f"{what}: no single leader within {config.leader_bound} s of the fault's end "
                f"(took {_seconds(rec.leader_after)})"
            )
        if rec.agreed_after is None or rec.agreed_after > config.agree_bound:
            problems.append(
                f"{what}: the nodes did not agree on a leader within {config.agree_bound} s "
                f"of the fault's end (took {_seconds(rec.agreed_after)})"
            )
        if result.target is not None and result.step.target == "leader":
            result.failover = next(
                (
                    r.t - result.started
                    for r in records
                    if r.ev == "elected"
                    and r.node != result.target
                    and r.t >= result.started
                    and r.t <= until
                ),
                None,
            )
        if result.step.kind.startswith("loop-stall") and result.target is not None:
            stall = next(
                (
                    (began, ended)
                    for node, began, ended in self.stalls
                    if node == result.target and result.started <= began <= result.ended
                ),
                None,
            )
            if stall is not None:
                problems += [
                    f"{what}: {problem}"
                    for problem in checks.loop_stall(
                        records, result.target, result.led, *stall, next_start, LOOP_STALL_LIMIT
                    )
                ]
        if result.restore_window is not None:
            start, end = result.restore_window
            for record in checks.disruptions(records, start, end):
                problems.append(
                    f"{what}: the old primary came back as a replica and the leadership "
                    f"changed: {record.node} elected (term {record.data.get('token')}) at "
                    f"{record.t:.3f}"
                )
        if result.promoted is not None:
            result.first_elected = next(
                (r for r in records if r.ev == "elected" and result.started <= r.t <= until),
                None,
            )
        if result.join_window is not None:
            start, end = result.join_window
            joined = next(
                (
                    r.t
                    for r in records
                    if r.ev == "joined" and r.node == result.target and start <= r.t <= end
                ),
                None,
            )
            if joined is not None:
                result.rejoin = checks.recovery(records, joined, next_start)
                took = result.rejoin.agreed_after
                if took is None or took > config.agree_bound:
                    problems.append(
                        f"{what}: {result.target} rejoined and the nodes did not agree on a "
                        f"leader within {config.agree_bound} s (took {_seconds(took)})"
                    )
            for record in checks.disruptions(records, start, end):
                problems.append(
                    f"{what}: {result.target} rejoined and the leadership changed: "
                    f"{record.node} elected (term {record.data.get('token')}) at {record.t:.3f}"
                )
        return problems

    def count_log_lines(self, markers: Sequence[str]) -> int:
        count = 0
        for node in self.nodes:
            for path in node.stderr_paths:
                with contextlib.suppress(OSError):
                    for line in path.read_text(errors="replace").splitlines():
                        count += any(marker in line for marker in markers)
        return count

    def tracebacks(self) -> list[str]:
        return find_tracebacks(path for node in self.nodes for path in node.stderr_paths)

    def summarize(
        self,
        records: list[Record],
        observed_until: float,
        duals: list[checks.DualLease],
        events: dict[str, int],
    ) -> dict[str, Any]:
        by_kind: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"count": 0, "leader_max": 0.0, "agreed_max": 0.0, "failover_max": None}
        )
        for result in self.steps:
            row = by_kind[result.step.kind]
            row["count"] += 1
            rec = result.recovery
            if rec is not None:
                row["leader_max"] = max(row["leader_max"], rec.leader_after or 0.0)
                row["agreed_max"] = max(row["agreed_max"], rec.agreed_after or 0.0)
            if result.rejoin is not None:
                row["agreed_max"] = max(row["agreed_max"], result.rejoin.agreed_after or 0.0)
            if result.failover is not None:
                row["failover_max"] = max(row["failover_max"] or 0.0, result.failover)
        held = checks.leaderships(records, observed_until)
        first_start = held[0].start if held else observed_until
        gaps = checks.leaderless_windows(records, first_start, observed_until)
        longest = max(gaps, key=lambda gap: gap[1] - gap[0], default=(0.0, 0.0))
        changes = sum(1 for a, b in itertools.pairwise(held) if a.node != b.node)
        # From one leadership's end to the next one's start: the safety margin (< 0: overlap).
        margins = [b.start - a.end for a, b in itertools.pairwise(held)]
        crashes = self.crashes
        failovers = [
            {
                "step": r.step.index,
                "kind": r.step.kind,
                "primary_after": r.promoted - r.started,
                "leader_after": None if r.first_elected is None else r.first_elected.t - r.started,
                "leader": None if r.first_elected is None else r.first_elected.node,
                "token_before": r.token_before,
                **self._at_risk(r),
                "token_after": None
                if r.first_elected is None
                else r.first_elected.data.get("token"),
            }
            for r in self.steps
            if r.promoted is not None
        ]
        return {
            "seed": self.config.seed,
            "topology": self.config.topology,
            "failovers": failovers,
            "duration": observed_until - self.started,
            "faults": dict(sorted(by_kind.items())),
            "steps": len(self.steps),
            "leaderships": len(held),
            "leader_changes": changes,
            "longest_leaderless": longest[1] - longest[0],
            "longest_leaderless_at": self._step_at(longest[0]),
            "closest_handover_ms": None if not margins else min(margins) * 1000,
            "dual_lease_ms": sum(d.unexcused for d in duals) * 1000,
            "dual_lease_paused_ms": sum(d.paused for d in duals) * 1000,
            "events": events,
            "publish_failures": self.publish_failures,
            "crashes": crashes,
            "fence_refusals": self.count_log_lines(self.kind.fence_markers if self.kind else ()),
            "proxied": {
                "subscriber": sum(p.stats.by_kind.get("subscriber", 0) for p in self.proxies),
                "command": sum(p.stats.by_kind.get("command", 0) for p in self.proxies),
                "reset": sum(p.stats.reset for p in self.proxies),
                "silenced": sum(p.stats.frozen for p in self.proxies),
            },
        }

    def _at_risk(self, result: StepResult) -> dict[str, int | None]:
        """A lagging failover: the events the primary alone confirmed (WAIT timed out) that
        were published between the cut of replication and the kill, and how many of them
        were lost. (A publish still waiting at the kill failed: not among them.)"""
        if result.cut_at is None or self.kind is None:
            return {"at_risk": None, "at_risk_lost": None}
        assert result.cut_at is not None
        at_risk = {
            event
            for event, began in self.kind.primary_only.items()
            if result.cut_at <= began <= result.started
        }
        return {"at_risk": len(at_risk), "at_risk_lost": len(at_risk - self.delivered)}

    def _step_at(self, t: float) -> str:
        """The step during which ``t`` fell (from its start to the next one's)."""
        during = None
        for result in self.steps:
            if result.started <= t:
                during = result
        if during is None:
            return "before the first fault"
        return f"step {during.step.index}, {during.step.kind}"

    def save(self, records: list[Record]) -> None:
        """The whole log, one JSON object a line, for a look after the run; the publishes
        apart."""
        with open(self.log_dir / "publishes.jsonl", "w") as out:
            for began, ended, outcome in self.publishes:
                out.write(json.dumps({"began": began, "ended": ended, "outcome": outcome}) + "\n")
        with open(self.log_dir / "records.jsonl", "w") as out:
            for r in records:
                out.write(
                    json.dumps({"t": r.t, "node": r.node, "life": r.life, "ev": r.ev, **r.data})
                    + "\n"
                )
            for result in self.steps:
                out.write(
                    json.dumps(
                        {
                            "step": result.step.index,
                            "kind": result.step.kind,
                            "target": result.target,
                            "started": result.started,
                            "ended": result.ended,
                        }
                    )
                    + "\n"
                )


def find_tracebacks(paths: Iterable[Path]) -> list[str]:
    """One problem per file that holds a Python traceback, quoting its start."""
    found = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback (most recent call last)" not in text:
            continue
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if "Traceback (most recent" in line)
        excerpt = "\n    ".join(lines[max(0, first - 1) : first + TRACEBACK_LINES])
        found.append(f"traceback in {path.name}:\n    {excerpt}")
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def format_summary(result: ChaosResult) -> str:
    s = result.summary
    lines = [
        "",
        f"chaos summary: seed {s['seed']}, {s['steps']} faults in {s['duration']:.0f} s, "
        f"{result.config.nodes} {result.config.kind} nodes, {s['topology']} Redis",
        "",
        "  After each fault ends (max over its occurrences): one leader after, every node",
        "  naming it after; for faults on the leader, a new leader elected after (from the",
        "  fault's start).",
        "",
        f"  {'fault':<22}{'count':>6}{'one leader':>12}{'all agree':>12}{'new leader':>12}",
    ]
    for kind, row in s["faults"].items():
        failover = row["failover_max"]
        lines.append(
            f"  {kind:<22}{row['count']:>6}{row['leader_max']:>10.2f} s{row['agreed_max']:>10.2f} s"
            + ("           -" if failover is None else f"{failover:>10.2f} s")
        )
    if s["failovers"]:
        lines += [
            "",
            "  Failovers, from the primary's kill: the new primary answering, the first election,",
            "  and the tokens before and after; for a lagging one, the events published while",
            "  replication was cut (the primary alone confirmed them) and how many were lost.",
            "",
            f"  {'step':>6}  {'fault':<20}{'primary':>10}{'leader':>10}   token",
        ]
        for row in s["failovers"]:
            leader = "never" if row["leader_after"] is None else f"{row['leader_after']:.2f} s"
            lines.append(
                f"  {row['step']:>6}  {row['kind']:<20}{row['primary_after']:>8.2f} s"
                f"{leader:>10}   {row['token_before']} -> {row['token_after']}"
                + ("" if row["leader"] is None else f" ({row['leader']})")
                + (
                    ""
                    if row["at_risk"] is None
                    else f"   lagging: {row['at_risk']} published, {row['at_risk_lost']} lost"
                )
            )
    ev, px = s["events"], s["proxied"]
    lines += [
        "",
        f"  leaderships                {s['leaderships']} ({s['leader_changes']} leader changes)",
        f"  longest leaderless window  {s['longest_leaderless']:.2f} s "
        f"({s['longest_leaderless_at']})",
        f"  closest handover           {_ms(s['closest_handover_ms'])} from one lease's end to "
        "the next one's start",
        f"  dual-lease                 {s['dual_lease_ms']:.1f} ms outside pauses "
        f"({s['dual_lease_paused_ms']:.1f} ms while the old holder was stopped)",
        f"  events                     {ev['published']} acknowledged, {ev['lost']} lost, "
        f"{ev['duplicated']} duplicated",
        f"                             ({s['publish_failures']} publishes failed, "
        f"{ev['unacknowledged_delivered']} of them delivered all the same)",
        *(
            [
                f"                             ({ev['primary_only']} confirmed by the primary "
                f"alone, not by WAIT; {ev['primary_only_lost']} of them lost)"
            ]
            if s["topology"] != "standalone"
            else []
        ),
        f"  fenced off                 {s['fence_refusals']} writes of stale leaderships",
        f"  node crashes               {s['crashes']}",
        *(
            [
                f"  proxied connections        {px['subscriber']} subscriber, "
                f"{px['command']} command; {px['reset']} reset, {px['silenced']} made silent"
            ]
            if s["topology"] == "standalone"
            else []  # no proxies there
        ),
        f"  violations                 {len(result.violations)}",
    ]
    for violation in result.violations:
        lines.append(f"    - {violation}")
    verdict = "PASS" if result.ok else "FAIL"
    lines += ["", f"chaos {verdict} (seed {s['seed']}; logs: {result.log_dir})", ""]
    return "\n".join(lines)


async def run_chaos(config: ChaosConfig) -> ChaosResult:
    """Run the schedule of ``config.seed`` and return the verdict (printed as well)."""
    if config.kind not in NODE_KINDS:
        raise ValueError(f"unknown node kind {config.kind!r}; known: {', '.join(NODE_KINDS)}")
    if config.sabotage and config.kind != "builtin":
        raise ValueError("sabotage needs the builtin nodes (--kind builtin)")
    check_faults(config.kinds, config.topology)
    if config.topology != "standalone" and config.kind != "builtin":
        raise ValueError(f"the {config.topology} topology runs the builtin nodes only")
    if config.sabotage and config.topology != "standalone":
        # long-lease cuts the key's TTL on a plain connection to the one server.
        raise ValueError("sabotage runs on the standalone topology only")
    own_dir = config.log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix="chaos-")) if config.log_dir is None else config.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(config, log_dir)
    # Every wait in the run is bounded; this bounds their sum, whatever goes wrong.
    limit = config.duration + WATCHDOG_MARGIN
    try:
        result = await asyncio.wait_for(chaos.run(), limit)
    except asyncio.TimeoutError:
        raise RuntimeError(
            f"chaos run (seed {config.seed}) did not finish within {limit:.0f} s; "
            f"everything it started was stopped; logs in {log_dir}"
        ) from None
    if own_dir and result.ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    return result
