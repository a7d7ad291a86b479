"""``fastapi-leader`` against real uvicorn replicas of the example app, as an operator runs it
during an incident: ``status`` says what every node's ``GET /leader`` says, ``watch`` prints a
crash failover (``kill -9`` of the leader), ``resign`` moves the lead before maintenance.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import STEADY, MakeCluster
from .nodes import STARTUP_TIMEOUT, AppCluster, clean_env, eventually

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 60.0


def _cli_env(cluster: AppCluster) -> dict[str, str]:
    # The operator gives the tool the group's settings, timings included.
    return clean_env(LEADER_REDIS_URL=cluster.redis_url, LEADER_GROUP=cluster.group, **STEADY)


def _cli(cluster: AppCluster, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastapi_leader", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=cwd,
        env=_cli_env(cluster),
    )


class _Watch:
    """``fastapi-leader watch`` in the background, its lines collected as they come."""

    def __init__(self, cluster: AppCluster, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastapi_leader", "watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=_cli_env(cluster),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = STARTUP_TIMEOUT) -> str:
        line: str = eventually(
            lambda: next((line for line in self.lines if text in line), None),
            timeout,
            f"watch to print {text!r} (so far: {self.lines})",
        )
        return line

    def interrupt(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(RUN_TIMEOUT)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(RUN_TIMEOUT)


def _status_agrees_with_every_node(cluster: AppCluster, cwd: Path) -> None:
    leader = cluster.wait_for_leader()
    run = _cli(cluster, cwd, "status", "--json")
    assert run.returncode == 0, run
    seen = json.loads(run.stdout)
    for node in cluster.live:
        view = node.view()
        assert view is not None
        assert seen["leader_id"] == view["leader_id"] == leader.node_id
        assert seen["term"] == view["term"]
    members = {member["node_id"]: member for member in seen["members"]}
    assert {node_id: m["url"] for node_id, m in members.items()} == {
        node.node_id: node.url for node in cluster.live
    }
    assert [node_id for node_id, m in members.items() if m["is_leader"]] == [leader.node_id]


def test_an_incident_as_an_operator_sees_it(make_cluster: MakeCluster, tmp_path: Path) -> None:
    # One cluster for the whole story: each start of three replicas costs seconds of imports.
    cluster = make_cluster(**STEADY)
    cluster.start(3)
    first = cluster.wait_for_leader()
    _status_agrees_with_every_node(cluster, tmp_path)
    watch = _Watch(cluster, tmp_path)
    try:
        watch.wait_for(f"leader is {first.node_id}")

        # Maintenance: move the lead away from the first leader.
        first_view = first.view()
        assert first_view is not None
        run = _cli(cluster, tmp_path, "resign")
        assert run.returncode == 0, run
        second = cluster.wait_for_leader(other_than=first)
        second_view = second.view()
        assert second_view is not None
        assert second_view["term"] > first_view["term"]
        assert f"{second.node_id} leads (term {second_view['term']}" in run.stdout
        assert first.running  # it handed over and stayed, as a follower
        watch.wait_for(f"{first.node_id} hands over to {second.node_id}")
        watch.wait_for(f"leader is {second.node_id} (term {second_view['term']})")

        # A crash: kill -9, no handover; the group must notice the silence.
        second.process.kill()
        second.wait_stopped()
        third = cluster.wait_for_leader(other_than=second)
        watch.wait_for(f"no leader: {second.node_id} silent for")
        watch.wait_for(f"leader is {third.node_id} (term ")
        _status_agrees_with_every_node(cluster, tmp_path)
        code, err = watch.interrupt()
    finally:
        watch.close()
    assert code == 0, err
    assert "Traceback" not in err, err
