"""TaskScope: one owner for a group of tasks, bounded close, leaks kept referenced and reported."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from livekit.plugins.session_guard.scope import LeakKeeper, ScopeClosedError, TaskScope


async def forever() -> None:
    await asyncio.Event().wait()


async def test_spawn_from_a_plain_callback_and_close_cancels_everything() -> None:
    scope = TaskScope("s")
    loop = asyncio.get_running_loop()
    spawned: list[asyncio.Task[None]] = []
    loop.call_soon(lambda: spawned.append(scope.spawn(forever(), name="from_callback")))
    spawned.append(scope.spawn(forever()))
    await asyncio.sleep(0.01)
    assert len(scope) == 2 and {t.get_name() for t in spawned} == {"s:from_callback", "s:task"}
    result = await scope.aclose(1.0)
    assert result.cancelled == 2 and not result.leaked
    assert all(t.cancelled() for t in spawned) and len(scope) == 0


async def test_finished_tasks_leave_the_scope() -> None:
    scope = TaskScope("s")

    async def quick() -> int:
        return 1

    task = scope.spawn(quick())
    assert await task == 1
    await asyncio.sleep(0)
    assert len(scope) == 0
    await scope.aclose(0.1)


async def test_failed_task_is_logged_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    scope = TaskScope("s")

    async def boom() -> None:
        raise ValueError("kaput")

    scope.spawn(boom(), name="boom")
    await asyncio.sleep(0.01)
    assert scope.errors == 1
    assert any("s:boom failed" in r.getMessage() and r.exc_info for r in caplog.records)
    await scope.aclose(0.1)


async def test_spawn_after_close_raises_without_an_unawaited_coroutine() -> None:
    scope = TaskScope("s")
    await scope.aclose(0.1)
    with pytest.raises(ScopeClosedError):
        scope.spawn(forever())  # closed by spawn: no "coroutine was never awaited" (an error here)


async def test_close_is_bounded_and_a_stubborn_task_is_kept_until_it_finishes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    keeper = LeakKeeper()
    scope = TaskScope("s", leak_keeper=keeper)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    task = scope.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)  # let it start (a task cancelled before its first step just ends)
    t0 = time.monotonic()
    result = await scope.aclose(0.1)
    assert time.monotonic() - t0 < 2.0  # bounded: the task itself would never end
    assert result.leaked == ["s:stubborn"] and keeper.tasks == {task}
    assert any("ignored cancellation" in r.getMessage() and "stubborn" in r.getMessage() for r in caplog.records)
    release.set()
    assert await keeper.wait(1.0)
    assert len(keeper) == 0 and task.done()
    assert any("finally finished" in r.getMessage() for r in caplog.records)


async def test_close_is_idempotent_and_counts_errors_raised_while_closing() -> None:
    scope = TaskScope("s")

    async def fails_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")

    scope.spawn(fails_on_cancel())
    await asyncio.sleep(0)
    first = await scope.aclose(0.5)
    second = await scope.aclose(0.5)
    assert first.errors == 1 and second.cancelled == 0 and scope.closed
