"""The Redis (or Valkey) transport: pub/sub for messages, Lua scripts for the group's keys.

Each node holds exactly two connections:

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
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisError
from redis.typing import EncodableT

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
# SIGSTOPped server is noticed within _IDLE_BEFORE_PING + _PING_TIMEOUT + _POLL_INTERVAL.
_POLL_INTERVAL = 0.25
# Silence on the subscriber connection before it is PINGed. A healthy group is never this quiet
# (the leader beats every 100 ms), so the PINGs cost nothing while a leader is alive.
_IDLE_BEFORE_PING = 0.5
# No frame at all this long after a PING: the connection is dead even without an RST.
_PING_TIMEOUT = 1.0
_PING_PAYLOAD = b"fastapi-leader-ping"

_PASSWORD_OPTION = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)

# Resubscription backoff: quick for a blip, at most about a second apart for an outage.
_BACKOFF_FIRST = 0.05
_BACKOFF_CAP = 1.0

# Scripts take their key as KEYS[1] (so a cluster would route them by it) and the broadcast
# channel as an argument: channels are not keys. Values are compared as strings.
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
    redis.call('PUBLISH', ARGV[3], ARGV[4])
    return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('PUBLISH', ARGV[3], ARGV[4])
    return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[3] ~= '' then
        redis.call('PUBLISH', ARGV[2], ARGV[3])
    end
    return 1
end
return 0
"""


# Every command a node sends: PING (at start, and on a quiet subscriber connection), SCRIPT LOAD
# and EVALSHA for the four scripts above, and the commands those scripts run on the group's two
# keys and broadcast channel; PUBLISH of votes to a node's own channel; SUBSCRIBE and, when
# closing, UNSUBSCRIBE. Keep this in step with the scripts: the ACL test runs a cluster under
# exactly this rule and fails on any command it denies.
_COMMANDS = (
    "ping",
    "script|load",
    "evalsha",
    "get",
    "set",
    "incr",
    "pexpire",
    "del",
    "publish",
    "subscribe",
    "unsubscribe",
)


def acl_rule(settings: LeaderSettings) -> list[str]:
    """The least-privilege Redis ACL rules for the nodes of ``settings.group``: the group's two
    keys and its channels only, and only the commands a node sends. Create the user with::

        ACL SETUSER <user> reset on ><password> <rules...>

    for example ``await admin.execute_command("ACL", "SETUSER", "billing-leader", "reset",
    "on", ">" + password, *acl_rule(settings))``, and give the nodes ``redis://<user>:<password>@
    ...``. For the default prefix and a group ``billing`` the rules are::

        resetkeys ~fastapi-leader:billing:leader ~fastapi-leader:billing:term
        resetchannels &fastapi-leader:billing &fastapi-leader:billing:node:*
        -@all +ping +script|load +evalsha +get +set +incr +pexpire +del +publish +subscribe
        +unsubscribe

    plus ``+client|setname`` when ``redis_url`` sets a ``client_name``, and ``+select`` when it
    names a database other than 0. Names cannot contain ``:`` or glob characters (the settings
    refuse them), so no other group's names match these patterns. Needs Redis 6.2 or later
    (or Valkey): channel rules (``&``) came with 6.2.
    """
    names = Names(settings.channel_prefix, settings.group, settings.node_id)
    rules = [
        "resetkeys",
        f"~{names.leader_key}",
        f"~{names.term_key}",
        "resetchannels",
        f"&{names.broadcast}",
        f"&{names.node_channel('*')}",
        "-@all",
        *(f"+{command}" for command in _COMMANDS),
    ]
    if settings.redis_url.startswith("memory://"):
        return rules
    options: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    if options.get("client_name"):
        rules.append("+client|setname")
    if options.get("db"):
        rules.append("+select")
    return rules


def _redact_url(url: str) -> str:
    """Return ``url`` with its password (in the user info or a ``password=`` option) replaced
    by ``***``, fit for logs and error messages.

    Deliberately not a URL parser: a password with an unescaped ``/`` or ``#`` would fool
    ``urlsplit`` into showing it, while "everything up to the last ``@``" never does.
    """
    scheme, separator, rest = url.partition("://")
    if separator and "@" in rest:
        userinfo, _, location = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:***@{location}"
    return _PASSWORD_OPTION.sub(r"\1***", f"{scheme}{separator}{rest}")


def _ttl_ms(ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"ttl must be positive, got {ttl!r}")
    return math.ceil(ttl * 1000)


def _describe(exc: BaseException) -> str:
    if not str(exc):
        return "no reply in time" if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


# What a lost or unreachable broker raises. Other Redis errors (NOPERM from an ACL, a full
# server) are wrapped too: for the caller each of them means "no answer", never "no".
_BROKER_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class RedisTransport:
    """Messages over Redis pub/sub and the group's keys in Redis, with two connections per node.

    Args:
        url: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL, as redis-py reads it.
        names: channel and key names of this node in its group.
        connect_timeout: seconds allowed to open a connection (TCP, TLS and handshake).
        command_timeout: seconds allowed for any one command, reconnection included; also how
            long the subscriber waits for its subscriptions to be confirmed.
        ssl_options: extra keyword arguments for redis-py's connections (``ssl_ca_certs``,
            ``ssl_certfile`` ...), used with ``rediss://`` URLs.

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
    ) -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout!r}")
        if not command_timeout > 0:
            raise ValueError(f"command_timeout must be positive, got {command_timeout!r}")
        self.names = names
        self._safe_url = _redact_url(url)
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        pool_options: dict[str, Any] = {
            **(ssl_options or {}),
            "max_connections": 1,
            # Waiting for the one connection counts against the command's own timeout.
            "timeout": command_timeout,
            "socket_timeout": command_timeout,
            "socket_connect_timeout": connect_timeout,
            "decode_responses": False,
            **_POOL_COMPAT_OPTIONS,
        }
        try:
            # No retries: on an error redis-py only closes the connection; the next command
            # opens a new one.
            self._commands = Redis.from_pool(
                BlockingConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0), **pool_options)
            )
            # Nothing retried at all: redis-py would otherwise reconnect and resubscribe the
            # subscriber behind the reader's back, and the outage would go unreported.
            self._subscriber = Redis.from_pool(
                BlockingConnectionPool.from_url(
                    url, retry=Retry(NoBackoff(), 0, supported_errors=()), **pool_options
                )
            )
        except ValueError:
            # redis-py's message may quote parts of the URL, the password included.
            raise ValueError(
                f"Invalid Redis URL {self._safe_url}: expected redis://, rediss:// or unix://, "
                "with a numeric port and the password percent-encoded"
            ) from None
        self._allocate_term = self._commands.register_script(_ALLOCATE_TERM)
        self._acquire = self._commands.register_script(_ACQUIRE)
        self._renew = self._commands.register_script(_RENEW)
        self._release = self._commands.register_script(_RELEASE)
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisTransport {self._safe_url} node={self.names.node_id!r}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        """Connect both connections, load the scripts, subscribe to the broadcast and own
        channels, and start delivering messages to ``sink``.

        Raises:
            BrokerUnavailable: Redis could not be reached (or refused a command) in time.
            RuntimeError: the transport was already started, or closed.
        """
        if self._closed:
            raise RuntimeError("RedisTransport.start(): the transport is closed")
        if self._reader is not None:
            raise RuntimeError("RedisTransport.start() was already called")
        # The first connection may need the whole connect timeout before the command starts.
        first_timeout = self._connect_timeout + self._command_timeout
        try:
            await asyncio.wait_for(self._commands.ping(), first_timeout)
            for script in (self._allocate_term, self._acquire, self._renew, self._release):
                await asyncio.wait_for(
                    self._commands.script_load(script.script), self._command_timeout
                )
            pubsub = await self._subscribe(sink)
        except _BROKER_ERRORS as exc:
            await self._close_connections()
            raise BrokerUnavailable(
                f"Cannot use Redis at {self._safe_url}: {_describe(exc)}"
            ) from exc
        self._pubsub = pubsub
        self._reader = asyncio.create_task(
            self._read_forever(pubsub, sink), name=f"fastapi-leader reader {self.names.node_id}"
        )

    async def close(self) -> None:
        """Stop the reader, unsubscribe and close both connections. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.unsubscribe(), self._command_timeout)
            await self._discard(pubsub)
        await self._close_connections()

    async def _close_connections(self) -> None:
        for client in (self._commands, self._subscriber):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), self._connect_timeout)

    # -- commands ----------------------------------------------------------------------------

    async def publish(self, data: bytes, to: str | None = None) -> None:
        """Publish ``data`` on the broadcast channel, or on node ``to``'s own channel."""
        channel = self.names.broadcast if to is None else self.names.node_channel(to)
        await self._command("PUBLISH", lambda: self._commands.publish(channel, data))

    async def allocate_term(self, floor: int) -> int:
        """Atomically set the term counter to ``max(counter, floor) + 1`` and return it."""
        result = await self._command(
            "allocate_term",
            lambda: self._allocate_term(keys=[self.names.term_key], args=[int(floor)]),
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
            lambda: self._acquire(keys=[self.names.leader_key, self.names.term_key], args=args),
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
            "renew", lambda: self._renew(keys=[self.names.leader_key], args=args)
        )
        return bool(result)

    async def release(self, term: int, announce: bytes | None) -> bool:
        """If the key holds ``holder(term)``, delete it and publish ``announce`` (if any), in one
        script. True if released."""
        args: list[EncodableT] = [self.names.holder(term), self.names.broadcast, announce or b""]
        result = await self._command(
            "release", lambda: self._release(keys=[self.names.leader_key], args=args)
        )
        return bool(result)

    async def _command(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        if self._closed:
            raise BrokerUnavailable(f"{what}: the transport to {self._safe_url} is closed")
        try:
            return await asyncio.wait_for(call(), self._command_timeout)
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(
                f"Redis at {self._safe_url}: {what} failed: {_describe(exc)}"
            ) from exc

    # -- subscriber --------------------------------------------------------------------------

    async def _subscribe(self, sink: Sink) -> PubSub:
        """Open a fresh subscriber connection and return it once both subscriptions are
        confirmed, so that a message published after this returns is heard."""
        pubsub = self._subscriber.pubsub()
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
        await pubsub.subscribe(*channels)
        while channels:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            if message["type"] == "subscribe":
                channels.discard(message["channel"])
            elif message["type"] == "message":
                self._deliver(sink, message["data"])

    async def _read_forever(self, pubsub: PubSub, sink: Sink) -> None:
        """Deliver messages until cancelled by :meth:`close`; survive every other error."""
        while True:
            try:
                await self._pump(pubsub, sink)
            except Exception as exc:
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
        loop = asyncio.get_running_loop()
        last_frame_at = loop.time()
        ping_sent = False
        while True:
            message = await pubsub.get_message(timeout=_POLL_INTERVAL)
            now = loop.time()
            if message is not None:
                # Any frame (message, pong, subscribe) proves that the server is alive.
                last_frame_at = now
                ping_sent = False
                if message["type"] == "message":
                    self._deliver(sink, message["data"])
                continue
            silence = now - last_frame_at
            if silence >= _IDLE_BEFORE_PING + _PING_TIMEOUT:
                raise TimeoutError(f"no reply to PING for {silence - _IDLE_BEFORE_PING:.1f} s")
            if silence >= _IDLE_BEFORE_PING and not ping_sent:
                await asyncio.wait_for(pubsub.ping(_PING_PAYLOAD), self._command_timeout)
                ping_sent = True

    async def _resubscribe(self, sink: Sink) -> PubSub:
        """Retry :meth:`_subscribe` with jittered exponential backoff until it succeeds."""
        delay = _BACKOFF_FIRST
        while True:
            await asyncio.sleep(delay + random.uniform(0, delay / 2))
            try:
                return await self._subscribe(sink)
            except Exception as exc:
                _log.debug(
                    "Resubscribing to Redis at %s failed: %s", self._safe_url, _describe(exc)
                )
            delay = min(delay * 2, _BACKOFF_CAP)

    def _deliver(self, sink: Sink, data: Any) -> None:
        if isinstance(data, bytes):
            _notify(sink.message_received, data)

    async def _discard(self, pubsub: PubSub) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                pubsub.aclose(),  # type: ignore[no-untyped-call]
                self._connect_timeout,
            )


def _notify(callback: Callable[..., None], *args: Any) -> None:
    """Call a sink method; a sink that raises despite its contract must not stop the reader."""
    try:
        callback(*args)
    except Exception:
        _log.exception("fastapi-leader transport sink %r raised", callback)
