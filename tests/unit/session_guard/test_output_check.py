"""The tripwire itself: a task destroyed while pending is seen by the check in tests/conftest.py."""

from __future__ import annotations

import asyncio
import gc

from tests.conftest import OutputCheck


def test_destroyed_pending_task_is_detected(no_destroyed_pending_tasks: OutputCheck) -> None:
    loop = asyncio.new_event_loop()

    async def waiter() -> None:
        await loop.create_future()  # a future nobody will ever resolve

    tasks = [loop.create_task(waiter())]
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    tasks.clear()
    gc.collect()
    no_destroyed_pending_tasks.expect("Task was destroyed but it is pending")
