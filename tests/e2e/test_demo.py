"""The demo launcher, ``python -m example_app``, run as users run it: a subprocess whose output
we read, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import itertools
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .nodes import clean_env, free_ports, pid_exists

pytestmark = pytest.mark.e2e

# The launcher starts a server and two nodes and waits for an election: ~3 s here. Generous.
LEADER_LINE_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0
# The lines that name a process the launcher started: "node-8000  http://...  pid 123".
STARTED = re.compile(r"^(?P<name>node-\d+|redis)\s+\S+\s+pid (?P<pid>\d+)")
LEADER = re.compile(r"leader is (?P<node>node-\d+) \(term \d+, pid (?P<pid>\d+)\)")


class Launcher:
    """``python -m example_app`` with its output read line by line on a thread."""

    def __init__(self, args: list[str], cwd: Path, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "example_app", *args],
            cwd=cwd,  # no .env here
            env=clean_env(PYTHONUNBUFFERED="1", **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.pids: dict[str, int] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # until every process holding the pipe has exited
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r} in {timeout} s")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"output ended without {pattern.pattern!r}")
            self.lines.append(line)
            started = STARTED.match(line)
            if started:
                self.pids[started["name"]] = int(started["pid"])
            found = pattern.search(line)
            if found:
                return found

    def rest_of_output(self) -> str:
        """Everything printed after the lines read so far, once the output has ended."""
        self._reader.join(EXIT_TIMEOUT)
        rest = []
        while (line := self._queue.get_nowait()) is not None:
            rest.append(line)
        self.lines.extend(rest)
        return "\n".join(rest)

    def kill_everything(self) -> None:
        """Last resort, after a failed test: the launcher and whatever it said it started."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.pids.values():
            if pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launcher]]:
    launchers: list[Launcher] = []

    def start(args: list[str], **env: str) -> Launcher:
        launcher = Launcher(args, tmp_path, **env)
        launchers.append(launcher)
        return launcher

    yield start
    for launcher in launchers:
        launcher.kill_everything()


def test_the_demo_runs_a_cluster_and_ctrl_c_stops_everything(
    launch: Callable[..., Launcher],
) -> None:
    port = _consecutive_free_ports(2)
    started_at = time.monotonic()
    launcher = launch(["--nodes", "2", "--port", str(port)])

    leader = launcher.wait_for_line(LEADER, LEADER_LINE_TIMEOUT)
    print(f"\ndemo: first leader line after {time.monotonic() - started_at:.2f} s")
    assert set(launcher.pids) == {"redis", f"node-{port}", f"node-{port + 1}"}
    assert int(leader["pid"]) == launcher.pids[leader["node"]]
    assert f"kill -9 {leader['pid']}" in launcher.lines[-1]

    launcher.process.send_signal(signal.SIGINT)
    assert launcher.process.wait(EXIT_TIMEOUT) == 0
    rest = launcher.rest_of_output()
    assert "stopped 2 node(s) and Redis" in rest
    assert "Traceback" not in "\n".join(launcher.lines)
    left = {name: pid for name, pid in launcher.pids.items() if pid_exists(pid)}
    assert not left, f"still running after the launcher exited: {left}"
    assert not _processes_on_ports(port, port + 1)


def test_the_demo_refuses_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_to_exit(["--nodes", "1", "--port", str(port)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: port {port} is already in use; pick another first port with --port"
    ]
    assert result.stdout == ""


def test_the_demo_refuses_an_unreachable_redis(tmp_path: Path) -> None:
    (closed_port,) = free_ports(1)
    url = f"redis://127.0.0.1:{closed_port}/0"
    result = _run_to_exit(["--port", str(_consecutive_free_ports(3))], tmp_path, url)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: cannot reach Redis at {url}: ")
    assert result.stdout == ""


def _run_to_exit(
    args: list[str], cwd: Path, redis_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = clean_env() if redis_url is None else clean_env(LEADER_REDIS_URL=redis_url)
    return subprocess.run(
        [sys.executable, "-m", "example_app", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
    )


def _consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that were free a moment ago."""
    for _ in range(50):
        (first,) = free_ports(1)
        if first + count > 65536:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"found no {count} consecutive free ports")


def _processes_on_ports(*ports: int) -> list[str]:
    """Command lines of running processes started with ``--port P`` for one of ``ports``."""
    wanted = {str(port) for port in ports}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        on_port = any(a == "--port" and b in wanted for a, b in itertools.pairwise(args))
        if on_port and pid_exists(int(proc.name)):
            found.append(" ".join(args))
    return found
