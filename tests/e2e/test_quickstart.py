"""The README's Quick start, run as pasted: its install lines in a fresh venv, its app file, its
two servers on two ports, and its curl lines, which must name one leader, then another once the
first is stopped with Ctrl-C.

What is taken as is and what is not:

- The code blocks are read from README.md at test time, and run by bash as written, but for two
  substitutions: the Redis URL becomes a private server's (a test never touches the machine's
  Redis on 6379) and the ports 8000 and 8001 become free ones.
- The install block runs in a copy of the clone (the files the package's build reads), so that
  its ``.venv`` lands in the test's tmp dir, not in the developer's checkout. The venv is fresh
  on purpose rather than the test venv: the test venv has uvicorn and the repo on ``sys.path``,
  so it would hide the two faults a new user meets (an install line that forgets the server, a
  wheel that misses a module). ``app.py`` lives in a directory of its own, away from the clone,
  so that the servers import the installed wheel.
- The venv is made and filled with uv where ``uv`` is on PATH (CI installs it to run nox; its
  cache is warm by then): ``python3 -m venv`` and ``pip install`` stand for ``uv venv`` and
  ``uv pip install`` (same requirements, same PEP 517 build), ~5 s instead of ~50 s of
  ensurepip and pip on a loaded 2-core box. Without uv they run as written, with the test's own
  interpreter as ``python3``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastapi_leader.testing import RedisServer

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# What the package's build reads (pyproject.toml's wheel target and metadata).
CLONE_FILES = ("pyproject.toml", "README.md", "LICENSE", "fastapi_leader")
README_REDIS_URL = "redis://127.0.0.1:6379/0"

# Generous: a cold cache downloads the dependencies; pip without uv takes ~50 s here.
INSTALL_TIMEOUT = 300.0
# The first start in a fresh venv compiles every module it imports.
STARTUP_TIMEOUT = 60.0
WAIT = 20.0
POLL = 0.1
STOP_TIMEOUT = 15.0
CURL_TIMEOUT = 10.0

# Stand-ins for the two install commands when uv is there (see the module docstring).
_UV_PRELUDE = """
python3() {
    if [ "$1" = -m ] && [ "$2" = venv ]; then shift 2; uv venv -q --python "$TEST_PYTHON" "$@";
    else "$TEST_PYTHON" "$@"; fi
}
pip() { uv pip "$@"; }
"""
_PLAIN_PRELUDE = 'python3() { "$TEST_PYTHON" "$@"; }\n'


@dataclass
class QuickStart:
    """The Quick start's code blocks, by what they do."""

    install: list[str]
    app: str
    servers: list[str]
    curls: list[str]


def read_quick_start() -> QuickStart:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"^```(\w+)\n(.*?)^```\n", section[1], re.S | re.M)
    shell = [body.splitlines() for lang, body in blocks if lang in ("sh", "bash", "shell")]
    python = [body for lang, body in blocks if lang == "python"]
    assert len(python) == 1, "the Quick start should show one app file"
    install = next((lines for lines in shell if any("pip install" in x for x in lines)), None)
    assert install, "the Quick start has no install line"
    lines = [line for block in shell for line in block]
    servers = [line for line in lines if "uvicorn app:app" in line]
    curls = [line for line in lines if line.startswith("curl ")]
    return QuickStart(install, python[0], servers, curls)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of its own: the Quick start uses the default group."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


_SESSION_VARIABLES = (
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONHOME",
    "UV_PYTHON",
    "UV_PROJECT_ENVIRONMENT",
)


def _env(venv: Path | None = None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LEADER_", "EXAMPLE_"))
        # nox's uv backend sets UV_PYTHON and UV_PROJECT_ENVIRONMENT to the session's venv:
        # left in, `uv pip install` would fill that venv instead of the Quick start's.
        and key not in _SESSION_VARIABLES
    }
    env["TEST_PYTHON"] = sys.executable
    if venv is not None:  # as `. .venv/bin/activate` leaves it
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


def _curl(line: str) -> dict[str, Any] | None:
    # Loopback only: a proxy from the environment would stand between curl and the servers.
    env = {k: v for k, v in _env().items() if not k.lower().endswith("_proxy")}
    result = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=CURL_TIMEOUT, env=env
    )
    if result.returncode != 0:
        return None
    with contextlib.suppress(ValueError):
        view: dict[str, Any] = json.loads(result.stdout)
        return view
    return None


def _eventually(condition: Any, what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL)


def test_the_quick_start_works_as_pasted(
    tmp_path: Path,
    private_redis: RedisServer,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    quick = read_quick_start()
    assert any("uvicorn" in line for line in quick.install), "the install line must bring uvicorn"
    readme_ports = [re.search(r"--port (\d+)", line) for line in quick.servers]
    assert len(quick.servers) == 2 and all(readme_ports), quick.servers
    ports = {m[1]: str(p) for m, p in zip(readme_ports, _free_ports(2), strict=True) if m}
    assert len(ports) == 2, "two copies on two ports"
    assert len(quick.curls) == 2, quick.curls
    for line in quick.curls:  # Debian's curl 7.88 needs the host: `curl :8000` fails there
        assert re.match(r"curl http://127\.0\.0\.1:\d+/leader$", line), line

    def localise(line: str) -> str:
        line = line.replace(README_REDIS_URL, private_redis.url)
        return re.sub(r"\b\d{4,5}\b", lambda m: ports.get(m[0], m[0]), line)

    # 1. The install block, in a copy of the clone, in a fresh venv.
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in CLONE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, clone / name)
    prelude = _UV_PRELUDE if shutil.which("uv") else _PLAIN_PRELUDE
    script = prelude + "set -e\n" + "\n".join(quick.install) + "\n"
    began = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=clone,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installer = "uv" if prelude is _UV_PRELUDE else "pip"
    print(f"\nquick start: installed with {installer} in {time.monotonic() - began:.1f} s")
    venv = clone / ".venv"
    assert (venv / "bin" / "uvicorn").exists(), "the install line did not install uvicorn"

    # 2. The app file, in a directory of its own; 3. the two servers, from there.
    service = tmp_path / "service"
    service.mkdir()
    (service / "app.py").write_text(quick.app, encoding="utf-8")
    by_port: dict[str, subprocess.Popen[bytes]] = {}
    for line in quick.servers:
        log = (service / f"server-{len(by_port)}.log").open("wb")
        process = subprocess.Popen(
            ["bash", "-c", localise(line)],
            cwd=service,
            env=_env(venv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a terminal's foreground job
        )
        log.close()
        processes.append(process)
        by_port[re.search(r"--port (\d+)", localise(line))[1]] = process  # type: ignore[index]

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(service.glob("*.log")))

    # 4. The curl lines: both name the same leader, and exactly one is it.
    curls = [localise(line) for line in quick.curls]

    def agreed() -> list[dict[str, Any]] | None:
        for process in processes:
            assert process.poll() is None, f"a server exited:\n{logs()}"
        views = [_curl(line) for line in curls]
        answered = [view for view in views if view is not None]
        if len(answered) < len(views):
            return None
        leaders = {view["leader_id"] for view in answered}
        leading = [view for view in answered if view["is_leader"]]
        return answered if len(leaders) == 1 and None not in leaders and len(leading) == 1 else None

    views = _eventually(agreed, "one leader named by both copies", STARTUP_TIMEOUT)
    leader_index = next(i for i, view in enumerate(views) if view["is_leader"])
    leader_port = re.search(r":(\d+)/", curls[leader_index])[1]  # type: ignore[index]
    other_curl = curls[1 - leader_index]

    # 5. Ctrl-C on the leader: it stops cleanly, and the other copy takes over.
    leader_process = by_port[leader_port]
    os.killpg(leader_process.pid, signal.SIGINT)  # Ctrl-C signals the foreground group
    assert leader_process.wait(STOP_TIMEOUT) == 0, logs()
    successor = _eventually(
        lambda: (view := _curl(other_curl)) and view["is_leader"] and view,
        "the other copy to lead",
    )
    assert successor["leader_id"] != views[leader_index]["node_id"]
    assert "Traceback" not in logs(), logs()


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
