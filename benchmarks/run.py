"""The benchmark's command line: run the scenarios, print a markdown report, write raw JSON.

python -m benchmarks --quick                     # about 4 minutes
python -m benchmarks                             # the full run (>= 20 trials per figure)
python -m benchmarks --scenarios crash,pause --impls ours,ours-fast --trials 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fastapi_leader.testing import RedisServer

from .harness import IMPLS, REPO, Harness, Impl, Pool, summary
from .scenarios import (
    DUAL_LEASE,
    SCENARIOS,
    Cell,
    Config,
    Ctx,
    guard,
    handover_name,
    kept_name,
    memory,
    stall_limit_default,
)
from .topology import AFTER_PROMOTION, KINDS, TOKEN, topology
from .topology import title as topology_title

DEFAULT_OUT = REPO / "benchmarks" / "results"
# Issue 10 ("no higher than today's"): the idle cost before the election got a runtime of its
# own, from the README's Performance table (the full run at commit 4d08662, 2 cores): Redis
# commands/s of the whole group by group size, and CPU per node at 50 nodes (%).
IDLE_BEFORE_OWN_RUNTIME = {
    "ours": {"commands": {3: 47.0, 50: 51.0}, "cpu": {50: 0.45}},
    "ours-fast": {"commands": {3: 93.0, 50: 100.0}, "cpu": {50: 0.91}},
}
# Noise allowed above those: commands are whole (+-1 of ~70 in a 1.5 s window); CPU per node
# is a few clock ticks per window.
IDLE_COMMANDS_SLACK = 1.05
IDLE_CPU_SLACK = 1.15
# The stall limit the issue gives as the default, for a library that has none yet.
ISSUE_STALL_LIMIT = 10.0
# Left out of --quick unless named: most of their trials wait 15 to 60 s for a TTL.
QUICK_SKIPS = [name for name, impl in IMPLS.items() if impl.slow]
# Every scenario run per implementation, in the order of --scenarios' help; "topology" runs
# for our rows only (the peers have no Sentinel or Cluster URL to give).
PER_IMPL = {**SCENARIOS, "topology": topology}
OURS_ONLY = {"topology"}
CHOICES = [*PER_IMPL, "memory", "guard"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Leader-election benchmarks with real processes and a private Redis.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 trials, short windows, 60 s of churn; skips the slow peers' TTL-bound trials",
    )
    parser.add_argument("--trials", type=int, help="trials per figure (default 20; --quick 3)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    parser.add_argument(
        "--scenarios",
        default=",".join(CHOICES),
        help=f"comma-separated, from {','.join(CHOICES)} (default: all)",
    )
    parser.add_argument(
        "--impls",
        help=f"comma-separated, from {','.join(IMPLS)} (default: all; with --quick, all but "
        f"{' and '.join(QUICK_SKIPS)}, whose trials wait on 15-30 s TTLs)",
    )
    parser.add_argument("--idle-sizes", default="3,10,50", help="cluster sizes for idle cost")
    parser.add_argument("--scale-nodes", type=int, default=100, help="nodes in the scale group")
    parser.add_argument("--calm", type=float, help="scale: seconds of calm (60; --quick 10)")
    parser.add_argument("--churn", type=float, help="memory: seconds of churn (600; --quick 60)")
    parser.add_argument("--stall-trials", type=int, help="stall: trials (3; --quick 1)")
    parser.add_argument(
        "--stall-lengths",
        default="0.5,1,2,5,10",
        help="stall: seconds the leader's app loop is blocked, each length once per kind "
        "(sleep, spin) and trial (default 0.5,1,2,5,10)",
    )
    parser.add_argument(
        "--topology-trials",
        type=int,
        help="topology: primary failovers per topology, Sentinel and Cluster (5; --quick 3)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON and the node log"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target is missed or not measured (the report is printed first)",
    )
    args = parser.parse_args(argv)
    args.scenario_list = _choose(parser, args.scenarios, CHOICES, "scenario")
    if args.impls is None:
        args.impls = ",".join(i for i in IMPLS if not (args.quick and i in QUICK_SKIPS))
    args.impl_list = _choose(parser, args.impls, list(IMPLS), "implementation")
    return args


def _choose(parser: argparse.ArgumentParser, value: str, known: list[str], what: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        parser.error(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [k for k in known if k in chosen]  # run order is fixed


def make_config(args: argparse.Namespace) -> Config:
    quick = args.quick
    trials = args.trials or (3 if quick else 20)
    return Config(
        quick=quick,
        trials=trials,
        nodes=args.nodes,
        idle_sizes=tuple(int(s) for s in args.idle_sizes.split(",") if s),
        idle_windows=2 if quick and not args.trials else trials,
        idle_window=1.5 if quick else 3.0,
        scale_nodes=args.scale_nodes,
        scale_trials=2 if quick and not args.trials else trials,
        calm=args.calm or (10.0 if quick else 60.0),
        churn=args.churn or (60.0 if quick else 600.0),
        stall_lengths=tuple(float(s) for s in args.stall_lengths.split(",") if s),
        stall_trials=args.stall_trials or (1 if quick else 3),
        topology_trials=args.topology_trials or (3 if quick else 5),
    )


# ---- running -----------------------------------------------------------------------------------


def _progress(started: float, message: str) -> None:
    print(f"[{time.monotonic() - started:7.1f} s] {message}", file=sys.stderr, flush=True)


# The timing scenarios run one at a time, on an otherwise quiet machine. The cost scenarios
# measure consumed CPU time, commands and memory, which other load barely moves: they run
# together, each on its own Redis server, which saves minutes.
TIMING = ["cold", "crash", "graceful", "join", "pause", "stall", "scale", "topology"]


class _Lab:
    """One Redis server and one process pool per implementation, kept for the whole run."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.servers: list[RedisServer] = []
        self.pools: dict[str, Pool] = {}

    def pool(self, impl: Impl) -> Pool:
        if impl.name not in self.pools:
            server = RedisServer().start()
            self.servers.append(server)
            self.pools[impl.name] = Pool(self.harness, impl, server.url)
        return self.pools[impl.name]

    def server(self, impl: Impl) -> RedisServer:
        url = self.pool(impl).redis_url
        return next(s for s in self.servers if s.url == url)

    async def renew(self, impl: Impl) -> None:
        """After a failed scenario: whatever it left running must not skew the next."""
        pool = self.pools[impl.name]
        await pool.close()
        self.pools[impl.name] = Pool(self.harness, impl, pool.redis_url)

    async def close(self) -> None:
        try:
            await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        finally:
            for server in self.servers:
                server.stop()


async def run(args: argparse.Namespace, cfg: Config, log_path: Path) -> list[Cell]:
    started = time.monotonic()
    harness = Harness(log_path)
    lab = _Lab(harness)
    cells: list[Cell] = []
    impls = [IMPLS[name] for name in args.impl_list]
    chosen = args.scenario_list

    async def scenarios(impl: Impl, names: list[str]) -> list[Cell]:
        out: list[Cell] = []
        for name in names:
            if name in OURS_ONLY and impl.kind != "ours":
                continue
            cells = await _one(harness, cfg, impl, lab, name, started)
            out += cells
            if cells and cells[-1].skipped and cells[-1].skipped.startswith("failed"):
                await lab.renew(impl)
        return out

    async def costs() -> list[Cell]:
        out: list[Cell] = []
        if "idle" in chosen:
            for impl in impls:
                out += await scenarios(impl, ["idle"])
        if "guard" in chosen:
            _progress(started, "guard cost")
            with RedisServer() as server:
                out += await _guarded("guard cost", "ours", guard(cfg, server))
        return out

    async def memory_cells() -> list[Cell]:
        if "memory" not in chosen or not impls:
            return []
        _progress(started, f"memory: {cfg.churn:g} s of churn, {len(impls)} impls at once")
        with RedisServer() as server:
            return await _guarded("memory", "all", memory(harness, cfg, impls, server))

    try:
        for impl in impls:
            cells += await scenarios(impl, [s for s in TIMING if s in chosen])
        for group in await asyncio.gather(costs(), memory_cells()):
            cells += group
    finally:
        try:
            await lab.close()
        finally:
            await harness.close()
    _progress(started, "done")
    return cells


async def _one(
    harness: Harness, cfg: Config, impl: Impl, lab: _Lab, name: str, started: float
) -> list[Cell]:
    _progress(started, f"{impl.name}: {name}")
    began = time.monotonic()
    ctx = Ctx(harness, cfg, impl, lab.server(impl), lab.pool(impl))
    cells = await _guarded(name, impl.name, PER_IMPL[name](ctx))
    for cell in cells:
        cell.seconds = time.monotonic() - began
    return cells


async def _guarded(scenario: str, impl: str, work: Any) -> list[Cell]:
    """A scenario that fails becomes a row that says so, not a crash of the whole run."""
    try:
        cells: list[Cell] = await work
        return cells
    except Exception as exc:
        traceback.print_exc()
        return [Cell(scenario, impl, skipped=f"failed: {type(exc).__name__}: {exc}")]


# ---- report ------------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if value == math.inf:
        return "timeout"
    if unit == "count":
        return f"{value:g}"
    if unit == "kept":
        return {1.0: "yes", 0.0: "no"}.get(value, f"{value:.2f}")
    if unit in ("x", "ratio"):
        return f"{value:.3f}"
    if unit == "ms":
        return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
    if unit in ("%", "MB", "cmd"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def _summaries(cells: list[Cell]) -> dict[tuple[str, str, str], dict[str, float]]:
    out = {}
    for cell in cells:
        for metric in cell.metrics:
            s = summary(metric.samples, metric.timeouts)
            if s is not None:
                out[(cell.scenario, cell.impl, metric.name)] = s
    return out


# The command-line key of each scenario, by the title its cells carry (a scenario that fails
# leaves one cell titled by its key, and its targets must still be found).
_TITLE_KEYS = {
    "cold start": "cold",
    "crash failover": "crash",
    "graceful handover": "graceful",
    "join": "join",
    "pause": "pause",
    "app-loop stall": "stall",
    "idle cost": "idle",
    "scale": "scale",
    "memory": "memory",
    "guard cost": "guard",
    "topology failover": "topology",
}


def scenario_key(title: str) -> str:
    """The ``--scenarios`` key a cell's title belongs to (a key is its own key)."""
    for prefix in sorted(_TITLE_KEYS, key=len, reverse=True):
        if title.startswith(prefix):
            return _TITLE_KEYS[prefix]
    return title


def evaluate(cells: list[Cell], cfg: Config) -> list[dict[str, Any]]:
    """The issue's targets, each met, missed or not measured, with its figure.

    A target never reads "met" on a partial measurement: a trial that timed out (or was given
    up on) misses it whatever the other trials say, and a scenario that failed leaves its
    targets "not measured" rather than absent."""
    s = _summaries(cells)
    present = {cell.impl for cell in cells}
    rows: list[dict[str, Any]] = []

    def check(target: str, impl: str, key: tuple[str, str, str], stat: str, ok: Any) -> None:
        def row(figure: str, met: bool | None) -> None:
            rows.append({"target": target, "impl": impl, "figure": figure, "met": met})

        # The cell of this figure failed, or the whole scenario did (its one cell is titled by
        # its key); another cell of the same scenario failing leaves this one measured.
        failed = [
            c
            for c in cells
            if c.impl in (key[1], "all")
            and c.scenario in (key[0], scenario_key(key[0]))
            and (c.skipped or "").startswith("failed")
        ]
        if failed:
            row(f"scenario {failed[0].skipped}", None)
            return
        if not any(c.scenario == key[0] and c.impl == key[1] for c in cells):
            return  # the scenario was not asked for
        found = s.get(key)
        if found is None:
            row("not measured", None)
            return
        metrics = [m for c in cells for m in c.metrics if (c.scenario, c.impl, m.name) == key]
        unit = metrics[0].unit
        timeouts = sum(m.timeouts for m in metrics)
        value = found[stat]
        figure = "timeout" if value == math.inf else f"{_fmt(value, unit)} {unit}"
        if timeouts:
            n = int(found["n"])
            row(f"{stat} {figure}; {timeouts} of {n} trials timed out", False)
            return
        row(f"{stat} {figure}", bool(ok(value)))

    for name in ("ours", "ours-fast"):
        if name not in present:
            continue
        impl = IMPLS[name]
        limit = 1.5 * impl.timescale * 1000
        check(
            f"crash failover p95 <= 1.5 x election_timeout_min ({limit:.0f} ms)",
            name,
            ("crash failover", name, "failover, to agreement"),
            "p95",
            lambda v, limit=limit: v <= limit,
        )
        # Issue 10: crash failover p95 stays <= 750 ms at the defaults with a runtime of its own.
        absolute = 750.0 if name == "ours" else 300.0
        check(
            f"crash failover p95 <= {absolute:.0f} ms",
            name,
            ("crash failover", name, "failover, to agreement"),
            "p95",
            lambda v, absolute=absolute: v <= absolute,
        )
        check(
            "graceful handover: leaderless gap p95 <= 20 ms",
            name,
            ("graceful handover", name, "leaderless gap (demoted -> elected)"),
            "p95",
            lambda v: v <= 20,
        )
        check(
            "join: 0 leader changes",
            name,
            ("join", name, "leader changes"),
            "max",
            lambda v: v == 0,
        )
        check(
            "pause: 0 ms of dual valid lease",
            name,
            ("pause", name, DUAL_LEASE),
            "max",
            lambda v: v == 0,
        )
        _stall_targets(rows, cells, cfg, name, check)
        followers = []
        for size in cfg.idle_sizes:
            scenario = f"idle cost, {size} nodes"
            # The median: a window counts whole commands, +-1 of ~30 at 1.5 s windows.
            check(
                f"idle, {size} nodes: leader <= 1 command per heartbeat",
                name,
                (scenario, name, "leader, per heartbeat"),
                "median",
                lambda v: v <= 1.0,
            )
            follower = s.get((scenario, name, "follower, per heartbeat (mean)"))
            if follower is not None:
                followers.append((size, follower["median"]))
        if len(followers) >= 2:
            figures = ", ".join(f"{size}: {value:.2f}" for size, value in followers)
            # "Fewer" means a real drop (10 %), not noise in the second decimal.
            decreasing = all(b[1] < 0.9 * a[1] for a, b in itertools.pairwise(followers))
            rows.append(
                {
                    "target": "idle: followers send fewer commands per beat as the group grows",
                    "impl": name,
                    "figure": f"median per follower per heartbeat: {figures}",
                    "met": decreasing,
                }
            )
        before = IDLE_BEFORE_OWN_RUNTIME[name]
        for size, commands in before["commands"].items():
            check(
                f"idle, {size} nodes: Redis commands/s no higher than before the own runtime "
                f"({commands:g}, +{IDLE_COMMANDS_SLACK - 1:.0%})",
                name,
                (f"idle cost, {size} nodes", name, "Redis commands/s (all nodes)"),
                "median",
                lambda v, commands=commands: v <= commands * IDLE_COMMANDS_SLACK,
            )
        for size, cpu in before["cpu"].items():
            check(
                f"idle, {size} nodes: CPU per node no higher than before the own runtime "
                f"({cpu:g} %, +{IDLE_CPU_SLACK - 1:.0%})",
                name,
                (f"idle cost, {size} nodes", name, "CPU per node (mean)"),
                "median",
                lambda v, cpu=cpu: v <= cpu * IDLE_CPU_SLACK,
            )
        big = max(cfg.idle_sizes)
        check(
            f"idle, {big} nodes: CPU per node < 2 %",
            name,
            (f"idle cost, {big} nodes", name, "CPU per node (mean)"),
            "p95",
            lambda v: v < 2.0,
        )
        procs = min(cfg.scale_nodes, cfg.max_procs)
        size = procs * math.ceil(cfg.scale_nodes / procs)
        check(
            f"scale, {size} nodes: one leader within 2 s of a cold start",
            name,
            ("scale", name, f"cold start to one agreed leader ({size} nodes)"),
            "p95",
            lambda v: v <= 2000,
        )
        check(
            f"scale, {size} nodes: no spurious elections in {cfg.calm:g} s",
            name,
            ("scale", name, f"elections in {cfg.calm:g} s of calm"),
            "max",
            lambda v: v == 0,
        )
        check(
            "memory: <= 10 MB RSS above the bare app",
            name,
            ("memory", name, "RSS above the bare app"),
            "median",
            lambda v: v <= 10,
        )
        check(
            f"memory: < 1 MB growth over {cfg.churn:g} s of churn",
            name,
            ("memory", name, f"RSS growth over {cfg.churn:g} s of churn"),
            "median",
            lambda v: v < 1,
        )
    for name in (n for n in IMPLS if IMPLS[n].kind == "ours" and n in present):
        _topology_targets(IMPLS[name], check)
    if "ours-economy" in present:
        # Issue 11: a group of 3 on the economy profile costs at most 2 commands/s, counted as
        # Redis counts them (a script's own calls included), and fails over within about its
        # largest election timeout plus a round.
        check(
            "idle, 3 nodes: economy profile <= 2 Redis commands/s",
            "ours-economy",
            ("idle cost, 3 nodes", "ours-economy", "Redis commands/s (all nodes)"),
            "median",
            lambda v: v <= 2.0,
        )
        limit = IMPLS["ours-economy"].settle * 1000 + 1000
        check(
            f"crash failover p95 <= election_timeout_max + 1 s ({limit:.0f} ms)",
            "ours-economy",
            ("crash failover", "ours-economy", "failover, to agreement"),
            "p95",
            lambda v, limit=limit: v <= limit,
        )
    for cell in cells:
        if cell.scenario != "guard cost":
            continue
        for metric in cell.metrics:
            if metric.name.startswith("require_leader / unguarded rps"):
                check(
                    f"guard cost: {metric.name} >= 0.97",
                    "ours",
                    ("guard cost", "ours", metric.name),
                    "median",
                    lambda v: v >= 0.97,
                )
    return rows


def _topology_targets(impl: Impl, check: Any) -> None:
    """Issue 11: after the primary dies, a new leader within the topology's own failover time
    plus one election timeout (the time from the promotion to the new lease, against the
    largest election timeout), with a larger fencing token."""
    assert impl.timeout_max is not None
    limit = impl.timeout_max * 1000
    for kind in KINDS:
        scenario = topology_title(kind)
        check(
            f"{kind}: primary killed -> new leader within Redis's promotion + one election "
            f"timeout (promoted -> new leader p95 <= election_timeout_max, {limit:.0f} ms)",
            impl.name,
            (scenario, impl.name, AFTER_PROMOTION),
            "p95",
            lambda v, limit=limit: v <= limit,
        )
        check(
            f"{kind}: primary killed -> the new leader's fencing token is larger",
            impl.name,
            (scenario, impl.name, TOKEN),
            "min",
            lambda v: v >= 1,
        )


def _stall_targets(
    rows: list[dict[str, Any]], cells: list[Cell], cfg: Config, name: str, check: Any
) -> None:
    """Issue 10's stall targets for one of our rows: every stall below the limit kept (one
    row for all of them), and beyond a short limit a handover, neither before the limit nor
    long after it."""
    cell = next((c for c in cells if c.scenario == "app-loop stall" and c.impl == name), None)
    if cell is not None and not cell.skipped:
        limit = stall_limit_default()
        limit_note = f"{limit:g} s" if limit is not None else f"{ISSUE_STALL_LIMIT:g} s (issue)"
        below = [s for s in cfg.stall_lengths if s < (limit or ISSUE_STALL_LIMIT)]
        lost, kept, missing = [], 0, []
        for seconds in below:
            for kind in ("sleep", "spin"):
                metric = next((m for m in cell.metrics if m.name == kept_name(seconds, kind)), None)
                if metric is None or not metric.samples:
                    missing.append(f"{seconds:g} s {kind}")
                elif min(metric.samples) < 1.0 or metric.timeouts:
                    lost.append(f"{seconds:g} s {kind}")
                else:
                    kept += 1
        figure = f"kept through {kept} of {kept + len(lost)}" + (
            f"; lost through {', '.join(lost)}" if lost else ""
        )
        if missing:
            figure += f"; not measured: {', '.join(missing)}"
        rows.append(
            {
                "target": f"stall: leadership kept, same term, through app-loop stalls below "
                f"LEADER_LOOP_STALL_LIMIT ({limit_note}), sleep and spin",
                "impl": name,
                "figure": figure,
                "met": None if kept + len(lost) == 0 else not lost and not missing,
            }
        )
    limit_ms = cfg.stall_limit * 1000
    for kind in ("sleep", "spin"):
        key = ("app-loop stall beyond the limit", name, handover_name(cfg, kind))
        check(
            f"stall beyond a {cfg.stall_limit:g} s limit ({kind}): no successor before the "
            "limit (-100 ms)",
            name,
            key,
            "min",
            lambda v: v >= limit_ms - 100,
        )
        check(
            f"stall beyond a {cfg.stall_limit:g} s limit ({kind}): successor p95 <= limit + 1 s",
            name,
            key,
            "p95",
            lambda v: v <= limit_ms + 1000,
        )


def render(cells: list[Cell], targets: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# fastapi-leader benchmarks ({'quick' if meta['config']['quick'] else 'full'} run)",
        "",
        f"{meta['host']['cpus']} CPUs, load average {meta['load_before']} before and "
        f"{meta['load_after']} after; {meta['duration_s']:.0f} s; commit {meta['commit']}. "
        "Times are `time.monotonic()` differences between the harness's signals and the nodes' "
        "own reports. p95 is the nearest-rank 95th percentile (the max below 20 samples).",
        "",
        "| impl | settings |",
        "|---|---|",
    ]
    left_out = [name for name in QUICK_SKIPS if name not in meta["impls"]]
    for name in meta["impls"]:
        lines.append(f"| {name} | {IMPLS[name].settings} |")
    for name in left_out:
        lines.append(
            f"| {name} | *not run: {IMPLS[name].settings}; most of its trials wait "
            f"{IMPLS[name].timescale:g} s or more for a TTL (run without --quick, or name it in "
            "--impls)* |"
        )
    scenarios: list[str] = []
    for cell in cells:
        if cell.scenario not in scenarios:
            scenarios.append(cell.scenario)
    for scenario in scenarios:
        lines += ["", f"## {scenario}", ""]
        lines += [
            "| impl | figure | unit | n | min | median | p95 | max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        notes = []
        for cell in (c for c in cells if c.scenario == scenario):
            if cell.skipped:
                lines.append(f"| {cell.impl} | *{cell.skipped}* | | | | | | |")
            for metric in cell.metrics:
                s = summary(metric.samples, metric.timeouts)
                if s is None:
                    continue
                u = metric.unit
                lines.append(
                    f"| {cell.impl} | {metric.name} | {u} | {s['n']} | {_fmt(s['min'], u)} | "
                    f"{_fmt(s['median'], u)} | {_fmt(s['p95'], u)} | {_fmt(s['max'], u)} |"
                )
            notes += [f"{cell.impl}: {note}" for note in cell.notes]
            if len(cell.failures) > 2:
                notes.append(f"{cell.impl}: {len(cell.failures)} trials timed out; the first two:")
            for failure in cell.failures[:2]:
                notes.append(
                    f"{cell.impl}: a trial timed out ({failure['reason']}): "
                    f"{failure['nodes']} nodes, leading {failure['leading'][:3]}, "
                    f"named {failure['named_leaders']}, "
                    f"{failure['elections_last_10s']} elections in the last 10 s; "
                    f"totals {failure.get('totals') or 'n/a'}"
                )
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    if targets:
        lines += ["", "## targets", "", "| target | impl | figure | met |", "|---|---|---|---|"]
        for row in targets:
            met = {True: "met", False: "**missed**", None: "not measured"}[row["met"]]
            lines.append(f"| {row['target']} | {row['impl']} | {row['figure']} | {met} |")
    return "\n".join(lines) + "\n"


# ---- main --------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}{' (dirty tree)' if dirty else ''}" or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"bench-{stamp}-nodes.log"
    load_before = _load()
    began = time.monotonic()

    # SIGTERM (nox or CI stopping us) unwinds like Ctrl-C: every finally block runs.
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        cells = asyncio.run(run(args, cfg, log_path))
    except KeyboardInterrupt:
        print("interrupted: every process the benchmark started was stopped", file=sys.stderr)
        return 130
    meta = {
        "started": stamp,
        "duration_s": time.monotonic() - began,
        "commit": _git_commit(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in ("redis", "tooz", "fastapi", "apscheduler")},
        "load_before": load_before,
        "load_after": _load(),
        "config": dataclasses.asdict(cfg),
        "impls": args.impl_list,
        "settings": {name: IMPLS[name].settings for name in args.impl_list},
        "node_log": str(log_path),
    }
    targets = evaluate(cells, cfg)
    report = render(cells, targets, meta)
    print(report)
    out = args.out / f"bench-{stamp}.json"
    with contextlib.suppress(OSError):
        (args.out / f"bench-{stamp}.md").write_text(report)
    out.write_text(
        json.dumps(
            {"meta": meta, "cells": [dataclasses.asdict(c) for c in cells], "targets": targets},
            indent=1,
        )
    )
    print(f"raw samples: {out}", file=sys.stderr)
    unmet = [row for row in targets if row["met"] is not True]
    if args.strict and unmet:
        print(f"{len(unmet)} target(s) missed or not measured", file=sys.stderr)
        return 1
    return 0
