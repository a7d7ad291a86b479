"""The benchmarks' implementations, event log, clusters and statistics, over :mod:`harness`.

Every node process is started by :func:`harness.processes.spawn`: in a session (process
group) of its own, killed by the kernel if this process dies (``PR_SET_PDEATHSIG``), and
registered so that an ``atexit`` hook kills what is left; :meth:`Harness.close` (run from
``finally`` blocks, also on Ctrl-C) wakes and kills every group that is still there. The nodes
also exit on their own when their stdin closes. Reports are :mod:`harness.reports` lines; the
leaderships and their overlaps are :mod:`harness.leases`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness import processes
from harness.leases import Record, leaderships, overlap
from harness.reports import parse
from harness.waiting import Changes
from harness.waiting import wait_for as wait_until

REPO = processes.ROOT
_T = TypeVar("_T")

__all__ = [
    "IMPLS",
    "REPO",
    "Cluster",
    "Event",
    "Harness",
    "Impl",
    "NodeState",
    "Pool",
    "Proc",
    "cpu_seconds",
    "leadership_intervals",
    "overlap",
    "rss_mb",
    "summary",
]

# ---- implementations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One row of the comparison: an implementation with one set of settings."""

    name: str
    kind: str  # the node script's --impl
    args: tuple[str, ...]
    settings: str
    timescale: float
    """The configured minimum time before another node may take over (ours: the minimum
    election timeout; tooz: the lock TTL; the lease lock: the key's TTL), in seconds."""
    timescale_name: str
    beat: float
    """The leader's renewal period, in seconds."""
    lease: float | None
    """Longest lease one renewal can give the holder, by the holder's own clock (None: the
    implementation does not read a lease)."""
    settle: float
    """How long a cluster must stay unchanged after it agrees before the agreement counts."""
    knows_leader: bool
    """Whether followers can name the leader (tooz's Redis driver cannot)."""
    timeout_max: float | None = None
    """Ours: the largest election timeout, in seconds (None for the others)."""
    slow: bool = False
    """Trials that wait for the timescale take tens of seconds: skipped in --quick, run in
    parallel lanes in the full run."""


def _ours(name: str, profile: str, title: str, *, slow: bool = False) -> Impl:
    """Our row for a profile of ``benchmarks.node``, its figures read from LeaderSettings (the
    defaults, ``LeaderSettings.FAST_PROFILE`` or ``ECONOMY_PROFILE``), so the table always says
    what ran."""
    from fastapi_leader import LeaderSettings

    fields = LeaderSettings.model_fields
    timings = {
        field: float(fields[field].default)
        for field in (
            "heartbeat_interval",
            "lease",
            "election_timeout_min",
            "election_timeout_max",
            "member_expiry",
        )
    }
    if profile == "fast":
        timings.update(LeaderSettings.FAST_PROFILE)
    elif profile == "economy":
        timings.update(LeaderSettings.ECONOMY_PROFILE)
    hb, tmin, tmax = (
        timings["heartbeat_interval"],
        timings["election_timeout_min"],
        timings["election_timeout_max"],
    )
    return Impl(
        name,
        "ours",
        ("--profile", profile),
        f"{title}: heartbeat {hb:g} s, lease {timings['lease']:g} s, election timeout "
        f"{tmin:g}-{tmax:g} s, member expiry {timings['member_expiry']:g} s",
        timescale=tmin,
        timescale_name="election_timeout_min",
        beat=hb,
        lease=timings["lease"],
        # The largest election timeout and a beat: a follower that missed the leader would
        # have stood by then.
        settle=round(tmax + 0.05, 3),
        knows_leader=True,
        timeout_max=tmax,
        slow=slow,
    )


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in [
        _ours("ours", "default", "defaults"),
        _ours("ours-fast", "fast", "LeaderSettings.fast()"),
        _ours("ours-economy", "economy", "LeaderSettings.economy()", slow=True),
        Impl(
            "tooz",
            "tooz",
            ("--tooz-timeout", "30", "--tooz-poll", "1"),
            "tooz 9 Redis driver, defaults: timeout=30 (lock TTL 30 s, heart every 15 s); "
            "run_watchers() every 1 s",
            timescale=30.0,
            timescale_name="lock TTL",
            beat=15.0,
            lease=None,
            settle=2.5,
            knows_leader=False,
            slow=True,
        ),
        Impl(
            "tooz-fast",
            "tooz",
            ("--tooz-timeout", "1", "--tooz-poll", "0.1"),
            "tooz 9 Redis driver, timeout=1 (its minimum: whole seconds; lock TTL 1 s, heart "
            "every 0.5 s); run_watchers() every 0.1 s",
            timescale=1.0,
            timescale_name="lock TTL",
            beat=0.5,
            lease=None,
            settle=0.3,
            knows_leader=False,
        ),
        Impl(
            "leaselock",
            "leaselock",
            ("--ttl", "15", "--renew", "10", "--retry", "2"),
            "hand-written lease lock, client-go defaults: SET NX PX 15000, renew every 10 s, "
            "followers retry every 2 s",
            timescale=15.0,
            timescale_name="key TTL",
            beat=10.0,
            lease=15.0,
            settle=2.5,
            knows_leader=True,
            slow=True,
        ),
        Impl(
            "leaselock-fast",
            "leaselock",
            ("--ttl", "2.25", "--renew", "1.5", "--retry", "0.5"),
            "hand-written lease lock, fast: SET NX PX 2250, renew every 1.5 s, followers "
            "retry every 0.5 s (client-go's 15:10:2 ratios)",
            timescale=2.25,
            timescale_name="key TTL",
            beat=1.5,
            lease=2.25,
            settle=0.7,
            knows_leader=True,
        ),
    ]
}


# ---- events and node state ---------------------------------------------------------------------


@dataclass
class Event:
    t: float
    ev: str
    pid: int
    node: str | None
    data: dict[str, Any]


@dataclass
class NodeState:
    """What the harness knows of one node, from its reports."""

    node: str
    pid: int
    leading: bool = False
    lead_t: float | None = None  # when the current (or last) leadership was reported
    known: str | None = None  # the leader this node names
    known_t: float = 0.0
    joined: bool = False
    left: bool = False
    died_at: float | None = None  # its process was killed (or exited) then


class Proc:
    """One node process."""

    def __init__(self, harness: Harness, impl: Impl, process: asyncio.subprocess.Process):
        self.harness = harness
        self.impl = impl
        self.process = process
        self.pid = process.pid
        self.armed = False
        self.alive = True
        self.killed = False  # SIGKILL sent: dead, even before its stdout says so
        self.killed_at: float | None = None
        self.paused = False
        self.nodes: list[str] = []  # started and not stopped
        self.reader: asyncio.Task[None] | None = None
        self.armed_by = "armed"  # the report that says the process is ready

    def __repr__(self) -> str:
        return f"<Proc {self.impl.name} pid={self.pid} nodes={len(self.nodes)}>"

    async def send(self, line: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        await stdin.drain()

    def signal(self, signum: int) -> float:
        """Send a signal; return the monotonic time just before it was sent."""
        sent_at = processes.send(self.pid, signum)
        if signum == signal.SIGKILL:
            self.killed, self.killed_at = True, sent_at
        elif signum == signal.SIGSTOP:
            self.paused = True
        elif signum == signal.SIGCONT:
            self.paused = False
        return sent_at

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size in MiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Harness:
    """Starts node processes, keeps their event log and each node's state."""

    def __init__(self, log_path: Path) -> None:
        self.events: list[Event] = []
        self.states: dict[str, NodeState] = {}
        self.procs: dict[int, Proc] = {}
        self._changed = Changes()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        # Not the developer's LEADER_* settings: each node gets its own on the command line.
        self.env = processes.clean_env()

    # -- processes ---------------------------------------------------------------------------

    async def spawn(
        self, impl: Impl, redis_url: str, extra: Sequence[str] = (), *, armed: str = "armed"
    ) -> Proc:
        """Start a node process and wait until it reports ``armed`` (imports done)."""
        process = await processes.spawn(
            [
                sys.executable,
                "-m",
                "benchmarks.node",
                "--impl",
                impl.kind,
                "--redis-url",
                redis_url,
                *impl.args,
                *extra,
            ],
            env=self.env,
            cwd=REPO,
            stderr=self.log,
        )
        proc = Proc(self, impl, process)
        self.procs[proc.pid] = proc
        proc.armed_by = armed
        proc.reader = asyncio.create_task(self._read(proc))
        await self.wait_for(lambda: proc.armed or not proc.alive, 60, f"{impl.name} to arm")
        if not proc.alive:
            raise RuntimeError(f"{impl.name} node process exited at startup (see the log)")
        return proc

    async def spawn_many(self, impl: Impl, redis_url: str, count: int) -> list[Proc]:
        return list(await asyncio.gather(*(self.spawn(impl, redis_url) for _ in range(count))))

    async def _read(self, proc: Proc) -> None:
        stdout = proc.process.stdout
        assert stdout is not None
        try:
            async for line in stdout:
                report = parse(line)
                if report is None:
                    self.log.write(b"unparsed: " + line)
                    continue
                self._record(proc, report.t, report.ev, report.pid, report.node, report.data)
        finally:
            proc.alive = False
            await proc.process.wait()
            processes.forget(proc.pid)
            died_at = proc.killed_at if proc.killed_at is not None else time.monotonic()
            for node in proc.nodes:
                self.states[node].left = True
                self.states[node].died_at = died_at
            proc.nodes = []
            self._pulse()

    def _record(
        self,
        proc: Proc,
        t: float,
        ev: str,
        pid: int | None,
        node: str | None,
        record: dict[str, Any],
    ) -> None:
        armed = proc.armed_by
        if pid is None:
            pid = proc.pid
        event = Event(t, ev, pid, node, record)
        self.events.append(event)
        if ev == armed:
            proc.armed = True
        elif ev == "error":
            self.log.write(f"node error: {node} {record}\n".encode())
        if node is not None:
            state = self.states.get(node)
            if state is None:
                state = self.states[node] = NodeState(node, pid)
            if ev == "joined":
                state.joined = True
                if node not in proc.nodes:
                    proc.nodes.append(node)
            elif ev == "elected":
                state.leading, state.lead_t = True, t
            elif ev == "demoted":
                state.leading = False
            elif ev == "leader":
                state.known, state.known_t = record.get("leader"), t
            elif ev == "left":
                state.left = True
                state.leading = False
                with contextlib.suppress(ValueError):
                    proc.nodes.remove(node)
        self._pulse()

    def _pulse(self) -> None:
        self._changed.pulse()

    async def wait_for(self, probe: Callable[[], _T], timeout: float, what: str) -> _T:
        """Wait until ``probe()`` is truthy (re-checked on every event and every 50 ms: some
        probes depend on the clock alone); return its value. TimeoutError after ``timeout``."""
        return await wait_until(probe, timeout, what, self._changed)

    async def exited(self, proc: Proc, timeout: float) -> None:
        await self.wait_for(lambda: not proc.alive, timeout, f"pid {proc.pid} to exit")

    async def command(self, procs: Iterable[Proc], line: str, reply: str, timeout: float) -> None:
        """Send ``line`` to every process and wait for a ``reply`` event from each."""
        procs = [p for p in procs if p.alive and not p.killed]
        mark = len(self.events)
        await asyncio.gather(*(p.send(line) for p in procs))
        pids = {p.pid for p in procs}

        def answered() -> bool:
            seen = {e.pid for e in self.events[mark:] if e.ev == reply}
            return pids <= seen | {p.pid for p in procs if not p.alive}

        await self.wait_for(answered, timeout, f"{reply!r} from {len(pids)} processes")

    async def terminate(self, proc: Proc, timeout: float = 10.0) -> None:
        """SIGTERM (and SIGCONT), then SIGKILL the group if it does not exit in time."""
        if not proc.alive:
            return
        processes.send(proc.pid, signal.SIGTERM)
        processes.send(proc.pid, signal.SIGCONT)
        try:
            await self.exited(proc, timeout)
        except TimeoutError:
            self.kill_group(proc)
            await self.exited(proc, 5.0)

    def kill_group(self, proc: Proc) -> None:
        if not proc.killed:
            proc.killed, proc.killed_at = True, time.monotonic()
        processes.kill_group(proc.pid)

    async def close(self) -> None:
        """Kill every process still running (their groups) and reap them."""
        procs = [p for p in self.procs.values() if p.alive]
        for proc in procs:
            self.kill_group(proc)
        for proc in procs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.process.wait(), 5.0)
            if proc.reader is not None:
                proc.reader.cancel()
        processes.kill_leftovers()
        self.log.close()

    async def retire(self, procs: Iterable[Proc]) -> None:
        """Terminate processes that a scenario no longer needs."""
        await asyncio.gather(*(self.terminate(p) for p in procs))

    # -- reading the cluster -------------------------------------------------------------------

    def deaths(self, nodes: Iterable[str]) -> dict[str, float]:
        """When the nodes' processes died, for those that did: a dead node leads no more,
        whatever its last lease report said."""
        return {n: died for n in nodes if n in self.states and (died := self.states[n].died_at)}

    def diagnose(self, nodes: Iterable[str]) -> dict[str, Any]:
        """What the nodes say, for a trial that timed out."""
        states = [self.states[n] for n in nodes if n in self.states]
        known: dict[str, int] = {}
        for s in states:
            known[str(s.known)] = known.get(str(s.known), 0) + 1
        ids = {s.node for s in states}
        recent = time.monotonic() - 10
        return {
            "nodes": len(states),
            "leading": [s.node for s in states if s.leading],
            "named_leaders": dict(sorted(known.items(), key=lambda kv: -kv[1])[:5]),
            "elections_last_10s": sum(
                1 for e in self.events if e.ev == "elected" and e.node in ids and e.t >= recent
            ),
        }

    def node_events(self, nodes: Iterable[str], since: float = -math.inf) -> list[Event]:
        wanted = set(nodes)
        return sorted(
            (e for e in self.events if e.node in wanted and e.t >= since), key=lambda e: e.t
        )

    def agreement(
        self, nodes: Iterable[str], impl: Impl, after: float = -math.inf, exclude: str = ""
    ) -> tuple[str, float] | None:
        """The leader all ``nodes`` agree on, and when the last of them came to know it.

        Exactly one node must report itself leader (elected after ``after``, and not
        ``exclude``); where followers can name the leader, every node must name that one."""
        states = [self.states[n] for n in nodes if n in self.states]
        if not states:
            return None
        leaders = [s for s in states if s.leading]
        if len(leaders) != 1:
            return None
        leader = leaders[0]
        assert leader.lead_t is not None
        if leader.lead_t <= after or leader.node == exclude:
            return None
        agreed_at = leader.lead_t
        if impl.knows_leader:
            if any(s.known != leader.node for s in states):
                return None
            agreed_at = max(agreed_at, *(s.known_t for s in states))
        return leader.node, agreed_at

    async def stable_agreement(
        self,
        nodes: Callable[[], list[str]],
        impl: Impl,
        timeout: float,
        after: float = -math.inf,
        exclude: str = "",
        stable: bool = True,
        meanwhile: Callable[[], Awaitable[Any]] | None = None,
    ) -> tuple[str, float]:
        """Wait until the nodes agree and (if ``stable``) stay so for ``impl.settle`` seconds.

        ``meanwhile`` starts once the nodes first agree (so whatever it costs falls after the
        figure is taken) and is awaited before returning."""
        deadline = time.monotonic() + timeout
        task: asyncio.Task[Any] | None = None
        try:
            while True:
                remaining = max(0.1, deadline - time.monotonic())
                first = await self.wait_for(
                    lambda: self.agreement(nodes(), impl, after, exclude), remaining, "agreement"
                )
                if meanwhile is not None and task is None:
                    task = asyncio.ensure_future(meanwhile())
                if not stable:
                    break
                await asyncio.sleep(impl.settle)
                if self.agreement(nodes(), impl, after, exclude) == first:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("the cluster did not settle")
            if task is not None:
                await task
            return first
        finally:
            if task is not None and not task.done():
                task.cancel()


# ---- clusters ----------------------------------------------------------------------------------


class Pool:
    """Node processes of one implementation, reused across trials and scenarios (a process
    with no node started in it costs nothing but memory)."""

    def __init__(self, harness: Harness, impl: Impl, redis_url: str) -> None:
        self.harness = harness
        self.impl = impl
        self.redis_url = redis_url
        self.procs: list[Proc] = []
        self.in_use: set[int] = set()

    async def get(self, count: int) -> list[Proc]:
        free = [p for p in self.procs if p.alive and not p.killed and p.pid not in self.in_use]
        # Claim before awaiting the spawn: clusters of parallel lanes ask at the same moment,
        # and a process shared by two of them would be stopped or killed under both.
        chosen = free[:count]
        self.in_use.update(p.pid for p in chosen)
        if len(chosen) < count:
            new = await self.harness.spawn_many(self.impl, self.redis_url, count - len(chosen))
            self.procs += new
            self.in_use.update(p.pid for p in new)
            chosen += new
        return chosen

    def release(self, procs: Iterable[Proc]) -> None:
        for proc in procs:
            self.in_use.discard(proc.pid)

    async def close(self) -> None:
        await self.harness.retire(self.procs)
        self.procs = []


class Cluster:
    """Nodes of one implementation in one group, spread over processes from a pool."""

    def __init__(self, pool: Pool, group: str) -> None:
        self.pool = pool
        self.harness = pool.harness
        self.impl = pool.impl
        self.group = group
        self.procs: list[Proc] = []
        self._labels = 0

    def nodes(self, exclude_paused: bool = True) -> list[str]:
        return [
            n
            for p in self.procs
            if p.alive and not p.killed and not (exclude_paused and p.paused)
            for n in p.nodes
            if not self.harness.states[n].left
        ]

    def all_nodes(self) -> list[str]:
        """Every node ever started in this cluster (dead ones included)."""
        prefix = f"{self.group}-"
        return [n for n in self.harness.states if n.startswith(prefix)]

    def proc_of(self, node: str) -> Proc:
        for proc in self.procs:
            if node in proc.nodes:
                return proc
        raise LookupError(node)

    async def add(self, procs: int, per_proc: int = 1) -> float:
        """Start ``per_proc`` nodes on each of ``procs`` processes at once; return the time
        just before the first start command. Returns once every node has joined."""
        chosen = await self.pool.get(procs)
        return await self.start_on(chosen, per_proc)

    async def start_on(self, procs: Sequence[Proc], per_proc: int) -> float:
        for proc in procs:
            if proc not in self.procs:
                self.procs.append(proc)
        labels = []
        for _ in procs:
            self._labels += 1
            labels.append(f"{self.group}-{self._labels}")
        started_at = time.monotonic()
        await asyncio.gather(
            *(
                p.send(f"start {self.group} {per_proc} {lbl}")
                for p, lbl in zip(procs, labels, strict=True)
            )
        )
        expected = [f"{lbl}-{i}" for lbl in labels for i in range(per_proc)]
        states = self.harness.states

        def joined() -> bool:
            return all(n in states and (states[n].joined or states[n].left) for n in expected)

        await self.harness.wait_for(joined, 60, f"{len(expected)} {self.impl.name} nodes to join")
        return started_at

    async def stop_proc(self, proc: Proc, release: bool = True) -> None:
        """Stop the nodes of one process gracefully and (by default) give it back to the
        pool."""
        await self.harness.command([proc], "stop", "stopped", 60)
        self.procs.remove(proc)
        if release:
            self.pool.release([proc])

    def drop(self, proc: Proc) -> None:
        """Forget a process that was killed."""
        if proc in self.procs:
            self.procs.remove(proc)
        self.pool.release([proc])

    async def stop(self) -> None:
        """Stop every node gracefully (the processes go back to the pool)."""
        busy = [p for p in self.procs if p.alive and not p.killed]
        await self.harness.command(busy, "stop", "stopped", 60)
        self.pool.release(self.procs)
        self.procs = []

    async def agree(self, timeout: float | None = None, **kwargs: Any) -> tuple[str, float]:
        if timeout is None:
            timeout = 10 * self.impl.timescale + 10
        return await self.harness.stable_agreement(self.nodes, self.impl, timeout, **kwargs)


# ---- statistics --------------------------------------------------------------------------------


def summary(samples: Sequence[float], timeouts: int = 0) -> dict[str, float] | None:
    """min, median, p95 (nearest rank) and max; None for no samples. ``timeouts`` trials
    count as samples beyond every measured one (``math.inf``)."""
    if not samples and not timeouts:
        return None
    ordered = sorted(samples) + [math.inf] * timeouts
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return {
        "n": len(ordered),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[rank - 1],
        "max": ordered[-1],
    }


def leadership_intervals(
    events: Sequence[Event], observed_until: float, lease_cap: Mapping[str, float] | None = None
) -> list[tuple[str, float, float]]:
    """Each node's leaderships as ``(node, start, end)`` by the nodes' own reports
    (:func:`harness.leases.leaderships`: from the earlier of ``elected`` and the lease's
    acquisition to the earliest of ``demoted``/``left``/``released`` and the last lease end
    the node reported; with neither, as tooz, ``observed_until``). ``lease_cap`` optionally
    caps a node's lease end (when its process died; the harness's upper bound for a
    SIGSTOPped node)."""
    records = [Record(e.t, e.node, e.pid, e.ev, e.data) for e in events if e.node is not None]
    return [
        (held.node, held.start, held.end)
        for held in leaderships(records, observed_until, lease_cap)
    ]
