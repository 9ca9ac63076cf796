"""The suite's own tripwire: a task destroyed while pending is seen by the conftest check."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from .conftest import OutputCheck


@pytest.fixture(autouse=True)
def _no_destroyed_pending_tasks() -> Iterator[None]:
    """Overrides the suite-wide tripwire (tests/conftest.py) for this module only: the test below provokes
    the message on purpose and checks that this directory's own tripwire sees it."""
    yield


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
