"""A local cluster of the example app, to watch leader election and failover.

    python -m example_app [--nodes 3] [--port 8000]

Starts ``--nodes`` uvicorn processes of ``example_app.main:app`` on consecutive ports from
``--port``, each with its own ``LEADER_NODE_ID`` (``node-<port>``) and ``LEADER_ADVERTISE_URL``
and one shared ``LEADER_GROUP`` (``example`` unless set). They use ``LEADER_REDIS_URL`` if set,
else a throw-away Redis-protocol server started here. Prints each node's URL and the
dashboard's, then one line per leadership change, with the command that kills the leader, and
one line when a node exits or Redis goes (never a traceback: a node killed mid-answer is a
node that did not answer; see :mod:`example_app.narration` for the sentences). Ctrl-C (or
SIGTERM) stops every process it started: the nodes first, so that the leader hands over, then
Redis.

Nothing but the standard library (and ``fastapi_leader``) runs here: the nodes are watched by
polling their ``GET /leader`` with ``urllib``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from fastapi_leader import LeaderSettings, SettingsError
from fastapi_leader.testing import RedisServer

from .narration import Narrator, describe_exit

HOST = "127.0.0.1"
# The directory holding example_app: the nodes import it from there, wherever we run from.
APP_DIR = Path(__file__).resolve().parent.parent
DEFAULT_GROUP = "example"

# Ten looks a second: a failover takes well under a second, and we want to see its gap.
POLL_INTERVAL = 0.1
# A node answers /leader in a millisecond; one that takes longer is as good as gone.
HTTP_TIMEOUT = 0.5
# Importing FastAPI and starting uvicorn takes a second or two; a loaded box may need more.
STARTUP_TIMEOUT = 30.0
# A node hands over in milliseconds on SIGTERM; after this long it is killed.
STOP_TIMEOUT = 10.0
REDIS_PING_TIMEOUT = 2.0

# Signals that stop the demo. The nodes get them from us only (see _start_node).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Local URLs only: never send them through an HTTP proxy from the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DemoError(Exception):
    """Something the user must fix; reported as one line on stderr, exit code 1."""


@dataclass
class Node:
    node_id: str
    port: int
    process: subprocess.Popen[bytes]
    exit_reported: bool = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def view(self) -> dict[str, Any] | None:
        """The node's ``GET /leader``, or None if it does not answer."""
        return read_view(self.url)


def read_view(url: str) -> dict[str, Any] | None:
    """``GET {url}/leader`` as a dict, or None if the node does not answer it whole."""
    try:
        with _http.open(f"{url}/leader", timeout=HTTP_TIMEOUT) as response:
            view: Any = json.load(response)
    except (OSError, ValueError, http.client.HTTPException):
        # Refused, reset, timed out, an HTTP error, not JSON, or a node that died while it
        # answered (IncompleteRead, RemoteDisconnected): the very step the demo invites.
        return None
    if not isinstance(view, dict) or not isinstance(view.get("node_id"), str):
        return None
    return view


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    stop = threading.Event()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    nodes: list[Node] = []
    redis_server: RedisServer | None = None
    try:
        ports = range(args.port, args.port + args.nodes)
        _check_ports(ports)
        settings = _read_settings()
        redis_url = settings.redis_url if "redis_url" in settings.model_fields_set else None
        if redis_url is None:
            redis_server = _start_redis_server()
            redis_url = redis_server.url
            _say(f"redis    {redis_url}  pid {redis_server.pid}  (throw-away, stopped on exit)")
        else:
            _check_redis(redis_url)
        group = settings.group if "group" in settings.model_fields_set else DEFAULT_GROUP
        for port in ports:
            if stop.is_set():
                return 0
            nodes.append(_start_node(port, redis_url, group))
            _say(f"{nodes[-1].node_id}  {nodes[-1].url}  pid {nodes[-1].process.pid}")
        _wait_until_ready(nodes, stop)
        if not stop.is_set():
            _say_how_to_play(nodes)
            _watch(nodes, stop, redis_server, redis_url)
        return 0
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        with _signals_ignored():  # a second Ctrl-C must not cut the cleanup short
            _stop_nodes(nodes)
            if redis_server is not None:
                redis_server.stop()
            if nodes or redis_server is not None:
                _say(f"stopped {len(nodes)} node(s)" + (" and Redis" if redis_server else ""))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_app",
        description="Run a local cluster of the example app and watch its leader.",
        epilog="Environment: LEADER_REDIS_URL (default: a throw-away server started here), "
        f"LEADER_GROUP (default: {DEFAULT_GROUP}), other LEADER_* and EXAMPLE_* settings are "
        "passed to every node.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="how many nodes (default: 3)")
    parser.add_argument("--port", type=int, default=8000, help="first port (default: 8000)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if not 1 <= args.port <= 65536 - args.nodes:
        parser.error(f"--port must leave room for {args.nodes} ports below 65536")
    return args


def _say(line: str) -> None:
    print(line, flush=True)


def _check_ports(ports: range) -> None:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As uvicorn binds: a port held only by closed connections (TIME_WAIT) is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError:
                raise DemoError(
                    f"port {port} is already in use; pick another first port with --port"
                ) from None


def _read_settings() -> LeaderSettings:
    """The ``LEADER_*`` settings from the environment or ``.env``, as the nodes will read them
    (but for the node id and URL, which we set), checked before any node starts."""
    try:
        settings = LeaderSettings()
    except SettingsError as exc:  # its first line names the variable, the value and the rule
        raise DemoError(f"invalid setting: {str(exc).splitlines()[0]}") from None
    if settings.redis_url.startswith("memory://"):
        raise DemoError("LEADER_REDIS_URL=memory:// works within one process; the demo needs Redis")
    return settings


def _check_redis(url: str) -> None:
    client = Redis.from_url(
        url, socket_connect_timeout=REDIS_PING_TIMEOUT, socket_timeout=REDIS_PING_TIMEOUT
    )
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        redacted = LeaderSettings(redis_url=url).redis_url_redacted
        raise DemoError(f"cannot reach Redis at {redacted}: {exc}") from None
    finally:
        client.close()


def _start_redis_server() -> RedisServer:
    # Ctrl-C in a terminal signals every process of the foreground group, the server included,
    # but it must outlive the nodes' handover. A blocked signal stays blocked across exec, so
    # the server starts deaf to SIGINT and SIGHUP, and stops when we send SIGTERM.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGHUP})
    try:
        return RedisServer().start()
    except RuntimeError as exc:  # no binary, or it would not start
        raise DemoError(str(exc).splitlines()[0]) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _start_node(port: int, redis_url: str, group: str) -> Node:
    node_id = f"node-{port}"
    env = {
        **os.environ,
        "LEADER_REDIS_URL": redis_url,
        "LEADER_GROUP": group,
        "LEADER_NODE_ID": node_id,
        "LEADER_ADVERTISE_URL": f"http://{HOST}:{port}",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "example_app.main:app",
        "--app-dir",
        str(APP_DIR),
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",  # we poll /leader ten times a second
    ]
    # A session of its own: Ctrl-C reaches us only, and we stop the nodes in order.
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    return Node(node_id, port, process)


def _wait_until_ready(nodes: list[Node], stop: threading.Event) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    waiting = list(nodes)
    while waiting and not stop.is_set():
        for node in list(waiting):
            code = node.process.poll()
            if code is not None:
                node.exit_reported = True
                raise DemoError(f"{node.node_id} {describe_exit(code)} while starting")
            if node.view() is not None:
                waiting.remove(node)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(node.node_id for node in waiting)
            raise DemoError(f"{names} did not answer within {STARTUP_TIMEOUT:.0f} s")
        stop.wait(POLL_INTERVAL)


def _say_how_to_play(nodes: list[Node]) -> None:
    first, last = nodes[0].url, nodes[-1].url
    _say("")
    _say(f"send events:  curl -X POST {first}/events -d '{{\"hello\": 1}}'")
    _say(f"watch work:   curl {last}/stats    (every node: /leader, /stats)")
    _say(f"dashboard:    {first}/dashboard    (a live page of the cluster, in a browser)")
    _say("stop:         Ctrl-C")
    _say("")


def _watch(
    nodes: list[Node], stop: threading.Event, redis_server: RedisServer | None, redis_url: str
) -> None:
    """Print a line whenever the set of nodes that say they lead changes, a process exits, or
    the nodes lose or regain Redis, until stopped."""
    narrator = Narrator(
        {node.node_id: node.process.pid for node in nodes},
        LeaderSettings(redis_url=redis_url).redis_url_redacted,
        None if redis_server is None else redis_server.pid,
    )
    redis_exit_reported = False
    while not stop.is_set():
        for node in nodes:
            code = node.process.poll()
            if code is not None and not node.exit_reported:
                node.exit_reported = True
                _say(f"{_now()} {narrator.node_exited(node.node_id, code)}")
        if redis_server is not None and not redis_exit_reported and not redis_server.is_running:
            redis_exit_reported = True
            code = redis_server.process.poll() if redis_server.process else None
            _say(f"{_now()} {narrator.redis_exited(code)}")
        live = [node for node in nodes if node.process.poll() is None]
        if not live:
            raise DemoError("every node has exited")
        views = [view for view in (node.view() for node in live) if view is not None]
        for line in narrator.saw(views, time.monotonic()):
            _say(f"{_now()} {line}")
        stop.wait(POLL_INTERVAL)


def _stop_nodes(nodes: list[Node]) -> None:
    """SIGTERM every node (the leader hands over as it leaves), wait, SIGKILL stragglers."""
    running = [node for node in nodes if node.process.poll() is None]
    for node in running:
        node.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for node in running:
        try:
            node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"{node.node_id} did not stop in {STOP_TIMEOUT:.0f} s: killing it", file=sys.stderr
            )
            node.process.kill()
            node.process.wait()


@contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


if __name__ == "__main__":
    sys.exit(main())
