"""The scenarios: each runs trials against real node processes and returns raw samples.

All times are differences of ``time.monotonic()`` readings: the harness's own (when it sent a
signal or a command) and the nodes' (when they reported a change), comparable because Linux's
monotonic clock is system-wide. See README.md for what each figure means and what bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from fastapi_leader.testing import RedisServer
from harness import processes

from .harness import (
    REPO,
    Cluster,
    Harness,
    Impl,
    Pool,
    Proc,
    cpu_seconds,
    leadership_intervals,
    overlap,
)


@dataclass
class Config:
    quick: bool
    trials: int
    nodes: int = 3
    idle_sizes: tuple[int, ...] = (3, 10, 50)
    idle_windows: int = 20
    idle_window: float = 3.0
    scale_nodes: int = 100
    scale_trials: int = 20
    calm: float = 60.0
    churn: float = 600.0
    max_procs: int = 10
    lanes: int = 5  # parallel clusters for the slow implementations' long trials
    stall_lengths: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    stall_trials: int = 3
    stall_limit: float = 2.0
    """The short ``LEADER_LOOP_STALL_LIMIT`` of the stall-beyond-the-limit series (ours)."""
    stall_beyond: float = 5.0
    """How long the leader's loop is blocked in that series: well past ``stall_limit``."""
    topology_trials: int = 5
    """Primary failovers per topology (Sentinel, Cluster): each builds a topology afresh."""


@dataclass
class Metric:
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    timeouts: int = 0
    """Trials that never produced this figure (no stable leader in time): counted as samples
    beyond any measured one."""


@dataclass
class Cell:
    """The result of one scenario for one implementation."""

    scenario: str
    impl: str
    metrics: list[Metric] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def metric(self, name: str, unit: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        metric = Metric(name, unit)
        self.metrics.append(metric)
        return metric

    def add(self, name: str, unit: str, value: float) -> None:
        self.metric(name, unit).samples.append(value)

    def add_all(self, name: str, unit: str, values: list[float]) -> None:
        self.metric(name, unit).samples.extend(values)

    def fail(self, metric: tuple[str, str], reason: str, diagnosis: dict[str, Any]) -> None:
        """A trial that timed out: counted against ``metric``, and said why."""
        self.metric(*metric).timeouts += 1
        self.failures.append({"metric": metric[0], "reason": reason, **diagnosis})


@dataclass
class Ctx:
    harness: Harness
    cfg: Config
    impl: Impl
    server: RedisServer
    pool: Pool

    @property
    def url(self) -> str:
        return self.server.url


Scenario = Callable[[Ctx], Awaitable[list[Cell]]]


def _ms(seconds: float) -> float:
    return seconds * 1000.0


# ---- running trials ----------------------------------------------------------------------------


One = Callable[[Cluster], Awaitable[None]]


async def _discard(cluster: Cluster) -> None:
    """Stop a cluster's nodes; kill its processes if they do not stop (an overloaded or
    wedged cluster must not skew what runs next)."""
    try:
        await asyncio.wait_for(cluster.stop(), 30)
    except (TimeoutError, asyncio.TimeoutError):
        for proc in cluster.procs:
            cluster.harness.kill_group(proc)
            cluster.drop(proc)


async def _lane(
    ctx: Ctx,
    cell: Cell,
    group: str,
    trials: int,
    one: One,
    primary: tuple[str, str],
    procs: int | None = None,
    per_proc: int = 1,
    also: tuple[tuple[str, str], ...] = (),
) -> None:
    """Run ``trials`` of ``one`` on a cluster of its own. A trial that times out is counted
    against ``primary`` and every metric of ``also`` (as a sample beyond the timeout: a figure
    that leaves the failed trials out would look better than the runs it measured), with what
    the nodes said, and the cluster is replaced by a fresh one. Trials given up on count the
    same way."""
    procs = procs or ctx.cfg.nodes
    restarts = 0
    cluster = Cluster(ctx.pool, group)
    settled = False
    failed_in_a_row = 0
    try:
        await cluster.add(procs, per_proc)
        for trial in range(trials):
            if failed_in_a_row >= 2:
                cell.notes.append(
                    f"gave up after 2 trials in a row found no stable leader "
                    f"({trials - trial} of {trials} trials not run, counted as timeouts)"
                )
                for metric in (primary, *also):
                    cell.metric(*metric).timeouts += trials - trial
                break
            try:
                if not settled:
                    await cluster.agree()
                    settled = True
                await one(cluster)
                failed_in_a_row = 0
            except TimeoutError as exc:
                failed_in_a_row += 1
                diagnosis = ctx.harness.diagnose(cluster.nodes())
                diagnosis["totals"] = await _totals(ctx.harness, cluster)
                cell.fail(primary, str(exc), diagnosis)
                for metric in also:
                    cell.metric(*metric).timeouts += 1
                await _discard(cluster)
                restarts += 1
                cluster = Cluster(ctx.pool, f"{group}-r{restarts}")
                await cluster.add(procs, per_proc)
                settled = False
    finally:
        await _discard(cluster)


async def _lanes(ctx: Ctx, trials: int, lane: Callable[[int, int], Awaitable[None]]) -> int:
    """Run ``trials`` in parallel lanes (separate groups) for slow implementations, whose
    trials wait tens of seconds for a TTL; one lane otherwise. Returns the lane count."""
    count = min(ctx.cfg.lanes, trials) if ctx.impl.slow else 1
    shares = [trials // count + (1 if i < trials % count else 0) for i in range(count)]
    await asyncio.gather(*(lane(i, share) for i, share in enumerate(shares) if share))
    return count


def _changes(events: list[Any], leader: str, old_nodes: set[str]) -> int:
    """Leader changes in ``events``: elections, demotions, and old nodes naming another
    leader than ``leader``."""
    count = 0
    for e in events:
        if e.ev in ("elected", "demoted"):
            count += 1
            continue
        if e.ev == "leader" and e.node in old_nodes and e.data.get("leader") != leader:
            count += 1
    return count


def _slow_reason(impl: Impl, factor: float) -> str:
    return (
        f"skipped in --quick: each trial waits >= {factor * impl.timescale:g} s "
        f"({impl.timescale_name} {impl.timescale:g} s); run without --quick"
    )


def _lane_note(cell: Cell, lanes: int) -> None:
    if lanes > 1:
        cell.notes.append(f"trials ran in {lanes} parallel groups (they wait on TTLs, not CPU)")


def _agreement_note(cell: Cell, impl: Impl) -> None:
    if not impl.knows_leader:
        cell.notes.append("followers cannot name the leader: time to the new leader's election")


async def _totals(harness: Harness, cluster: Cluster) -> dict[str, int]:
    """Counters and commands summed over the cluster's nodes (for a trial that timed out:
    did anyone stand, acquire, give the key back?)."""
    try:
        stats = await asyncio.wait_for(_node_stats(harness, cluster), 10)
    except (TimeoutError, asyncio.TimeoutError):
        return {}
    totals: dict[str, int] = {}
    for report in stats.values():
        for source in ("counters", "commands"):
            for key, value in report.get(source, {}).items():
                totals[key] = totals.get(key, 0) + int(value)
    return dict(sorted(totals.items()))


# ---- cold start --------------------------------------------------------------------------------


async def _cold_trials(
    ctx: Ctx, cell: Cell, name: str, procs: int, per_proc: int, trials: int, tag: str
) -> None:
    """Fresh groups, all nodes told to start at once (their processes already running and
    imported), until exactly one leader that every node names."""
    failed_in_a_row = 0
    for trial in range(trials):
        if failed_in_a_row >= 2:
            cell.notes.append(
                f"{name}: gave up after 2 trials in a row found no stable leader "
                f"({trials - trial} of {trials} trials not run)"
            )
            break
        cluster = Cluster(ctx.pool, f"{tag}-{ctx.impl.name}-{trial}")
        try:
            started_at = await cluster.add(procs, per_proc)
            leader, agreed_at = await cluster.agree()
            failed_in_a_row = 0
        except TimeoutError as exc:
            failed_in_a_row += 1
            diagnosis = ctx.harness.diagnose(cluster.nodes())
            diagnosis["totals"] = await _totals(ctx.harness, cluster)
            cell.fail((name, "ms"), str(exc), diagnosis)
        else:
            lead_t = ctx.harness.states[leader].lead_t or agreed_at
            cell.add(name, "ms", _ms(agreed_at - started_at))
            cell.trials.append(
                {"agreed_ms": _ms(agreed_at - started_at), "elected_ms": _ms(lead_t - started_at)}
            )
        finally:
            await _discard(cluster)


async def cold(ctx: Ctx) -> list[Cell]:
    cell = Cell("cold start", ctx.impl.name)
    await _cold_trials(
        ctx, cell, "time to one agreed leader", ctx.cfg.nodes, 1, ctx.cfg.trials, "cold"
    )
    if not ctx.impl.knows_leader:
        cell.notes.append("followers cannot name the leader: time to the leader's own election")
    return [cell]


# ---- crash failover ----------------------------------------------------------------------------


def _crash_one(ctx: Ctx, cell: Cell, name: str, per_proc: int, ratio: bool) -> One:
    """``kill -9`` of the leader's process until another node holds the lease and the
    survivors agree on it; then a replacement process joins (not measured)."""
    impl, harness = ctx.impl, ctx.harness

    async def one(cluster: Cluster) -> None:
        old, _ = await cluster.agree(stable=False)  # stable since the last trial
        victim = cluster.proc_of(old)
        killed_at = victim.signal(signal.SIGKILL)
        cluster.drop(victim)
        spare: list[Proc] = []

        async def replacement() -> None:
            spare.extend(await ctx.pool.get(1))

        new, agreed_at = await cluster.agree(after=killed_at, exclude=old, meanwhile=replacement)
        lead_t = harness.states[new].lead_t or agreed_at
        cell.add(name, "ms", _ms(agreed_at - killed_at))
        if ratio:
            cell.add(
                f"failover / {impl.timescale_name} ({impl.timescale:g} s)",
                "x",
                (agreed_at - killed_at) / impl.timescale,
            )
        await harness.exited(victim, 10)
        everyone = cluster.all_nodes()
        dead = harness.deaths(everyone)
        intervals = leadership_intervals(harness.node_events(everyone), time.monotonic(), dead)
        await cluster.start_on(spare, per_proc)  # the replacement joins (not measured)
        cell.trials.append(
            {
                "agreed_ms": _ms(agreed_at - killed_at),
                "elected_ms": _ms(lead_t - killed_at),
                "dual_lease_ms": _ms(overlap([(s, e) for _, s, e in intervals])),
            }
        )

    return one


async def crash(ctx: Ctx) -> list[Cell]:
    cell = Cell("crash failover", ctx.impl.name)
    if ctx.impl.slow and ctx.cfg.quick:
        cell.skipped = _slow_reason(ctx.impl, 1)
        return [cell]
    name = "failover, to agreement"
    one = _crash_one(ctx, cell, name, 1, ratio=True)

    async def lane(index: int, trials: int) -> None:
        group = f"crash-{ctx.impl.name}-{index}"
        await _lane(ctx, cell, group, trials, one, (name, "ms"))

    _lane_note(cell, await _lanes(ctx, ctx.cfg.trials, lane))
    _agreement_note(cell, ctx.impl)
    return [cell]


# ---- graceful handover -------------------------------------------------------------------------


async def graceful(ctx: Ctx) -> list[Cell]:
    """SIGTERM of the leader's process: its node stops gracefully (ours: ``election.stop()``)."""
    cell = Cell("graceful handover", ctx.impl.name)
    impl, harness = ctx.impl, ctx.harness
    gap_name = "leaderless gap (demoted -> elected)"

    async def one(cluster: Cluster) -> None:
        old, _ = await cluster.agree(stable=False)  # stable since the last trial
        victim = cluster.proc_of(old)
        termed_at = victim.signal(signal.SIGTERM)
        spare: list[Proc] = []

        async def replacement() -> None:
            spare.extend(await ctx.pool.get(1))

        new, agreed_at = await cluster.agree(after=termed_at, exclude=old, meanwhile=replacement)
        await harness.exited(victim, 30)
        cluster.drop(victim)
        demoted = [e.t for e in harness.node_events([old], termed_at) if e.ev == "demoted"]
        lead_t = harness.states[new].lead_t or agreed_at
        gap = _ms(lead_t - demoted[0]) if demoted else None
        if gap is not None:
            cell.add(gap_name, "ms", gap)
        cell.add("SIGTERM -> successor elected", "ms", _ms(lead_t - termed_at))
        cell.add("SIGTERM -> agreement", "ms", _ms(agreed_at - termed_at))
        cell.trials.append(
            {
                "gap_ms": gap,
                "elected_ms": _ms(lead_t - termed_at),
                "agreed_ms": _ms(agreed_at - termed_at),
            }
        )
        await cluster.start_on(spare, 1)

    await _lane(ctx, cell, f"graceful-{impl.name}", ctx.cfg.trials, one, (gap_name, "ms"))
    _agreement_note(cell, impl)
    return [cell]


# ---- join --------------------------------------------------------------------------------------


async def join(ctx: Ctx) -> list[Cell]:
    """A node joins a stable cluster; every leader change in the following window counts."""
    cell = Cell("join", ctx.impl.name)
    impl, harness = ctx.impl, ctx.harness
    window = max(1.0, 2 * impl.settle)
    name = "leader changes"

    async def one(cluster: Cluster) -> None:
        leader, _ = await cluster.agree(stable=False)  # stable since the last trial
        old_nodes = set(cluster.nodes())
        (spare,) = await ctx.pool.get(1)
        joined_at = await cluster.start_on([spare], 1)
        await asyncio.sleep(window)
        events = harness.node_events(cluster.nodes(), joined_at)
        changes = _changes(events, leader, old_nodes)
        cell.add(name, "count", changes)
        cell.trials.append({"changes": changes, "window_s": window})
        await cluster.stop_proc(spare)

    await _lane(ctx, cell, f"join-{impl.name}", ctx.cfg.trials, one, (name, "count"))
    cell.notes.append(f"each join watched for {window:g} s")
    return [cell]


# ---- pause -------------------------------------------------------------------------------------

DUAL_LEASE = "dual valid lease (nodes' reports)"


async def pause(ctx: Ctx) -> list[Cell]:
    """SIGSTOP of the leader for twice the timescale, then SIGCONT; dual leases by the
    nodes' own lease readings."""
    cell = Cell("pause", ctx.impl.name)
    impl, harness = ctx.impl, ctx.harness
    if impl.slow and ctx.cfg.quick:
        cell.skipped = _slow_reason(impl, 2)
        return [cell]
    paused_for = 2 * impl.timescale
    name = "SIGSTOP -> new leader agreed"

    async def one(cluster: Cluster) -> None:
        old, _ = await cluster.agree(stable=False)  # stable since the last trial
        victim = cluster.proc_of(old)
        stopped_at = victim.signal(signal.SIGSTOP)
        try:
            new, agreed_at = await cluster.agree(after=stopped_at, exclude=old)
            await asyncio.sleep(max(0.0, stopped_at + paused_for - time.monotonic()))
        finally:
            continued_at = victim.signal(signal.SIGCONT)
        # Give the old leader time to notice (ours and the lease lock report a demotion).
        with contextlib.suppress(TimeoutError):
            await harness.wait_for(
                lambda: not harness.states[old].leading, max(2.0, 2 * impl.beat), "demotion"
            )
        await asyncio.sleep(impl.settle)
        observed_until = time.monotonic()
        lead_t = harness.states[new].lead_t or agreed_at
        events = harness.node_events(cluster.all_nodes())

        dead = harness.deaths(cluster.all_nodes())

        def dual(cap: dict[str, float]) -> float:
            intervals = leadership_intervals(events, observed_until, {**dead, **cap})
            clipped = [(max(s, stopped_at), min(e, observed_until)) for _, s, e in intervals]
            return overlap(clipped)

        reported = dual({})
        # An upper bound that does not trust the paused node's last report: any renewal it
        # made was sent before SIGSTOP, so its lease ends by SIGSTOP + lease.
        bound = dual({old: stopped_at + impl.lease}) if impl.lease is not None else None
        cell.add(name, "ms", _ms(agreed_at - stopped_at))
        cell.add(DUAL_LEASE, "ms", _ms(reported))
        cell.trials.append(
            {
                "agreed_ms": _ms(agreed_at - stopped_at),
                "elected_ms": _ms(lead_t - stopped_at),
                "paused_s": continued_at - stopped_at,
                "dual_lease_ms": _ms(reported),
                "dual_lease_bound_ms": None if bound is None else _ms(bound),
                "old_demoted": not harness.states[old].leading,
            }
        )
        # A fresh node in the old process for the next trial (tooz's old leader would
        # otherwise go on believing it leads).
        await cluster.stop_proc(victim, release=False)
        await cluster.start_on([victim], 1)

    async def lane(index: int, trials: int) -> None:
        await _lane(
            ctx,
            cell,
            f"pause-{impl.name}-{index}",
            trials,
            one,
            (name, "ms"),
            also=((DUAL_LEASE, "ms"),),
        )

    _lane_note(cell, await _lanes(ctx, ctx.cfg.trials, lane))
    cell.notes.append(f"paused for {paused_for:g} s (2 x {impl.timescale_name})")
    if impl.lease is None:
        cell.notes.append(
            "tooz reports no lease and never tells a leader it lost the lock: the old leader "
            "still believes it leads after SIGCONT, so its leadership is counted until the "
            "trial ends (the dual figure is bounded by the observation window, not by tooz)"
        )
    return [cell]


# ---- app-loop stalls ---------------------------------------------------------------------------


def stall_limit_default() -> float | None:
    """``LEADER_LOOP_STALL_LIMIT``'s default, from the library's settings; None for a library
    without the setting (it then has no watchdog)."""
    from fastapi_leader import LeaderSettings

    field = LeaderSettings.model_fields.get("loop_stall_limit")
    return None if field is None else float(field.default)


def kept_name(seconds: float, kind: str) -> str:
    return f"kept through a {seconds:g} s {kind} stall"


def handover_name(cfg: Config, kind: str) -> str:
    return (
        f"{kind} stall of {cfg.stall_beyond:g} s, limit {cfg.stall_limit:g} s: "
        "stall -> successor elected"
    )


async def _leader_term(harness: Harness, cluster: Cluster, node: str) -> int | None:
    """The highest term ``node`` has seen (ours reports it in ``stats``; None for the peers)."""
    stats = await _node_stats(harness, cluster)
    term = stats.get(node, {}).get("term")
    return None if term is None else int(term)


async def _stall_leader(
    ctx: Ctx, cluster: Cluster, seconds: float, kind: str, watch: float
) -> dict[str, Any]:
    """Block the leader's app loop (its process's event loop) for ``seconds``; then watch for
    ``watch`` seconds more. Returns what happened: ``kept`` (no other node elected, the leader
    not demoted, and for ours the same term everywhere it reports), and the first successor's
    election, from the stall's start."""
    harness = ctx.harness
    leader, _ = await cluster.agree(stable=False)
    proc = cluster.proc_of(leader)
    term = await _leader_term(harness, cluster, leader)
    mark = len(harness.events)
    await proc.send(f"stall {seconds:g} {kind}")

    def event(name: str) -> float | None:
        return next(
            (e.t for e in harness.events[mark:] if e.ev == name and e.pid == proc.pid), None
        )

    began = await harness.wait_for(lambda: event("stalling"), 30, "the stall to begin")
    ended = await harness.wait_for(lambda: event("unstalled"), seconds + 60, "the stall to end")
    await asyncio.sleep(watch)
    events = harness.node_events(cluster.all_nodes(), began)
    successors = [e.t for e in events if e.ev == "elected" and e.node != leader]
    demoted = any(e.ev == "demoted" and e.node == leader for e in events)
    term_after = await _leader_term(harness, cluster, leader) if term is not None else None
    kept = not successors and not demoted and harness.states[leader].leading and term_after == term
    return {
        "leader": leader,
        "seconds": seconds,
        "kind": kind,
        "blocked_s": ended - began,
        "kept": kept,
        "successor_ms": _ms(successors[0] - began) if successors else None,
        "demoted": demoted,
        "term_before": term,
        "term_after": term_after,
    }


async def stall(ctx: Ctx) -> list[Cell]:
    """The leader's app loop blocked (``time.sleep`` or a pure-Python spin) for each length in
    ``cfg.stall_lengths``: is the leadership kept, in the same term? For ours, also a series
    with a short ``LEADER_LOOP_STALL_LIMIT`` and stalls well past it: how long until the
    watchdog has handed over? Every stall is one command to the node process, whose nodes
    live on the loop it blocks (the peers' threads, if they have any, keep running)."""
    impl, harness, cfg = ctx.impl, ctx.harness, ctx.cfg
    cell = Cell("app-loop stall", impl.name)
    watch = max(1.0, impl.settle)
    kinds = ("sleep", "spin")

    async def kept_trial(cluster: Cluster) -> None:
        for kind in kinds:
            for seconds in cfg.stall_lengths:
                result = await _stall_leader(ctx, cluster, seconds, kind, watch)
                cell.add(kept_name(seconds, kind), "kept", 1.0 if result["kept"] else 0.0)
                if result["successor_ms"] is not None:
                    name = f"{seconds:g} s {kind} stall: stall -> successor elected"
                    cell.add(name, "ms", result["successor_ms"])
                cell.trials.append(result)
                if not result["kept"]:
                    await cluster.agree()  # a stable leader again before the next stall

    primary = (kept_name(cfg.stall_lengths[0], kinds[0]), "kept")
    await _lane(ctx, cell, f"stall-{impl.name}", cfg.stall_trials, kept_trial, primary)
    limit = stall_limit_default() if impl.kind == "ours" else None
    cell.notes.append(
        f"each stall blocks the leader process's event loop; then {watch:g} s of watching; "
        "kept = no other node elected, the leader not demoted"
        + (", the same term" if impl.kind == "ours" else "")
        + (
            f"; LEADER_LOOP_STALL_LIMIT {limit:g} s (default)"
            if limit is not None
            else "; no stall limit in this implementation (or library version)"
        )
    )
    if impl.kind != "ours":
        return [cell]

    beyond = Cell("app-loop stall beyond the limit", impl.name)
    limited = dataclasses.replace(
        impl,
        name=f"{impl.name}, limit {cfg.stall_limit:g} s",
        args=(*impl.args, "--loop-stall-limit", str(cfg.stall_limit)),
    )
    pool = Pool(harness, limited, ctx.url)
    limited_ctx = dataclasses.replace(ctx, impl=limited, pool=pool)

    async def beyond_trial(cluster: Cluster) -> None:
        for kind in kinds:
            result = await _stall_leader(limited_ctx, cluster, cfg.stall_beyond, kind, watch)
            metric = beyond.metric(handover_name(cfg, kind), "ms")
            if result["successor_ms"] is None:
                metric.timeouts += 1  # never handed over: "timeout" in the table
            else:
                metric.samples.append(result["successor_ms"])
            beyond.trials.append(result)
            await cluster.agree()

    try:
        primary = (handover_name(cfg, kinds[0]), "ms")
        group = f"stall-beyond-{impl.name}"
        await _lane(limited_ctx, beyond, group, cfg.stall_trials, beyond_trial, primary)
    finally:
        await pool.close()
    beyond.notes.append(
        f"LEADER_LOOP_STALL_LIMIT={cfg.stall_limit:g} in the nodes' environment; the leader's "
        f"loop blocked {cfg.stall_beyond:g} s; 'timeout': no successor elected during the "
        f"stall and the {watch:g} s after"
        + ("" if limit is not None else "; this library has no such setting (it is ignored)")
    )
    return [cell, beyond]


# ---- idle cost ---------------------------------------------------------------------------------


async def _redis_counts(client: Redis) -> tuple[int, dict[str, int]]:
    stats = await client.info("stats")
    commandstats = await client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in commandstats.items()}
    return int(stats["total_commands_processed"]), calls


async def _node_stats(harness: Harness, cluster: Cluster) -> dict[str, dict[str, Any]]:
    """One ``stats`` report from every node of the cluster."""
    procs = [p for p in cluster.procs if p.alive]
    mark = len(harness.events)
    await asyncio.gather(*(p.send("stats") for p in procs))
    wanted = {n for p in procs for n in p.nodes}

    def answered() -> dict[str, dict[str, Any]] | None:
        got = {
            e.node: {**e.data, "_t": e.t}
            for e in harness.events[mark:]
            if e.ev == "stats" and e.node
        }
        return got if wanted <= set(got) else None

    return await harness.wait_for(answered, 30, "stats")


def _kinds(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], nodes: list[str]
) -> dict[str, int]:
    """Commands the nodes sent between two reports, by kind, summed."""
    out: dict[str, int] = {}
    for node in nodes:
        if node not in before:
            continue
        for kind, count in after[node].get("commands", {}).items():
            delta = count - before[node].get("commands", {}).get(kind, 0)
            if delta:
                out[kind] = out.get(kind, 0) + delta
    return out


def _per_beat(before: dict[str, Any], after: dict[str, Any], beat: float) -> float:
    """Commands a node sent per ``beat`` seconds between two of its reports (timed by the
    node's own report stamps, not by the harness)."""
    sent = 0
    for kind, count in after.get("commands", {}).items():
        sent += count - before.get("commands", {}).get(kind, 0)
    return sent / (after["_t"] - before["_t"]) * beat


async def idle(ctx: Ctx) -> list[Cell]:
    """A stable cluster left alone: Redis commands per second and CPU per node."""
    cells = []
    for size in ctx.cfg.idle_sizes:
        try:
            cells.append(await _idle(ctx, size))
        except TimeoutError as exc:
            title = f"idle cost, {size} nodes"
            cells.append(Cell(title, ctx.impl.name, skipped=f"failed: {exc}"))
    return cells


async def _idle(ctx: Ctx, size: int) -> Cell:
    impl, harness, cfg = ctx.impl, ctx.harness, ctx.cfg
    cell = Cell(f"idle cost, {size} nodes", impl.name)
    # A window must hold a few of the leader's renewals; slow implementations get longer
    # windows and fewer of them (about two minutes per size).
    window = max(cfg.idle_window, impl.beat)
    windows = cfg.idle_windows
    if window > cfg.idle_window:
        windows = max(3, min(windows, int(120 // window)))
    procs = min(size, cfg.max_procs)
    per_proc = math.ceil(size / procs)
    cluster = Cluster(ctx.pool, f"idle-{impl.name}-{size}")
    client = Redis.from_url(ctx.url)
    try:
        await cluster.add(procs, per_proc)
        await cluster.agree()
        await asyncio.sleep(max(0.5, min(impl.beat, 5.0)))
        for _ in range(windows):
            cmds0, calls0 = await _redis_counts(client)
            stats0 = await _node_stats(harness, cluster)
            cpu0 = {p.pid: p.cpu_seconds() for p in cluster.procs}
            redis_cpu0 = cpu_seconds(ctx.server.pid)
            t0 = time.monotonic()
            await asyncio.sleep(window)
            t1 = time.monotonic()
            redis_cpu1 = cpu_seconds(ctx.server.pid)
            cpu1 = {p.pid: p.cpu_seconds() for p in cluster.procs}
            stats1 = await _node_stats(harness, cluster)
            cmds1, calls1 = await _redis_counts(client)
            elapsed = t1 - t0
            # The two INFO calls of the second sample: the harness's, not the nodes'.
            commands = cmds1 - cmds0 - 2
            cell.add("Redis commands/s (all nodes)", "cmd/s", commands / elapsed)
            cell.add("per node", "cmd/s", commands / elapsed / size)
            leaders = [n for n in stats1 if stats1[n].get("role") == "leader"]
            followers = [n for n in stats1 if n not in leaders and n in stats0]
            if leaders and leaders[0] in stats0:
                leader = leaders[0]
                sent = _per_beat(stats0[leader], stats1[leader], impl.beat)
                cell.add("leader, per heartbeat", "cmd", sent)
            if followers:
                each = [_per_beat(stats0[n], stats1[n], impl.beat) for n in followers]
                mean = sum(each) / len(each)
                cell.add("follower, per heartbeat (mean)", "cmd", mean)
            per_node_cpu = [
                (cpu1[p.pid] - cpu0[p.pid]) / elapsed * 100 / max(1, len(p.nodes))
                for p in cluster.procs
                if p.pid in cpu1 and p.nodes
            ]
            cell.add("CPU per node (mean)", "%", sum(per_node_cpu) / len(per_node_cpu))
            cell.add("CPU per node (max)", "%", max(per_node_cpu))
            cell.add("Redis server CPU", "%", (redis_cpu1 - redis_cpu0) / elapsed * 100)
            cell.trials.append(
                {
                    "elapsed_s": elapsed,
                    "commands": commands,
                    "by_command": {
                        k: v - calls0.get(k, 0) for k, v in calls1.items() if v != calls0.get(k, 0)
                    },
                    "members": {n: s.get("members") for n, s in stats1.items()},
                    "leader_commands": _kinds(stats0, stats1, leaders),
                    "follower_commands": _kinds(stats0, stats1, followers),
                }
            )
    finally:
        await client.aclose()
        await cluster.stop()
    cell.notes.append(
        f"{procs} processes x {per_proc} nodes; CPU per node = process CPU / nodes in it; "
        f"{window:g} s windows; 'heartbeat' = the leader's renewal period "
        f"({impl.beat:g} s)"
    )
    if impl.kind == "tooz":
        cell.notes.append("tooz: per-role counts miss pipelines (used only to join and leave)")
    return cell


# ---- scale -------------------------------------------------------------------------------------


async def scale(ctx: Ctx) -> list[Cell]:
    """100 nodes in one group (several per process, each with its own connections)."""
    impl, harness, cfg = ctx.impl, ctx.harness, ctx.cfg
    procs = min(cfg.scale_nodes, cfg.max_procs)
    per_proc = math.ceil(cfg.scale_nodes / procs)
    cell = Cell("scale", impl.name)
    cell.notes.append(f"{procs * per_proc} nodes: {procs} processes x {per_proc} nodes")
    cold_name = f"cold start to one agreed leader ({procs * per_proc} nodes)"
    await _cold_trials(ctx, cell, cold_name, procs, per_proc, cfg.scale_trials, "scale-cold")

    crash_name = "crash failover, to agreement"
    cold_metric = cell.metric(cold_name, "ms")
    if not cold_metric.samples:
        cell.notes.append("crash failover and calm not run: no cold start reached a stable leader")
        return [cell]
    if impl.slow and cfg.quick:
        cell.notes.append("crash failover: " + _slow_reason(impl, 1))
    else:
        one = _crash_one(ctx, cell, crash_name, per_proc, ratio=False)
        group = f"scale-crash-{impl.name}"
        await _lane(ctx, cell, group, cfg.scale_trials, one, (crash_name, "ms"), procs, per_proc)

    calm_name = f"elections in {cfg.calm:g} s of calm"

    async def calm(cluster: Cluster) -> None:
        leader, _ = await cluster.agree()
        calm_from = time.monotonic()
        await asyncio.sleep(cfg.calm)
        nodes = cluster.nodes()
        events = harness.node_events(nodes, calm_from)
        elections = sum(1 for e in events if e.ev == "elected")
        # A follower that stops hearing the leader names no leader for a while, even when no
        # election follows: the first sign of an overloaded group.
        lost = sum(1 for e in events if e.ev == "leader" and e.data.get("leader") != leader)
        cell.add(calm_name, "count", elections)
        cell.add("times a node lost the leader", "count", lost)
        cell.trials.append({"leader": leader, "elections": elections, "lost_leader": lost})

    group = f"scale-calm-{impl.name}"
    await _lane(ctx, cell, group, 1, calm, (calm_name, "count"), procs, per_proc)
    return [cell]


# ---- memory ------------------------------------------------------------------------------------


async def memory(
    harness: Harness, cfg: Config, impls: list[Impl], server: RedisServer
) -> list[Cell]:
    """RSS of a FastAPI app with a node in its lifespan, above the bare app, and its growth
    while a node joins and another leaves every second. All implementations churn at once
    (RSS does not depend on CPU contention); the bare app is measured alone first."""
    bare_impl = Impl(
        name="none",
        kind="none",
        args=(),
        settings="a bare FastAPI app",
        timescale=1.0,
        timescale_name="",
        beat=1.0,
        lease=None,
        settle=0.0,
        knows_leader=False,
    )
    baselines = {}
    for name, extra in (("bare", []), ("bare+redis", ["--with-redis"])):
        bare = await harness.spawn(bare_impl, server.url, ["--app", *extra], armed="serving")
        await asyncio.sleep(3.0)
        baselines[name] = _median([await _rss_sample(bare) for _ in range(5)])
        await harness.terminate(bare)
    cells = await asyncio.gather(
        *(_memory(harness, cfg, impl, server, baselines) for impl in impls)
    )
    return list(cells)


async def _rss_sample(proc: Any) -> float:
    await asyncio.sleep(0.2)
    return proc.rss_mb()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


async def _memory(
    harness: Harness, cfg: Config, impl: Impl, server: RedisServer, baselines: dict[str, float]
) -> Cell:
    cell = Cell("memory", impl.name)
    group = f"memory-{impl.name}"
    app = await harness.spawn(
        impl, server.url, ["--app", "--group", group, "--node-id", f"{group}-app"], armed="serving"
    )
    churner = None
    try:
        churner = await harness.spawn(impl, server.url)
        await churner.send(f"churn {group} 3 1.0 {group}-churn")
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < cfg.churn:
            samples.append((elapsed, app.rss_mb()))
            await asyncio.sleep(1.0)
        warm = min(10.0, cfg.churn / 6)
        first = [rss for at, rss in samples if warm <= at < warm + 5]
        last = [rss for at, rss in samples if at >= cfg.churn - 5]
        mark = len(harness.events)
        await app.send("stats")
        with contextlib.suppress(TimeoutError):
            await harness.wait_for(
                lambda: any(e.ev == "stats" and e.pid == app.pid for e in harness.events[mark:]),
                10,
                "app stats",
            )
        stats = [e.data for e in harness.events[mark:] if e.ev == "stats" and e.pid == app.pid]
        turns = max(
            (e.data.get("turns", 0) for e in harness.events if e.pid == churner.pid), default=0
        )
        bare_rss = baselines["bare"]
        cell.add("RSS above the bare app", "MB", _median(first) - bare_rss)
        cell.add(
            "RSS above the bare app + a redis-py client",
            "MB",
            _median(first) - baselines["bare+redis"],
        )
        cell.add(f"RSS growth over {cfg.churn:g} s of churn", "MB", _median(last) - _median(first))
        cell.trials.append(
            {
                "baseline_rss_mb": baselines,
                "rss_mb": samples,
                "churn_turns": turns,
                "app_stats": stats[0] if stats else None,
            }
        )
        cell.notes.append(
            f"bare app {bare_rss:.1f} MB, with a connected redis-py client "
            f"{baselines['bare+redis']:.1f} MB; growth = median of the last 5 s - median of "
            f"{warm:g}-{warm + 5:g} s; {turns} joins and leaves"
        )
        if stats and "members" in stats[0]:
            cell.notes.append(f"member table at the end: {stats[0]['members']} entries")
    finally:
        procs = [p for p in (app, churner) if p is not None]
        await harness.retire(procs)
    return cell


# ---- guard cost --------------------------------------------------------------------------------


async def guard(cfg: Config, server: RedisServer) -> list[Cell]:
    """Requests per second through the ASGI app with and without ``require_leader``, in a
    separate process (``benchmarks/guard.py``)."""
    cell = Cell("guard cost", "ours")
    rounds = 5 if cfg.quick else 20
    process = await processes.spawn(
        [
            sys.executable,
            "-m",
            "benchmarks.guard",
            "--redis-url",
            server.url,
            "--rounds",
            str(rounds),
        ],
        env=processes.clean_env(),
        cwd=REPO,
        stderr=None,
        stdin=None,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 600)
    finally:
        if process.returncode is None:
            processes.kill_group(process.pid)
            await process.wait()
        processes.forget(process.pid)
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        cell.skipped = f"the guard benchmark failed (exit {process.returncode}); see its output"
        return [cell]
    if "error" in result:
        cell.skipped = result["error"]
        return [cell]
    for name, values in result.items():
        if name != "notes":
            cell.add_all(name, "ratio" if "/" in name else "req/s", values)
    cell.notes += result.get("notes", [])
    return [cell]


SCENARIOS: dict[str, Scenario] = {
    "cold": cold,
    "crash": crash,
    "graceful": graceful,
    "join": join,
    "pause": pause,
    "stall": stall,
    "idle": idle,
    "scale": scale,
}
"""Per-implementation scenarios, in run order; ``memory`` and ``guard`` run once at the end,
and ``topology`` (``benchmarks.topology``, built on these cells) is added by ``run.py``."""
