"""``python -m tests.chaos``: a chaos run from the command line (see :mod:`tests.chaos`).

    python -m tests.chaos                      # the short run (about two minutes), new seed
    python -m tests.chaos --seed 42 --duration 600
    python -m tests.chaos --faults stop-leader,net-cut --kind example
    python -m tests.chaos --seed 1 --duration 10 --faults loop-stall,loop-stall-long
    python -m tests.chaos --topology sentinel --seed 7 --duration 120
    python -m tests.chaos --topology cluster --faults cluster-failover --steps 5

--topology picks the Redis the nodes run on: standalone (the default: one server, one fault
proxy per node, every fault), sentinel (a primary, a replica and 3 sentinels, reached by
redis+sentinel://) or cluster (3 primaries with a replica each, redis+cluster://). The two
replicated topologies run without proxies (Sentinel and Cluster hand out the servers' real
addresses), so their faults are their failover (sentinel-failover, cluster-failover: SIGKILL
the primary, the replica takes over, the old primary comes back as its replica) and the
faults done to node processes (kill-*, term-*, stop-leader, loop-stall*); builtin nodes only.
A failover is "prompt" or "lagging" (replication cut for 2 s first, the leader resigning
in it: the failover loses writes, a leadership among them); on these topologies an event is
acknowledged once WAIT says its replica has it (see docs/chaos.md).

Exits 0 when every invariant held, 1 otherwise (the summary says which failed).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from pathlib import Path

from .faults import ALL_KINDS, TOPOLOGIES, TOPOLOGY_FAULTS, check_faults
from .harness import ChaosConfig, run_chaos
from .node import SABOTAGES
from .workload import NODE_KINDS


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, help="the schedule's seed (default: a new one)")
    parser.add_argument(
        "--duration", type=float, default=100.0, help="seconds of faults (default: 100)"
    )
    parser.add_argument("--nodes", type=int, default=3, help="node processes (default: 3)")
    parser.add_argument("--kind", choices=sorted(NODE_KINDS), default="builtin")
    parser.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="standalone",
        help="the Redis the nodes run on (default: standalone)",
    )
    parser.add_argument(
        "--faults",
        help="comma-separated fault kinds (default: all those of the topology): "
        + "; ".join(f"{name}: {', '.join(kinds)}" for name, kinds in TOPOLOGY_FAULTS.items()),
    )
    parser.add_argument("--steps", type=int, help="stop after this many faults")
    parser.add_argument("--sabotage", choices=SABOTAGES, help="break every node on purpose")
    parser.add_argument("--log-dir", type=Path, help="keep node logs here")
    parser.add_argument("--leader-bound", type=float, default=ChaosConfig.leader_bound)
    parser.add_argument("--agree-bound", type=float, default=ChaosConfig.agree_bound)
    args = parser.parse_args(argv)
    faults = None
    if args.faults is not None:
        faults = tuple(kind.strip() for kind in args.faults.split(",") if kind.strip())
        unknown = sorted(set(faults) - set(ALL_KINDS))
        if unknown or not faults:
            parser.error(f"unknown fault kinds {unknown}; known: {', '.join(ALL_KINDS)}")
        try:
            check_faults(faults, args.topology)
        except ValueError as exc:
            parser.error(str(exc))
    if args.topology != "standalone" and (args.kind != "builtin" or args.sabotage):
        parser.error(f"--topology {args.topology} runs the builtin nodes, without --sabotage")
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (a failover needs somewhere to go)")
    return ChaosConfig(
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(10**6),
        duration=args.duration,
        nodes=args.nodes,
        kind=args.kind,
        faults=faults,
        topology=args.topology,
        steps=args.steps,
        sabotage=args.sabotage,
        log_dir=args.log_dir,
        leader_bound=args.leader_bound,
        agree_bound=args.agree_bound,
    )


def dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack (to see where a run is stuck)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


async def run(config: ChaosConfig) -> bool:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    # SIGTERM: stop like Ctrl-C does, through every `finally` (nodes, proxies, Redis).
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    result = await run_chaos(config)
    return result.ok


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return 0 if asyncio.run(run(config)) else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("chaos: interrupted; everything it started was stopped", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
