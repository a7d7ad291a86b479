"""Primary failover on Redis as production runs it: Sentinel and Cluster (issue 11).

Each trial builds a fresh topology from :mod:`harness.topologies` (a primary, a replica and 3
sentinels; or 3 primaries and 3 replicas), starts the group's node processes with the
topology's ``redis+sentinel://`` or ``redis+cluster://`` URL, waits for a stable leader, and
SIGKILLs the Redis primary (for Cluster, the primary of the group's slot). It measures, from
the kill: when Redis reports the replica promoted (polled from here), when a node of the
group reports a new lease (its own report), and when every node names that leader; and the
fencing token before and after, which must grow. The issue's promise is a new leader "within
the cluster's/sentinels' own failover time plus one election timeout": the report gives the
promotion time, and the leader time minus the promotion time against the settings' largest
election timeout.

A fresh topology per trial, because a failover leaves no replica behind to promote again,
and what one failover leaves (a demoted primary rejoining, sentinels' epochs) must not
colour the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from fastapi_leader import LeaderSettings
from fastapi_leader.testing import RedisServer
from fastapi_leader.transport.base import Names
from harness import processes
from harness.topologies import (
    FAILOVER_TIMEOUT,
    NODE_TIMEOUT_MS,
    ClusterTopology,
    SentinelTopology,
)

from .harness import Cluster, Event, Impl, Pool
from .scenarios import Cell, Ctx

KINDS = ("Sentinel", "Cluster")
TITLE = "topology failover"
PROMOTED = "kill -> replica promoted (Redis)"
LEADER = "kill -> new leader holding the lease"
AFTER_PROMOTION = "promoted -> new leader"
AGREED = "kill -> every node names it"
TOKEN = "fencing token: after - before"
RESUBSCRIBED = "promoted -> first node subscribed again"
RESUBSCRIBED_TO_LEADER = "first node subscribed again -> new leader"
# How often the promotion is polled: its resolution (plus a round trip).
POLL = 0.01
TOPOLOGY_NOTES = {
    "Sentinel": (
        "a primary, 1 replica, 3 sentinels (quorum 2, down-after-milliseconds "
        f"{NODE_TIMEOUT_MS}, failover-timeout 10000); promoted = the replica answers ROLE master "
        "and the sentinels name it as the primary"
    ),
    "Cluster": (
        f"3 primaries + 3 replicas (cluster-node-timeout {NODE_TIMEOUT_MS}, "
        "cluster-replica-validity-factor 0); the primary of the group's slot is killed; "
        "promoted = its replica answers ROLE master"
    ),
}


def title(kind: str) -> str:
    """The report section of one topology."""
    return f"{TITLE}, {kind}"


# ---- reading the reports (pure) ------------------------------------------------------------------


def first_new_lease(events: Sequence[Event], nodes: set[str], after: float) -> Event | None:
    """The first lease acquisition (``lease`` with ``acquired``) that one of ``nodes``
    reported after ``after``: while the group's primary is dead nobody can take the key, so
    this is the leadership the failover ended in, whichever node it went to (the old leader's
    included) and whatever its token."""
    found = [
        e
        for e in events
        if e.ev == "lease" and e.data.get("acquired") and e.node in nodes and e.t > after
    ]
    return min(found, key=lambda e: e.t) if found else None


def restored_after(events: Sequence[Event], nodes: set[str], after: float) -> Event | None:
    """The first report by one of ``nodes`` that its subscription is back, after ``after``."""
    found = [
        e
        for e in events
        if e.ev == "connection"
        and e.data.get("state") == "restored"
        and e.node in nodes
        and e.t > after
    ]
    return min(found, key=lambda e: e.t) if found else None


def timeline(
    events: Sequence[Event], nodes: set[str], since: float, until: float
) -> list[dict[str, Any]]:
    """What the nodes reported from ``since`` to ``until``, in ms from ``since`` (renewals,
    stats and the like left out): for the JSON, to tell where a failover's time went."""
    kept = ("connection", "stood", "stood_end", "lease", "released", "elected", "demoted")
    out = []
    for e in sorted(events, key=lambda e: e.t):
        if e.node not in nodes or not since <= e.t <= until or e.ev not in kept:
            continue
        if e.ev == "lease" and not e.data.get("acquired"):
            continue
        detail = {k: v for k, v in e.data.items() if k in ("state", "term", "won", "cause")}
        out.append({"ms": round((e.t - since) * 1000, 1), "node": e.node, "ev": e.ev, **detail})
    return out


def token_of(events: Sequence[Event], node: str) -> int | None:
    """The fencing token of ``node``'s latest leadership, from its ``elected`` reports."""
    tokens = [e.data.get("token") for e in events if e.node == node and e.ev == "elected"]
    last = tokens[-1] if tokens else None
    return int(last) if last is not None else None


@dataclass(frozen=True)
class Figures:
    """One trial's figures, in milliseconds from the kill (the token growth is a count)."""

    promoted_ms: float
    leader_ms: float
    after_promotion_ms: float
    token_growth: int


def figures(
    killed_at: float, promoted_at: float, leased_at: float, token_before: int, token_after: int
) -> Figures:
    """A trial's figures from its readings (``time.monotonic()`` seconds)."""
    return Figures(
        promoted_ms=(promoted_at - killed_at) * 1000,
        leader_ms=(leased_at - killed_at) * 1000,
        after_promotion_ms=(leased_at - promoted_at) * 1000,
        token_growth=token_after - token_before,
    )


# ---- Redis's side (blocking: run on a thread) -------------------------------------------------


def _admin(port: int) -> redis.Redis:
    return redis.Redis("127.0.0.1", port, socket_timeout=1.0, socket_connect_timeout=1.0)


def _kill(server: RedisServer) -> float:
    """SIGKILL ``server`` (a crash, as ``harness.topologies`` kills: no clean shutdown to hand
    over); return the monotonic time just before the signal."""
    killed_at = processes.send(server.pid, signal.SIGKILL)
    process = server.process
    if process is not None:
        process.wait()
    server.stop()
    return killed_at


def _cluster_victim(topology: ClusterTopology, key: str) -> tuple[RedisServer, RedisServer]:
    """The primary serving ``key``'s slot and its replica."""
    primary = topology.primary_of(key)
    primary_id = topology.node_id(primary)
    with _admin(primary.port) as admin:
        nodes = admin.execute_command("CLUSTER", "NODES").decode().splitlines()
    for fields in (line.split() for line in nodes):
        if "slave" in fields[2].split(",") and fields[3] == primary_id:
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            return primary, next(s for s in topology.servers if s.port == port)
    raise LookupError(f"the primary on port {primary.port} has no replica")


class _Promotion:
    """Polls, on a thread of its own, until Redis reports the replica promoted; ``at`` is the
    time the first answer that said so was asked for (within ``POLL`` plus a round trip of
    the change)."""

    def __init__(self, replica: RedisServer, sentinel_port: int | None) -> None:
        self._replica = replica
        self._sentinel_port = sentinel_port
        self._stop = threading.Event()
        self.role_at: float | None = None
        self.named_at: float | None = None

    @property
    def at(self) -> float | None:
        if self.role_at is None:
            return None
        if self._sentinel_port is None:
            return self.role_at
        return None if self.named_at is None else max(self.role_at, self.named_at)

    def cancel(self) -> None:
        self._stop.set()

    def run(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with contextlib.ExitStack() as stack:
            replica = stack.enter_context(_admin(self._replica.port))
            sentinel = (
                None
                if self._sentinel_port is None
                else stack.enter_context(_admin(self._sentinel_port))
            )
            while not self._stop.is_set():
                asked = time.monotonic()
                with contextlib.suppress(redis.RedisError, OSError):
                    if self.role_at is None and replica.execute_command("ROLE")[0] == b"master":
                        self.role_at = asked
                with contextlib.suppress(redis.RedisError, OSError):
                    if sentinel is not None and self.named_at is None:
                        _, port = sentinel.execute_command(
                            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "main"
                        )
                        if int(port) == self._replica.port:
                            self.named_at = asked
                if (at := self.at) is not None:
                    return at
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"Redis did not promote the replica in {timeout:g} s")
                self._stop.wait(POLL)
        raise TimeoutError("cancelled")


# ---- the scenario --------------------------------------------------------------------------------


def _build(kind: str) -> SentinelTopology | ClusterTopology:
    topology: SentinelTopology | ClusterTopology = (
        SentinelTopology() if kind == "Sentinel" else ClusterTopology()
    )
    return topology.__enter__()


def _close(topology: SentinelTopology | ClusterTopology) -> None:
    topology.__exit__(None, None, None)


async def _trial(ctx: Ctx, cell: Cell, kind: str, group: str) -> None:
    harness = ctx.harness
    # The nodes also report their subscription and candidacies (where the time goes).
    impl = dataclasses.replace(ctx.impl, args=(*ctx.impl.args, "--timeline"))
    async with contextlib.AsyncExitStack() as stack:
        topology = await asyncio.to_thread(_build, kind)
        stack.push_async_callback(asyncio.to_thread, _close, topology)
        pool = Pool(harness, impl, topology.url)
        stack.push_async_callback(pool.close)
        cluster = Cluster(pool, group)
        await cluster.add(ctx.cfg.nodes)
        old, _ = await cluster.agree()
        token_before = token_of(harness.events, old)
        assert token_before is not None, f"{old} reported no token"
        if isinstance(topology, SentinelTopology):
            assert topology.primary is not None and topology.replica is not None
            victim, replica = topology.primary, topology.replica
            sentinel_port: int | None = topology.sentinels[0].port
        else:
            key = Names(LeaderSettings.model_fields["channel_prefix"].default, group, "-")
            victim, replica = await asyncio.to_thread(_cluster_victim, topology, key.leader_key)
            sentinel_port = None
        nodes = set(cluster.nodes())
        mark = len(harness.events)
        # Watching from before the kill: the replica answers "slave" until it is promoted.
        promotion = _Promotion(replica, sentinel_port)
        watching = asyncio.ensure_future(asyncio.to_thread(promotion.run, FAILOVER_TIMEOUT + 5))

        async def stop_watching() -> None:
            promotion.cancel()
            with contextlib.suppress(Exception):
                await watching

        stack.push_async_callback(stop_watching)
        killed_at = await asyncio.to_thread(_kill, victim)
        leader_timeout = FAILOVER_TIMEOUT + 10 * impl.timescale + 10
        lease = await harness.wait_for(
            lambda: first_new_lease(harness.events[mark:], nodes, killed_at),
            leader_timeout,
            "a new leader's lease",
        )
        promoted_at = await watching
        new, agreed_at = await cluster.agree(after=killed_at)
        assert lease is not None and lease.node is not None
        token_after = int(lease.data.get("term", 0))
        found = figures(killed_at, promoted_at, lease.t, token_before, token_after)
        cell.add(PROMOTED, "ms", found.promoted_ms)
        cell.add(LEADER, "ms", found.leader_ms)
        cell.add(AFTER_PROMOTION, "ms", found.after_promotion_ms)
        cell.add(AGREED, "ms", (agreed_at - killed_at) * 1000)
        cell.add(TOKEN, "count", found.token_growth)
        back = restored_after(harness.events[mark:], nodes, promoted_at)
        if back is not None and back.t <= lease.t:
            cell.add(RESUBSCRIBED, "ms", (back.t - promoted_at) * 1000)
            cell.add(RESUBSCRIBED_TO_LEADER, "ms", (lease.t - back.t) * 1000)
        cell.trials.append(
            {
                "killed_port": victim.port,
                "promoted_port": replica.port,
                "promoted_ms": found.promoted_ms,
                "replica_role_ms": ((promotion.role_at or promoted_at) - killed_at) * 1000,
                "sentinels_named_ms": (
                    None if promotion.named_at is None else (promotion.named_at - killed_at) * 1000
                ),
                "leader_ms": found.leader_ms,
                "after_promotion_ms": found.after_promotion_ms,
                "agreed_ms": (agreed_at - killed_at) * 1000,
                "old_leader": old,
                "new_leader": lease.node,
                "agreed_leader": new,
                "token_before": token_before,
                "token_after": token_after,
                "timeline": timeline(harness.events[mark:], nodes, killed_at, agreed_at),
            }
        )


def _fail_trial(cell: Cell, reason: str, diagnosis: dict[str, Any] | None) -> None:
    """A trial with no figure: counted against every figure (beyond any measured one), and
    said why where it ran (``diagnosis``: what the nodes said)."""
    if diagnosis is None:
        cell.metric(LEADER, "ms").timeouts += 1
    else:
        cell.fail((LEADER, "ms"), reason, diagnosis)
    for name, unit in ((PROMOTED, "ms"), (AFTER_PROMOTION, "ms"), (AGREED, "ms"), (TOKEN, "count")):
        cell.metric(name, unit).timeouts += 1


async def topology(ctx: Ctx) -> list[Cell]:
    """Both topologies, ``cfg.topology_trials`` trials each, for one of our implementations."""
    cells = []
    for kind in KINDS:
        cell = Cell(title(kind), ctx.impl.name)
        cells.append(cell)
        failed_in_a_row = 0
        trials = ctx.cfg.topology_trials
        for trial in range(trials):
            if failed_in_a_row >= 2:
                cell.notes.append(
                    f"gave up after 2 failed trials in a row ({trials - trial} of {trials} "
                    "not run, counted as timeouts)"
                )
                for _ in range(trials - trial):
                    _fail_trial(cell, "not run", None)
                break
            group = f"topo-{kind.lower()}-{ctx.impl.name}-{trial}"
            try:
                await _trial(ctx, cell, kind, group)
                failed_in_a_row = 0
            except (TimeoutError, asyncio.TimeoutError, redis.RedisError, OSError) as exc:
                failed_in_a_row += 1
                nodes = [n for n in ctx.harness.states if n.startswith(f"{group}-")]
                _fail_trial(cell, f"{type(exc).__name__}: {exc}", ctx.harness.diagnose(nodes))
        _topology_notes(cell, ctx.impl, kind, ctx.cfg.nodes)
    return cells


def _topology_notes(cell: Cell, impl: Impl, kind: str, nodes: int) -> None:
    cell.notes.append(
        f"{TOPOLOGY_NOTES[kind]}; a fresh topology and {nodes} node processes "
        f"per trial; promotion polled every {POLL * 1000:g} ms"
    )
    if cell.trials:
        tokens = ", ".join(f"{t['token_before']}->{t['token_after']}" for t in cell.trials)
        same = sum(1 for t in cell.trials if t["new_leader"] == t["old_leader"])
        cell.notes.append(
            f"fencing tokens before->after: {tokens}; the new leader was the old leader's node "
            f"in {same} of {len(cell.trials)} trials"
        )
    if impl.timeout_max is not None:
        cell.notes.append(
            f"issue 11's promise: promoted -> new leader within one election timeout "
            f"(election_timeout_max {impl.timeout_max:g} s)"
        )


__all__ = [
    "AFTER_PROMOTION",
    "AGREED",
    "KINDS",
    "LEADER",
    "PROMOTED",
    "RESUBSCRIBED",
    "RESUBSCRIBED_TO_LEADER",
    "TITLE",
    "TOKEN",
    "Figures",
    "figures",
    "first_new_lease",
    "restored_after",
    "timeline",
    "title",
    "token_of",
    "topology",
]
