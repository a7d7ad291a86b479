"""Fault injection: real node processes, a real Redis, faults from a seeded schedule.

- :mod:`.harness`: the run (``run_chaos``) and its summary;
- :mod:`.faults`: the fault kinds and the seeded schedule;
- :mod:`.proxy`: the in-process TCP proxy between each node and Redis (cuts, latency,
  half-open connections, told apart per connection kind);
- :mod:`.checks`: the invariants, as pure functions over the run's log;
- :mod:`.node`, :mod:`.appnode`, :mod:`.steering`: the node processes and the commands they
  take (``stall``); what they report comes from :mod:`harness.reports`, and the processes,
  waits and lease reconstruction from the rest of :mod:`harness`;
- :mod:`.workload`: the pluggable part: which nodes run, how events are published and counted.

``--topology sentinel|cluster`` runs on a replicated Redis (:mod:`harness.topologies`),
without proxies, with the topology's failover and the process faults (see :mod:`.faults`).

Run it with ``python -m tests.chaos [--seed S] [--duration SECONDS]`` (``--help`` for more),
or through pytest: ``pytest tests/chaos`` (the short run, 60 s of faults; ``CHAOS_SEED``
and ``CHAOS_DURATION`` override its seed and length).
"""
