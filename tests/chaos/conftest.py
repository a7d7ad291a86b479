"""The ``chaos`` marker: fault-injection runs over real processes (see tests/chaos/__init__)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos: fault injection over real node processes, a real Redis and fault proxies",
    )
