"""The example app's live dashboard, in a real headless Chromium, over the demo's cluster.

The page is opened on the leader itself, the leader is killed (``kill -9``, as the demo
invites), and the page, which has lost the node it came from, must show the new leader: it
follows another member's stream. A screenshot is saved under the test's tmp dir (its path is
printed; ``pytest -s`` shows it).

Needs Debian's ``chromium``; skipped without it, unless ``FASTAPI_LEADER_REQUIRE_BROWSER=1``
(as ``.ci/run`` sets), which makes a missing browser a failure.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from .browser import Browser, find_chromium
from .demo_launcher import DASHBOARD, LEADER, STEADY, DemoLauncher

pytestmark = pytest.mark.e2e

EVENTS = 5
# Generous: the page updates four times a second, a failover takes one or two.
PAGE_WAIT = 20.0

_local = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    if find_chromium() is None:
        if os.environ.get("FASTAPI_LEADER_REQUIRE_BROWSER") == "1":
            pytest.fail("FASTAPI_LEADER_REQUIRE_BROWSER=1 but there is no chromium on PATH")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    return Browser.start(tmp_path / "chromium-profile")


def _js(text: str) -> str:
    return json.dumps(text)


def test_the_dashboard_shows_the_leader_then_its_successor(
    tmp_path: Path, browser: Browser
) -> None:
    with browser, DemoLauncher.start(tmp_path, nodes=3, **STEADY) as demo:
        first = demo.wait_for_line(LEADER)
        link = demo.find(DASHBOARD)["url"]  # printed before the first leader line
        first_node = min((n for n in demo.urls if n != "redis"), key=lambda n: int(n[5:]))
        assert link == f"{demo.urls[first_node]}/dashboard"  # the demo links the first node
        for i in range(EVENTS):
            request = urllib.request.Request(
                f"{demo.urls[first_node]}/events", data=f'{{"n": {i}}}'.encode(), method="POST"
            )
            with _local.open(request, timeout=10) as response:
                assert response.status == 202

        # On the leader's own page: the hard case, where the page loses its node.
        leader = first["node"]
        browser.open(f"{demo.urls[leader]}/dashboard")
        browser.wait_for(f"document.querySelector('#leader').textContent === {_js(leader)}")
        assert browser.text("#term") == first["term"]
        browser.wait_for("document.querySelectorAll('#nodes tr').length === 3")
        browser.wait_for(
            f"document.querySelector('#published').textContent === '{EVENTS}' && "
            f"document.querySelector('#delivered').textContent === '{EVENTS}'",
            PAGE_WAIT,
        )
        before = browser.screenshot(tmp_path / "dashboard-before.png")

        killed_at = time.monotonic()
        os.kill(demo.pids[leader], signal.SIGKILL)
        successor = browser.wait_for(
            "(() => { const t = document.querySelector('#leader').textContent;"
            f" return t.startsWith('node-') && t !== {_js(leader)} ? t : null; }})()",
            PAGE_WAIT,
        )
        print(
            f"\ndashboard: new leader {successor} shown {time.monotonic() - killed_at:.2f} s "
            "after the kill"
        )
        assert successor in demo.urls
        assert int(browser.text("#term")) > int(first["term"])
        assert demo.urls[leader] in browser.text("#source")  # it says which stopped answering
        # The timeline keeps the first leadership and shows the second.
        timeline = browser.text("#timeline")
        assert f"{leader} leads (term {first['term']})" in timeline
        assert f"{successor} leads" in timeline
        # The killed node is shown gone once the others stop counting it (member expiry).
        browser.wait_for(
            f"(document.querySelector('#nodes tr[data-node={_js(leader)}]') || {{}})"
            ".className === 'gone'",
            PAGE_WAIT,
        )
        after = browser.screenshot(tmp_path / "dashboard-after.png")
        print(f"screenshots: {before} {after}")
        assert not [line for line in browser.console if line.startswith("uncaught")]

        # With the page's stream open, the nodes still stop on SIGTERM at once: streams end.
        assert demo.stop() == 0
    output = demo.output()
    assert "did not stop" not in output, output
    assert "Traceback" not in output, output
