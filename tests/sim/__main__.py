"""Replay or survey simulated scenarios: ``python -m tests.sim [SEED ...]`` or ``--count N``."""

from __future__ import annotations

import argparse
import statistics
import time

from .scenarios import run_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("seeds", nargs="*", type=int)
    parser.add_argument("--count", type=int, default=0, help="run seeds 0..COUNT-1")
    args = parser.parse_args()
    seeds = args.seeds or list(range(args.count))
    started = time.perf_counter()
    settled: dict[str, list[float]] = {}
    for seed in seeds:
        outcome = run_scenario(seed)
        if len(seeds) <= 5:
            print(outcome)
        if outcome.settled_after is not None and outcome.kind == "chaos":
            settled.setdefault(outcome.profile, []).append(outcome.settled_after)
    took = time.perf_counter() - started
    print(f"{len(seeds)} scenarios in {took:.1f} s")
    for profile, times in sorted(settled.items()):
        if len(times) > 1:
            q = statistics.quantiles(times, n=20)
            print(
                f"{profile}: leader settled after the last fault: median "
                f"{statistics.median(times):.3f} s, p95 {q[18]:.3f} s, max {max(times):.3f} s"
            )


main()
