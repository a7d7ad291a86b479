"""The FastAPI face: lifespan, dependencies, ``@leader_only`` and the ``/leader`` router.

Apps run in process, on one event loop, behind ``httpx.ASGITransport``; :func:`serve` plays the
server's part of the ASGI lifespan protocol (with lifespan state, as uvicorn does), so startup
goes through ``app.__call__`` exactly as under a real server. Several apps in one test form a
cluster on the process's in-memory broker (``memory://``), each test in a group of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastapi_leader import (
    LEADER_ONLY_RESPONSES,
    BrokerUnavailable,
    LeaderElection,
    LeaderElectionDep,
    LeaderSettings,
    LeaderStatusDep,
    MemoryBroker,
    MemoryTransport,
    NotLeader,
    Status,
    get_election,
    leader_lifespan,
    leader_only,
    leader_router,
    require_leader,
)
from fastapi_leader.integration import _LeaderGate
from fastapi_leader.transport import Names
from tests.helpers.cluster import WAIT

STATUS_FIELDS = {
    "node_id",
    "group",
    "role",
    "is_leader",
    "leader_id",
    "leader_url",
    "term",
    "fencing_token",
    "lease_remaining",
    "members",
    "connected",
}
MEMBER_FIELDS = {"node_id", "url", "is_leader", "last_seen_ago"}


# ---- harness ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan as a server does, and yield a client for it; shut down after.

    Startup failures raise the app's exception. Each request gets a shallow copy of the lifespan
    state in ``scope["state"]``, as uvicorn gives it."""
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    task = asyncio.ensure_future(app(scope, to_app.get, from_app.put))

    async def step(message: str) -> None:
        await to_app.put({"type": f"lifespan.{message}"})
        reply = await asyncio.wait_for(from_app.get(), WAIT)
        if reply["type"] != f"lifespan.{message}.complete":
            await asyncio.wait_for(task, WAIT)  # raises what the app raised
            raise AssertionError(f"lifespan {message} failed: {reply}")

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    await step("startup")
    try:
        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
    finally:
        await step("shutdown")
        await asyncio.wait_for(task, WAIT)


@pytest.fixture
def group() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def settings_for(group: str, node_id: str, **overrides: Any) -> LeaderSettings:
    options: dict[str, Any] = {
        "redis_url": "memory://",
        "group": group,
        "node_id": node_id,
        "advertise_url": f"http://{node_id}.test:8000",
    }
    return LeaderSettings(**{**options, **overrides})


def make_app(group: str, node_id: str, **overrides: Any) -> FastAPI:
    """A node's app: the election from settings, the /leader router, and guarded routes."""
    app = FastAPI(lifespan=leader_lifespan(settings=settings_for(group, node_id, **overrides)))
    app.include_router(leader_router())

    @app.post("/guarded", dependencies=[Depends(require_leader)])
    async def guarded(election: LeaderElectionDep) -> dict[str, Any]:
        return {"node_id": election.node_id}

    @app.post("/decorated/{item}")
    @leader_only
    async def decorated(request: Request, item: str, n: int = 0) -> dict[str, Any]:
        return {"node_id": get_election(request).node_id, "item": item, "n": n}

    @app.post("/decorated-sync")
    @leader_only
    def decorated_sync(request: Request) -> dict[str, Any]:
        return {"node_id": request.app.state.leader_election.node_id}

    @app.get("/open")
    async def open_to_all(status: LeaderStatusDep) -> dict[str, Any]:
        return {"node_id": status.node_id}

    return app


def election_of(app: FastAPI) -> LeaderElection:
    election = app.state.leader_election
    assert isinstance(election, LeaderElection)
    return election


@dataclasses.dataclass
class Pair:
    """Two nodes' apps, once both know the same leader."""

    leader: httpx.AsyncClient
    follower: httpx.AsyncClient
    leader_id: str
    follower_id: str
    leader_election: LeaderElection
    follower_election: LeaderElection


@contextlib.asynccontextmanager
async def two_nodes(group: str) -> AsyncIterator[Pair]:
    """Apps ``a`` and ``b`` of one group, served, once both know the same leader."""
    apps = {node_id: make_app(group, node_id) for node_id in ("a", "b")}
    async with serve(apps["a"]) as client_a, serve(apps["b"]) as client_b:
        clients = {"a": client_a, "b": client_b}
        leader_id = await election_of(apps["a"]).wait_for_leader(5)
        assert await election_of(apps["b"]).wait_for_leader(5) == leader_id
        follower_id = "b" if leader_id == "a" else "a"
        assert election_of(apps[leader_id]).is_leader
        yield Pair(
            clients[leader_id],
            clients[follower_id],
            leader_id,
            follower_id,
            election_of(apps[leader_id]),
            election_of(apps[follower_id]),
        )


def assert_not_leader_response(response: httpx.Response, follower_id: str, leader_id: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Leader-Id"] == leader_id
    assert response.headers["X-Leader-Url"] == f"http://{leader_id}.test:8000"
    assert response.json() == {
        "detail": {
            "message": "This node is not the leader",
            "node_id": follower_id,
            "leader_id": leader_id,
            "leader_url": f"http://{leader_id}.test:8000",
        }
    }


# ---- the lifespan -------------------------------------------------------------------------------


async def test_the_lifespan_alone_starts_the_election_and_stops_it_at_shutdown(
    group: str,
) -> None:
    app = FastAPI(lifespan=leader_lifespan(settings=settings_for(group, "solo")))
    app.include_router(leader_router())
    assert not hasattr(app.state, "leader_election")

    async with serve(app) as client:
        election = election_of(app)
        assert election.running
        assert election.node_id == "solo"
        await election.wait_until_leader(5)
        assert (await client.get("/leader")).json()["is_leader"] is True

    assert not election.running
    assert not hasattr(app.state, "leader_election")


async def test_the_lifespan_reads_the_environment_by_default(
    group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEADER_REDIS_URL", "memory://")
    monkeypatch.setenv("LEADER_GROUP", group)
    monkeypatch.setenv("LEADER_NODE_ID", "from-env")
    app = FastAPI(lifespan=leader_lifespan())

    async with serve(app):
        assert election_of(app).node_id == "from-env"
        assert election_of(app).group == group


async def test_a_composed_lifespan_runs_inside_the_election(group: str) -> None:
    election = LeaderElection(settings_for(group, "a"))
    log: list[str] = []

    @contextlib.asynccontextmanager
    async def database(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # The app's own startup sees a started election, registered on the app.
        assert app.state.leader_election is election
        log.append(f"inner startup, election running: {election.running}")
        yield {"db": "connection"}
        log.append(f"inner shutdown, election running: {election.running}")

    app = FastAPI(lifespan=leader_lifespan(election, lifespan=database))

    @app.get("/state")
    async def read_state(request: Request) -> dict[str, Any]:
        return {
            "db": request.state.db,
            "node_id": request.state.leader_election.node_id,
        }

    async with serve(app) as client:
        response = await client.get("/state")
        assert response.json() == {"db": "connection", "node_id": "a"}
        log.append("serving")

    log.append(f"after shutdown, election running: {election.running}")
    assert log == [
        "inner startup, election running: True",
        "serving",
        # The election stops (leader work, handover) while the app's resources are still open.
        "inner shutdown, election running: False",
        "after shutdown, election running: False",
    ]


async def test_shutdown_cancels_a_running_leader_job_before_the_apps_lifespan_closes(
    group: str, caplog: pytest.LogCaptureFixture
) -> None:
    election = LeaderElection(settings_for(group, "a"))
    log: list[str] = []
    job_started = asyncio.Event()

    @election.scheduled_job("interval", seconds=0.05)
    async def long_job() -> None:
        job_started.set()
        try:
            await asyncio.Event().wait()  # a job still running when shutdown begins
        except asyncio.CancelledError:
            log.append(f"job cancelled, resource open: {'closed' not in log}")
            raise

    @contextlib.asynccontextmanager
    async def resource(app: FastAPI) -> AsyncIterator[None]:
        yield
        log.append("closed")

    app = FastAPI(lifespan=leader_lifespan(election, lifespan=resource))
    with caplog.at_level(logging.INFO, logger="fastapi_leader"):
        async with serve(app):
            await election.wait_until_leader(timeout=WAIT)
            await asyncio.wait_for(job_started.wait(), WAIT)
    assert log == ["job cancelled, resource open: True", "closed"]
    assert "long_job cancelled: leadership ended" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_lifespan_nests_inside_the_apps_own_lifespan(group: str) -> None:
    election = LeaderElection(settings_for(group, "a"))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with leader_lifespan(election)(app) as state:
            assert election.running
            yield {**state, "cache": "warm"}
        assert not election.running

    app = FastAPI(lifespan=lifespan)

    @app.get("/state")
    async def read_state(request: Request, status: LeaderStatusDep) -> dict[str, Any]:
        return {"cache": request.state.cache, "node_id": status.node_id}

    async with serve(app) as client:
        assert (await client.get("/state")).json() == {"cache": "warm", "node_id": "a"}
    assert not election.running


async def test_startup_fails_loudly_when_the_broker_is_unreachable(group: str) -> None:
    broker = MemoryBroker()
    settings = settings_for(group, "cut-off")
    broker.disconnect("cut-off")
    election = LeaderElection(
        settings,
        transport=MemoryTransport(broker, Names(settings.channel_prefix, group, "cut-off")),
    )
    inner_started = False

    @contextlib.asynccontextmanager
    async def inner(app: FastAPI) -> AsyncIterator[None]:
        nonlocal inner_started
        inner_started = True
        yield

    app = FastAPI(lifespan=leader_lifespan(election, lifespan=inner))

    with pytest.raises(BrokerUnavailable):
        async with serve(app):
            pass  # pragma: no cover - startup must fail
    assert not inner_started
    assert not hasattr(app.state, "leader_election")


def test_an_election_and_settings_together_are_refused(group: str) -> None:
    settings = settings_for(group, "a")
    with pytest.raises(ValueError, match="not both"):
        leader_lifespan(LeaderElection(settings), settings=settings)


async def test_without_the_lifespan_the_dependencies_say_what_to_add() -> None:
    app = FastAPI()
    app.include_router(leader_router())

    @app.post("/guarded", dependencies=[Depends(require_leader)])
    async def guarded() -> None: ...

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for method, path in (("GET", "/leader"), ("POST", "/guarded")):
            with pytest.raises(RuntimeError) as raised:
                await client.request(method, path)
            assert "FastAPI(lifespan=leader_lifespan())" in str(raised.value)


async def test_a_mounted_sub_app_finds_the_election_in_the_lifespan_state(group: str) -> None:
    # A sub-app has an app.state of its own; the lifespan state is shared with it.
    app = FastAPI(lifespan=leader_lifespan(settings=settings_for(group, "a")))
    admin = FastAPI()
    admin.include_router(leader_router())

    @admin.post("/guarded", dependencies=[Depends(require_leader)])
    async def guarded() -> str:
        return "done"

    app.mount("/admin", admin)

    async with serve(app) as client:
        await election_of(app).wait_until_leader(5)
        assert (await client.get("/admin/leader")).json()["node_id"] == "a"
        assert (await client.post("/admin/guarded")).json() == "done"


# ---- require_leader and @leader_only on routes --------------------------------------------------


async def test_require_leader_passes_on_the_leader_and_refuses_on_a_follower(group: str) -> None:
    async with two_nodes(group) as pair:
        response = await pair.leader.post("/guarded")
        assert response.status_code == 200, response.text
        assert response.json() == {"node_id": pair.leader_id}

        response = await pair.follower.post("/guarded")
        assert_not_leader_response(response, pair.follower_id, pair.leader_id)
        assert (await pair.follower.get("/open")).status_code == 200  # unguarded routes serve


async def test_leader_only_routes_answer_like_require_leader(group: str) -> None:
    async with two_nodes(group) as pair:
        leader, follower, leader_id = pair.leader, pair.follower, pair.leader_id
        response = await leader.post("/decorated/x?n=3")
        assert response.status_code == 200, response.text
        # Request, the path and the query parameter all reached the handler.
        assert response.json() == {"node_id": leader_id, "item": "x", "n": 3}
        response = await leader.post("/decorated-sync")
        assert response.status_code == 200, response.text
        assert response.json() == {"node_id": leader_id}

        for path in ("/decorated/x?n=3", "/decorated-sync"):
            assert_not_leader_response(await follower.post(path), pair.follower_id, leader_id)
        # Validation still applies to a leader-only route's own parameters.
        assert (await leader.post("/decorated/x?n=three")).status_code == 422


async def test_no_leader_known_gives_a_503_without_leader_headers(group: str) -> None:
    # A node that has just joined listens for an election timeout before it may stand, so
    # for a while it knows no leader at all (timings stretched to make that while long).
    slow = {"election_timeout_min": 5.0, "election_timeout_max": 6.0, "advertise_url": None}
    app = make_app(group, "alone", **slow)
    async with serve(app) as client:
        assert election_of(app).leader_id is None
        response = await client.post("/guarded")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert "X-Leader-Id" not in response.headers
    assert "X-Leader-Url" not in response.headers
    assert response.json()["detail"] == {
        "message": "This node is not the leader",
        "node_id": "alone",
        "leader_id": None,
        "leader_url": None,
    }


# A node that has just joined listens for an election timeout before it may stand: stretched,
# it stays leaderless (and so refuses) for the whole test.
NO_LEADER_YET = {"election_timeout_min": 30.0, "election_timeout_max": 31.0}


def _route(app: FastAPI, path: str) -> APIRoute:
    return next(r for r in app.routes if isinstance(r, APIRoute) and r.path == path)


async def test_require_leader_is_checked_ahead_of_the_dependency_solver(group: str) -> None:
    # An empty dependency costs FastAPI about a fifth of a cheap request; the lifespan moves
    # the check in front of the route, and the route must answer exactly as before.
    solved: list[str] = []

    async def record(request: Request) -> None:
        solved.append(get_election(request).node_id)

    apps = {node_id: make_app(group, node_id) for node_id in ("a", "b")}
    for app in apps.values():
        app.post("/recorded", dependencies=[Depends(require_leader), Depends(record)])(
            lambda: "done"
        )
    async with serve(apps["a"]) as client_a, serve(apps["b"]) as client_b:
        leader_id = await election_of(apps["a"]).wait_for_leader(5)
        assert await election_of(apps["b"]).wait_for_leader(5) == leader_id
        follower_id = "b" if leader_id == "a" else "a"
        clients = {"a": client_a, "b": client_b}
        for app in apps.values():
            calls = [sub.call for sub in _route(app, "/recorded").dependant.dependencies]
            assert calls == [record]  # require_leader left the solver's list

        response = await clients[follower_id].post("/recorded")
        assert_not_leader_response(response, follower_id, leader_id)
        assert (await clients[leader_id].post("/recorded")).json() == "done"
        assert solved == [leader_id]  # the follower refused before the other dependency


async def test_a_router_wide_require_leader_guards_every_route_of_it(group: str) -> None:
    def app_with_router(node_id: str, **overrides: Any) -> FastAPI:
        router = APIRouter(prefix="/admin", dependencies=[Depends(require_leader)])
        router.post("/async")(_async_done)
        router.post("/sync")(lambda: "done")
        app = FastAPI(lifespan=leader_lifespan(settings=settings_for(group, node_id, **overrides)))
        app.include_router(router)
        return app

    waiting = app_with_router("waiting", **NO_LEADER_YET)
    async with serve(waiting) as client:
        for path in ("/admin/async", "/admin/sync"):
            assert (await client.post(path)).status_code == 503
    leader = app_with_router("leader")
    async with serve(leader) as client:
        await election_of(leader).wait_until_leader(5)
        for path in ("/admin/async", "/admin/sync"):
            assert (await client.post(path)).json() == "done"


async def _async_done() -> str:
    return "done"


async def test_an_override_of_require_leader_is_resolved_as_fastapi_would(group: str) -> None:
    app = make_app(group, "alone", **NO_LEADER_YET)

    def allow() -> None:
        return None

    def teapot() -> None:
        raise HTTPException(418)

    async with serve(app) as client:
        assert (await client.post("/guarded")).status_code == 503
        app.dependency_overrides[require_leader] = allow
        assert (await client.post("/guarded")).json() == {"node_id": "alone"}
        app.dependency_overrides[require_leader] = teapot
        assert (await client.post("/guarded")).status_code == 418
        app.dependency_overrides.clear()
        assert (await client.post("/guarded")).status_code == 503


async def test_a_second_run_of_the_lifespan_keeps_routes_guarded_once(group: str) -> None:
    # Test clients enter an app's lifespan once per test, and apps are often module globals.
    app = make_app(group, "alone", **NO_LEADER_YET)
    for _ in range(2):
        async with serve(app) as client:
            assert (await client.post("/guarded")).status_code == 503
    gate = _route(app, "/guarded").app
    # Wrapped once: the second startup found the route gated already.
    assert isinstance(gate, _LeaderGate)
    assert not isinstance(gate.app, _LeaderGate)


async def test_the_dependencies_read_the_election_on_the_event_loop_thread(group: str) -> None:
    # A sync dependency would run in a worker thread, reading the member table while the
    # loop changes it ("dictionary changed size during iteration").
    threads: set[int] = set()

    class Recording(LeaderElection):
        def status(self) -> Status:
            threads.add(threading.get_ident())
            return super().status()

    election = Recording(settings_for(group, "a"))
    app = FastAPI(lifespan=leader_lifespan(election))
    app.include_router(leader_router())

    @app.post("/guarded", dependencies=[Depends(require_leader)])
    def guarded() -> None: ...

    @app.post("/decorated")
    @leader_only
    def decorated() -> None: ...

    async with serve(app) as client:
        await election.wait_until_leader(5)
        for method, path in (("GET", "/leader"), ("POST", "/guarded"), ("POST", "/decorated")):
            assert (await client.request(method, path)).status_code == 200
    assert threads == {threading.get_ident()}


def test_a_leader_url_unfit_for_a_header_stays_in_the_body_only() -> None:
    hostile = "http://a.test/\r\nSet-Cookie: session=stolen"
    refusal = NotLeader("b", "a", hostile)
    assert refusal.headers == {"Retry-After": "1", "X-Leader-Id": "a"}
    assert isinstance(refusal.detail, dict)
    assert refusal.detail["leader_url"] == hostile
    for unfit in ("http://a.test/\n", "http://ä.test/", "http://a.test/ x"):
        assert NotLeader("b", "a", unfit).headers == {"Retry-After": "1", "X-Leader-Id": "a"}
    assert NotLeader("b", "a\n").headers == {"Retry-After": "1"}


async def test_leader_only_bound_to_an_election_guards_a_route_with_it(group: str) -> None:
    leader = LeaderElection(settings_for(group, "a"))
    follower = LeaderElection(settings_for(group, "b"))
    await leader.start()
    try:
        await leader.wait_until_leader(5)
        await follower.start()
        try:
            assert await follower.wait_for_leader(5) == "a"
            app = FastAPI()  # no lifespan: the bound election is all the route needs

            @app.get("/on-a")
            @leader_only(leader)
            async def on_a() -> str:
                return "a"

            @app.get("/on-b")
            @leader_only(follower)
            async def on_b() -> str:
                return "b"

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/on-a")).json() == "a"
                assert_not_leader_response(await client.get("/on-b"), "b", "a")
        finally:
            await follower.stop()
    finally:
        await leader.stop()


def starlette_app(group: str, node_id: str) -> Starlette:
    """A plain Starlette app (no FastAPI): the lifespan, and an endpoint under @leader_only."""

    @leader_only
    async def reindex(request: Request) -> JSONResponse:
        return JSONResponse({"node_id": get_election(request).node_id})

    @leader_only
    def reindex_sync(request: Request) -> JSONResponse:
        return JSONResponse({"node_id": request.app.state.leader_election.node_id})

    routes = [Route("/reindex", reindex), Route("/reindex-sync", reindex_sync)]
    election = LeaderElection(settings_for(group, node_id))
    app = Starlette(routes=routes, lifespan=leader_lifespan(election))
    app.state.election_under_test = election
    return app


async def test_leader_only_on_a_starlette_endpoint_answers_the_same_503_on_a_follower(
    group: str,
) -> None:
    # Two apps in one process: the bare decorator cannot pick an election for a plain call,
    # but a request names its app's, so each endpoint uses its own.
    app_a, app_b = starlette_app(group, "a"), starlette_app(group, "b")
    async with serve(app_a) as a:
        await app_a.state.election_under_test.wait_until_leader(WAIT)
        async with serve(app_b) as b:
            assert await app_b.state.election_under_test.wait_for_leader(WAIT) == "a"
            for path in ("/reindex", "/reindex-sync"):
                assert (await a.get(path)).json() == {"node_id": "a"}
                assert_not_leader_response(await b.get(path), "b", "a")


# ---- OpenAPI ------------------------------------------------------------------------------------


def responses_of(schema: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    responses: dict[str, Any] = schema["paths"][path][method]["responses"]
    return responses


async def test_the_lifespan_documents_the_503_of_leader_only_routes(group: str) -> None:
    app = make_app(group, "a")
    before = app.openapi()  # generated and cached before startup: the lifespan must reset it
    assert "503" not in responses_of(before, "/guarded", "post")

    async with serve(app) as client:
        schema = (await client.get("/openapi.json")).json()
        assert app.openapi() == schema

    expected = LEADER_ONLY_RESPONSES[503]
    for path, method in (
        ("/guarded", "post"),
        ("/decorated/{item}", "post"),
        ("/decorated-sync", "post"),
    ):
        documented = responses_of(schema, path, method)["503"]
        assert documented["content"] == expected["content"], path
        assert set(documented["headers"]) == {"Retry-After", "X-Leader-Id", "X-Leader-Url"}
        assert "200" in responses_of(schema, path, method)
    assert "503" not in responses_of(schema, "/open", "get")
    assert "503" not in responses_of(schema, "/leader", "get")
    # The guard parameter is FastAPI's business only: it is no query parameter.
    parameters = schema["paths"]["/decorated/{item}"]["post"]["parameters"]
    assert {p["name"] for p in parameters} == {"item", "n"}


def test_leader_only_responses_document_the_503_without_the_lifespan() -> None:
    app = FastAPI()

    @app.post("/x", responses=LEADER_ONLY_RESPONSES)
    @leader_only
    async def x() -> None: ...

    documented = responses_of(app.openapi(), "/x", "post")["503"]
    assert documented["description"].startswith("This node is not the leader")
    detail = documented["content"]["application/json"]["schema"]["properties"]["detail"]
    assert set(detail["properties"]) == {"message", "node_id", "leader_id", "leader_url"}


async def test_the_openapi_schema_has_the_status_model_with_the_role_enum(group: str) -> None:
    app = make_app(group, "a")
    async with serve(app) as client:
        schema = (await client.get("/openapi.json")).json()

    ok = responses_of(schema, "/leader", "get")["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/LeaderStatus"}
    model = schema["components"]["schemas"]["LeaderStatus"]
    assert set(model["properties"]) == STATUS_FIELDS
    assert model["properties"]["role"]["enum"] == ["follower", "candidate", "leader"]
    assert model["properties"]["members"]["items"] == {"$ref": "#/components/schemas/MemberStatus"}
    assert set(schema["components"]["schemas"]["MemberStatus"]["properties"]) == MEMBER_FIELDS


# ---- @leader_only on plain functions ------------------------------------------------------------


async def test_leader_only_functions_run_on_the_leader_and_skip_on_a_follower(
    group: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    @leader_only
    async def sweep(label: str) -> str:
        calls.append(f"async {label}")
        return f"swept {label}"

    @leader_only
    def tally(label: str, *, times: int = 1) -> int:
        calls.append(f"sync {label}")
        return times

    # "a" leads, outside any app; "b" is the process's election, through its lifespan.
    other = LeaderElection(settings_for(group, "a"))
    await other.start()
    try:
        await other.wait_until_leader(5)
        app = make_app(group, "b")
        async with serve(app):
            election = election_of(app)
            assert await election.wait_for_leader(5) == "a"
            with caplog.at_level(logging.DEBUG, logger="fastapi_leader"):
                assert await sweep("on follower") is None
                assert tally("on follower", times=2) is None
            assert calls == []
            skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
            assert [r.levelno for r in skipped] == [logging.DEBUG, logging.DEBUG]
            assert "node b: skipped" in skipped[0].getMessage()
            assert "sweep" in skipped[0].getMessage()
            assert "tally" in skipped[1].getMessage()

            await other.stop()  # hands the leadership over to "b"
            await election.wait_until_leader(5)
            assert await sweep("on leader") == "swept on leader"
            assert tally("on leader", times=2) == 2
            assert calls == ["async on leader", "sync on leader"]
    finally:
        await other.stop()


async def test_leader_only_keeps_the_functions_identity() -> None:
    async def sweep(label: str, *, limit: int = 10) -> str:
        """Sweep things."""
        return label

    guarded = leader_only(sweep)
    assert guarded.__name__ == "sweep"
    assert guarded.__doc__ == "Sweep things."
    assert asyncio.iscoroutinefunction(guarded)
    assert not asyncio.iscoroutinefunction(leader_only(len))


def test_leader_only_refuses_what_it_cannot_guard() -> None:
    with pytest.raises(TypeError, match="expected a function or a LeaderElection"):
        leader_only("sweep")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="already"):
        leader_only(leader_only(len))


def test_the_signature_fastapi_sees_is_the_original_plus_the_guard() -> None:
    def handler(request: Request, item: str, *extra: int, **options: str) -> dict[str, str]:
        return {}

    parameters = inspect.signature(leader_only(handler)).parameters
    assert list(parameters) == ["request", "item", "extra", "_fastapi_leader_guard", "options"]
    # This module has ``from __future__ import annotations``: the annotations are strings
    # here, and must arrive evaluated, since older FastAPI versions evaluate them in the
    # wrapper's module, where ``Request`` means nothing.
    assert parameters["request"].annotation is Request
    assert parameters["item"].annotation is str
    assert inspect.signature(leader_only(handler)).return_annotation == dict[str, str]


async def test_a_plain_leader_only_call_with_no_election_names_the_fix() -> None:
    @leader_only
    async def sweep() -> str:
        return "swept"

    @leader_only()
    def tally() -> int:
        return 1

    with pytest.raises(RuntimeError) as raised:
        await sweep()
    assert "FastAPI(lifespan=leader_lifespan())" in str(raised.value)
    assert "leader_only(election)" in str(raised.value)
    with pytest.raises(RuntimeError, match="no leader election is running"):
        tally()


async def test_a_plain_leader_only_call_refuses_to_guess_between_two_elections(
    group: str,
) -> None:
    @leader_only
    def tally() -> int:
        return 1

    async with two_nodes(group):
        with pytest.raises(RuntimeError, match=r"2 leader elections .* bind one"):
            tally()


async def test_leader_only_bound_to_an_election_uses_that_one(group: str) -> None:
    async with two_nodes(group) as pair:

        @leader_only(pair.leader_election)
        async def on_leader() -> str:
            return "ran"

        @leader_only(pair.follower_election)
        def on_follower() -> str:
            return "ran"

        # Two elections run in this process, yet the bound ones need no choosing.
        assert await on_leader() == "ran"
        assert on_follower() is None


async def test_a_leader_only_apscheduler_job_runs_on_the_leader_only(group: str) -> None:
    calls: list[str] = []

    @leader_only
    async def job(label: str) -> str:
        calls.append(label)
        return label

    scheduler = AsyncIOScheduler()
    scheduler.start()
    loop = asyncio.get_running_loop()

    async def run_once(label: str) -> Any:
        done: asyncio.Future[JobExecutionEvent] = loop.create_future()

        def listener(event: JobExecutionEvent) -> None:
            if event.job_id == label and not done.done():
                done.set_result(event)

        scheduler.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        try:
            scheduler.add_job(job, "date", args=[label], id=label)  # "date", no time: now
            event = await asyncio.wait_for(done, WAIT)
        finally:
            scheduler.remove_listener(listener)
        assert event.exception is None, event.traceback
        return event.retval

    other = LeaderElection(settings_for(group, "a"))
    await other.start()
    try:
        await other.wait_until_leader(5)
        app = make_app(group, "b")
        async with serve(app):
            election = election_of(app)
            assert await election.wait_for_leader(5) == "a"
            assert await run_once("follower") is None
            await other.stop()
            await election.wait_until_leader(5)
            assert await run_once("leader") == "leader"
        assert calls == ["leader"]
    finally:
        scheduler.shutdown(wait=False)
        await other.stop()


# ---- the /leader router -------------------------------------------------------------------------


async def test_the_leader_view_on_the_leader_and_on_a_follower(group: str) -> None:
    views: dict[str, dict[str, Any]] = {}
    async with two_nodes(group) as pair:
        both = {pair.leader_id, pair.follower_id}
        for node_id, client in ((pair.leader_id, pair.leader), (pair.follower_id, pair.follower)):

            async def fetch(client: httpx.AsyncClient = client) -> dict[str, Any]:
                response = await client.get("/leader")
                assert response.status_code == 200, response.text
                assert response.headers["Cache-Control"] == "no-store"
                view: dict[str, Any] = response.json()
                return view

            # Each node lists the other once it has heard its presence beat.
            views[node_id] = await eventually_async(
                fetch, lambda view: {m["node_id"] for m in view["members"]} == both
            )
        leader_id = pair.leader_id

    for node_id, view in views.items():
        assert set(view) == STATUS_FIELDS
        assert view["node_id"] == node_id
        assert view["group"] == group
        assert view["leader_id"] == leader_id
        assert view["leader_url"] == f"http://{leader_id}.test:8000"
        assert view["connected"] is True
        assert isinstance(view["term"], int) and view["term"] >= 1
        assert (view["role"] == "leader") is view["is_leader"]
        for member in view["members"]:
            assert set(member) == MEMBER_FIELDS
            assert member["url"] == f"http://{member['node_id']}.test:8000"
            assert member["is_leader"] is (member["node_id"] == leader_id)
            assert isinstance(member["last_seen_ago"], float) and member["last_seen_ago"] >= 0

    lead, follow = views[leader_id], views[pair.follower_id]
    assert lead["is_leader"] is True and lead["role"] == "leader"
    assert lead["fencing_token"] == lead["term"]
    assert 0 < lead["lease_remaining"] <= 0.4  # the default lease, read at request time
    assert follow["is_leader"] is False and follow["role"] in ("follower", "candidate")
    assert follow["fencing_token"] is None and follow["lease_remaining"] is None


async def eventually_async(
    fetch: Callable[[], Any], condition: Callable[[Any], bool], timeout: float = WAIT
) -> Any:
    """Fetch until ``condition(value)`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await fetch()
        if condition(value):
            return value
        assert loop.time() < deadline, f"timed out; last value: {value}"
        await asyncio.sleep(0.02)


async def test_the_router_takes_a_path_tags_and_can_hide_from_the_schema(group: str) -> None:
    app = FastAPI(lifespan=leader_lifespan(settings=settings_for(group, "a")))
    app.include_router(leader_router("/internal/election", tags=["ops"]))
    app.include_router(leader_router("/hidden", include_in_schema=False))

    async with serve(app) as client:
        response = await client.get("/internal/election")
        assert response.status_code == 200
        assert response.json()["node_id"] == "a"
        assert (await client.get("/hidden")).status_code == 200
        assert (await client.get("/leader")).status_code == 404
        schema = app.openapi()

    assert schema["paths"]["/internal/election"]["get"]["tags"] == ["ops"]
    assert "/hidden" not in schema["paths"]


async def test_the_leader_view_answers_while_the_broker_is_gone(group: str) -> None:
    broker = MemoryBroker()
    settings = settings_for(group, "a")
    names = Names(settings.channel_prefix, group, "a")
    election = LeaderElection(settings, transport=MemoryTransport(broker, names))
    app = FastAPI(lifespan=leader_lifespan(election))
    app.include_router(leader_router())

    async with serve(app) as client:
        await election.wait_until_leader(5)
        broker.disconnect("a")

        async def fetch() -> dict[str, Any]:
            response = await client.get("/leader")
            assert response.status_code == 200, response.text
            view: dict[str, Any] = response.json()
            return view

        view = await eventually_async(
            fetch, lambda view: not view["connected"] and not view["is_leader"]
        )
        assert view["role"] != "leader"
        assert view["fencing_token"] is None
        assert election.running
