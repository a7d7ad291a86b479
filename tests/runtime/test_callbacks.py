"""Callbacks and leader work on the app's loop, fed from another thread as the election feeds
them: pairs always, in order, leader work begun before it is cancelled."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fastapi_leader.callbacks import Callbacks, LeaderWorkRevoked
from fastapi_leader.core import Cause, Demoted, Elected, LeaderChanged


def from_another_thread(action: object) -> None:
    thread = threading.Thread(target=action)  # type: ignore[arg-type]
    thread.start()
    thread.join()


async def settled(callbacks: Callbacks) -> None:
    # Posting goes through call_soon_threadsafe: let the loop take the posts, then drain.
    await asyncio.sleep(0)
    await asyncio.wait_for(callbacks.drain(), 10)


async def test_leadership_over_before_the_loop_ran_still_begins_its_work_then_demotes() -> None:
    # The race of issue 10: elected, resigned and demoted before the app's loop runs once.
    log: list[str] = []
    callbacks = Callbacks(lambda: "n1", timeout=5.0)
    callbacks.start()

    async def on_elected(token: int) -> None:
        log.append(f"began {token}")
        await asyncio.sleep(3600)
        log.append("never")

    callbacks.registry.on_elected.append(on_elected)
    callbacks.registry.on_demoted.append(lambda: log.append("demoted"))

    def election_thread() -> None:
        callbacks.post(Elected(term=7))
        callbacks.revoke(7)
        callbacks.post(Demoted(term=7, reason="resigned", cause=Cause.RESIGNED))

    from_another_thread(election_thread)
    await settled(callbacks)
    assert log == ["began 7", "demoted"]
    await callbacks.stop()


async def test_no_demoted_without_its_elected() -> None:
    log: list[str] = []
    callbacks = Callbacks(lambda: "n1", timeout=5.0)
    callbacks.start()
    callbacks.registry.on_elected.append(lambda token: log.append(f"elected {token}"))
    callbacks.registry.on_demoted.append(lambda: log.append("demoted"))
    from_another_thread(lambda: callbacks.post(Demoted(term=3, reason="x", cause=Cause.RESIGNED)))
    await settled(callbacks)
    assert log == []
    from_another_thread(
        lambda: (callbacks.post(Elected(4)), callbacks.post(Demoted(4, "x", Cause.RESIGNED)))
    )
    await settled(callbacks)
    assert log == ["elected 4", "demoted"]
    await callbacks.stop()


async def test_callbacks_run_on_the_app_loop_in_the_order_posted() -> None:
    app_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []
    callbacks = Callbacks(lambda: "n1", timeout=5.0)
    callbacks.start()
    here = lambda: threading.get_ident() == app_thread  # noqa: E731
    callbacks.registry.on_elected.append(lambda token: seen.append((f"elected {token}", here())))
    callbacks.registry.on_demoted.append(lambda: seen.append(("demoted", here())))
    callbacks.registry.on_leader_change.append(lambda who: seen.append((f"leader {who}", here())))

    def election_thread() -> None:
        callbacks.post(Elected(1))
        callbacks.post(LeaderChanged("n1", 1))
        callbacks.post(Demoted(1, "x", Cause.RESIGNED))
        callbacks.post(LeaderChanged(None, 1))

    from_another_thread(election_thread)
    await settled(callbacks)
    assert seen == [
        ("elected 1", True),
        ("leader n1", True),
        ("demoted", True),
        ("leader None", True),
    ]
    await callbacks.stop()


async def test_revoking_a_term_cancels_its_work_and_not_a_later_ones() -> None:
    callbacks = Callbacks(lambda: "n1", timeout=5.0)
    callbacks.start()
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        await asyncio.sleep(3600)
        return "finished"

    async def quick() -> str:
        await asyncio.sleep(0)
        return "finished"

    old = asyncio.ensure_future(callbacks.run_as_leader_work(work(), 5, "old"))
    await started.wait()
    from_another_thread(lambda: callbacks.revoke(5))
    with pytest.raises(LeaderWorkRevoked):
        await asyncio.wait_for(old, 10)
    assert await callbacks.run_as_leader_work(quick(), 6, "new") == "finished"
    # Work of a leadership already over begins (its first line runs) and ends at its first await.
    began: list[int] = []

    async def late() -> None:
        began.append(1)
        await asyncio.sleep(0)

    with pytest.raises(LeaderWorkRevoked):
        await callbacks.run_as_leader_work(late(), 5, "late")
    assert began == [1]
    await callbacks.stop()


async def test_stop_cancels_running_leader_work() -> None:
    callbacks = Callbacks(lambda: "n1", timeout=5.0)
    callbacks.start()
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = callbacks.leader_work(work(), 1, "work")
    await started.wait()
    await callbacks.stop()
    assert task.cancelled()
