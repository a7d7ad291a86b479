"""Deterministic simulation of the election core: hundreds of seeded fault scenarios.

Every scenario checks, after every simulated event, that no two nodes' own lease readings are
valid at once and that fencing tokens only grow; at its end, that one leader emerged soon after
the faults stopped and that every node agrees on it; and, for join scenarios, that neither
joining nodes nor a follower with a lossy link unseated a healthy leader.

A failure names its seed; replay it with ``python -m tests.sim SEED``. More seeds:
``SIM_SEEDS=5000 uvx nox -s tests -- tests/test_simulation.py``.
"""

from __future__ import annotations

import os

import pytest

from tests.sim.scenarios import SETTLE, run_scenario
from tests.sim.simulator import Simulation

SEEDS = int(os.environ.get("SIM_SEEDS", "500"))


@pytest.mark.parametrize("seed", range(SEEDS), ids=lambda seed: f"seed-{seed}")
def test_scenario_keeps_every_guarantee(seed: int) -> None:
    outcome = run_scenario(seed)
    assert outcome.settled_after is None or outcome.settled_after <= SETTLE


def test_a_seed_replays_exactly() -> None:
    first, second = run_scenario(7), run_scenario(7)
    assert first == second


def test_cold_start_elects_one_leader_that_all_follow() -> None:
    sim = Simulation(seed=1)
    nodes = [sim.add_node() for _ in range(5)]
    sim.run_until(2.0)
    (leader,) = sim.leaders()
    assert all(n.core.status(n.now).leader_id == leader.node_id for n in nodes)


def test_graceful_stop_hands_over_within_a_few_round_trips() -> None:
    sim = Simulation(seed=3)
    for _ in range(3):
        sim.add_node()
    sim.run_until(2.0)
    (old,) = sim.leaders()
    sim.stop(old.node_id, at=2.0)
    sim.run_until(2.0 + 12 * sim.faults.max_delay)  # release, hand over, term, votes, key
    (new,) = sim.leaders()
    assert new is not old
    assert sim.elections[-1][2] > sim.elections[-2][2]
