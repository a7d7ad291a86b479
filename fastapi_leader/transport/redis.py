"""The Redis (or Valkey) transport: pub/sub for messages, Lua scripts for the group's keys.

Three topologies (see :mod:`fastapi_leader.redis_url` for their URLs):

- **one server** (``redis://``): a pool of one connection for commands, one for the subscriber.
- **Redis Cluster** (``redis+cluster://``): redis-py's cluster client for the commands (it
  follows MOVED and ASK, and re-reads the slot map after a connection error), and the
  subscriber on the primary of the group's slot with sharded pub/sub (SSUBSCRIBE, SPUBLISH:
  Redis 7 or later). Every key and channel of a group carries the group as its hash tag, so the
  group lives on one slot. When that slot's primary goes away (or the server unsubscribes the
  shard channels, as Redis does when a slot moves), the subscriber reads the slot map again
  and resubscribes on the new owner. The cluster client is shared by the process's nodes on
  one cluster (one pool per cluster node); each node keeps its own subscriber connection.
- **Sentinel** (``redis+sentinel://``): both connections ask the sentinels for the primary each
  time they connect, and reconnect on a connection loss or a ``READONLY`` reply (the primary
  they knew was demoted). A third connection, to one of the sentinels, listens to
  ``+switch-master``: when the sentinels name a new primary for the service, both connections
  move to it at once, even while the old primary still runs and takes writes (as it does for a
  while after a ``SENTINEL FAILOVER``). When that sentinel goes away the listener moves to the
  next one, and on each (re)subscription it asks its sentinel for the primary, so a switch
  announced while nobody listened is followed too.

Each node holds two connections (to the group's one server, or its primary):

- a **command connection** (a pool capped at one connection) for PUBLISH and the four scripts.
  Every command is bounded by ``command_timeout``; a failed one raises
  :class:`BrokerUnavailable` and the next one reconnects by itself (the pool checks a connection
  for a closed socket before each use, so the first command after a Redis restart goes out on a
  fresh connection instead of failing).
- a **subscriber connection** read by one background task. Redis reports nothing when a server
  freezes or the network drops packets, so the reader PINGs when the connection has been silent
  and treats a missing reply as a lost connection. On any loss it reports
  ``connection_lost``, resubscribes with capped exponential backoff on a brand new connection,
  and reports ``connection_restored`` once the server has confirmed the subscriptions.

redis-py's own retries are switched off on both connections: a script that is retried after its
reply was lost could run twice (an ``acquire`` would then see its own key and answer "no"), and
the subscriber must notice every reconnection to report it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

from redis._parsers import AsyncCommandsParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.typing import EncodableT

from ..redis_url import BrokerURL, parse_broker_url, redact_url
from ..settings import LeaderSettings
from .base import BrokerUnavailable, Names, Sink

__all__ = ["RedisTransport", "acl_rule"]

_log = logging.getLogger(__name__)

# redis-py >= 7 skips its check for a closed connection before each use while "maintenance
# notifications" are on (their default is "auto"), and then the first command after a Redis
# restart fails. They need RESP3, which we do not use: switch them off where they exist.
_POOL_COMPAT_OPTIONS: dict[str, Any]
try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:
    _POOL_COMPAT_OPTIONS = {}
else:
    _POOL_COMPAT_OPTIONS = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}

# No CLIENT SETINFO on connect (redis-py sends its name and version by default): one command
# fewer for the ACL rule to allow (see acl_rule), and one that Redis before 7.2 does not know.
try:
    import redis.driver_info  # noqa: F401  (redis-py >= 7.1: driver_info=None turns it off)
except ImportError:
    _POOL_COMPAT_OPTIONS["lib_name"] = None
    _POOL_COMPAT_OPTIONS["lib_version"] = None
else:
    _POOL_COMPAT_OPTIONS["driver_info"] = None

_T = TypeVar("_T")

# The reader waits this long for a frame before checking the connection's health, so a
# SIGSTOPped server is noticed within idle_before_ping + _PING_TIMEOUT + _POLL_INTERVAL.
_POLL_INTERVAL = 0.25
# Silence on the subscriber connection before it is PINGed, at the least. A healthy group is
# never this quiet (the leader beats every 100 ms at the defaults; slower profiles pass a longer
# silence), so the PINGs cost nothing while a leader is alive.
_IDLE_BEFORE_PING = 0.5
# No frame at all this long after a PING: the connection is dead even without an RST.
_PING_TIMEOUT = 1.0
_PING_PAYLOAD = b"fastapi-leader-ping"

# Resubscription backoff: quick for a blip, at most about a second apart for an outage (the
# default; the election passes a shorter cap, see ``retry_cap``).
_BACKOFF_FIRST = 0.05
_BACKOFF_CAP = 1.0

# The sentinels' channel that announces a new primary: "<service> <old-ip> <old-port> <new-ip>
# <new-port>". It is quiet for months, so its connection is PINGed when silent; a dead sentinel
# costs only speed (a READONLY still sends the node to the new primary), so less often.
_SWITCH_MASTER = b"+switch-master"
_SENTINEL_IDLE_BEFORE_PING = 2.0

# Scripts touch only the keys passed in KEYS (Redis Cluster and Dragonfly require it); the
# broadcast channel is an argument (channels are not keys), in the same slot as the keys through
# the group's hash tag. Values are compared as strings. ``{publish}`` is PUBLISH, or SPUBLISH on
# a cluster (sharded pub/sub).
_ALLOCATE_TERM = """
local current = tonumber(redis.call('GET', KEYS[1])) or 0
if tonumber(ARGV[1]) > current then
    redis.call('SET', KEYS[1], ARGV[1])
end
return redis.call('INCR', KEYS[1])
"""

# A term below the counter is refused: a newer candidacy exists, and a leadership under the
# older term would write with a fencing token older than one already handed out.
_ACQUIRE = """
if (tonumber(redis.call('GET', KEYS[2])) or 0) > tonumber(ARGV[5]) then
    return 0
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    redis.call('{publish}', ARGV[3], ARGV[4])
    return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('{publish}', ARGV[3], ARGV[4])
    return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[3] ~= '' then
        redis.call('{publish}', ARGV[2], ARGV[3])
    end
    return 1
end
return 0
"""


# Every command a node sends: HELLO and PING at start (HELLO tells the server's version, mode and
# role), PING on a quiet subscriber connection, SCRIPT LOAD and EVALSHA for the four scripts
# above, and the commands those scripts run on the group's two keys and broadcast channel;
# PUBLISH of votes to a node's own channel; SUBSCRIBE and, when closing, UNSUBSCRIBE. On a
# cluster the pub/sub commands are the sharded ones, and the cluster client reads the slot map
# (CLUSTER SLOTS) and the command table (COMMAND). Keep this in step with the scripts: the ACL
# test runs a group under exactly this rule and fails on any command it denies.
_COMMANDS = (
    "hello",
    "ping",
    "script|load",
    "evalsha",
    "get",
    "set",
    "incr",
    "pexpire",
    "del",
)
_PUBSUB_COMMANDS = ("publish", "subscribe", "unsubscribe")
_CLUSTER_COMMANDS = ("spublish", "ssubscribe", "sunsubscribe", "cluster|slots", "command")

# HELLO (6.0) answers the version, mode and role in one reply; channel ACL rules (``&``) came
# with 6.2; sharded pub/sub with 7.0.
_MIN_VERSION = (6, 2)
_MIN_CLUSTER_VERSION = (7, 0)


def acl_rule(settings: LeaderSettings) -> list[str]:
    """The least-privilege Redis ACL rules for the nodes of ``settings.group``: the group's two
    keys and its channels only, and only the commands a node sends. Create the user with::

        ACL SETUSER <user> reset on ><password> <rules...>

    for example ``await admin.execute_command("ACL", "SETUSER", "billing-leader", "reset",
    "on", ">" + password, *acl_rule(settings))``, and give the nodes ``redis://<user>:<password>@
    ...``. For the default prefix and a group ``billing`` the rules are::

        resetkeys ~fastapi-leader:{billing}:leader ~fastapi-leader:{billing}:term
        resetchannels &fastapi-leader:{billing} &fastapi-leader:{billing}:node:*
        -@all +hello +ping +script|load +evalsha +get +set +incr +pexpire +del +publish
        +subscribe +unsubscribe

    On a cluster (``redis+cluster://``) the pub/sub commands are the sharded ones (``+spublish
    +ssubscribe +sunsubscribe``), plus ``+cluster|slots +command`` for the cluster client. Plus
    ``+client|setname`` when ``redis_url`` sets a ``client_name``, and ``+select`` when it names a
    database other than 0. Names cannot contain ``:``, braces or glob characters (the settings
    refuse them), so no other group's names match these patterns. Needs Redis 6.2 or later (or
    Valkey): channel rules (``&``) came with 6.2.
    """
    names = Names(settings.channel_prefix, settings.group, settings.node_id or "*")
    url = parse_broker_url(settings.redis_url)
    pubsub = _CLUSTER_COMMANDS if url.topology == "cluster" else _PUBSUB_COMMANDS
    rules = [
        "resetkeys",
        f"~{names.leader_key}",
        f"~{names.term_key}",
        "resetchannels",
        f"&{names.broadcast}",
        f"&{names.node_channel('*')}",
        "-@all",
        *(f"+{command}" for command in (*_COMMANDS, *pubsub)),
    ]
    if url.topology == "memory":
        return rules
    if url.topology == "standalone":
        options: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
        client_name, db = options.get("client_name"), options.get("db")
    else:
        client_name, db = url.options.get("client_name"), url.db
    if client_name:
        rules.append("+client|setname")
    if db:
        rules.append("+select")
    return rules


def _ttl_ms(ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return math.ceil(ttl * 1000)


def _describe(exc: BaseException) -> str:
    if not str(exc):
        return "no reply in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
    # One line: some servers' errors span several.
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# What a lost or unreachable broker raises. Other Redis errors (NOPERM from an ACL, a full
# server) are wrapped too: for the caller each of them means "no answer", never "no".
_BROKER_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# The server's words for "a password is needed" (NOAUTH, or HELLO before AUTH on Redis 6).
_AUTH_MISSING = ("noauth", "authentication required", "hello must be called with the client")
_AUTH_WRONG = ("wrongpass", "invalid password", "invalid username-password")
_AUTH_UNNEEDED = ("without any password configured",)


_TOO_OLD = (
    "the server is older than Redis 6.2 (it does not know HELLO without arguments); "
    "fastapi-leader needs Redis 6.2 or later, or Valkey"
)


class _SharedCommandTable(AsyncCommandsParser):
    """redis-py's cluster client reads the whole command table (COMMAND, a large reply that
    takes a loaded CPU up to a second to parse) every time it reads the slot map, to find the
    keys of commands. The table is the same on every node of a cluster: read it once per
    cluster and process, so a process running many groups (and all of them after a failover)
    does not parse it hundreds of times over."""

    __slots__ = ("_cluster_key",)
    _tables: ClassVar[dict[tuple[tuple[str, int], ...], dict[str, Any]]] = {}

    def __init__(self, cluster_key: tuple[tuple[str, int], ...]) -> None:
        super().__init__()
        self._cluster_key = cluster_key

    async def initialize(self, node: ClusterNode | None = None) -> None:
        table = self._tables.get(self._cluster_key)
        if table is None:
            await super().initialize(node)
            self._tables[self._cluster_key] = self.commands
        else:
            if node is not None:
                self.node = node
            self.commands = table


class _SharedClusters:
    """One cluster client per cluster, option set and event loop, shared by the transports of
    a process: a process that runs many groups (one per singleton role) reads the slot map once,
    not once per group, holds one connection pool per node, and re-reads the map once after a
    failover. Every transport still has a subscriber connection of its own."""

    _clients: ClassVar[dict[tuple[Any, ...], tuple[RedisCluster, int]]] = {}
    ready: ClassVar[set[RedisCluster]] = set()
    """Clients whose cluster was checked, with the scripts loaded on every primary."""

    @classmethod
    def acquire(cls, key: tuple[Any, ...], make: Callable[[], RedisCluster]) -> RedisCluster:
        full_key = (id(asyncio.get_running_loop()), *key)
        client, users = cls._clients.get(full_key, (None, 0))
        if client is None:
            client = make()
        cls._clients[full_key] = (client, users + 1)
        return client

    @classmethod
    def release(cls, client: RedisCluster) -> bool:
        """Forget one user of ``client``; True when it was the last (close it then)."""
        for key, (shared, users) in list(cls._clients.items()):
            if shared is client:
                if users > 1:
                    cls._clients[key] = (shared, users - 1)
                    return False
                del cls._clients[key]
                cls.ready.discard(client)
                return True
        return True


class _Incompatible(Exception):
    """The server answers, but cannot serve this group as configured (the message says why)."""


class RedisTransport:
    """Messages over Redis pub/sub and the group's keys in Redis, with two connections per node.

    Args:
        url: a ``redis_url`` (see :mod:`fastapi_leader.redis_url`): ``redis://``, ``rediss://``
            (TLS), ``unix://``, ``redis+cluster://`` or ``redis+sentinel://``.
        names: channel and key names of this node in its group.
        connect_timeout: seconds allowed to open a connection (TCP, TLS and handshake).
        command_timeout: seconds allowed for any one command, reconnection included; also how
            long the subscriber waits for its subscriptions to be confirmed.
        ssl_options: extra keyword arguments for redis-py's connections (``ssl_ca_certs``,
            ``ssl_certfile`` ...), used with the ``rediss`` schemes.
        sentinel_password: the sentinels' own password, if they require one.
        idle_before_ping: seconds of silence on the subscriber connection before it is PINGed
            (at least 0.5); no reply within another second and it counts as dead.
        retry_cap: the longest wait between two attempts to subscribe again after the
            subscription is lost (the waits double from 50 ms up to it, plus up to half in
            jitter): how soon after Redis is back, or a replica promoted, the node hears the
            group again.

    The password in ``url`` never appears in logs or error messages.
    """

    def __init__(
        self,
        url: str,
        names: Names,
        *,
        connect_timeout: float = 2.0,
        command_timeout: float = 1.0,
        ssl_options: Mapping[str, Any] | None = None,
        sentinel_password: str | None = None,
        idle_before_ping: float = _IDLE_BEFORE_PING,
        retry_cap: float = _BACKOFF_CAP,
    ) -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        if not command_timeout > 0:
            raise ValueError(f"command_timeout must be positive, got {command_timeout!r}")
        self.names = names
        self._safe_url = redact_url(url)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._idle_before_ping = max(idle_before_ping, _IDLE_BEFORE_PING)
        self._retry_cap = max(retry_cap, _BACKOFF_FIRST)
        # Set when a retry should not wait out its backoff: the sentinels named a new primary.
        self._retry_now = asyncio.Event()
        try:
            self._url = parse_broker_url(url)
        except ValueError as exc:
            raise ValueError(f"Invalid Redis URL {self._safe_url}: {exc}") from None
        self._sharded = self._url.topology == "cluster"
        connection_options: dict[str, Any] = {
            **(ssl_options or {}),
            "socket_timeout": command_timeout,
            "socket_connect_timeout": connect_timeout,
            "decode_responses": False,
            **_POOL_COMPAT_OPTIONS,
        }
        self._sentinel: Sentinel | None = None
        # On a cluster, the client shared by the process's transports (see _SharedClusters),
        # taken at start() on the loop that runs this node.
        self._cluster: RedisCluster | None = None
        self._node_options: dict[str, Any] = {}
        self._commands: Redis | RedisCluster | None = None
        self._subscriber: Redis | None = None
        try:
            if self._url.topology == "cluster":
                self._node_options = {
                    **connection_options,
                    **({"ssl": True} if self._url.tls else {}),
                    "username": self._url.username,
                    "password": self._url.password,
                    "client_name": self._url.options.get("client_name"),
                }
            elif self._url.topology == "sentinel":
                self._commands, self._subscriber = self._sentinel_clients(
                    self._url, connection_options, sentinel_password
                )
            else:
                self._commands, self._subscriber = self._standalone_clients(url, connection_options)
        except ValueError:
            # redis-py's message may quote parts of the URL, the password included.
            raise ValueError(
                f"Invalid Redis URL {self._safe_url}: expected redis://, rediss://, unix://, "
                "redis+cluster:// or redis+sentinel://, with numeric ports and the password "
                "percent-encoded"
            ) from None
        publish = "SPUBLISH" if self._sharded else "PUBLISH"
        # Bytes, so that no client is needed to compute their SHA; each call names its client.
        self._allocate_term = _script(_ALLOCATE_TERM)
        self._acquire = _script(_ACQUIRE.replace("{publish}", publish))
        self._renew = _script(_RENEW.replace("{publish}", publish))
        self._release = _script(_RELEASE.replace("{publish}", publish))
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # Sentinel only: the task that listens to +switch-master, the sentinel it listens to
        # (host, port) once subscribed, and the reader's cue to move its subscription.
        self._watcher: asyncio.Task[None] | None = None
        self._watched: tuple[str, int] | None = None
        self._watch_pubsub: PubSub | None = None
        self._move_subscription = False
        self.switches_followed = 0
        """Sentinel: how many times the sentinels named a new primary and both connections
        moved to it (from ``+switch-master``, or found on subscribing to a sentinel)."""
        self.switch_messages_ignored = 0
        """Sentinel: ``+switch-master`` messages ignored, malformed or for another service."""

    def _standalone_clients(self, url: str, options: dict[str, Any]) -> tuple[Redis, Redis]:
        pool_options = {
            **options,
            "max_connections": 1,
            # Waiting for the one connection counts against the command's own timeout.
            "timeout": self._command_timeout,
        }
        # No retries: on an error redis-py only closes the connection; the next command opens
        # a new one.
        commands = Redis.from_pool(
            BlockingConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0), **pool_options)
        )
        # Nothing retried at all: redis-py would otherwise reconnect and resubscribe the
        # subscriber behind the reader's back, and the outage would go unreported.
        subscriber = Redis.from_pool(
            BlockingConnectionPool.from_url(
                url, retry=Retry(NoBackoff(), 0, supported_errors=()), **pool_options
            )
        )
        return commands, subscriber

    def _sentinel_clients(
        self, url: BrokerURL, options: dict[str, Any], sentinel_password: str | None
    ) -> tuple[Redis, Redis]:
        assert url.service_name is not None
        tls = {"ssl": True, **options} if url.tls else {}
        sentinel_options = {
            key: value
            for key, value in {**options, **tls}.items()
            if key.startswith(("socket_", "ssl")) or key == "decode_responses"
        }
        if sentinel_password is not None:
            sentinel_options["password"] = sentinel_password
        # Typed through a Callable: redis-py types Sentinel.__init__ in some releases, not others.
        make_sentinel: Callable[..., Sentinel] = Sentinel
        self._sentinel = make_sentinel(
            list(url.hosts),
            sentinel_kwargs={**sentinel_options, "retry": Retry(NoBackoff(), 0)},
        )
        primary_options = {
            **options,
            **({"ssl": True} if url.tls else {}),
            "username": url.username,
            "password": url.password,
            "db": url.db,
            "client_name": url.options.get("client_name"),
        }
        # Each connection asks the sentinels for the primary when it connects, and drops
        # itself on READONLY (the primary it knew was demoted): both follow a failover. The
        # pools are not capped (redis-py's sentinel pool cannot wait for a connection), but the
        # driver sends one command at a time, so each holds one connection.
        commands = self._sentinel.master_for(
            url.service_name, retry=Retry(NoBackoff(), 0), **primary_options
        )
        subscriber = self._sentinel.master_for(
            url.service_name, retry=Retry(NoBackoff(), 0, supported_errors=()), **primary_options
        )
        return commands, subscriber

    def _cluster_client(self) -> RedisCluster:
        url = self._url
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in url.hosts],
            # No retries of a script whose reply was lost (see the module docstring); MOVED and
            # ASK are followed all the same, and a connection error makes the next command read
            # the slot map again.
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=False,
            **self._node_options,
        )
        client.commands_parser = _SharedCommandTable(tuple(sorted(url.hosts)))
        return client

    def __repr__(self) -> str:
        return f"<RedisTransport {self._safe_url} node={self.names.node_id!r}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        """Connect both connections, check the server, load the scripts, subscribe to the
        broadcast and own channels, and start delivering messages to ``sink``.

        Raises:
            BrokerUnavailable: Redis could not be reached, refused a command, or cannot serve
                the group as configured (a cluster node named by ``redis://``, a replica, a
                server older than 6.2 ...); the message is one line that names the fix.
            RuntimeError: the transport was already started, or closed.
        """
        if self._closed:
            raise RuntimeError("RedisTransport.start(): the transport is closed")
        if self._reader is not None:
            raise RuntimeError("RedisTransport.start() was already called")
        # The first connection may need the whole connect timeout before the command starts.
        first_timeout = self._connect_timeout + self._command_timeout
        step = "connect"
        try:
            if self._url.topology == "cluster":
                key = (self._url.hosts, tuple(sorted(map(repr, self._node_options.items()))))
                self._cluster = _SharedClusters.acquire(key, self._cluster_client)
                self._commands = self._cluster
                await asyncio.wait_for(self._cluster.initialize(), first_timeout)
                if self._cluster not in _SharedClusters.ready:
                    step = "check the server"
                    primary = await self._slot_primary()
                    try:
                        await self._check_server(primary, cluster=True)
                    finally:
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(primary.aclose(), self._connect_timeout)
            else:
                assert isinstance(self._commands, Redis)
                await self._check_server(self._commands, cluster=False)
            commands = self._commands
            assert commands is not None
            if self._cluster not in _SharedClusters.ready:
                step = "load the scripts"
                for script in (self._allocate_term, self._acquire, self._renew, self._release):
                    await asyncio.wait_for(
                        commands.script_load(script.script), self._command_timeout
                    )
                if self._cluster is not None:
                    # Checked and loaded on every primary: the next groups of this process
                    # skip both (a primary promoted later gets the scripts on NOSCRIPT).
                    _SharedClusters.ready.add(self._cluster)
            step = "read the group's keys"
            # A renewal no holder can match: it only reads the leader key, so an ACL that does
            # not cover the group's keys fails here, not at the first election.
            await asyncio.wait_for(
                self._renew(
                    keys=[self.names.leader_key],
                    args=["", 1, self.names.broadcast, b""],
                    client=commands,
                ),
                self._command_timeout,
            )
            step = "subscribe"
            pubsub = await self._subscribe(sink)
        except _Incompatible as exc:
            await self._close_connections()
            raise BrokerUnavailable(f"Cannot use Redis at {self._safe_url}: {exc}") from None
        except _BROKER_ERRORS as exc:
            await self._close_connections()
            raise BrokerUnavailable(self._start_failure(step, exc)) from exc
        self._pubsub = pubsub
        self._reader = asyncio.create_task(
            self._read_forever(pubsub, sink), name=f"fastapi-leader reader {self.names.node_id}"
        )
        if self._sentinel is not None:
            # In the background: the node works without it (only slower to follow a switch).
            self._watcher = asyncio.create_task(
                self._watch_sentinels(), name=f"fastapi-leader sentinel {self.names.node_id}"
            )

    async def _check_server(self, client: Redis, *, cluster: bool) -> None:
        """PING, then refuse a server that cannot serve the group: too old, a replica, a
        cluster node or a sentinel reached through the wrong scheme."""
        first_timeout = self._connect_timeout + self._command_timeout
        await asyncio.wait_for(client.ping(), first_timeout)
        try:
            # Without arguments (6.2+): the server's facts, in the protocol already spoken.
            reply = await asyncio.wait_for(
                client.execute_command("HELLO"),  # type: ignore[no-untyped-call]
                self._command_timeout,
            )
        except ResponseError as exc:
            text = str(exc).lower()
            if "unknown command" in text or "wrong number of arguments" in text:
                raise _Incompatible(_TOO_OLD) from None
            raise
        info = _hello_fields(reply)
        version = info.get("version", "0")
        mode = info.get("mode", "standalone")
        role = info.get("role", "master")
        if mode == "sentinel":
            raise _Incompatible(
                "this is a Sentinel, not a data node: name its service with "
                "redis+sentinel://host:26379[,host:26379...]/service_name"
            )
        if mode == "cluster" and not cluster:
            raise _Incompatible(
                "this node is part of a Redis Cluster: use redis+cluster://host:port"
                "[,host:port...] (rediss+cluster:// with TLS)"
            )
        if _version(version) < _MIN_VERSION:
            raise _Incompatible(
                f"the server runs version {version}; fastapi-leader needs Redis 6.2 or later, "
                "or Valkey"
            )
        if cluster and _version(version) < _MIN_CLUSTER_VERSION:
            raise _Incompatible(
                f"the cluster runs version {version}; on a cluster fastapi-leader uses sharded "
                "pub/sub (SSUBSCRIBE), which needs Redis 7.0 or later, or Valkey"
            )
        if role in ("replica", "slave"):
            raise _Incompatible(
                "the server is a read-only replica: point redis_url at the primary, or use "
                "redis+sentinel:// so that the primary is found through the sentinels"
            )

    def _start_failure(self, step: str, exc: BaseException) -> str:
        """The one line :meth:`start` raises for ``exc``, naming what to fix."""
        where = f"Redis at {self._safe_url}"
        text = str(exc).lower()
        if isinstance(exc, AuthenticationError) or any(w in text for w in _AUTH_MISSING):
            if any(words in text for words in _AUTH_WRONG):
                return (
                    f"{where} refused the user name or password (WRONGPASS): check the "
                    "credentials in LEADER_REDIS_URL (redis://USER:PASSWORD@host:port/db)"
                )
            if any(words in text for words in _AUTH_MISSING):
                return (
                    f"{where} requires a password: put it in LEADER_REDIS_URL as "
                    "redis://:PASSWORD@host:port/db, or redis://USER:PASSWORD@host:port/db for "
                    "an ACL user"
                )
        if any(words in text for words in _AUTH_WRONG):
            return (
                f"{where} refused the user name or password (WRONGPASS): check the "
                "credentials in LEADER_REDIS_URL (redis://USER:PASSWORD@host:port/db)"
            )
        if any(words in text for words in _AUTH_UNNEEDED):
            return (
                f"{where} has no password set, but LEADER_REDIS_URL gives one: remove it, "
                "or set the server's requirepass"
            )
        if isinstance(exc, MasterNotFoundError):
            return (
                f"No sentinel at {self._safe_url} named a primary for service "
                f"{self._url.service_name!r}: check the sentinels' addresses and the service "
                "name, and LEADER_SENTINEL_PASSWORD if the sentinels require a password"
            )
        if "unknown command 'hello'" in text:
            # redis-py opens every connection with HELLO (RESP3): Redis 5 refuses it.
            return f"Cannot use {where}: {_TOO_OLD}"
        if isinstance(exc, NoPermissionError) or text.startswith("noperm"):
            return (
                f"{where} refused to {step} for this user (NOPERM: {exc}): give the user "
                "the rules of fastapi_leader.acl_rule(settings) (see the README's ACL section)"
            )
        if "readonly" in text:
            return (
                f"{where} is a read-only replica: point redis_url at the primary, or use "
                "redis+sentinel://"
            )
        if step == "connect" or isinstance(exc, (OSError, asyncio.TimeoutError)):
            return (
                f"Cannot reach {where} ({_describe(exc)}): check the host and port in "
                "LEADER_REDIS_URL and that the server is running"
            )
        return f"Cannot use {where}: could not {step}: {_describe(exc)}"

    async def close(self) -> None:
        """Stop the reader, unsubscribe and close both connections. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        # The sentinel listener first: it must not move the connections while they close.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await self._stop_task(watcher, lambda: self._watch_pubsub)
        watch_pubsub, self._watch_pubsub = self._watch_pubsub, None
        if watch_pubsub is not None:
            await self._discard_sentinel_pubsub(watch_pubsub)
        reader, self._reader = self._reader, None
        if reader is not None:
            await self._stop_task(reader, lambda: self._pubsub)
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                unsubscribe = pubsub.sunsubscribe() if self._sharded else pubsub.unsubscribe()
                await asyncio.wait_for(unsubscribe, self._command_timeout)
            await self._discard(pubsub)
        await self._close_connections()

    async def _stop_task(
        self, task: asyncio.Task[None], its_pubsub: Callable[[], PubSub | None]
    ) -> None:
        """Cancel a task that reads a pub/sub connection, and wait for it, within bounds."""
        task.cancel()
        # Bounded: under load a cancellation can be swallowed inside redis-py's reads (a race
        # of its internal timeouts with ours, seen with hundreds of nodes on Python 3.11), and
        # an unbounded wait here hung close(). Then the connection is closed under the task,
        # which ends its read, and the task is cancelled once more.
        done, _ = await asyncio.wait({task}, timeout=self._command_timeout)
        pubsub = its_pubsub()
        if not done and pubsub is not None:
            await self._discard(pubsub)
            task.cancel()
            await asyncio.wait({task}, timeout=self._connect_timeout)
        if not task.done():
            _log.warning("fastapi-leader task %s did not stop; left behind", task)
        elif not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()

    async def _close_connections(self) -> None:
        clients: list[Redis | RedisCluster] = []
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            if _SharedClusters.release(cluster):
                clients.append(cluster)
        elif self._commands is not None:
            clients.append(self._commands)
        if self._subscriber is not None:
            clients.append(self._subscriber)
        for client in clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), self._connect_timeout)
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sentinel.aclose(), self._connect_timeout)

    # -- commands ----------------------------------------------------------------------------

    async def publish(self, data: bytes, to: str | None = None) -> None:
        """Publish ``data`` on the broadcast channel, or on node ``to``'s own channel."""
        channel = self.names.broadcast if to is None else self.names.node_channel(to)
        await self._command(
            "SPUBLISH" if self._sharded else "PUBLISH",
            lambda commands: (
                commands.spublish(channel, data)
                if self._sharded
                else commands.publish(channel, data)
            ),
        )

    async def allocate_term(self, floor: int) -> int:
        """Atomically set the term counter to ``max(counter, floor) + 1`` and return it."""
        result = await self._command(
            "allocate_term",
            lambda commands: self._allocate_term(
                keys=[self.names.term_key], args=[int(floor)], client=commands
            ),
        )
        return int(result)

    async def acquire(self, term: int, ttl: float, announce: bytes) -> bool:
        """``SET leader_key holder(term) NX PX ttl`` and, if set, publish ``announce`` on the
        broadcast channel, in one script. True if this node now holds the key."""
        args: list[EncodableT] = [
            self.names.holder(term),
            _ttl_ms(ttl),
            self.names.broadcast,
            announce,
            int(term),
        ]
        result = await self._command(
            "acquire",
            lambda commands: self._acquire(
                keys=[self.names.leader_key, self.names.term_key], args=args, client=commands
            ),
        )
        return bool(result)

    async def renew(self, term: int, ttl: float, announce: bytes) -> bool:
        """If the key holds ``holder(term)``, reset its TTL and publish ``announce``, in one
        script. True if renewed, False if the key is not ours (or gone)."""
        args: list[EncodableT] = [
            self.names.holder(term),
            _ttl_ms(ttl),
            self.names.broadcast,
            announce,
        ]
        result = await self._command(
            "renew",
            lambda commands: self._renew(keys=[self.names.leader_key], args=args, client=commands),
        )
        return bool(result)

    async def release(self, term: int, announce: bytes | None) -> bool:
        """If the key holds ``holder(term)``, delete it and publish ``announce`` (if any), in one
        script. True if released."""
        args: list[EncodableT] = [self.names.holder(term), self.names.broadcast, announce or b""]
        result = await self._command(
            "release",
            lambda commands: self._release(
                keys=[self.names.leader_key], args=args, client=commands
            ),
        )
        return bool(result)

    async def _command(
        self, what: str, call: Callable[[Redis | RedisCluster], Awaitable[_T]]
    ) -> _T:
        if self._closed:
            raise BrokerUnavailable(f"{what}: the transport to {self._safe_url} is closed")
        commands = self._commands
        if commands is None:
            raise BrokerUnavailable(f"{what}: the transport to {self._safe_url} is not started")
        try:
            return await asyncio.wait_for(call(commands), self._command_timeout)
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(
                f"Redis at {self._safe_url}: {what} failed: {_describe(exc)}"
            ) from exc

    # -- subscriber --------------------------------------------------------------------------

    async def _subscribe(self, sink: Sink, *, reread_slots: bool = False) -> PubSub:
        """Open a fresh subscriber connection and return it once both subscriptions are
        confirmed, so that a message published after this returns is heard."""
        # This subscription asks the sentinels afresh: a move asked for until now is done by it.
        self._move_subscription = False
        if self._cluster is None:
            assert self._subscriber is not None
            pubsub = self._subscriber.pubsub()
        else:
            if reread_slots:
                # The group's slot may have moved (or its primary died) since the last time:
                # read the slot map again (concurrent readers of one client share one read),
                # and subscribe on the slot's primary as it is now.
                await asyncio.wait_for(
                    self._cluster.nodes_manager.initialize(),
                    self._connect_timeout + self._command_timeout,
                )
            pubsub = (await self._slot_primary()).pubsub()
        try:
            await asyncio.wait_for(
                self._confirm_subscriptions(pubsub, sink),
                self._connect_timeout + self._command_timeout,
            )
        except BaseException:
            await self._discard(pubsub)
            raise
        return pubsub

    async def _confirm_subscriptions(self, pubsub: PubSub, sink: Sink) -> None:
        channels = {self.names.broadcast.encode(), self.names.own_channel.encode()}
        if self._sharded:
            await pubsub.ssubscribe(*channels)
        else:
            await pubsub.subscribe(*channels)
        while channels:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if message["type"] in ("subscribe", "ssubscribe"):
                channels.discard(message["channel"])
            elif message["type"] in ("message", "smessage"):
                self._deliver(sink, message["data"])

    def key_client(self) -> Redis | RedisCluster:
        """The started transport's command client, for reading the group's keys as the node
        reads them (through the sentinels' primary, or routed to the group's slot); closed
        with the transport. Raises RuntimeError before :meth:`start`."""
        if self._commands is None or self._closed:
            raise RuntimeError("key_client() needs a started transport")
        return self._commands

    async def _slot_primary(self) -> Redis:
        """A client of its own on the primary that serves the group's slot (cluster only)."""
        assert self._cluster is not None
        node = self._cluster.get_node_from_key(self.names.broadcast)
        if node is None:
            raise RedisClusterException("no node serves the group's slot")
        return Redis(
            host=node.host,
            port=int(node.port),
            retry=Retry(NoBackoff(), 0, supported_errors=()),
            **self._node_options,
        )

    async def _read_forever(self, pubsub: PubSub, sink: Sink) -> None:
        """Deliver messages until cancelled by :meth:`close`; survive every other error."""
        while True:
            try:
                await self._pump(pubsub, sink)
            except Exception as exc:
                if self._move_subscription:
                    moved = await self._move(pubsub, sink)
                    if moved is not None:
                        pubsub = moved
                        continue
                _log.warning(
                    "Lost the subscription to Redis at %s (%s); reconnecting",
                    self._safe_url,
                    _describe(exc),
                )
                await self._discard(pubsub)
                # Cleared only now: if close() cancels the discard, it closes the pubsub itself.
                self._pubsub = None
                _notify(sink.connection_lost)
                lost_at = asyncio.get_running_loop().time()
                pubsub = self._pubsub = await self._resubscribe(sink)
                _log.info(
                    "Subscription to Redis at %s restored after %.2f s",
                    self._safe_url,
                    asyncio.get_running_loop().time() - lost_at,
                )
                _notify(sink.connection_restored)

    async def _pump(self, pubsub: PubSub, sink: Sink) -> None:
        """Read frames until the connection fails; raise when it goes silent after a PING."""
        async with contextlib.aclosing(self._frames(pubsub, self._idle_before_ping)) as frames:
            async for message in frames:
                kind = message["type"]
                if kind in ("message", "smessage"):
                    self._deliver(sink, message["data"])
                elif kind == "sunsubscribe":
                    # Redis unsubscribes shard channels whose slot moved to another node.
                    raise ConnectionResetError("the group's slot moved to another node")
                if self._move_subscription:
                    # Asked to move, and redis-py reconnected (and resubscribed) by itself on
                    # its next read: move all the same, on a subscription this reader confirms.
                    raise ConnectionResetError("the sentinels named a new primary")
                # With a backlog buffered, get_message returns without ever suspending: yield,
                # so that a flood on the channel cannot hold off the timer (and the renewals)
                # of every node on the election thread.
                await asyncio.sleep(0)

    async def _frames(self, pubsub: PubSub, idle: float) -> AsyncGenerator[dict[str, Any], None]:
        """The frames of a pub/sub connection as they come. Any frame (message, pong,
        subscribe) proves the server alive; after ``idle`` seconds without one the connection
        is PINGed, and TimeoutError is raised when nothing follows within ``_PING_TIMEOUT``."""
        loop = asyncio.get_running_loop()
        last_frame_at = loop.time()
        ping_sent = False
        while True:
            message = await pubsub.get_message(timeout=_POLL_INTERVAL)
            now = loop.time()
            if message is not None:
                last_frame_at = now
                ping_sent = False
                yield message
                continue
            silence = now - last_frame_at
            if silence >= idle + _PING_TIMEOUT:
                raise TimeoutError(f"no reply to PING for {silence - idle:.1f} s")
            if silence >= idle and not ping_sent:
                await asyncio.wait_for(pubsub.ping(_PING_PAYLOAD), self._command_timeout)
                ping_sent = True

    async def _move(self, old: PubSub, sink: Sink) -> PubSub | None:
        """Subscribe on the primary the sentinels name now, in place of ``old``, without
        reporting a loss: the node never stopped hearing a primary, and hears the new one
        within one connection's setup. None if that fails (then it is a loss after all)."""
        started = asyncio.get_running_loop().time()
        await self._discard(old)
        self._pubsub = None
        try:
            pubsub = self._pubsub = await self._subscribe(sink)
        except Exception as exc:
            _log.warning(
                "Could not move the subscription to the new primary of %s (%s)",
                self._safe_url,
                _describe(exc),
            )
            return None
        _log.info(
            "Subscription moved to the new primary of %s in %.3f s",
            self._safe_url,
            asyncio.get_running_loop().time() - started,
        )
        return pubsub

    async def _resubscribe(self, sink: Sink) -> PubSub:
        """Retry :meth:`_subscribe` with jittered exponential backoff until it succeeds; a
        switch of primary announced by the sentinels cuts the wait short."""
        delay = _BACKOFF_FIRST
        self._retry_now.clear()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                pause = delay + random.uniform(0, delay / 2)
                await asyncio.wait_for(self._retry_now.wait(), pause)
            self._retry_now.clear()
            try:
                return await self._subscribe(sink, reread_slots=True)
            except Exception as exc:
                _log.debug(
                    "Resubscribing to Redis at %s failed: %s", self._safe_url, _describe(exc)
                )
            delay = min(delay * 2, self._retry_cap)

    # -- sentinel: +switch-master ------------------------------------------------------------

    async def _watch_sentinels(self) -> None:
        """Listen to ``+switch-master`` on one sentinel at a time until cancelled by
        :meth:`close`; when it fails, move to the next of the URL's sentinels, with backoff."""
        hosts = list(self._url.hosts)
        # A random first one: the nodes of a process (and of a fleet) spread over the sentinels.
        index = random.randrange(len(hosts))
        delay = _BACKOFF_FIRST
        while True:
            host, port = hosts[index]
            try:
                await self._watch(host, port)
            except Exception as exc:
                if self._watched is not None:
                    _log.warning(
                        "Lost the sentinel at %s:%d (%s); listening to +switch-master on the "
                        "next one",
                        host,
                        port,
                        _describe(exc),
                    )
                    delay = _BACKOFF_FIRST
                else:
                    _log.debug(
                        "Cannot listen to +switch-master on the sentinel at %s:%d: %s",
                        host,
                        port,
                        _describe(exc),
                    )
            finally:
                self._watched = None
                pubsub, self._watch_pubsub = self._watch_pubsub, None
                if pubsub is not None:
                    await self._discard_sentinel_pubsub(pubsub)
            index = (index + 1) % len(hosts)
            await asyncio.sleep(delay + random.uniform(0, delay / 2))
            delay = min(delay * 2, _BACKOFF_CAP)

    async def _watch(self, host: str, port: int) -> None:
        """Subscribe to ``+switch-master`` on the sentinel at ``host:port`` and follow every
        switch of the service it announces; raise when the sentinel fails or goes silent."""
        assert self._sentinel is not None and self._url.service_name is not None
        # A client of its own, never retrying: redis-py would otherwise reconnect and
        # resubscribe behind this loop's back, and a switch announced meanwhile go unheard.
        client = Redis(
            host=host,
            port=port,
            **{
                **self._sentinel.sentinel_kwargs,
                "retry": Retry(NoBackoff(), 0, supported_errors=()),
            },
        )
        pubsub = self._watch_pubsub = client.pubsub()
        setup_timeout = self._connect_timeout + self._command_timeout
        await asyncio.wait_for(self._confirm_switch_master(pubsub), setup_timeout)
        self._watched = (host, port)
        # A switch announced while no sentinel was heard (or before this node started): the
        # sentinel's answer now is what the next +switch-master would have said.
        reply = await asyncio.wait_for(
            client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._url.service_name
            ),
            setup_timeout,
        )
        if isinstance(reply, (list, tuple)) and len(reply) == 2:
            primary = _address(reply[0], reply[1])
            if primary is not None:
                await self._follow(primary, (host, port))
        async with contextlib.aclosing(self._frames(pubsub, _SENTINEL_IDLE_BEFORE_PING)) as frames:
            async for message in frames:
                if message["type"] == "message" and message["channel"] == _SWITCH_MASTER:
                    await self._switch_announced(message["data"], (host, port))

    async def _confirm_switch_master(self, pubsub: PubSub) -> None:
        await pubsub.subscribe(_SWITCH_MASTER)
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "subscribe":
                return

    async def _switch_announced(self, data: Any, told_by: tuple[str, int]) -> None:
        """Follow a ``+switch-master`` message that names a new primary of this service;
        count and ignore any other."""
        assert self._url.service_name is not None
        primary = _parse_switch_master(data, self._url.service_name)
        if primary is None:
            self.switch_messages_ignored += 1
            _log.debug("Ignored a +switch-master message: %r", data)
        else:
            await self._follow(primary, told_by)

    async def _follow(self, primary: tuple[str, int], told_by: tuple[str, int]) -> None:
        """Move both connections to ``primary``, unless they are on it already."""
        assert isinstance(self._commands, Redis)
        if self._on(primary):
            return
        self.switches_followed += 1
        _log.info(
            "The sentinels name %s:%d the primary of %r: moving both connections there",
            *primary,
            self._url.service_name,
        )
        # Rediscovery asks the sentinels in turn: first the one that announced the switch,
        # since the others may name the old primary for a moment yet.
        self._prefer_sentinel(told_by)
        # The subscriber: its reader moves it once its connection closes under it.
        self._move_subscription = True
        self._retry_now.set()  # a reader waiting out its backoff retries now, on the new one
        pubsub = self._pubsub
        connection = None if pubsub is None else pubsub.connection
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.disconnect(), self._connect_timeout)
        # The commands: one under way on the old primary fails (what it did there is about to
        # be lost anyway), and a PING opens the connection to the new primary now, not at the
        # next command (a follower may not send one for seconds). Not beside a command under way:
        # the uncapped pool would open a second connection and keep it; that command, cut off
        # now, fails, and the node's next one reconnects to the new primary.
        commands = self._commands
        pool = commands.connection_pool
        busy = bool(pool._in_use_connections)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.disconnect(), self._connect_timeout)
        if not busy:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    commands.ping(), self._connect_timeout + self._command_timeout
                )

    def _on(self, primary: tuple[str, int]) -> bool:
        """Whether both connections are open to ``primary``."""
        pubsub = self._pubsub
        connection = None if pubsub is None else pubsub.connection
        if connection is None or not connection.is_connected:
            return False
        if _address(connection.host, connection.port) != primary:
            return False
        assert self._commands is not None
        pool = self._commands.connection_pool
        open_ones = [
            _address(c.host, c.port)
            for c in (*pool._available_connections, *pool._in_use_connections)
            if c.is_connected
        ]
        if not open_ones:
            # None open (the last command failed): the next one opens where discovery says.
            master = getattr(pool, "master_address", None)
            return master is not None and _address(*master) == primary
        return all(address == primary for address in open_ones)

    def _prefer_sentinel(self, address: tuple[str, int]) -> None:
        assert self._sentinel is not None
        sentinels = self._sentinel.sentinels
        for index, sentinel in enumerate(sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            if _address(kwargs.get("host"), kwargs.get("port")) == address:
                sentinels[0], sentinels[index] = sentinels[index], sentinels[0]
                return

    async def _discard_sentinel_pubsub(self, pubsub: PubSub) -> None:
        # The client was made for this subscription alone: close its pool with it.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close_pubsub(pubsub), self._connect_timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pubsub.connection_pool.disconnect(), self._connect_timeout)

    def _deliver(self, sink: Sink, data: Any) -> None:
        if isinstance(data, bytes):
            _notify(sink.message_received, data)

    async def _discard(self, pubsub: PubSub) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close_pubsub(pubsub), self._connect_timeout)
        if self._cluster is not None:
            # The slot primary's client was made for this subscription alone.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.connection_pool.disconnect(), self._connect_timeout)


def close_pubsub(pubsub: PubSub) -> Awaitable[None]:
    """`pubsub.aclose()`, typed: redis-py annotates it in some releases, not in others."""
    aclose: Callable[[], Awaitable[None]] = pubsub.aclose
    return aclose()


def _address(host: Any, port: Any) -> tuple[str, int] | None:
    """``(host, port)`` from a reply's or a connection's fields, or None if they are not one."""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if isinstance(port, bytes):
        port = port.decode(errors="replace")
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)
    if not isinstance(host, str) or not host or isinstance(port, bool):
        return None
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    return host, port


def _parse_switch_master(data: Any, service: str) -> tuple[str, int] | None:
    """The new primary's address from a ``+switch-master`` message about ``service``
    (``<service> <old-ip> <old-port> <new-ip> <new-port>``); None if the message is about
    another service, or is not one."""
    if not isinstance(data, bytes):
        return None
    try:
        fields = data.decode().split(" ")
    except UnicodeDecodeError:
        return None
    if len(fields) != 5 or fields[0] != service:
        return None
    if _address(fields[1], fields[2]) is None:
        return None
    return _address(fields[3], fields[4])


def _notify(callback: Callable[..., None], *args: Any) -> None:
    """Call a sink method; a sink that raises despite its contract must not stop the reader."""
    try:
        callback(*args)
    except Exception:
        _log.exception("fastapi-leader transport sink %r raised", callback)


def _script(text: str) -> AsyncScript:
    return AsyncScript(None, text.encode())  # type: ignore[arg-type]


def _hello_fields(reply: Any) -> dict[str, str]:
    """HELLO's reply (a flat list under RESP2, a dict under RESP3) as text fields."""
    if isinstance(reply, dict):
        pairs = list(reply.items())
    elif isinstance(reply, (list, tuple)):
        pairs = list(zip(reply[::2], reply[1::2], strict=False))
    else:
        return {}
    fields: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(key, bytes):
            key = key.decode(errors="replace")
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(key, str) and isinstance(value, (str, int)):
            fields[key] = str(value)
    return fields
