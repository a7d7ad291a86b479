"""The FastAPI face of the election: a lifespan, dependencies, ``@leader_only`` and a router.

::

    from fastapi import Depends, FastAPI

    from fastapi_leader import leader_lifespan, leader_only, leader_router, require_leader

    app = FastAPI(lifespan=leader_lifespan())  # LEADER_* environment variables
    app.include_router(leader_router())  # GET /leader: this node's view


    @app.post("/rebuild", dependencies=[Depends(require_leader)])
    async def rebuild() -> dict[str, str]: ...

Everything here uses only the public surface of :class:`~fastapi_leader.LeaderElection`; the
layers below this module know nothing of FastAPI.

A follower refuses leader-only requests with **503 Service Unavailable**, headers ``Retry-After:
1``, ``X-Leader-Id`` (when a leader is known) and ``X-Leader-Url`` (when that leader advertised
one), and this JSON body:

.. code-block:: json

    {"detail": {"message": "This node is not the leader", "node_id": "b",
                "leader_id": "a", "leader_url": "http://a:8000"}}

The body sits under ``detail`` because :class:`NotLeader` is an ordinary
:class:`~fastapi.HTTPException`, handled by FastAPI's (or the app's own) HTTPException handler.
A handler of our own for a flat body cannot be installed by the lifespan: Starlette builds its
exception middleware before the lifespan runs, so under a real server such a handler would never
be called. An app that wants another shape registers a handler for :class:`NotLeader` when it
creates the app (``FastAPI(exception_handlers={NotLeader: ...})``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Literal, ParamSpec, TypeVar, overload

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.types import Lifespan, Receive, Scope, Send

from .core import Role, Status
from .events import ElectionObserver, as_observers
from .service import LeaderElection
from .settings import LeaderSettings

__all__ = [
    "LEADER_ONLY_RESPONSES",
    "LeaderElectionDep",
    "LeaderStatus",
    "LeaderStatusDep",
    "MemberStatus",
    "NotLeader",
    "get_election",
    "leader_lifespan",
    "leader_router",
    "leader_status",
    "require_leader",
]

log = logging.getLogger("fastapi_leader")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_AppT = TypeVar("_AppT", bound=Starlette)

# The key under which the lifespan stores the election, on app.state and in the lifespan state.
_STATE_KEY = "leader_election"

# Failover takes under a second with the default timings, so a client that retries after one
# second finds a leader (or a follower that can name it). Retry-After counts whole seconds.
_RETRY_AFTER_SECONDS = 1

_NOT_LEADER_MESSAGE = "This node is not the leader"

# A leader's id and URL reach us in messages from other nodes; only printable ASCII without
# spaces may go into a header (no CR/LF to split the response, nothing latin-1 cannot encode).
# A value that fails this still appears, JSON-escaped, in the body. (fullmatch: ``$`` would
# let a trailing newline through.)
_HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,2048}")


# ---- the status model -------------------------------------------------------------------------

RoleName = Literal["follower", "candidate", "leader"]

_ROLE_NAMES: dict[Role, RoleName] = {
    Role.FOLLOWER: "follower",
    Role.CANDIDATE: "candidate",
    Role.LEADER: "leader",
}


class MemberStatus(BaseModel):
    """A live member of the group, as this node sees it."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    node_id: str
    """The member's node id."""
    url: str | None = None
    """The URL the member advertises (``LEADER_ADVERTISE_URL``), if any."""
    is_leader: bool
    """Whether this node knows the member as the live leader."""
    last_seen_ago: float
    """Seconds since this node last heard from the member."""


class LeaderStatus(BaseModel):
    """One node's view of the election, read at one instant (so the fields agree: ``role`` is
    ``"leader"`` exactly when ``is_leader``, and then ``leader_id == node_id``)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    node_id: str
    """This node's id."""
    group: str
    """The election group."""
    role: RoleName
    """This node's part in the election."""
    is_leader: bool
    """Whether this node holds a valid lease now."""
    leader_id: str | None
    """The live leader this node knows of (itself while leading), or null."""
    leader_url: str | None
    """The URL the leader advertises, when a leader is known and advertises one."""
    term: int
    """The highest term this node has seen."""
    fencing_token: int | None
    """This node's fencing token while it leads, else null."""
    lease_remaining: float | None
    """Seconds left on this node's lease while it leads, else null."""
    members: list[MemberStatus]
    """The live members this node hears, itself included once it hears itself."""
    connected: bool
    """Whether this node's connection to the broker is up."""

    @classmethod
    def from_status(cls, status: Status) -> LeaderStatus:
        """Build the model from a :meth:`LeaderElection.status` snapshot."""
        return cls(
            node_id=status.node_id,
            group=status.group,
            role=_ROLE_NAMES[status.role],
            is_leader=status.is_leader,
            leader_id=status.leader_id,
            leader_url=_leader_url(status),
            term=status.term,
            fencing_token=status.fencing_token,
            lease_remaining=status.lease_remaining,
            members=[
                MemberStatus(
                    node_id=member.node_id,
                    url=member.url,
                    is_leader=member.is_leader,
                    last_seen_ago=member.last_seen_ago,
                )
                for member in status.members
            ],
            connected=status.connected,
        )


def _leader_url(status: Status) -> str | None:
    for member in status.members:
        if member.node_id == status.leader_id:
            return member.url
    return None


# ---- the 503 ------------------------------------------------------------------------------------


class NotLeader(HTTPException):
    """503: this node is not the leader. Raised by :func:`require_leader` and by
    ``@leader_only`` routes on a follower; see the module docstring for the response."""

    def __init__(
        self, node_id: str, leader_id: str | None = None, leader_url: str | None = None
    ) -> None:
        self.node_id = node_id
        self.leader_id = leader_id
        self.leader_url = leader_url
        headers = {"Retry-After": str(_RETRY_AFTER_SECONDS)}
        if leader_id is not None and _HEADER_SAFE.fullmatch(leader_id):
            headers["X-Leader-Id"] = leader_id
        if leader_url is not None and _HEADER_SAFE.fullmatch(leader_url):
            headers["X-Leader-Url"] = leader_url
        detail = {
            "message": _NOT_LEADER_MESSAGE,
            "node_id": node_id,
            "leader_id": leader_id,
            "leader_url": leader_url,
        }
        super().__init__(status_code=503, detail=detail, headers=headers)

    @classmethod
    def from_status(cls, status: Status) -> NotLeader:
        """The refusal for a follower whose view is ``status``."""
        return cls(status.node_id, status.leader_id, _leader_url(status))


_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}

LEADER_ONLY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "This node is not the leader: retry later, or on the leader "
        "(`X-Leader-Url`).",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer"},
            },
            "X-Leader-Id": {
                "description": "The leader's node id, when one is known.",
                "schema": {"type": "string"},
            },
            "X-Leader-Url": {
                "description": "The leader's advertised URL, when it has one.",
                "schema": {"type": "string"},
            },
        },
        # Written out rather than taken from a model, so that the same dict works before
        # startup (``responses=LEADER_ONLY_RESPONSES``) and when the lifespan adds it to a
        # route afterwards, when FastAPI would no longer turn a model into a schema.
        "content": {
            "application/json": {
                "schema": {
                    "title": "NotLeaderResponse",
                    "type": "object",
                    "required": ["detail"],
                    "properties": {
                        "detail": {
                            "type": "object",
                            "required": ["message", "node_id", "leader_id", "leader_url"],
                            "properties": {
                                "message": {"type": "string"},
                                "node_id": {"type": "string"},
                                "leader_id": _NULLABLE_STRING,
                                "leader_url": _NULLABLE_STRING,
                            },
                        }
                    },
                }
            }
        },
    }
}
"""The ``responses=`` entry documenting the 503 of a leader-only route.

The lifespan adds it to every route that depends on :func:`require_leader` (``@leader_only``
routes included). Pass it yourself (``@app.post("/x", responses=LEADER_ONLY_RESPONSES)``) for
the schema to show it without the lifespan having run, e.g. when exporting it offline."""


# ---- dependencies -------------------------------------------------------------------------------


def get_election(request: Request) -> LeaderElection:
    """Dependency: the app's :class:`LeaderElection`, as stored by :func:`leader_lifespan`.
    Also a plain function, for code that holds a request.

    Raises:
        RuntimeError: the app was not created with the lifespan.
    """
    election = getattr(request.app.state, _STATE_KEY, None)
    if election is None:
        # A mounted sub-app has its own app.state but shares the lifespan state.
        election = getattr(request.state, _STATE_KEY, None)
    if not isinstance(election, LeaderElection):
        raise RuntimeError(
            "No leader election on this app: create it with "
            "FastAPI(lifespan=leader_lifespan()) (or leader_lifespan(election, "
            "lifespan=your_lifespan) to keep a lifespan of your own)"
        )
    return election


# leader_status and require_leader are coroutines so that FastAPI runs them on the event loop:
# a sync dependency would run in a worker thread, reading the election's member table while
# the loop changes it.


async def leader_status(request: Request) -> LeaderStatus:
    """Dependency: a read-only snapshot of this node's view, the lease read now."""
    return LeaderStatus.from_status(get_election(request).status())


async def require_leader(request: Request) -> None:
    """Dependency: passes on the leader; on a follower raises :class:`NotLeader` (503).

    Use it as ``dependencies=[Depends(require_leader)]`` on a route or a router."""
    _check_leader(get_election(request))


def _check_leader(election: LeaderElection) -> None:
    # The leader's path is one lease reading; the full snapshot (members, leader URL) is built
    # only for the refusal. It sits on every guarded request, so it must cost next to nothing.
    if election.is_leader:
        return
    status = election.status()
    if not status.is_leader:  # the lease may have been renewed in between: recheck, same view
        raise NotLeader.from_status(status)


LeaderElectionDep = Annotated[LeaderElection, Depends(get_election)]
"""``election: LeaderElectionDep`` injects the app's :class:`LeaderElection`."""

LeaderStatusDep = Annotated[LeaderStatus, Depends(leader_status)]
"""``status: LeaderStatusDep`` injects a :class:`LeaderStatus` snapshot."""


class _ElectionGuard:
    """The dependency of a route decorated with ``@leader_only(election)``: like
    :func:`require_leader`, for that election rather than the app's."""

    def __init__(self, election: LeaderElection) -> None:
        self.election = election

    async def __call__(self) -> LeaderElection:
        _check_leader(self.election)
        return self.election


async def _route_guard(
    request: Request, _: Annotated[None, Depends(require_leader)]
) -> LeaderElection:
    """The dependency of a route under a bare ``@leader_only``: :func:`require_leader` (so an
    override of it applies), then the app's election, for the handler to run under."""
    return get_election(request)


def _is_leader_guard(call: object) -> bool:
    return call in (require_leader, _route_guard) or isinstance(call, _ElectionGuard)


# ---- the lifespan -------------------------------------------------------------------------------

# Elections started by leader_lifespan in this process, for plain functions under
# @leader_only without an explicit election. A list, not one slot, so that a second app in
# the same process makes the choice ambiguous (and an error) instead of silently taking over.
_running: list[LeaderElection] = []


def _current_election() -> LeaderElection:
    if len(_running) == 1:
        return _running[0]
    if not _running:
        raise RuntimeError(
            "leader_only: no leader election is running in this process. Start one with "
            "FastAPI(lifespan=leader_lifespan()), or bind one: @leader_only(election)"
        )
    nodes = ", ".join(election.node_id for election in _running)
    raise RuntimeError(
        f"leader_only: {len(_running)} leader elections are running in this process "
        f"(nodes {nodes}); bind one: @leader_only(election)"
    )


@overload
def leader_lifespan(
    election: LeaderElection | None = None,
    *,
    settings: LeaderSettings | None = None,
    observer: ElectionObserver | Iterable[ElectionObserver] | None = None,
    lifespan: None = None,
) -> Callable[[Starlette], AbstractAsyncContextManager[dict[str, Any]]]: ...


@overload
def leader_lifespan(
    election: LeaderElection | None = None,
    *,
    settings: LeaderSettings | None = None,
    observer: ElectionObserver | Iterable[ElectionObserver] | None = None,
    lifespan: Lifespan[_AppT],
) -> Callable[[_AppT], AbstractAsyncContextManager[dict[str, Any]]]: ...


def leader_lifespan(
    election: LeaderElection | None = None,
    *,
    settings: LeaderSettings | None = None,
    observer: ElectionObserver | Iterable[ElectionObserver] | None = None,
    lifespan: Lifespan[_AppT] | None = None,
) -> Callable[[_AppT], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan that runs a leader election for the app: ``FastAPI(lifespan=leader_lifespan())``.

    Args:
        election: the election to run; by default one is created at startup from
            ``settings``.
        settings: settings for that election; by default read from ``LEADER_*`` variables
            (at startup). Give ``election`` or ``settings``, not both.
        observer: one :class:`~fastapi_leader.events.ElectionObserver` or several, for the
            election: added to ``election`` (before it starts), or given to the one created.
        lifespan: the app's own lifespan, run inside this one: its startup sees a started
            election, and its shutdown runs after the election has stopped.

    On startup: starts the election (a :class:`~fastapi_leader.BrokerUnavailable` propagates,
    so the app fails to start, loudly), stores it as ``app.state.leader_election``, makes it the
    process's election for plain functions under :func:`leader_only`, documents the 503 of
    every route that depends on :func:`require_leader`, then enters ``lifespan``. It yields the
    state ``{"leader_election": election}`` merged with the inner lifespan's state (so
    ``request.state`` sees both; our key wins a clash). On shutdown:
    :meth:`LeaderElection.stop` stops leader work (running leader-only jobs are cancelled and
    awaited), hands the leadership over and leaves the group, and then the inner lifespan
    exits, so leader work never runs on into resources the app's lifespan has closed.

    Composing: ``FastAPI(lifespan=leader_lifespan(election, lifespan=my_lifespan))``; or nest
    it inside your own lifespan::

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
            async with leader_lifespan(election)(app) as state:
                ...  # the election is running here
                yield state
    """
    if election is not None and settings is not None:
        raise ValueError("leader_lifespan: give an election or settings, not both")

    @contextlib.asynccontextmanager
    async def run_leader_election(app: _AppT) -> AsyncIterator[dict[str, Any]]:
        if election is None:
            node = LeaderElection(settings, observer=observer)
        else:
            node = election
            for item in as_observers(observer):
                if item not in node.observers:  # the lifespan may run again (tests do)
                    node.add_observer(item)
        _document_leader_routes(app)
        _gate_leader_routes(app, node)
        await node.start()
        setattr(app.state, _STATE_KEY, node)
        _running.append(node)
        try:
            if lifespan is None:
                yield {_STATE_KEY: node}
            else:
                async with lifespan(app) as inner_state:
                    try:
                        yield {**(inner_state or {}), _STATE_KEY: node}
                    finally:
                        # Leader work (jobs, on_elected tasks) uses what the app's lifespan
                        # opened: stop it, and hand over, before that lifespan closes them.
                        await node.stop()
        finally:
            _running.remove(node)
            if getattr(app.state, _STATE_KEY, None) is node:
                delattr(app.state, _STATE_KEY)
            await node.stop()

    return run_leader_election


def _document_leader_routes(app: Starlette) -> None:
    """Add the 503 response to every route that depends on a leader guard: FastAPI derives no
    responses from dependencies, so the schema would not show it otherwise."""
    changed = False
    for route in app.routes:
        if not isinstance(route, APIRoute) or not _depends_on_guard(route.dependant):
            continue
        if 503 in route.responses or "503" in route.responses:
            continue  # documented by the app already
        # A new dict: routes may share the one the app passed as ``responses=``.
        route.responses = {**route.responses, **LEADER_ONLY_RESPONSES}
        changed = True
    if changed and isinstance(app, FastAPI):
        app.openapi_schema = None  # a schema generated before now lacks the 503s


def _depends_on_guard(dependant: Dependant) -> bool:
    return any(
        _is_leader_guard(sub.call) or _depends_on_guard(sub) for sub in dependant.dependencies
    )


def _gate_leader_routes(app: Starlette, election: LeaderElection) -> None:
    """Move the :func:`require_leader` check of routes guarded by
    ``dependencies=[Depends(require_leader)]`` (on the route or its router) in front of
    FastAPI's dependency machinery, checking ``election``: the one the lifespan stores on this
    app, where :func:`require_leader` would find it.

    A dependency, even an empty one, costs about a fifth of the cheapest request's time in
    FastAPI (a second pass of its dependency solver); the same check as a plain call in front of
    the route's handler costs next to nothing. The route answers exactly as before: the check
    raises the same :class:`NotLeader`, which the app's exception handlers turn into the 503.

    Only the app's own routes, and only dependencies without a name, move: a named one passes
    a value to the handler (as ``@leader_only``'s does), and routes of routers that this FastAPI
    version keeps apart from ``app.routes`` keep theirs: slower, just as correct.
    """
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        if isinstance(route.app, _LeaderGate):
            route.app.election = election  # the lifespan runs again, maybe with another node
        elif any(_is_gateable(sub) for sub in route.dependant.dependencies):
            route.app = _LeaderGate(route, election)


def _is_gateable(sub: Dependant) -> bool:
    return sub.name is None and sub.call is require_leader


class _LeaderGate:
    """The ASGI app in front of a gated route's own: checks leadership, then calls it."""

    def __init__(self, route: APIRoute, election: LeaderElection) -> None:
        self.route = route
        self.app = route.app
        self.election = election
        provider = route.dependency_overrides_provider
        self.overrides: Any = provider if hasattr(provider, "dependency_overrides") else None
        self.full_dependencies = route.dependant.dependencies
        # A new list, not an edit: a request already in the dependency solver keeps its own.
        route.dependant.dependencies = [
            sub for sub in self.full_dependencies if not _is_gateable(sub)
        ]
        self.gating = True

    # Not a coroutine function: it returns the route's own coroutine, which the router awaits,
    # so the gate adds no frame of its own to every request.
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if self.gating:
            if self.overrides is not None and require_leader in self.overrides.dependency_overrides:
                # The app overrides the guard (tests do): give the route its dependency back,
                # for good, so that FastAPI resolves the override as it would have.
                self.route.dependant.dependencies = self.full_dependencies
                self.gating = False
            else:
                _check_leader(self.election)
        return self.app(scope, receive, send)


# ---- the /leader router -------------------------------------------------------------------------


def leader_router(
    path: str = "/leader", *, tags: list[str] | None = None, include_in_schema: bool = True
) -> APIRouter:
    """A router with ``GET {path}``: this node's :class:`LeaderStatus`.

    It reads this node's own state only, so it answers 200 (with ``connected: false``) even
    while the broker is unreachable: a probe can tell "up but cut off" from "down".
    ``app.include_router(leader_router())``; needs :func:`leader_lifespan`.
    """
    router = APIRouter()

    @router.get(
        path,
        response_model=LeaderStatus,
        tags=list(tags) if tags is not None else None,
        include_in_schema=include_in_schema,
        summary="This node's view of the leader election",
        name="leader_status",
    )
    async def read_leader_status(status: LeaderStatusDep, response: Response) -> LeaderStatus:
        # A view of a moment: a cache must not serve it later.
        response.headers["Cache-Control"] = "no-store"
        return status

    return router
