"""Guard cost: requests per second through a FastAPI app with and without ``require_leader``.

Run by the harness as ``python -m benchmarks.guard --redis-url URL``; prints one JSON line.
The apps run in this process with a real :class:`LeaderElection` (leading its group on the
harness's Redis) under ``leader_lifespan``. Requests are plain ASGI calls (no HTTP, no client
library), so the figure is the dependency's own cost against the cheapest possible request, a
lower bound of what a real deployment would see; and again through httpx's ASGITransport.

Fair by construction: every variant is an app built by the same code with its one route at
the same path (in a shared app, the route matched second pays for the first's regex); variants
run in rotating order, block by block, so drift in machine load hits all alike; a ratio is one
of medians (of block times within a round), so a single slow block does not swing it; and an
unguarded twin of the unguarded app shows the noise floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from harness import processes

Message = dict[str, Any]
GROUP = "guard-bench"


def _load_integration() -> tuple[Any, Any] | str:
    try:
        from fastapi_leader.integration import leader_lifespan, require_leader
    except ImportError as exc:
        return (
            f"fastapi_leader.integration is not available ({exc}): the guard scenario needs "
            "leader_lifespan and require_leader"
        )
    return leader_lifespan, require_leader


async def _lifespan(app: Any, state: dict[str, Any]) -> Callable[[], Any]:
    """Run the app's ASGI lifespan startup; return a coroutine function that shuts it down."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    reply = await outbox.get()
    if reply["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {reply}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return shutdown


def _scope(path: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": dict(state),
    }


async def _asgi_requests(app: Any, path: str, state: dict[str, Any], count: int) -> float:
    """Send ``count`` requests one after another as plain ASGI calls; return the seconds."""
    body = {"type": "http.request", "body": b"", "more_body": False}
    statuses: list[int] = []

    async def receive() -> Message:
        return body

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for _ in range(count):
        await app(_scope(path, state), receive, send)
        # A server yields to the loop between requests (socket reads); without this the
        # election's jobs would starve and the lease run out mid-benchmark.
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    if any(status != 200 for status in statuses):
        raise RuntimeError(f"{path}: unexpected statuses {sorted(set(statuses))}")
    return elapsed


def _httpx_client(app: Any) -> Any:
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")


async def _httpx_requests(client: Any, path: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        response = await client.get(path)
        await asyncio.sleep(0)  # as above: let the election's jobs run
        if response.status_code != 200:
            raise RuntimeError(f"{path}: unexpected status {response.status_code}")
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _load_integration()
    if isinstance(loaded, str):
        return {"error": loaded}
    leader_lifespan, require_leader = loaded
    from fastapi import Depends, FastAPI, HTTPException

    from fastapi_leader import LeaderElection, LeaderSettings

    election = LeaderElection(LeaderSettings(redis_url=args.redis_url, group=GROUP))

    async def plain() -> None:
        return None

    async def is_leader() -> None:
        if not election.is_leader:
            raise HTTPException(503)

    # One app per variant, built by the same code, each with its one route at the same path:
    # in one app, routes are matched in order, and a route listed second costs its requests
    # a few percent against the first (measured: two identical routes, 0.96-0.98).
    guards: dict[str, list[Any]] = {
        OPEN: [],
        TWIN: [],  # the same unguarded route again: the noise floor of the ratios
        "/guarded": [Depends(require_leader)],
        "/plain": [Depends(plain)],
        "/is-leader": [Depends(is_leader)],
    }
    apps = {}
    for variant, dependencies in guards.items():
        app = FastAPI(lifespan=leader_lifespan(election) if variant == "/guarded" else None)

        @app.get("/", dependencies=dependencies)
        async def route() -> dict[str, bool]:
            return {"ok": True}

        apps[variant] = app

    # The election runs in the guarded app's lifespan; every app's requests carry its state,
    # where require_leader finds the election (as in a mounted sub-app).
    state: dict[str, Any] = {}
    shutdown = await _lifespan(apps["/guarded"], state)
    followers = None
    clients = {variant: _httpx_client(app) for variant, app in apps.items()}
    try:
        await election.wait_until_leader(timeout=10)

        async def asgi(variant: str, count: int) -> float:
            return await _asgi_requests(apps[variant], "/", state, count)

        async def via_httpx(variant: str, count: int) -> float:
            return await _httpx_requests(clients[variant], "/", count)

        senders = {"ASGI": (asgi, args.block), "httpx": (via_httpx, max(1, args.block // 4))}
        for send, _ in senders.values():
            for variant in guards:  # warm-up: FastAPI builds its caches on first use
                await send(variant, 50)
        result: dict[str, Any] = {}
        sizes = [1] + ([args.followers + 1] if args.followers else [])
        for size in sizes:
            if size > 1:
                followers = await _start_followers(args)
                await _wait_members(election, size)
            for name, (send, block) in senders.items():
                label = f"{name}, {size} node{'s' * (size > 1)}"
                await _measure(send, block, list(guards), args, result, label)
        result["notes"] = [
            f"requests as plain ASGI calls and through httpx's ASGITransport; each round "
            f"runs {args.blocks} blocks of every variant in rotating order, and a ratio is "
            f"the unguarded route's median block time over the variant's (ratio of medians, "
            f"so one slow block does not swing it); the node leads its group on a real "
            f"Redis (alone, then with {args.followers} followers in another process)",
            "each variant is its own app with one route, so route matching costs the same; "
            "'unguarded twin': the unguarded app again (the noise floor); 'plain "
            "dependency': an empty async Depends(), what any dependency costs in FastAPI; "
            "'is_leader check': a hand-written Depends() reading election.is_leader",
        ]
        return result
    finally:
        for client in clients.values():
            await client.aclose()
        if followers is not None:
            followers.terminate()
            await followers.wait()
            processes.forget(followers.pid)
        await shutdown()


OPEN = "/open"
TWIN = "/open-twin"
NAMES = {
    TWIN: "unguarded twin",
    "/guarded": "require_leader",
    "/plain": "plain dependency",
    "/is-leader": "is_leader check",
}


async def _measure(
    send: Callable[[str, int], Any],
    block: int,
    variants: list[str],
    args: argparse.Namespace,
    result: dict[str, Any],
    label: str,
) -> None:
    ratios = {v: f"{NAMES[v]} / unguarded rps ({label})" for v in variants if v != OPEN}
    unguarded = f"unguarded ({label})"
    for name in [*ratios.values(), unguarded]:
        result[name] = []
    for round_ in range(args.rounds):
        spent: dict[str, list[float]] = {v: [] for v in variants}
        for index in range(args.blocks):
            shift = (round_ + index) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                spent[variant].append(await send(variant, block))
        medians = {v: statistics.median(times) for v, times in spent.items()}
        result[unguarded].append(block / medians[OPEN])
        for variant, name in ratios.items():
            result[name].append(medians[OPEN] / medians[variant])


async def _start_followers(args: argparse.Namespace) -> asyncio.subprocess.Process:
    process = await processes.spawn(
        [sys.executable, "-m", "benchmarks.node", "--impl", "ours", "--redis-url", args.redis_url],
        env=processes.clean_env(),
        cwd=processes.ROOT,
        stderr=None,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert process.stdin is not None
    process.stdin.write(f"start {GROUP} {args.followers} guard-follower\n".encode())
    await process.stdin.drain()
    return process


async def _wait_members(election: Any, size: int) -> None:
    deadline = time.monotonic() + 60
    while len(election.members) < size or not election.is_leader:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group did not reach {size} members")
        await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--block", type=int, default=200)
    parser.add_argument("--followers", type=int, default=19, help="then measure in a bigger group")
    args = parser.parse_args()
    try:
        result = asyncio.run(run(args))
    except Exception as exc:
        result = {"error": f"failed: {type(exc).__name__}: {exc}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
