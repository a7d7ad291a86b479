"""Node processes that cannot outlive the harness, and the faults done to them with signals.

Every process is started in a session (process group) of its own, so that a kill reaches
whatever it started (a server's workers); on Linux the kernel also SIGKILLs it when the thread
that started it dies (``PR_SET_PDEATHSIG``), so not even a killed harness leaves nodes behind.
The groups still alive are registered here: :func:`kill_leftovers` (run at exit too) wakes and
kills each one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ROOT",
    "clean_env",
    "die_with_parent",
    "forget",
    "kill_group",
    "kill_leftovers",
    "pid_exists",
    "popen",
    "send",
    "spawn",
]

ROOT = Path(__file__).resolve().parent.parent
"""The repository: on the nodes' ``PYTHONPATH``, so they import its packages."""

# Lines a node writes on stdout may be long (a ``stats`` report of a big table).
_LINE_LIMIT = 1 << 20
_PR_SET_PDEATHSIG = 1

_live_groups: set[int] = set()


def die_with_parent() -> None:
    """In the child before exec (Linux): be SIGKILLed when the parent thread dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _preexec() -> Any:
    return die_with_parent if sys.platform == "linux" else None


def clean_env(
    drop: Sequence[str] = ("LEADER_", "EXAMPLE_", "CHAOS_"), **overrides: str
) -> dict[str, str]:
    """This environment without the variables starting with ``drop`` (the developer's own
    settings must not reach the nodes), the repository importable and output unbuffered,
    plus ``overrides``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(tuple(drop))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


async def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | str,
    stderr: IO[bytes] | int | None,
    stdin: int | None = asyncio.subprocess.PIPE,
    stdout: int | None = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """Start ``argv`` on the running loop, in a group of its own that dies with us, reading
    its stdout in lines; registered until :func:`forget` (or :func:`kill_leftovers`)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
        preexec_fn=_preexec(),
        limit=_LINE_LIMIT,
    )
    _live_groups.add(process.pid)
    return process


def popen(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | str,
    stdout: IO[bytes] | int | None,
    stderr: IO[bytes] | int | None = subprocess.STDOUT,
    session: bool = True,
) -> subprocess.Popen[bytes]:
    """:func:`spawn` without a loop (the end-to-end tests): stdin closed; ``session``: in a
    group of its own (registered, as by :func:`spawn`)."""
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=session,
        preexec_fn=_preexec(),
    )
    if session:
        _live_groups.add(process.pid)
    return process


def send(pid: int, signum: int) -> float:
    """Send ``signum`` to one process; return the monotonic time just before it was sent (so
    that nothing the process reports after the signal can be dated before it). A process
    that is gone already is no error."""
    sent_at = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
    return sent_at


def kill_group(pgid: int) -> None:
    """SIGCONT (a stopped process would not die before it runs again) and SIGKILL a whole
    process group; one that is gone already is no error."""
    for signum in (signal.SIGCONT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)


def forget(pid: int) -> None:
    """The process was reaped: its group is no longer ours to kill (its pid may be reused)."""
    _live_groups.discard(pid)


def kill_leftovers() -> None:
    """Kill every registered group that was not reaped (run at exit as well)."""
    for pgid in list(_live_groups):
        kill_group(pgid)
    _live_groups.clear()


atexit.register(kill_leftovers)


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (Linux: ``/proc``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status
