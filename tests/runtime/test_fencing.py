"""Fence and FencedScript against a real, private Redis-protocol server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from fastapi_leader import Fence, FencedScript, StaleToken
from fastapi_leader.fencing import _PRELUDE
from tests.conftest import MakeRedisServer

pytestmark = pytest.mark.redis

FENCE_KEY = "app:report:fence"
DATA_KEY = "app:report"
# A fenced write that leaves a trace of every run: it appends its argument to a list.
APPEND = "return redis.call('RPUSH', KEYS[1], ARGV[1])"
SET = "return redis.call('SET', KEYS[1], ARGV[1])"


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
async def redis(redis_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=request.param)
    yield client
    await client.aclose()


@pytest.fixture
def fence(redis: Redis) -> Fence:
    return Fence(redis, FENCE_KEY)


def text(value: Any) -> Any:
    """Replies as str, whether the client decodes them or not."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [text(item) for item in value]
    return value


# -- tokens ---------------------------------------------------------------------------------


async def test_a_first_token_writes_and_is_recorded(fence: Fence, redis: Redis) -> None:
    save = fence.script(SET)
    assert await fence.newest() is None

    assert text(await save(3, keys=[DATA_KEY], args=["first"])) == "OK"

    assert text(await redis.get(DATA_KEY)) == "first"
    assert await fence.newest() == 3


async def test_an_equal_or_newer_token_writes(fence: Fence, redis: Redis) -> None:
    append = fence.script(APPEND)

    for token in (1, 1, 2, 5, 5):
        await append(token, keys=[DATA_KEY], args=[token])

    assert text(await redis.lrange(DATA_KEY, 0, -1)) == ["1", "1", "2", "5", "5"]
    assert await fence.newest() == 5


async def test_an_older_token_is_refused_and_writes_nothing(fence: Fence, redis: Redis) -> None:
    append = fence.script(APPEND)
    await append(7, keys=[DATA_KEY], args=["new leader"])

    with pytest.raises(StaleToken) as refused:
        await append(6, keys=[DATA_KEY], args=["old leader, woken from a pause"])

    assert (refused.value.key, refused.value.token, refused.value.newest) == (FENCE_KEY, 6, 7)
    assert str(refused.value) == (
        f"fencing token 6 is older than 7, the newest used on {FENCE_KEY!r}: "
        "a newer leadership has taken over this resource"
    )
    assert text(await redis.lrange(DATA_KEY, 0, -1)) == ["new leader"]
    assert await fence.newest() == 7


async def test_advance_refuses_older_leaderships_before_any_write(
    fence: Fence, redis: Redis
) -> None:
    append = fence.script(APPEND)
    await append(1, keys=[DATA_KEY], args=["term 1"])

    await fence.advance(2)  # a new leadership begins: term 1 must not write any more

    with pytest.raises(StaleToken):
        await append(1, keys=[DATA_KEY], args=["term 1, late"])
    with pytest.raises(StaleToken) as refused:
        await fence.advance(1)
    assert refused.value.newest == 2
    await fence.advance(2)  # the same leadership again: fine
    assert text(await redis.lrange(DATA_KEY, 0, -1)) == ["term 1"]
    assert await fence.newest() == 2


async def test_tokens_compare_exactly_up_to_2_to_the_53(fence: Fence) -> None:
    # Lua numbers are doubles: past 2**53 neighbours would compare equal.
    await fence.advance(2**53)

    with pytest.raises(StaleToken) as refused:
        await fence.advance(2**53 - 1)
    assert refused.value.newest == 2**53


async def test_fences_on_different_keys_are_independent(redis: Redis) -> None:
    reports, invoices = Fence(redis, "app:reports:fence"), Fence(redis, "app:invoices:fence")
    await reports.advance(9)

    await invoices.script(SET)(1, keys=["app:invoices"], args=["written with token 1"])

    assert await reports.newest() == 9
    assert await invoices.newest() == 1
    with pytest.raises(StaleToken):
        await reports.advance(8)
    await invoices.advance(8)
    assert await invoices.newest() == 8


async def write_or_refusal(script: FencedScript, token: int, log_key: str) -> int | None:
    """Append ``token`` to ``log_key`` with ``token``; None if it landed, else the newest token
    the refusal named."""
    try:
        await script(token, keys=[log_key], args=[token])
    except StaleToken as refused:
        assert refused.token == token
        return refused.newest
    return None


async def test_concurrent_writers_never_land_an_older_token_after_a_newer(
    redis_url: str, redis: Redis
) -> None:
    # Many connections at once, tokens in random order: the log of writes that landed must
    # never go backwards, and every refusal must name a newer token that did land.
    rng = random.Random(5)
    clients = [Redis.from_url(redis_url) for _ in range(8)]
    try:
        for round_number in range(5):
            log_key, fence_key = f"log:{round_number}", f"fence:{round_number}"
            scripts = [Fence(client, fence_key).script(APPEND) for client in clients]
            tokens = list(range(1, 101))
            rng.shuffle(tokens)

            outcomes = await asyncio.gather(
                *(write_or_refusal(scripts[token % 8], token, log_key) for token in tokens)
            )

            landed = [int(token) for token in text(await redis.lrange(log_key, 0, -1))]
            assert landed == sorted(landed)
            refusals = {
                token: newest for token, newest in zip(tokens, outcomes, strict=True) if newest
            }
            assert sorted(landed + list(refusals)) == list(range(1, 101))
            assert 100 in landed
            assert all(newest > token and newest in landed for token, newest in refusals.items())
            assert await Fence(redis, fence_key).newest() == 100
    finally:
        for client in clients:
            await client.aclose()


# -- the script -----------------------------------------------------------------------------


async def test_the_body_sees_its_own_keys_and_arguments(fence: Fence) -> None:
    echo = fence.script("return {#KEYS, #ARGV, KEYS[1], KEYS[2], ARGV[1], ARGV[2]}")

    assert text(await echo(1, keys=["k1", "k2"], args=["a1", "a2"])) == [
        2,
        2,
        "k1",
        "k2",
        "a1",
        "a2",
    ]
    assert text(await echo(1)) == [0, 0]


async def test_many_arguments_reach_the_body(fence: Fence, redis: Redis) -> None:
    # More than unpack() could put on the Lua stack.
    push_all = fence.script("return redis.call('RPUSH', KEYS[1], unpack(ARGV, 1, 100))")
    count_args = fence.script("return #ARGV")

    assert await count_args(1, args=list(range(20_000))) == 20_000
    assert await push_all(1, keys=[DATA_KEY], args=list(range(20_000))) == 100


async def test_the_body_can_return_nothing(fence: Fence) -> None:
    assert await fence.script("redis.call('PING')")(1) is None


async def test_errors_of_the_body_are_redis_errors_not_refusals(fence: Fence, redis: Redis) -> None:
    await redis.set(DATA_KEY, "not a number")
    increment = fence.script("return redis.call('INCR', KEYS[1])")
    refuse = fence.script("return redis.error_reply('NOPE not today')")

    with pytest.raises(ResponseError, match="not an integer") as raised:
        await increment(4, keys=[DATA_KEY])
    assert not isinstance(raised.value, StaleToken)
    with pytest.raises(ResponseError, match=r"^NOPE not today$"):
        await refuse(4)
    # The check passed, so the token stands, as the module docs say.
    assert await fence.newest() == 4


async def test_the_script_is_loaded_once_and_run_by_its_hash(fence: Fence, redis: Redis) -> None:
    append = fence.script(APPEND)
    await redis.script_flush()  # the session's server may know it from an earlier test
    await redis.config_resetstat()

    for token in range(1, 6):
        await append(token, keys=[DATA_KEY], args=[token])

    stats = await redis.info("commandstats")
    assert stats["cmdstat_script|load"]["calls"] == 1  # after the first EVALSHA's NOSCRIPT
    evalsha = stats["cmdstat_evalsha"]
    assert (evalsha["calls"], evalsha["failed_calls"]) == (6, 1)
    assert "cmdstat_eval" not in stats
    assert await redis.script_exists(append.sha) == [True]


async def test_the_script_is_loaded_again_after_script_flush(fence: Fence, redis: Redis) -> None:
    append = fence.script(APPEND)
    await append(1, keys=[DATA_KEY], args=["before the flush"])

    await redis.script_flush()
    assert await redis.script_exists(append.sha) == [False]

    await append(2, keys=[DATA_KEY], args=["after the flush"])
    with pytest.raises(StaleToken):
        await append(1, keys=[DATA_KEY], args=["stale, after the flush"])

    assert await redis.script_exists(append.sha) == [True]
    assert text(await redis.lrange(DATA_KEY, 0, -1)) == ["before the flush", "after the flush"]


async def test_the_script_is_loaded_again_after_a_server_restart(
    make_redis_server: MakeRedisServer,
) -> None:
    server = make_redis_server()
    # A client that reconnects on its own (redis-py's default does too; said here, not assumed).
    client = Redis.from_url(server.url, retry=Retry(NoBackoff(), 3))
    try:
        fence = Fence(client, FENCE_KEY)
        append = fence.script(APPEND)
        await append(1, keys=[DATA_KEY], args=["before the restart"])

        server.restart()  # no persistence: the data, the fence and the script are all gone

        assert await client.script_exists(append.sha) == [False]
        await append(1, keys=[DATA_KEY], args=["after the restart"])
        assert await client.script_exists(append.sha) == [True]
        assert await client.lrange(DATA_KEY, 0, -1) == [b"after the restart"]
        assert await fence.newest() == 1
    finally:
        await client.aclose()


def test_scripts_differ_only_by_their_body(fence: Fence) -> None:
    first, again, other = fence.script(APPEND), fence.script(APPEND), fence.script(SET)

    assert first.sha == again.sha != other.sha
    assert first.body == APPEND
    assert first.fence is fence
    assert _PRELUDE.startswith("do\n")  # the check comes first, before anything of the body


# -- misuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "error", "message"),
    [
        (None, TypeError, r"got None \(LeaderElection.fencing_token is None when this node"),
        ("3", TypeError, "must be an int, got '3'"),
        (3.0, TypeError, "must be an int, got 3.0"),
        (True, TypeError, "must be an int, got True"),
        (-1, ValueError, "between 0 and 2\\*\\*53, got -1"),
        (2**53 + 1, ValueError, f"between 0 and 2\\*\\*53, got {2**53 + 1}"),
    ],
)
async def test_a_bad_token_is_refused_before_anything_is_sent(
    fence: Fence, redis: Redis, token: Any, error: type[Exception], message: str
) -> None:
    save = fence.script(SET)

    with pytest.raises(error, match=message):
        await save(token, keys=[DATA_KEY], args=["x"])
    with pytest.raises(error, match=message):
        await fence.advance(token)

    assert await redis.exists(DATA_KEY, FENCE_KEY) == 0


@pytest.mark.parametrize(
    ("keys", "args", "message"),
    [
        ("k", (), "keys must be a list or tuple, got 'k'"),
        ((), b"a", "args must be a list or tuple, got b'a'"),
        ({"k"}, (), "keys must be a list or tuple, got {'k'}"),
    ],
)
async def test_keys_and_args_must_be_sequences(
    fence: Fence, redis: Redis, keys: Any, args: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        await fence.script(SET)(1, keys=keys, args=args)
    assert await redis.exists(FENCE_KEY) == 0


async def test_a_fence_needs_an_asyncio_client_and_a_key(redis: Redis) -> None:
    sync_client = sync_redis.Redis()
    try:
        with pytest.raises(TypeError, match=r"redis.asyncio.Redis client, got redis.client.Redis"):
            Fence(sync_client, FENCE_KEY)  # type: ignore[arg-type]
    finally:
        sync_client.close()
    with pytest.raises(ValueError, match="non-empty string, got ''"):
        Fence(redis, "")
    with pytest.raises(ValueError, match="non-empty string, got b'k'"):
        Fence(redis, b"k")  # type: ignore[arg-type]


@pytest.mark.parametrize("body", ["", "  \n", None])
def test_a_script_needs_a_body(fence: Fence, body: Any) -> None:
    with pytest.raises(ValueError, match="non-empty Lua source"):
        fence.script(body)


def test_a_script_body_cannot_carry_flags(fence: Fence) -> None:
    with pytest.raises(ValueError, match="cannot start with a #! line"):
        fence.script("#!lua flags=no-writes\nreturn 1")


async def test_a_fence_key_holding_something_else_is_reported(fence: Fence, redis: Redis) -> None:
    await redis.set(FENCE_KEY, "not a token")
    message = f"the fence key {FENCE_KEY!r} does not hold a fencing token"

    with pytest.raises(ResponseError, match=message):
        await fence.script(SET)(1, keys=[DATA_KEY], args=["x"])
    with pytest.raises(ResponseError, match=message):
        await fence.newest()
    assert await redis.exists(DATA_KEY) == 0

    await redis.delete(FENCE_KEY)
    await redis.rpush(FENCE_KEY, "a list")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await fence.advance(1)
