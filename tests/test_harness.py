"""harness/: the processes it starts cannot outlive it, its waits, and the reports a real
election writes through it (the lease reconstruction: tests/test_harness_leases.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastapi_leader import MemoryBroker
from harness import processes
from harness.leases import Record, dual_leases, leaderships
from harness.reporter import NodeReporter
from harness.reports import format_line, parse
from harness.waiting import Changes, eventually, eventually_async, until, wait_for
from tests.helpers.cluster import Cluster

WAIT = 10.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _reap(process: subprocess.Popen[bytes]) -> None:
    processes.kill_group(process.pid)
    process.wait(WAIT)
    processes.forget(process.pid)


# ---- processes -------------------------------------------------------------------------------


def test_kill_group_kills_the_process_and_what_it_started(tmp_path: Path) -> None:
    # The node starts a child of its own (as a server starts its workers) and names it.
    script = f"import subprocess, sys, time\nchild = subprocess.Popen({SLEEPER!r})\n"
    script += "print(child.pid, flush=True)\ntime.sleep(120)\n"
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        node = processes.popen(
            [sys.executable, "-c", script], env=processes.clean_env(), cwd=tmp_path, stdout=out
        )
    try:
        child = int(eventually(lambda: log.read_text().strip(), WAIT, "the child's pid"))
        os.kill(node.pid, signal.SIGSTOP)  # a stopped group dies too: SIGCONT comes first

        processes.kill_group(node.pid)

        assert node.wait(WAIT) == -signal.SIGKILL
        eventually(lambda: not processes.pid_exists(child), WAIT, "the child to die")
    finally:
        _reap(node)


def test_a_node_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    # A middle process starts a node through the harness, names it, and dies at once.
    script = textwrap.dedent(
        f"""
        import os, sys
        from harness import processes
        node = processes.popen({SLEEPER!r}, env=processes.clean_env(), cwd={str(tmp_path)!r},
                               stdout=None)
        print(node.pid, flush=True)
        os._exit(0)
        """
    )
    middle = subprocess.run(
        [sys.executable, "-c", script],
        env=processes.clean_env(),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=True,
    )
    node = int(middle.stdout)
    try:
        eventually(lambda: not processes.pid_exists(node), WAIT, "the orphaned node to die")
    finally:
        processes.kill_group(node)


def test_send_dates_the_signal_and_a_gone_process_is_no_error(tmp_path: Path) -> None:
    node = processes.popen(SLEEPER, env=processes.clean_env(), cwd=tmp_path, stdout=None)
    before = time.monotonic()
    sent_at = processes.send(node.pid, signal.SIGKILL)
    assert before <= sent_at <= time.monotonic()
    assert node.wait(WAIT) == -signal.SIGKILL
    processes.forget(node.pid)
    processes.send(node.pid, signal.SIGKILL)  # reaped: nothing to signal, nothing raised
    processes.kill_group(node.pid)


def test_clean_env_keeps_the_developers_settings_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADER_REDIS_URL", "redis://developer:6379")
    monkeypatch.setenv("CHAOS_SABOTAGE", "long-lease")

    env = processes.clean_env(LEADER_GROUP="g")

    assert "LEADER_REDIS_URL" not in env and "CHAOS_SABOTAGE" not in env
    assert env["LEADER_GROUP"] == "g"
    assert str(processes.ROOT) in env["PYTHONPATH"].split(os.pathsep)


async def test_spawn_reads_a_nodes_reports(tmp_path: Path) -> None:
    script = "from harness.reports import emit\nemit('armed', 'n1', extra=1)\n"
    node = await processes.spawn(
        [sys.executable, "-c", script], env=processes.clean_env(), cwd=tmp_path, stderr=None
    )
    try:
        assert node.stdout is not None
        line = await asyncio.wait_for(node.stdout.readline(), WAIT)
        report = parse(line)
        assert report is not None
        assert (report.ev, report.node, report.pid, report.data) == (
            "armed",
            "n1",
            node.pid,
            {"extra": 1},
        )
        assert await asyncio.wait_for(node.wait(), WAIT) == 0
    finally:
        processes.kill_group(node.pid)
        processes.forget(node.pid)


# ---- waiting ---------------------------------------------------------------------------------


async def test_until_wakes_on_a_pulse_and_returns_the_value() -> None:
    changes = Changes()
    state: list[str] = []

    async def later() -> None:
        await asyncio.sleep(0)
        state.append("ready")
        changes.pulse()

    task = asyncio.create_task(later())
    assert await until(lambda: state[:1], WAIT, changes) == ["ready"]
    await task


async def test_until_gives_none_and_wait_for_names_what_timed_out() -> None:
    assert await until(lambda: False, 0.05) is None
    with pytest.raises(TimeoutError, match="waiting for the impossible"):
        await wait_for(lambda: 0, 0.05, "the impossible", Changes())


def test_eventually_names_what_timed_out() -> None:
    with pytest.raises(AssertionError, match="waiting for the impossible"):
        eventually(lambda: None, 0.05, "the impossible")


# ---- the reports of a real election ---------------------------------------------------------


async def test_a_real_election_reports_its_leases_through_its_events() -> None:
    lines: dict[str, list[str]] = {}
    reporters: dict[str, NodeReporter] = {}
    async with Cluster(broker=MemoryBroker()) as cluster:
        for node_id in ("a", "b"):
            node = cluster.make(node_id)
            out = lines[node_id] = []
            reporter = reporters[node_id] = NodeReporter(
                write=lambda *args, out=out, **data: out.append(format_line(*args, **data))
            )
            reporter.attach(node)
            await node.start()
        first = await cluster.wait_for_single_leader()
        await eventually_async(lambda: "elected" in evs(lines[first.node_id]), WAIT, "elected")
        assert await first.resign()
        second = await cluster.wait_for_single_leader()
        await eventually_async(lambda: "elected" in evs(lines[second.node_id]), WAIT, "elected")
        observed_until = time.monotonic()

    records = [
        Record(report.t, node_id, 1, report.ev, report.data)
        for node_id, out in lines.items()
        for report in map(parse, out)
        if report is not None
    ]
    held = leaderships(records, observed_until)
    assert [(h.node, h.term) for h in held] == [
        (first.node_id, first_token(lines[first.node_id])),
        (second.node_id, first_token(lines[second.node_id])),
    ]
    assert held[0].how_ended == "demoted"  # by the ``released`` line of the election thread
    assert dual_leases(records, observed_until) == []
    # Counted by the role the node has as the command ends: it acquires as a follower (the
    # answer makes it leader) and releases as one (it steps down before it gives the key back).
    for reporter in reporters.values():
        assert reporter.commands["follower:acquire"] >= 1  # two may stand at once
        assert reporter.commands["follower:release"] == 1


def evs(out: list[str]) -> list[str]:
    return [report.ev for report in map(parse, out) if report is not None]


def first_token(out: list[str]) -> int:
    return next(
        int(r.data["token"]) for r in map(parse, out) if r is not None and r.ev == "elected"
    )
