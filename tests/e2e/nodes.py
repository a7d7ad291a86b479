"""Real uvicorn processes of the example app, for end-to-end tests.

::

    with AppCluster(redis_url, log_dir) as cluster:
        a, b, c = cluster.start(3)  # returns once each answers GET /leader
        leader = cluster.wait_for_leader()  # the node every live node names

Every cluster has its own group (a uuid), so clusters sharing a server never hear each other.
Leaving the ``with`` block stops every node it started (SIGTERM, then SIGKILL), whatever
happened inside. Waits poll HTTP state against a deadline; none sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]

# Generous: these bound waits that normally end within a second or two, on a loaded 2-core box
# where several Python processes import FastAPI at once.
STARTUP_TIMEOUT = 30.0
WAIT = 10.0
POLL = 0.02
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 2.0
# Lines of a node's output quoted when it fails.
LOG_TAIL_LINES = 30


def eventually(
    condition: Callable[[], Any], timeout: float = WAIT, what: str = "the condition"
) -> Any:
    """Poll ``condition`` every 20 ms until it returns something truthy, and return that;
    fail (AssertionError) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL)


def always(condition: Callable[[], Any], duration: float, what: str) -> None:
    """Check ``condition`` every 20 ms for ``duration`` seconds; fail the first time it is
    falsy. (Observing for a while is the point here: this waits for nothing.)"""
    deadline = time.monotonic() + duration
    while True:
        assert condition(), f"{what} stopped holding"
        if time.monotonic() >= deadline:
            return
        time.sleep(POLL)


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without the developer's LEADER_* and EXAMPLE_* settings, plus
    ``overrides``, with the repo root importable."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LEADER_", "EXAMPLE_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


def _die_with_parent() -> None:
    """In the child before exec (Linux): be killed if the test process dies, so that not even
    a killed pytest leaves nodes behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


class AppNode:
    """One uvicorn process of ``example_app.main:app``."""

    def __init__(self, port: int, group: str, redis_url: str, log_dir: Path, env: dict[str, str]):
        self.port = port
        self.node_id = f"node-{port}"
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{self.node_id}.log"
        node_env = clean_env(
            LEADER_REDIS_URL=redis_url,
            LEADER_GROUP=group,
            LEADER_NODE_ID=self.node_id,
            LEADER_ADVERTISE_URL=self.url,
            **env,
        )
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "example_app.main:app",
            "--app-dir",
            str(ROOT),
            "--port",
            str(port),
            "--no-access-log",
        ]
        with open(self.log_path, "wb") as log:
            # cwd: a directory with no .env file in it.
            self.process = subprocess.Popen(
                command,
                cwd=log_dir,
                env=node_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._http = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT, trust_env=False)

    def __repr__(self) -> str:
        return f"<AppNode {self.node_id} pid {self.pid}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def get(self, path: str) -> httpx.Response:
        return self._http.get(path)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.post(path, **kwargs)

    def view(self) -> dict[str, Any] | None:
        """The node's ``GET /leader``, or None if it does not answer (yet, or any more)."""
        try:
            response = self.get("/leader")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        view: dict[str, Any] = response.json()
        return view

    def stats(self) -> dict[str, Any]:
        response = self.get("/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until the node answers ``GET /leader`` and is connected to Redis."""

        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"{self.node_id} exited with {self.process.returncode}")
            view = self.view()
            return view is not None and bool(view["connected"])

        try:
            eventually(ready, timeout, f"{self.node_id} to answer GET /leader")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its output:\n{self.output()}") from None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait, SIGKILL after ``timeout``."""
        if self.running:
            self.process.terminate()
        self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._http.close()

    def output(self) -> str:
        """The last lines the node wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) or "(no output)"


class AppCluster:
    """Nodes of the example app in one group on one server; :meth:`close` stops them all.

    ``env``: more environment variables for every node (e.g. ``LEADER_LEASE``).
    """

    def __init__(self, redis_url: str, log_dir: Path, **env: str) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.group = f"e2e-{uuid.uuid4().hex[:12]}"
        self.env = env
        self.nodes: list[AppNode] = []

    def __enter__(self) -> AppCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, count: int = 1, **env: str) -> list[AppNode]:
        """Start ``count`` nodes at once and return them when every one answers."""
        nodes = []
        for port in free_ports(count):
            node = AppNode(port, self.group, self.redis_url, self.log_dir, {**self.env, **env})
            self.nodes.append(node)  # first, so that close() stops it whatever happens next
            nodes.append(node)
        for node in nodes:
            node.wait_ready()
        return nodes

    @property
    def live(self) -> list[AppNode]:
        return [node for node in self.nodes if node.running]

    def agreed_leader(self, nodes: Iterable[AppNode] | None = None) -> AppNode | None:
        """The node that every one of ``nodes`` (default: the live ones) names as leader, and
        that says it leads; None while they disagree or nobody leads."""
        nodes = self.live if nodes is None else list(nodes)
        views = [node.view() for node in nodes]
        if not views or any(view is None for view in views):
            return None
        leader_ids = {view["leader_id"] for view in views if view is not None}
        if len(leader_ids) != 1:
            return None
        leader = next((node for node in self.nodes if node.node_id in leader_ids), None)
        if leader is None or not leader.running:
            return None
        view = leader.view()
        return leader if view is not None and view["is_leader"] else None

    def wait_for_leader(
        self,
        nodes: Iterable[AppNode] | None = None,
        *,
        other_than: AppNode | None = None,
        timeout: float = WAIT,
    ) -> AppNode:
        """Wait until ``nodes`` (default: the live ones) agree on a leader (not
        ``other_than``); return it."""
        nodes = None if nodes is None else list(nodes)

        def leader() -> AppNode | None:
            found = self.agreed_leader(nodes)
            return None if found is other_than else found

        found: AppNode = eventually(leader, timeout, "the nodes to agree on a leader")
        return found

    def close(self) -> None:
        """Stop every node: SIGTERM all at once, then wait (SIGKILL after a timeout)."""
        for node in self.nodes:
            if node.running:
                node.process.terminate()
        for node in self.nodes:
            node.wait_stopped()
