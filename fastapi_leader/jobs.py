"""Leader-only APScheduler jobs of the user's, on the app's event loop.

``@election.scheduled_job(...)`` jobs fire on every node and run on the leader only (they are
``@leader_only`` functions). They run on a scheduler of the app's loop, the user's own if one was
passed, because they use what the app opened there; the protocol's own jobs run on the election
thread's scheduler and never share one with them.

On a follower they do not even fire: each job is paused while this node does not lead and
resumed when it is elected (APScheduler keeps its trigger's grid), so a follower's log never says
``Job "sweep" executed successfully`` for work it did not do. A run that fires in the moment a
leadership ends is skipped, and APScheduler's lines about that run are dropped too (a filter on
its executor's logger that knows only our jobs' ids).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from datetime import timezone
from typing import TYPE_CHECKING, Any, TypeVar

from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .callbacks import callable_name

if TYPE_CHECKING:
    from .service import LeaderElection

__all__ = ["ScheduledJobs"]

_F = TypeVar("_F", bound=Callable[..., Any])
_JobSpec = tuple[Callable[..., Any], Any, dict[str, Any]]

log = logging.getLogger("fastapi_leader")

# APScheduler's lines about a run (apscheduler/executors/base.py), as its executors log them.
_RUNNING = 'Running job "%s" (scheduled at %s)'
_EXECUTED = 'Job "%s" executed successfully'


class _SkippedRuns(logging.Filter):
    """On an APScheduler executor's logger: drops the lines of runs of our jobs that happen on a
    follower (they are skipped, not run), and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, LeaderElection] = {}  # our job ids, and the election of each
        self.skipping: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg not in (_RUNNING, _EXECUTED) or not isinstance(args, tuple) or not args:
            return True
        job_id = getattr(args[0], "id", None)
        election = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if election is None or not isinstance(job_id, str):
            return True
        if record.msg == _RUNNING:
            if election.is_leader:
                return True
            self.skipping.add(job_id)
            return False
        if job_id in self.skipping:
            self.skipping.discard(job_id)
            return False
        return True


def _executor_logger(options: dict[str, Any]) -> logging.Logger:
    return logging.getLogger(f"apscheduler.executors.{options.get('executor', 'default')}")


_FILTER = _SkippedRuns()
_FILTERED: set[str] = set()  # the executor loggers it is on


class ScheduledJobs:
    """The jobs registered with :meth:`LeaderElection.scheduled_job`, and their scheduler."""

    def __init__(self, election: LeaderElection, scheduler: AsyncIOScheduler | None) -> None:
        self._election = election
        self._scheduler = scheduler
        self._owns_scheduler = scheduler is None
        self._specs: list[_JobSpec] = []
        self._jobs: list[Job] = []
        self._running = False

    def decorator(self, trigger: Any, trigger_args: dict[str, Any]) -> Callable[[_F], _F]:
        def register(func: _F) -> _F:
            options = {"coalesce": True, "max_instances": 1, **trigger_args}
            options.setdefault(
                "id", f"fastapi-leader:{self._election.group}:job:{callable_name(func)}"
            )
            options.setdefault("name", callable_name(func))
            spec = (self._skipping(func, options), trigger, options)
            self._specs.append(spec)
            if self._running:
                self._add(spec)
            return func

        return register

    def _skipping(self, func: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
        """``func`` under ``@leader_only``, skipped without a word in a follower's log."""
        election = self._election
        guarded = election.leader_only(func)
        name = callable_name(func)
        job_id: str = options["id"]
        executor_log = _executor_logger(options)

        def skips() -> bool:
            if election.is_leader:
                return False
            if executor_log.isEnabledFor(logging.INFO):
                _FILTER.skipping.add(job_id)  # its "executed successfully" line is dropped
            log.debug("node %s: skipped job %s: not the leader", election.node_id, name)
            return True

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                return None if skips() else await guarded(*args, **kwargs)

            return run_async

        @functools.wraps(func)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            return None if skips() else guarded(*args, **kwargs)

        return run_sync

    def leading(self, token: int) -> None:
        """``on_elected``: the jobs fire from now on (app loop)."""
        for job in self._jobs:
            with contextlib.suppress(Exception):  # removed meanwhile (or a one-off now past)
                job.resume()

    def following(self) -> None:
        """``on_demoted``: the jobs stop firing (app loop); a run in progress is cancelled as
        leader work."""
        for job in self._jobs:
            with contextlib.suppress(Exception):
                job.pause()

    def start(self) -> None:
        """Add the jobs (on the app's loop, where this is called)."""
        self._running = True
        for spec in self._specs:
            self._add(spec)

    def _add(self, spec: _JobSpec) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            scheduler = self._scheduler = AsyncIOScheduler(timezone=timezone.utc)
        if not scheduler.running:
            scheduler.start()
        func, trigger, options = spec
        _FILTER.jobs[options["id"]] = self._election
        executor_log = _executor_logger(options)
        if executor_log.name not in _FILTERED:
            _FILTERED.add(executor_log.name)
            executor_log.addFilter(_FILTER)
        if not self._election.is_leader:
            options = {**options, "next_run_time": None}  # paused until this node leads
        self._jobs.append(scheduler.add_job(func, trigger, replace_existing=True, **options))

    def stop(self) -> None:
        """Remove the jobs; shut down the scheduler if it is ours."""
        self._running = False
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            if _FILTER.jobs.get(job.id) is self._election:
                del _FILTER.jobs[job.id]
        if self._owns_scheduler:
            scheduler, self._scheduler = self._scheduler, None
            if scheduler is not None and scheduler.running:
                scheduler.shutdown(wait=False)
            return
        for job in jobs:
            with contextlib.suppress(Exception):  # already gone
                job.remove()
