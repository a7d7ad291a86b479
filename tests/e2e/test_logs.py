"""What a user reads in a node's output: role changes under plain uvicorn, no leader-only job
"executed" on a follower, and an invalid setting said in one line.

Real uvicorn processes of the example app (its leader-only job, ``move_events``, fires every
0.2 s here); no logging configured but where a test says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import STEADY, MakeCluster
from .nodes import EXAMPLE_APP, ROOT, STARTUP_TIMEOUT, AppNode, clean_env, eventually

pytestmark = [pytest.mark.e2e]

ROLE_LINE = re.compile(
    r"^INFO: +fastapi_leader: node (\S+): candidate -> leader \(term (\d+)\): won", re.M
)
EXECUTED = re.compile(r'Job "move_events[^"]*" executed successfully')


def _leader_and_follower(make_cluster: MakeCluster, **env: str) -> tuple[AppNode, AppNode]:
    cluster = make_cluster(**STEADY, **env)
    cluster.start(2)
    leader = cluster.wait_for_leader()
    (follower,) = [node for node in cluster.nodes if node is not leader]
    return leader, follower


def test_plain_uvicorn_shows_one_line_per_role_change(make_cluster: MakeCluster) -> None:
    leader, follower = _leader_and_follower(make_cluster)
    line = eventually(lambda: ROLE_LINE.search(leader.log()), what="the leader's role line")
    assert line.group(1) == leader.node_id
    term = line.group(2)
    eventually(
        lambda: (
            f"fastapi_leader: node {follower.node_id}: following {leader.node_id} (term "
            in follower.log()
        ),
        what="the follower's line",
    )
    assert len(ROLE_LINE.findall(leader.log())) == 1
    assert f"(term {term})" in leader.log()


def test_a_follower_never_says_it_ran_a_leader_only_job(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    # The app routes every logger through the root at INFO (uvicorn --log-config): APScheduler
    # now speaks, and the election's default handler steps aside (no line twice).
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "root": {"handlers": ["err"], "level": "INFO"},
    }
    config_path = tmp_path / "logging.json"
    config_path.write_text(json.dumps(config))
    leader, follower = _leader_and_follower(make_cluster, UVICORN_LOG_CONFIG=str(config_path))
    eventually(lambda: len(EXECUTED.findall(leader.log())) >= 5, what="the leader's runs")
    follower_log = follower.log()
    assert "following" in follower_log
    assert not EXECUTED.search(follower_log), follower_log
    assert 'Running job "move_events' not in follower_log
    won = [ln for ln in leader.log().splitlines() if "candidate -> leader" in ln]
    assert len(won) == 1 and won[0].startswith("INFO fastapi_leader: node ")


def test_an_invalid_setting_is_the_line_uvicorn_prints_last(tmp_path: Path) -> None:
    env = clean_env(LEADER_LEASE="abc", LEADER_REDIS_URL="redis://127.0.0.1:1/0")
    command = [sys.executable, "-m", "uvicorn", EXAMPLE_APP, "--app-dir", str(ROOT)]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    # The error's first line, where a reader of a traceback looks first: the last one.
    assert lines[-1] == (
        "fastapi_leader.settings.SettingsError: LEADER_LEASE='abc' (lease): Input should be a "
        "valid number, unable to parse string as a number"
    ), done.stderr
    assert "pydantic" not in done.stderr and "validation error" not in done.stderr
