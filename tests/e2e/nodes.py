"""Real uvicorn processes of the example app, for end-to-end tests.

::

    with AppCluster(redis_url, log_dir) as cluster:
        a, b, c = cluster.start(3)  # returns once each answers GET /leader
        leader = cluster.wait_for_leader()  # the node every live node names

Every cluster has its own group (a uuid), so clusters sharing a server never hear each other.
Leaving the ``with`` block stops every node it started (SIGTERM, then SIGKILL), whatever
happened inside. Waits poll HTTP state against a deadline; none sleeps to synchronise.

``AppCluster(..., app=STALL_APP)`` runs another app module (``module:attribute``) the same way.
:class:`WorkerServer` is one server process whose workers share one port (``gunicorn -w N``,
``uvicorn --workers N``); it tells the workers' answers apart by their ``X-Worker-Pid`` header
(see :mod:`tests.e2e.stall_app`).

The processes (they die with the test process, each in a group of its own) and the waits are
:mod:`harness`'s, shared with the chaos suite and the benchmarks.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from harness import processes
from harness.processes import ROOT, pid_exists
from harness.waiting import always, always_while, eventually

__all__ = [
    "EXAMPLE_APP",
    "HTTP_TIMEOUT",
    "ROOT",
    "STALL_APP",
    "STARTUP_TIMEOUT",
    "WAIT",
    "AppCluster",
    "AppNode",
    "WorkerServer",
    "always",
    "always_while",
    "brief_view",
    "clean_env",
    "eventually",
    "free_ports",
    "pid_exists",
]

EXAMPLE_APP = "example_app.main:app"
STALL_APP = "tests.e2e.stall_app:app"

# Generous: these bound waits that normally end within a second or two, on a loaded 2-core box
# where several Python processes import FastAPI at once.
STARTUP_TIMEOUT = 30.0
WAIT = 10.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 2.0
# Lines of a node's output quoted when it fails.
LOG_TAIL_LINES = 30
# Requests in flight at once while sampling the workers of a WorkerServer: more than the
# workers, so that busy ones leave some connections to the others.
SAMPLE_CONCURRENCY = 6


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
    return processes.clean_env(**overrides)


def _spawn(command: Sequence[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output (stdout and stderr) in ``log_path``, in the log's
    directory (one with no .env file in it), in a process group of its own (so that its
    children, a server's workers, can be signalled with it) that dies with this process."""
    with open(log_path, "wb") as log:
        return processes.popen(command, env=env, cwd=log_path.parent, stdout=log)


def _tail(log_path: Path) -> str:
    """The last lines a process wrote to ``log_path``."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:]) or "(no output)"


class AppNode:
    """One uvicorn process of an app (default ``example_app.main:app``).

    Its node id is ``node-<port>`` unless ``env`` sets ``LEADER_NODE_ID``.
    """

    def __init__(
        self,
        port: int,
        group: str,
        redis_url: str,
        log_dir: Path,
        env: dict[str, str],
        app: str = EXAMPLE_APP,
    ):
        self.port = port
        self.node_id = env.get("LEADER_NODE_ID", f"node-{port}")
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"node-{port}.log"
        node_env = clean_env(
            LEADER_REDIS_URL=redis_url,
            LEADER_GROUP=group,
            LEADER_NODE_ID=self.node_id,
            LEADER_ADVERTISE_URL=self.url,
        )
        node_env.update(env)
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--app-dir",
            str(ROOT),
            "--port",
            str(port),
            "--no-access-log",
        ]
        self.process = _spawn(command, self.log_path, node_env)
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
            processes.kill_group(self.process.pid)
            self.process.wait()
        processes.forget(self.process.pid)
        self._http.close()

    def output(self) -> str:
        """The last lines the node wrote."""
        return _tail(self.log_path)

    def log(self) -> str:
        """Everything the node wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class AppCluster:
    """Nodes of the example app in one group on one server; :meth:`close` stops them all.

    ``env``: more environment variables for every node (e.g. ``LEADER_LEASE``); ``app``: the
    app every node serves (``module:attribute``).
    """

    def __init__(self, redis_url: str, log_dir: Path, app: str = EXAMPLE_APP, **env: str) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.app = app
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
            node = AppNode(
                port, self.group, self.redis_url, self.log_dir, {**self.env, **env}, self.app
            )
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


class WorkerServer:
    """One server process whose workers all serve one port: ``gunicorn -w N`` or ``uvicorn
    --workers N``, as users deploy an app on one host.

    The workers share the port, so a request reaches whichever worker accepts it. Each
    request here goes on a fresh connection, several at once, and the app names the worker
    that answered (``X-Worker-Pid``, see :mod:`tests.e2e.stall_app`): :meth:`views` collects
    every worker's ``GET /leader`` that way. No node id or advertised URL is set: every worker
    reads the same ``LEADER_*`` environment, as it would in production.

    :meth:`close` (or leaving the ``with`` block) stops the server, its workers with it.
    """

    def __init__(
        self, command: Sequence[str], port: int, log_path: Path, env: dict[str, str]
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process = _spawn(command, log_path, env)
        self.latest: dict[int, dict[str, Any]] = {}
        """The last ``GET /leader`` each worker (by pid) answered."""
        self._pool = ThreadPoolExecutor(max_workers=SAMPLE_CONCURRENCY)

    @classmethod
    def gunicorn(
        cls,
        app: str,
        *,
        workers: int,
        redis_url: str,
        log_dir: Path,
        preload: bool = True,
        **env: str,
    ) -> WorkerServer:
        """``gunicorn -k uvicorn.workers.UvicornWorker -w workers [--preload] app``."""
        port = free_ports(1)[0]
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            "--chdir",
            str(ROOT),
            *(["--preload"] if preload else []),
            *_no_control_socket(),
            app,
        ]
        return cls(command, port, log_dir / f"gunicorn-{port}.log", _group_env(redis_url, env))

    @classmethod
    def uvicorn(
        cls, app: str, *, workers: int, redis_url: str, log_dir: Path, **env: str
    ) -> WorkerServer:
        """``uvicorn --workers workers app``."""
        port = free_ports(1)[0]
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--app-dir",
            str(ROOT),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
        ]
        return cls(command, port, log_dir / f"uvicorn-{port}.log", _group_env(redis_url, env))

    def __enter__(self) -> WorkerServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def _view(self) -> tuple[int, dict[str, Any]] | None:
        try:
            response = httpx.get(
                f"{self.url}/leader",
                timeout=HTTP_TIMEOUT,
                headers={"Connection": "close"},
                trust_env=False,
            )
        except httpx.HTTPError:
            return None
        pid = response.headers.get("X-Worker-Pid")
        if response.status_code != 200 or pid is None:
            return None
        view: dict[str, Any] = response.json()
        return int(pid), view

    def sample(self, requests: int = 2 * SAMPLE_CONCURRENCY) -> dict[int, dict[str, Any]]:
        """Send ``requests`` ``GET /leader`` at once, each on its own connection; return the
        answers by worker pid (and remember them in :attr:`latest`)."""
        answers = {}
        for answer in self._pool.map(lambda _: self._view(), range(requests)):
            if answer is not None:
                answers[answer[0]] = answer[1]
        self.latest.update(answers)
        return answers

    def views(
        self,
        count: int | None,
        condition: Callable[[dict[int, dict[str, Any]]], bool] = lambda views: True,
        *,
        exclude: Iterable[int] = (),
        timeout: float = WAIT,
        what: str = "",
    ) -> dict[int, dict[str, Any]]:
        """Wait until ``count`` live workers (not ``exclude``; None: any number) have answered
        since this call and ``condition`` holds for their latest answers; return those, by
        pid."""
        excluded = set(exclude)
        seen: dict[int, dict[str, Any]] = {}

        def collected() -> dict[int, dict[str, Any]] | None:
            if not self.running:
                raise AssertionError(f"the server exited; its output:\n{self.output()}")
            for pid, view in self.sample().items():
                if pid not in excluded:
                    seen[pid] = view
            for pid in [pid for pid in seen if not pid_exists(pid)]:
                del seen[pid]
            enough = bool(seen) if count is None else len(seen) == count
            return dict(seen) if enough and condition(seen) else None

        try:
            found: dict[int, dict[str, Any]] = eventually(
                collected, timeout, what or f"{count or 'some'} workers to answer GET /leader"
            )
        except AssertionError as exc:
            answers = {pid: brief_view(view) for pid, view in seen.items()}
            raise AssertionError(f"{exc}; last answers: {answers}") from None
        return found

    def wait_ready(self, workers: int, timeout: float = STARTUP_TIMEOUT) -> dict[int, dict]:
        """Wait until ``workers`` workers answer, each connected to Redis."""
        return self.views(
            workers,
            lambda views: all(view["connected"] for view in views.values()),
            timeout=timeout,
            what=f"{workers} workers to answer GET /leader, connected",
        )

    def kill(self, pid: int, signum: signal.Signals = signal.SIGKILL) -> float:
        """Signal one worker; return the monotonic time just before."""
        return processes.send(pid, signum)

    def output(self) -> str:
        """The last lines the server and its workers wrote."""
        return _tail(self.log_path)

    def close(self) -> None:
        """SIGTERM the server (it stops its workers), SIGKILL its whole group after a
        timeout, and whatever of the group is left in any case."""
        if self.running:
            self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT)
        processes.kill_group(self.process.pid)
        self.process.wait()
        processes.forget(self.process.pid)
        self._pool.shutdown()


def _no_control_socket() -> list[str]:
    """Recent gunicorn opens a control socket at one path per user (``~/.gunicorn``): servers
    of tests running side by side would take it from each other. Off, where it exists."""
    from gunicorn.config import KNOWN_SETTINGS

    known = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in known else []


def _group_env(redis_url: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of every worker of a WorkerServer: a group of its own (a uuid)."""
    return clean_env(LEADER_REDIS_URL=redis_url, LEADER_GROUP=f"e2e-{uuid.uuid4().hex[:12]}", **env)


def brief_view(view: dict[str, Any]) -> dict[str, Any]:
    """The parts of a view that a failure message needs."""
    return {
        "node_id": view.get("node_id"),
        "role": view.get("role"),
        "leader_id": view.get("leader_id"),
        "term": view.get("term"),
        "members": [member.get("node_id") for member in view.get("members", [])],
    }
