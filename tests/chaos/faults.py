"""The fault kinds and the seeded schedule that mixes them.

A schedule is an endless sequence of :class:`Step` drawn from one ``random.Random(seed)``:
the kinds come in shuffled rounds (every kind once per round, so even a short run meets each
of them), and every duration, target and mode is drawn from the same generator. The same seed
therefore always gives the same steps; which node is "the leader" when a step runs depends on
the run, so a replay repeats the schedule, not necessarily every election.

Each Redis topology has its own faults (:data:`TOPOLOGY_FAULTS`). The standalone server
(:data:`KINDS`) sits behind one fault proxy per node, so the network faults can hit one node's
connections. Sentinel and Cluster runs have no proxy: Sentinel hands out the primary's real
address and Cluster's MOVED replies and slot map name the real nodes, so a proxy in front of
the first address would see only part of the traffic. They run their topology's failover
(``sentinel-failover``, ``cluster-failover``) and the faults done to node processes, which
need no proxy (:data:`PROCESS_KINDS`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "ALL_KINDS",
    "KINDS",
    "LAGGING_SECONDS",
    "LOOP_STALL_BELOW",
    "LOOP_STALL_BEYOND",
    "LOOP_STALL_LIMIT",
    "PROCESS_KINDS",
    "TOPOLOGIES",
    "TOPOLOGY_FAULTS",
    "Step",
    "check_faults",
    "describe",
    "schedule",
]

LAGGING_SECONDS = 2.0
"""*-failover ``lagging``: how long the replica misses the primary's writes before the kill.
A publish waits 0.5 s for its replica (then counts as confirmed by the primary alone) and the
next one comes 50 ms later: at least one such publish completes in the first second, with a
second of margin before the kill."""

LOOP_STALL_LIMIT = 3.0
"""The ``LEADER_LOOP_STALL_LIMIT`` (s) every chaos node runs with: above the longest SIGSTOP of
``stop-leader`` (2.5 s, which stalls the app's loop too) and short enough for a run."""
LOOP_STALL_BELOW = (0.5, LOOP_STALL_LIMIT - 1.0)
"""``loop-stall`` durations: below the limit by a second at least (the watchdog's margin)."""
LOOP_STALL_BEYOND = (LOOP_STALL_LIMIT + 1.5, LOOP_STALL_LIMIT + 3.0)
"""``loop-stall-long`` durations: past the limit by more than a handover takes."""

KINDS: tuple[str, ...] = (
    "kill-leader",  # SIGKILL the leader; restart it after `duration`
    "kill-follower",
    "term-leader",  # SIGTERM (graceful stop: handover); restart after `duration`
    "term-follower",
    "stop-leader",  # SIGSTOP the leader for `duration` (> the election timeout), then SIGCONT
    "redis-restart",  # stop Redis (SIGTERM or SIGKILL: `mode`) for `duration`, restart it
    "redis-wipe",  # the same, and the restarted Redis has lost the election's keys
    "redis-sigstop",  # SIGSTOP the Redis server for `duration`
    "redis-client-pause",  # CLIENT PAUSE <duration> ALL
    "net-cut",  # one node <-> Redis: both connections cut (`mode`: reset or drop)
    "net-cut-subscriber",  # only the node's subscriber connection
    "net-cut-command",  # only its command connection(s)
    "net-latency",  # latency and jitter on every chunk, both ways
    "net-half-open",  # connections go silent; new ones are accepted and never answered
    "loop-stall",  # block a node's app loop (`mode`: sleep or spin) below LOOP_STALL_LIMIT
    "loop-stall-long",  # block the leader's app loop beyond LOOP_STALL_LIMIT: a handover
)
"""The standalone run's faults (the default)."""

PROCESS_KINDS: tuple[str, ...] = (
    "kill-leader",
    "kill-follower",
    "term-leader",
    "term-follower",
    "stop-leader",
    "loop-stall",
    "loop-stall-long",
)
"""Faults done to node processes (signals, the steering commands): any topology."""

TOPOLOGY_FAULTS: dict[str, tuple[str, ...]] = {
    "standalone": KINDS,
    # SIGKILL the primary; the sentinels promote the replica; after `duration` the old
    # primary comes back as the new one's replica (SentinelTopology.restore).
    "sentinel": ("sentinel-failover", *PROCESS_KINDS),
    # SIGKILL the primary of the group's slot; its replica takes over; after `duration` the
    # killed node comes back as the new primary's replica (ClusterTopology.restore).
    "cluster": ("cluster-failover", *PROCESS_KINDS),
}
"""Every fault a topology can run (its default: all of them)."""

TOPOLOGIES: tuple[str, ...] = tuple(TOPOLOGY_FAULTS)
ALL_KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for ks in TOPOLOGY_FAULTS.values() for k in ks))


@dataclass(frozen=True)
class Step:
    """One fault of a schedule, as drawn (before it meets a running group)."""

    index: int
    kind: str
    duration: float
    """How long the fault lasts; for kill-* and term-*, how long the node stays down; for
    *-failover, how long the killed primary stays down after its replica took over."""
    target: str
    """``leader`` or ``follower``: whose process or connection the fault hits (Redis faults:
    ``redis``, failovers included)."""
    pick: int
    """Which follower, as an index into the followers sorted by name (modulo their number)."""
    gap: float
    """Quiet time after the group has recovered, before the next step."""
    mode: str = ""
    """net-cut*: ``reset`` or ``drop``; redis-restart/-wipe: ``term`` or ``kill``;
    *-failover: ``prompt`` (the replica is up to date, as on a quiet network: it lags by
    well under a millisecond here) or ``lagging`` (replication is cut for
    :data:`LAGGING_SECONDS` before the kill, and the leader resigns in it: the failover
    loses the writes of that time, a whole leadership among them);
    loop-stall*: ``sleep`` (``time.sleep``) or ``spin`` (pure Python, holding the GIL)."""
    latency: float = 0.0
    jitter: float = 0.0


def _draw(rng: random.Random, index: int, kind: str) -> Step:
    duration = round(rng.uniform(0.4, 2.5), 3)
    redis = kind.startswith("redis-") or kind.endswith("-failover")
    target = "redis" if redis else rng.choice(("leader", "follower"))
    mode = ""
    latency = jitter = 0.0
    if kind.endswith("-leader") or kind == "loop-stall-long":
        target = "leader"
    elif kind.endswith("-follower"):
        target = "follower"
    if kind.startswith(("kill-", "term-")):
        duration = round(rng.uniform(0.2, 1.0), 3)
    elif kind == "stop-leader":
        # Longer than the largest election timeout (0.7 s by default): a successor is elected.
        duration = round(rng.uniform(1.0, 2.5), 3)
    elif kind in ("redis-restart", "redis-wipe"):
        mode = rng.choice(("term", "kill"))
    elif kind.endswith("-failover"):
        mode = rng.choice(("prompt", "lagging"))
    elif kind.startswith("net-cut"):
        mode = rng.choice(("reset", "drop"))
    elif kind == "loop-stall":
        duration = round(rng.uniform(*LOOP_STALL_BELOW), 3)
        mode = rng.choice(("sleep", "spin"))
    elif kind == "loop-stall-long":
        duration = round(rng.uniform(*LOOP_STALL_BEYOND), 3)
        mode = rng.choice(("sleep", "spin"))
    elif kind == "net-latency":
        duration = round(rng.uniform(1.0, 3.0), 3)
        latency = round(rng.uniform(0.005, 0.25), 3)
        jitter = round(rng.uniform(0.0, 0.2), 3)
    return Step(
        index=index,
        kind=kind,
        duration=duration,
        target=target,
        pick=rng.randrange(1000),
        gap=round(rng.uniform(0.3, 1.2), 3),
        mode=mode,
        latency=latency,
        jitter=jitter,
    )


def check_faults(kinds: Sequence[str], topology: str = "standalone") -> None:
    """ValueError unless ``kinds`` is a non-empty list of faults ``topology`` can run."""
    if topology not in TOPOLOGY_FAULTS:
        raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
    known = TOPOLOGY_FAULTS[topology]
    unknown = set(kinds) - set(known)
    if unknown or not kinds:
        raise ValueError(
            f"fault kinds {sorted(unknown)} cannot run on the {topology} topology; "
            f"it runs: {', '.join(known)}"
        )


def schedule(seed: int, kinds: Sequence[str] = KINDS) -> Iterator[Step]:
    """The endless schedule of ``seed``: shuffled rounds of ``kinds``."""
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
    rng = random.Random(seed)
    index = 0
    while True:
        round_ = list(kinds)
        rng.shuffle(round_)
        for kind in round_:
            index += 1
            yield _draw(rng, index, kind)


def describe(step: Step) -> str:
    """A one-line description of a step (without its runtime target)."""
    parts = [f"{step.kind}", f"{step.duration:.2f}s"]
    if step.mode:
        parts.append(step.mode)
    if step.kind == "net-latency":
        parts.append(f"{step.latency * 1000:.0f}ms+{step.jitter * 1000:.0f}ms jitter")
    return " ".join(parts)
