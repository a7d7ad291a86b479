"""``python -m example_app`` run as a user runs it, for the dashboard and demo-fault tests.

::

    with DemoLauncher.start(tmp_path, nodes=3) as demo:
        leader = demo.wait_for_line(LEADER)  # "leader is node-P (term T, pid N)"
        demo.pids["redis"], demo.pids[leader["node"]]

Its output (the demo's and its nodes', which share its stdout) is read line by line on a thread;
every line is kept in ``lines``. Leaving the ``with`` block stops the demo (SIGINT, as Ctrl-C)
and then kills whatever it said it started and is still running, pass or fail.

Self-contained on purpose (standard library only): the shared harness in ``nodes.py`` may be
reorganised, and these tests need nothing from it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]

# Timings for tests that kill leaders on a loaded 2-core box: a leader keeps its lease through a
# one-second stall, so that the only re-elections are the ones a test causes (the rules behind
# the defaults still hold: lease < election timeout - heartbeat).
STEADY = {
    "LEADER_LEASE": "1.0",
    "LEADER_ELECTION_TIMEOUT_MIN": "1.2",
    "LEADER_ELECTION_TIMEOUT_MAX": "1.5",
    "LEADER_MEMBER_EXPIRY": "2.0",
}
# The demo starts a server and its nodes and waits for an election: ~3 s here. Generous.
LINE_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0

STARTED = re.compile(r"^(?P<name>node-\d+|redis)\s+(?P<url>\S+)\s+pid (?P<pid>\d+)")
LEADER = re.compile(r"leader is (?P<node>node-\d+) \(term (?P<term>\d+), pid (?P<pid>\d+)\)")
DASHBOARD = re.compile(r"^dashboard:\s+(?P<url>\S+)")


class DemoLauncher:
    """One ``python -m example_app`` process and what it printed."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self.pids: dict[str, int] = {}  # "redis", "node-P": as the demo printed them
        self.urls: dict[str, str] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, cwd: Path, nodes: int, **env: str) -> DemoLauncher:
        """Start the demo with ``nodes`` nodes on free consecutive ports, in ``cwd`` (a
        directory with no ``.env``), with the developer's ``LEADER_*``/``EXAMPLE_*`` settings
        replaced by ``env``."""
        port = consecutive_free_ports(nodes)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LEADER_", "EXAMPLE_"))}
        clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), clean.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-m", "example_app", "--nodes", str(nodes), "--port", str(port)],
            cwd=cwd,
            env={**clean, "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return cls(process)

    def __enter__(self) -> DemoLauncher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.kill_everything()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # until every process holding the pipe has exited
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _take(self, line: str) -> None:
        self.lines.append(line)
        started = STARTED.match(line)
        if started:
            self.pids[started["name"]] = int(started["pid"])
            self.urls[started["name"]] = started["url"]

    def wait_for_line(
        self, pattern: re.Pattern[str], timeout: float = LINE_TIMEOUT
    ) -> re.Match[str]:
        """The next line matching ``pattern`` (lines before it are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = "\n".join(self.lines[-20:])
                raise AssertionError(f"no {pattern.pattern!r} line in {timeout} s:\n{tail}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                tail = "\n".join(self.lines[-20:])
                raise AssertionError(f"output ended without {pattern.pattern!r}:\n{tail}")
            self._take(line)
            found = pattern.search(line)
            if found:
                return found

    def find(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first line read so far that matches ``pattern``."""
        for line in self.lines:
            found = pattern.search(line)
            if found:
                return found
        raise AssertionError(f"no line matching {pattern.pattern!r} yet:\n{self.output()}")

    def lines_during(self, seconds: float) -> list[str]:
        """Every line printed in the next ``seconds`` (observing for a while is the point)."""
        deadline = time.monotonic() + seconds
        seen: list[str] = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)  # the end stays visible to later reads
                break
            self._take(line)
            seen.append(line)
        return seen

    def stop(self) -> int | None:
        """Ctrl-C: SIGINT to the demo, wait for it and for the end of its output; its exit
        code (None if it had to be killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        self._reader.join(EXIT_TIMEOUT)
        with contextlib.suppress(queue.Empty):
            while (line := self._queue.get_nowait()) is not None:
                self._take(line)
        return self.process.returncode

    def kill_everything(self) -> None:
        """Last resort: the demo and whatever it said it started, if still running."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.pids.values():
            if pid_exists(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def output(self) -> str:
        """Every line read so far."""
        return "\n".join(self.lines)


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that were free a moment ago."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first: int = probe.getsockname()[1]
        if first + count > 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"found no {count} consecutive free ports")
