"""Fenced writes: leader work that writes to Redis only with a fencing token at least as new as
the newest one already used on the resource.

Why a token, when the work already runs on the leader only: a node checks that it leads, then
writes, and between the two the process can stop (a GC pause, SIGSTOP, a swapped-out VM, a slow
network). Its lease ends meanwhile, another node is elected and writes. When the old leader
wakes, it finishes the write it had begun: no leadership check can prevent that, the check
is already over. Only the resource can refuse the write. Every leadership carries a token larger
than every earlier one (:attr:`LeaderElection.fencing_token <fastapi_leader.LeaderElection>`); a
:class:`Fence` keeps, in one Redis key per resource, the highest token used on that resource,
and runs each write in one Lua script together with the check::

    fence = Fence(redis, "app:report:fence")
    save = fence.script("return redis.call('SET', KEYS[1], ARGV[1])")

    token = election.fencing_token  # None when this node does not lead
    if token is not None:
        try:
            await save(token, keys=["app:report"], args=[report])
        except StaleToken:
            ...  # a newer leadership has written: this one is over, drop the work

What it guarantees: a write with token ``t`` lands only if no write (or :meth:`Fence.advance`)
with a token greater than ``t`` has landed through the same fence key before it. The check, the
update of the stored token and your write run as one script, so nothing can come between them.
An equal token passes: one leadership writes many times.

Using it well: read what the write depends on inside the script where you can (a checkpoint, a
version), so that the decision and the write are one step. Where the leader decides from what it
read earlier, or from its own view of the world, call :meth:`Fence.advance` as its leadership
begins (in ``on_elected``), before it reads: from then on no older leadership's write can land
between this one's read and its write.

What it does not:

- It guards only writes that go through it. A client that writes the resource directly, or
  through another fence key, is not checked.
- The stored token lives in Redis: lose the key (``FLUSHALL``, eviction under an ``allkeys-*``
  ``maxmemory-policy``, a restart without persistence, a failover to a replica that had not
  received it) and the fence starts again from nothing. Give it the durability of the data it
  guards, and no TTL.
- Redis does not roll back a script that fails half-way: if your script raises after writing
  part of its work, that part stays (and the token has been recorded).
- A token is compared, not authenticated: it stops a *late* leader, not a hostile client.

One fence key guards one resource; a leadership uses its one token on every fence it writes
through. The client is a ``redis.asyncio.Redis`` (one server, or a primary), not a cluster
client.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any, SupportsIndex

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, KeyT

__all__ = ["Fence", "FencedScript", "StaleToken"]

# Lua numbers are doubles: integers are exact up to 2**53, so larger tokens could compare equal
# while they differ. The election never hands out more (its terms stop at the same bound).
_MAX_TOKEN = 2**53

# The error replies of the prelude, told apart from errors of the body by these codes.
_STALE = "FENCE_STALE"
_CORRUPT = "FENCE_CORRUPT"
_TOKEN_PATTERN = re.compile(r"[0-9]+")

# Runs before the body. KEYS[1] is the fence key, ARGV[1] the token; the body then sees its own
# KEYS and ARGV (locals that shadow the globals), numbered from 1 as in any script. A loop, not
# unpack(), so that no number of arguments can overflow the Lua stack.
_PRELUDE = f"""\
do
    local token = tonumber(ARGV[1])
    local stored = redis.call('GET', KEYS[1])
    if stored then
        if not string.match(stored, '^[0-9]+$') then
            return redis.error_reply('{_CORRUPT}')
        end
        local newest = tonumber(stored)
        if token < newest then
            return redis.error_reply('{_STALE} ' .. stored)
        end
        if token > newest then
            redis.call('SET', KEYS[1], ARGV[1])
        end
    else
        redis.call('SET', KEYS[1], ARGV[1])
    end
end
local function fence_without_first(list)
    local rest = {{}}
    for i = 2, #list do
        rest[i - 1] = list[i]
    end
    return rest
end
local KEYS, ARGV = fence_without_first(KEYS), fence_without_first(ARGV)
"""


class StaleToken(Exception):
    """The fencing token is older than the newest one already used on the resource: a newer
    leadership has written there (or called :meth:`Fence.advance`), so this one is over. Nothing
    was written."""

    def __init__(self, key: str, token: int, newest: int) -> None:
        super().__init__(
            f"fencing token {token} is older than {newest}, the newest used on {key!r}: "
            "a newer leadership has taken over this resource"
        )
        self.key = key
        """The fence key."""
        self.token = token
        """The token that was refused."""
        self.newest = newest
        """The newest token used on the fence key when the write was refused."""


class Fence:
    """The fencing token of one resource, stored in Redis under ``key``, and the scripts that
    write to the resource only with a token not older than it.

    ``redis``: an asyncio client (``redis.asyncio.Redis``); the fence sends its commands through
    it and nowhere else, and never closes it. ``key``: the Redis key that holds the highest
    token used on the resource; it must not be used for anything else, nor expire.
    """

    def __init__(self, redis: Redis, key: str) -> None:
        if not isinstance(redis, Redis):
            raise TypeError(
                f"Fence needs a redis.asyncio.Redis client, got {type(redis).__module__}."
                f"{type(redis).__qualname__}"
            )
        if not isinstance(key, str) or not key:
            raise ValueError(f"the fence key must be a non-empty string, got {key!r}")
        self._redis = redis
        self._key = key
        self._advance = self.script("return nil")

    @property
    def redis(self) -> Redis:
        """The client the fence's commands go through."""
        return self._redis

    @property
    def key(self) -> str:
        """The Redis key holding the newest token used on the resource."""
        return self._key

    def __repr__(self) -> str:
        return f"Fence(key={self._key!r})"

    def script(self, body: str) -> FencedScript:
        """Return your Lua write ``body`` as a fenced script: called with a token, it runs only
        if the token is not older than the newest one used on this fence, and records it.

        Write ``body`` as any Redis script: it sees its own ``KEYS`` and ``ARGV`` (the fence's
        key and the token are passed apart), and what it returns is the call's result. It must
        do all of the guarded write itself: a write made after the call returns is not fenced.
        Nothing is sent to Redis here; the script is loaded on its first call.
        """
        return FencedScript(self, body)

    async def advance(self, token: int) -> None:
        """Record ``token`` as the newest used on the resource without writing anything else,
        so that older leaderships are refused from now on: call it when a leadership begins,
        before its first write. Raises :class:`StaleToken` if a newer token was used already."""
        await self._advance(token)

    async def newest(self) -> int | None:
        """The newest token used on the resource, or ``None`` if none has been yet."""
        stored = await self._redis.get(self._key)
        if stored is None:
            return None
        text = stored.decode() if isinstance(stored, bytes) else str(stored)
        if _TOKEN_PATTERN.fullmatch(text) is None:
            raise _corrupt(self._key)
        return int(text)


class FencedScript:
    """A Lua write that runs only with a fencing token not older than its fence's newest.

    Made by :meth:`Fence.script`. Call it with the token and the body's own keys and arguments;
    the script is loaded into Redis on the first call and run by its SHA1 from then on (loaded
    again if the server forgot it: ``SCRIPT FLUSH``, a restart).
    """

    def __init__(self, fence: Fence, body: str) -> None:
        if not isinstance(body, str) or not body.strip():
            raise ValueError(f"the script body must be non-empty Lua source, got {body!r}")
        if body.lstrip().startswith("#!"):
            # Flags and a shebang must open the script, and the fence's check must come first.
            raise ValueError("a fenced script body cannot start with a #! line (script flags)")
        self._fence = fence
        self._body = body
        self._script = fence.redis.register_script(_PRELUDE + body)

    @property
    def fence(self) -> Fence:
        """The fence this script writes through."""
        return self._fence

    @property
    def body(self) -> str:
        """Your Lua source, as given."""
        return self._body

    @property
    def sha(self) -> str:
        """The SHA1 of the whole script (the fence's check, then the body)."""
        sha: str = self._script.sha
        return sha

    async def __call__(
        self,
        token: int,
        keys: Sequence[KeyT] = (),
        args: Sequence[EncodableT] = (),
    ) -> Any:
        """Run the script with fencing ``token``; return what the body returns.

        Raises :class:`StaleToken` (and writes nothing) if a newer token was used on the fence;
        otherwise records ``token`` as the newest and runs the body, in one atomic script.
        Redis errors (connection, the body's own errors) propagate as redis-py raises them.
        """
        token = _check_token(token)
        keys = _check_sequence("keys", keys)
        args = _check_sequence("args", args)
        fence = self._fence
        try:
            return await self._script(keys=[fence.key, *keys], args=[token, *args])
        except ResponseError as exc:
            code, _, detail = str(exc).partition(" ")
            if code == _STALE:
                raise StaleToken(fence.key, token, int(detail)) from None
            if code == _CORRUPT:
                raise _corrupt(fence.key) from None
            raise

    def __repr__(self) -> str:
        return f"FencedScript(fence={self._fence!r}, sha={self.sha!r})"


def _check_token(token: object) -> int:
    # bool is an int, and numpy's integers are not: accept what has __index__, but for bools.
    if isinstance(token, bool) or not isinstance(token, SupportsIndex):
        hint = " (LeaderElection.fencing_token is None when this node does not lead)"
        raise TypeError(
            f"a fencing token must be an int, got {token!r}" + (hint if token is None else "")
        )
    value = operator.index(token)
    if not 0 <= value <= _MAX_TOKEN:
        raise ValueError(f"a fencing token must be between 0 and 2**53, got {value}")
    return value


def _corrupt(key: str) -> ResponseError:
    return ResponseError(
        f"the fence key {key!r} does not hold a fencing token (a decimal integer): "
        "it is used for something else, or was overwritten"
    )


def _check_sequence(name: str, values: Sequence[Any]) -> Sequence[Any]:
    # A lone string or bytes is a sequence too, and would go out one character at a time.
    if isinstance(values, (str, bytes, memoryview)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list or tuple, got {values!r}")
    return values
