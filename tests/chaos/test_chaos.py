"""Chaos runs under pytest: the short run of CI, and sabotaged runs that must fail.

``CHAOS_SEED`` and ``CHAOS_DURATION`` (seconds of faults, default 60: about 70 s in all, some
15 faults, nearly one round of every kind) set the short run; the long run is
``python -m tests.chaos --duration 600``.

``test_app_loop_stalls_below_and_beyond_the_limit`` runs the two stall faults alone, once
each (``python -m tests.chaos --faults loop-stall,loop-stall-long`` for more of them).

The sabotaged runs break the nodes on purpose (see :mod:`tests.chaos.node`) and check that the
harness says so: a harness that cannot fail proves nothing.

``test_failovers_keep_the_invariants`` runs two failovers of each replicated topology
(Sentinel, Cluster), seeded, with the standalone run's checks (about 40 s each);
``python -m tests.chaos --topology sentinel|cluster`` runs them longer, mixed with the
process faults.
"""

from __future__ import annotations

import io
import itertools
import os
import random
from pathlib import Path

import pytest

from tests.chaos.faults import schedule
from tests.chaos.harness import ChaosConfig, ChaosResult, format_summary, run_chaos

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SHORT_DURATION = float(os.environ.get("CHAOS_DURATION", "60"))


async def run(config: ChaosConfig) -> tuple[ChaosResult, str]:
    out = io.StringIO()
    config.out = out
    result = await run_chaos(config)
    return result, out.getvalue()


@pytest.mark.timeout(SHORT_DURATION + 420)
async def test_short_chaos_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    config = ChaosConfig(seed=seed, duration=SHORT_DURATION, log_dir=tmp_path / "chaos")
    result, output = await run(config)
    with capsys.disabled():
        print(format_summary(result))
    assert result.ok, (
        f"chaos run with seed {seed} broke {len(result.violations)} invariant(s); replay: "
        f"{config.replay()}\n{output}"
    )


def first_seed(kind: str, *, target: str, mode: str, longer_than: float) -> int:
    """The first seed whose first step (with only ``kind`` scheduled) hits ``target`` in
    ``mode`` for more than ``longer_than`` seconds: a schedule known in advance."""
    for seed in itertools.count():
        step = next(schedule(seed, [kind]))
        if step.target == target and step.mode == mode and step.duration > longer_than:
            return seed
    raise AssertionError("unreachable")


@pytest.mark.timeout(300)
async def test_a_node_that_trusts_an_expired_lease_is_caught(tmp_path: Path) -> None:
    # The leader's traffic silently dropped for over 1.8 s: it cannot renew, Redis lets the
    # key expire and another node is elected (~0.7 s), while the sabotaged leader trusts its
    # lease for 2 s and notices the dead subscription only after ~1.5 s: two valid
    # leaderships for most of a second, outside any pause. (With the command connection
    # alone cut, it would hear its successor's first heartbeat and step down within
    # milliseconds: caught too, by a hair.)
    seed = first_seed("net-cut", target="leader", mode="drop", longer_than=1.8)
    config = ChaosConfig(
        seed=seed,
        duration=1.0,  # one step
        faults=("net-cut",),
        sabotage="long-lease",
        log_dir=tmp_path / "chaos",
    )
    result, output = await run(config)
    assert not result.ok, output
    assert result.summary["dual_lease_ms"] > 100, output
    assert any(v.startswith("two valid leases") for v in result.violations), output


@pytest.mark.timeout(300)
async def test_an_unfenced_mover_is_caught_delivering_twice(tmp_path: Path) -> None:
    # The leader is stopped, most likely between reading a batch and writing it; its
    # successor delivers the batch; the old leader wakes up and, unfenced, delivers it again.
    config = ChaosConfig(
        seed=1,
        duration=12.0,  # four pauses of the leader
        faults=("stop-leader",),
        sabotage="unfenced-work",
        log_dir=tmp_path / "chaos",
    )
    result, output = await run(config)
    assert not result.ok, output
    assert result.summary["events"]["duplicated"] > 0, output
    # Nothing else is wrong with these nodes: the election itself held.
    assert result.summary["dual_lease_ms"] == 0, output
    assert all("duplicate deliveries" in v for v in result.violations), output


STALL_FAULTS = ("loop-stall", "loop-stall-long")
# The first round of the stall faults holds one of each: about 12 s with the settles and gaps.
STALL_DURATION = 10.0


def stall_seed() -> int:
    """The first seed whose first round stalls the leader in both faults (below and beyond
    the limit), so that the run checks the leader's side of both."""
    for seed in itertools.count():
        steps = schedule(seed, STALL_FAULTS)
        if all(next(steps).target == "leader" for _ in STALL_FAULTS):
            return seed
    raise AssertionError("unreachable")


@pytest.mark.timeout(300)
async def test_app_loop_stalls_below_and_beyond_the_limit(tmp_path: Path) -> None:
    # Below LEADER_LOOP_STALL_LIMIT nothing changes; beyond it the leader hands over once the
    # limit has passed. A runtime that shares the app's loop fails the first half: its leader
    # loses the lead half a second into any stall.
    config = ChaosConfig(
        seed=stall_seed(),
        duration=STALL_DURATION,
        faults=STALL_FAULTS,
        log_dir=tmp_path / "chaos",
    )
    result, output = await run(config)
    assert {step.step.kind for step in result.steps} == set(STALL_FAULTS), output
    assert result.ok, f"{len(result.violations)} violation(s); replay: {config.replay()}\n{output}"


# Seed 8's first two failovers: one "lagging" (replication cut for 2 s before the kill,
# so the failover loses writes the primary alone had confirmed), then a "prompt" one.
FAILOVER_SEED = 8


@pytest.mark.timeout(300)
@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
async def test_failovers_keep_the_invariants(
    topology: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The primary (of the group's slot) is SIGKILLed twice; each time its replica takes
    # over, the group elects a leader with a higher token, and the old primary comes back as
    # the new one's replica without unseating it. The mover loses and repeats nothing that
    # its replica had confirmed (WAIT) before the kill; the lagging failover does lose what
    # the primary alone confirmed, which is why those events are not counted as acknowledged.
    kind = f"{topology}-failover"
    config = ChaosConfig(
        seed=FAILOVER_SEED,
        duration=200.0,  # bounded by `steps`
        topology=topology,
        faults=(kind,),
        steps=2,
        log_dir=tmp_path / "chaos",
    )
    result, output = await run(config)
    assert [(step.step.kind, step.step.mode) for step in result.steps] == [
        (kind, "lagging"),
        (kind, "prompt"),
    ], output
    for step in result.steps:
        assert step.promoted is not None and step.first_elected is not None, output
        assert step.token_before is not None, output
        assert step.first_elected.data["token"] > step.token_before, output
    assert result.summary["events"]["published"] > 0, output
    # The lagging failover did lose writes: every event that the primary alone confirmed
    # after the replica's link went down (at least one: see LAGGING_SECONDS).
    lagging = result.summary["failovers"][0]
    assert lagging["at_risk"] >= 1, output
    assert lagging["at_risk_lost"] == lagging["at_risk"], output
    with capsys.disabled():
        print(format_summary(result))  # the failover figures, in CI's log
    assert result.ok, f"{len(result.violations)} violation(s); replay: {config.replay()}\n{output}"
