"""The machinery that runs real node processes, shared by ``benchmarks/`` and ``tests/``.

Dev-only: it is not in the wheel (``pyproject.toml`` ships ``fastapi_leader`` alone) and is
type-checked with ``mypy --strict`` like the library (``nox -s typecheck``). One module an
idea:

- :mod:`harness.processes`: spawning node processes that die with their parent, each in a
  process group of its own, reaping them, and the faults done with signals (SIGKILL,
  SIGSTOP/SIGCONT, SIGTERM);
- :mod:`harness.reports`: the JSON lines a node writes about itself (``emit``, ``parse``);
  it imports nothing of the library, so processes that must not load it write them too;
- :mod:`harness.reporter`: :class:`~harness.reporter.NodeReporter`, which writes them from the
  election's callbacks and its public event interface (:mod:`fastapi_leader.events`):
  nothing patches, wraps or subclasses a transport;
- :mod:`harness.waiting`: waiting for a condition over reports (``wait_for``, ``until``) and
  polling one (``eventually``, ``always``);
- :mod:`harness.stalls`: blocking a node's event loop on purpose, as apps do (``sleep``,
  ``spin``);
- :mod:`harness.leases`: the reconstruction of leaderships, terms and lease overlaps (dual
  leases) from the reports, pure functions;
- :mod:`harness.topologies`: Redis Cluster (3 primaries, 3 replicas) and Sentinel (a primary,
  a replica, 3 sentinels) started on free ports, and their failovers, for the tests, the chaos
  suite and the benchmarks.
"""
