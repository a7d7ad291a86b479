"""The stall app (:mod:`tests.e2e.stall_app`) with Prometheus metrics: ``GET /metrics``.

    PROMETHEUS_MULTIPROC_DIR=/tmp/m uvicorn --workers 2 tests.e2e.metrics_app:app

Every response names its worker (``X-Worker-Pid``), so a test tells the workers apart.
"""

from __future__ import annotations

from fastapi_leader.prometheus import PrometheusObserver, metrics_router

from .stall_app import app, election

election.add_observer(PrometheusObserver())
app.include_router(metrics_router())

__all__ = ["app"]
