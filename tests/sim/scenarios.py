"""Seeded fault scenarios for the simulator, and the checks run at their end.

``run_scenario(seed)`` builds everything from the seed alone, so a failure replays exactly with
``python -m tests.sim SEED`` or ``pytest tests/core/test_simulation.py -k 'seed-SEED]'``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fastapi_leader import LeaderSettings
from fastapi_leader.core import Timing

from .simulator import Faults, Simulation

# Faults happen in [WARMUP, WARMUP + FAULT_WINDOW); then the network is calm.
WARMUP = 2.0
FAULT_WINDOW = 10.0
# Liveness: once the last fault has ended, one leader must emerge within this long. The protocol
# needs the largest election timeout plus one round (four broker round trips); the allowance on
# top covers a competing candidacy and the simulated 50 ms one-way latency.
SETTLE = 2.5


# Every fourth seed runs LeaderSettings.fast(): 50 ms heartbeats on a network a fraction as
# slow (one-way latency up to 20 ms instead of 50), as that profile assumes.
PROFILES = {"default": Timing(), "fast": Timing(**LeaderSettings.FAST_PROFILE)}


@dataclass
class Outcome:
    seed: int
    profile: str
    nodes: int
    kind: str
    faults: list[str]
    elections: int
    settled_after: float | None  # seconds from the last fault's end to a stable single leader


def run_scenario(seed: int) -> Outcome:
    rng = random.Random(seed)
    kind = "join" if seed % 5 == 0 else "chaos"
    profile = "fast" if seed % 4 == 3 else "default"
    timing = PROFILES[profile]
    faults = Faults(
        max_delay=rng.uniform(0.0, 0.05) * timing.election_timeout_min / 0.5,
        drop=rng.choice([0.0, 0.01, 0.05]) if kind == "chaos" else 0.0,
        duplicate=rng.choice([0.0, 0.02, 0.1]),
    )
    sim = Simulation(seed, timing=timing, faults=faults)
    count = rng.randint(3, 9)
    for _ in range(count):
        sim.add_node()
    plan: list[str] = []
    faults_end = _plan_joins(sim, rng, plan) if kind == "join" else _plan_chaos(sim, rng, plan)

    def calm() -> None:
        sim.faults.drop = 0.0
        sim.faults.duplicate = 0.0
        for node in sim.nodes.values():
            node.inbound_drop = 0.0

    sim.at(faults_end, calm)
    stable: dict[str, object] = {"leader": None, "since": None}

    def watch(s: Simulation) -> None:
        leaders = s.leaders()
        current = leaders[0].node_id if len(leaders) == 1 else None
        if current != stable["leader"]:
            stable["leader"] = current
            stable["since"] = s.time if current is not None else None

    if kind == "join":
        sim.run_until(WARMUP)
        if len(sim.leaders()) != 1:
            sim.fail(f"no single leader {WARMUP} s after a cold start")
    sim.run_until(faults_end + SETTLE + 1.0, check=watch)

    settled_after = None
    alive = [n for n in sim.nodes.values() if n.alive]
    if alive:
        leaders = sim.leaders()
        if len(leaders) != 1:
            sim.fail(f"liveness: {len(leaders)} leaders {SETTLE + 1.0:.1f} s after the faults")
        leader = leaders[0].node_id
        for node in alive:
            seen = node.core.status(node.now).leader_id
            if seen != leader:
                sim.fail(f"liveness: {node.node_id} follows {seen}, not {leader}")
        since = stable["since"]
        assert isinstance(since, float)
        settled_after = max(0.0, since - faults_end)
        if settled_after > SETTLE:
            sim.fail(f"liveness: a stable leader only {settled_after:.2f} s after the faults")
    if kind == "join":
        late = [e for e in sim.elections if e[0] > WARMUP]
        if late:
            sim.fail(f"a joining node unseated the leader: {late}")
    return Outcome(seed, profile, count, kind, plan, len(sim.elections), settled_after)


def _plan_joins(sim: Simulation, rng: random.Random, plan: list[str]) -> float:
    """Nodes join while a leader is healthy, and one node hears the group through a lossy
    link, so it misses heartbeats and stands: neither may unseat the leader. Returns when the
    last node joined."""
    last = WARMUP
    pick = rng.random()

    def degrade() -> None:
        # A follower's link, not the leader's: a leader that cannot hear itself must step down.
        followers = [n for n in sim.nodes.values() if n not in sim.leaders()]
        lossy = followers[int(pick * len(followers))]
        lossy.inbound_drop = 0.6
        plan.append(f"{lossy.node_id} loses 60% of what it should hear")

    sim.at(WARMUP, degrade)
    for i in range(rng.randint(1, 4)):
        at = WARMUP + rng.uniform(0, FAULT_WINDOW)
        node_id = f"j{i}"
        plan.append(f"join {node_id} at {at:.2f}")
        sim.at(at, lambda node_id=node_id: sim.add_node(node_id))
        last = max(last, at)
    return last


def _plan_chaos(sim: Simulation, rng: random.Random, plan: list[str]) -> float:
    """A random mix of faults; returns when the last one ends."""
    ids = list(sim.nodes)
    last = WARMUP
    for _ in range(rng.randint(1, 6)):
        at = WARMUP + rng.uniform(0, FAULT_WINDOW - 2.0)
        duration = rng.uniform(0.1, 2.0)
        what = rng.choice(["crash", "restart", "stop", "pause", "cut", "redis", "join"])
        target = rng.choice(ids)
        plan.append(f"{what} {target} at {at:.2f} for {duration:.2f}")
        last = max(last, at + duration)
        if what == "crash":
            sim.crash(target, at)
        elif what == "restart":
            sim.crash(target, at, restart_after=duration)
        elif what == "stop":
            sim.stop(target, at)
        elif what == "pause":
            sim.pause(target, at, duration)
        elif what == "cut":
            sim.cut(target, at, duration)
        elif what == "redis":
            sim.restart_redis(at, duration)
        else:
            node_id = f"j{len(plan)}"
            sim.at(at, lambda node_id=node_id: sim.add_node(node_id))
    return last


def crowded_cold_start(
    seed: int, profile: str, *, nodes: int = 100, until: float = 4.0
) -> tuple[Simulation, float | None]:
    """``nodes`` nodes start over 0.6 s on a host with two CPUs, each message, timer and
    answer costing 200 us of one (about twice what a node costs on a 2-core laptop), over a
    loopback broker. Returns the simulation (run for ``until`` seconds) and when every node
    first named one leader that held a valid lease (to 10 ms), or None."""
    faults = Faults(max_delay=0.001, tick_jitter=0.002, cores=2, cpu_cost=200e-6)
    sim = Simulation(seed, timing=PROFILES[profile], faults=faults)
    for _ in range(nodes):
        sim.at(sim.rng.uniform(0.0, 0.6), lambda: sim.add_node())
    agreed = None
    step = 0.01  # checking every node after every event would cost more than the run
    while sim.time < until:
        sim.run_until(sim.time + step)
        if agreed is None and len(sim.nodes) == nodes and _all_follow_one_leader(sim):
            agreed = sim.time
    return sim, agreed


def _all_follow_one_leader(sim: Simulation) -> bool:
    leaders = sim.leaders()
    if len(leaders) != 1:
        return False
    leader = leaders[0].node_id
    return all(n.core.status(n.now).leader_id == leader for n in sim.nodes.values())
