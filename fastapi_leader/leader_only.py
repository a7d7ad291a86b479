"""``@leader_only``: one implementation for routes, Starlette endpoints and plain functions.

:meth:`LeaderElection.leader_only` and :func:`leader_only` are this one decorator, with one
behaviour:

- a call on a follower does not run: a plain call returns ``None`` (logged at debug level); a
  request (a FastAPI route, or a Starlette endpoint given the request) answers the same 503 as
  :func:`~fastapi_leader.require_leader`;
- on the leader, an async call runs as *leader work* of the current leadership: if the
  leadership ends first it is cancelled (as soon as the app's loop runs), and the call returns
  ``None`` (a request: the 503). A sync call cannot be interrupted and runs to its end.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import JSONResponse

from .callbacks import LeaderWorkRevoked, callable_name
from .integration import (
    NotLeader,
    _current_election,
    _ElectionGuard,
    _route_guard,
    get_election,
)
from .service import LeaderElection

__all__ = ["leader_only"]

log = logging.getLogger("fastapi_leader")

_P = ParamSpec("_P")
_T = TypeVar("_T")

# The keyword parameter @leader_only adds to the signature FastAPI sees. FastAPI resolves its
# Depends (the 503 on a follower) before the handler runs, and passes it; a plain call does
# not, which is how the wrapper tells a FastAPI request from a plain call.
_GUARD_PARAM = "_fastapi_leader_guard"
_NOT_PASSED = object()


class _LeaderOnly:
    """The decorator ``leader_only(election)`` returns."""

    def __init__(self, election: LeaderElection | None) -> None:
        self.election = election

    @overload
    def __call__(
        self, func: Callable[_P, Coroutine[Any, Any, _T]], /
    ) -> Callable[_P, Coroutine[Any, Any, _T | None]]: ...

    @overload
    def __call__(self, func: Callable[_P, _T], /) -> Callable[_P, _T | None]: ...

    def __call__(self, func: Callable[..., Any], /) -> Callable[..., Any]:
        return _guard(func, self.election)


@overload
def leader_only(
    func: Callable[_P, Coroutine[Any, Any, _T]], /
) -> Callable[_P, Coroutine[Any, Any, _T | None]]: ...


@overload
def leader_only(func: Callable[_P, _T], /) -> Callable[_P, _T | None]: ...


@overload
def leader_only(election: LeaderElection | None = None, /) -> _LeaderOnly: ...


def leader_only(target: Any = None, /) -> Any:
    """Run a route handler, a Starlette endpoint or a function on the leader only.

    On a **route handler** (below the route decorator) or a **Starlette endpoint**, a follower
    answers 503 exactly as :func:`require_leader` does, and the lifespan lists the 503 in the
    route's OpenAPI::

        @app.post("/reindex")
        @leader_only
        async def reindex(request: Request) -> dict[str, int]: ...

    On a **plain function** (sync or async: a loop body, an APScheduler job), a call on a
    follower is skipped, logged at debug level, and returns ``None``::

        @leader_only
        async def sweep() -> int: ...

    On the leader an async call runs as leader work: cancelled if the leadership ends before it
    does (a plain call then returns ``None``, a request answers 503). Leadership is read at the
    moment of the call. ``@leader_only`` uses the election the lifespan started;
    ``@leader_only(election)`` (or ``election.leader_only``) binds one explicitly. A plain call
    with no election running raises :class:`RuntimeError`. The signature survives: FastAPI
    injects the handler's parameters as before, and type checkers see the original
    parameters, the result becoming ``T | None``.
    """
    if target is None or isinstance(target, LeaderElection):
        return _LeaderOnly(target)
    if not callable(target):
        raise TypeError(
            f"leader_only: expected a function or a LeaderElection, not {type(target).__name__}"
        )
    return _guard(target, None)


def _guard(func: Callable[..., Any], election: LeaderElection | None) -> Callable[..., Any]:
    name = callable_name(func)

    def refuse(node: LeaderElection, request: bool) -> Any:
        """What a call on a follower gets: the 503 for a request, else ``None``."""
        if not request:
            log.debug("node %s: skipped %s: not the leader", node.node_id, name)
            return None
        refusal = NotLeader.from_status(node.status())
        if request is _STARLETTE:
            # Starlette's own handler cannot render a dict detail: answer as FastAPI would.
            return JSONResponse(
                {"detail": refusal.detail}, status_code=refusal.status_code, headers=refusal.headers
            )
        raise refusal

    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def leader_only_async(*args: Any, **kwargs: Any) -> Any:
            node, request = _call_kind(election, args, kwargs)
            token = node.fencing_token
            if token is None:
                if request is _FASTAPI:
                    # FastAPI's guard admitted the request: an override of require_leader
                    # (tests do that), or the lease ended a moment ago. Honour the guard.
                    return await func(*args, **kwargs)
                return refuse(node, request)
            try:
                return await node._callbacks.run_as_leader_work(func(*args, **kwargs), token, name)
            except LeaderWorkRevoked:
                log.info("node %s: %s cancelled: leadership ended", node.node_id, name)
                return refuse(node, request)

        wrapper = leader_only_async
    else:

        @functools.wraps(func)
        def leader_only_sync(*args: Any, **kwargs: Any) -> Any:
            node, request = _call_kind(election, args, kwargs)
            if request is not _FASTAPI and not node.is_leader:
                return refuse(node, request)
            return func(*args, **kwargs)

        wrapper = leader_only_sync

    guard = _route_guard if election is None else _ElectionGuard(election)
    _set_signature(wrapper, _with_guard(func, guard))
    return wrapper


# How a call came: a FastAPI request (the guard parameter passed), a Starlette endpoint (the
# request as the only argument), or a plain call.
_FASTAPI: Any = True
_STARLETTE: Any = "starlette"


def _call_kind(
    election: LeaderElection | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[LeaderElection, Any]:
    """The election a call runs under, and how the call came."""
    passed = kwargs.pop(_GUARD_PARAM, _NOT_PASSED)
    if isinstance(passed, LeaderElection):  # FastAPI resolved the guard: the request's own
        return passed, _FASTAPI
    starlette = len(args) == 1 and not kwargs and isinstance(args[0], Request)
    if election is not None:
        node = election
    elif starlette:
        node = get_election(args[0])  # the request's own app, even with several running
    else:
        node = _current_election()
    if passed is not _NOT_PASSED:  # an override of the guard returned something else
        return node, _FASTAPI
    return node, _STARLETTE if starlette else False


def _set_signature(func: Callable[..., Any], signature: inspect.Signature) -> None:
    func.__signature__ = signature  # type: ignore[attr-defined]


def _with_guard(func: Callable[..., Any], guard: Callable[..., Any]) -> inspect.Signature:
    """``func``'s signature plus the guard parameter, for FastAPI to resolve."""
    try:
        # Annotations evaluated now, in func's module: FastAPI would evaluate strings (from
        # ``from __future__ import annotations``) in the wrapper's module, where they mean
        # nothing.
        signature = inspect.signature(func, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        # A name that exists only for type checkers: leave the strings to FastAPI, which
        # newer versions resolve in the unwrapped function's module.
        signature = inspect.signature(func)
    if _GUARD_PARAM in signature.parameters:
        raise TypeError(f"leader_only: {func!r} is decorated with @leader_only already")
    params = list(signature.parameters.values())
    guard_param = inspect.Parameter(
        _GUARD_PARAM, inspect.Parameter.KEYWORD_ONLY, default=Depends(guard), annotation=None
    )
    # Keyword-only parameters come before **kwargs, if there is one.
    at = len(params)
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        at -= 1
    params.insert(at, guard_param)
    return signature.replace(parameters=params)
