"""Fixtures for the Letta plugin's unit tests: a fake Letta (no server), a job scope, a backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import pytest
from letta_client import AsyncLetta
from livekit.plugins.letta import LettaOptions, LettaTurnOptions
from livekit.plugins.letta._scope import TaskScope
from livekit.plugins.letta.backend import LettaBackend

from tests.unit.letta.fake_letta import FakeLetta

FORBIDDEN = ("Task was destroyed but it is pending", "Task exception was never retrieved")


@pytest.fixture
def forbidden_output() -> tuple[str, ...]:
    """This suite also forbids lost task exceptions (see tests/conftest.py)."""
    return FORBIDDEN


@pytest.fixture
def fake() -> Iterator[FakeLetta]:
    f = FakeLetta()
    yield f
    f.close_tails()


@pytest.fixture
async def scope() -> AsyncIterator[TaskScope]:
    s = TaskScope("test-job")
    yield s
    assert await s.aclose(2.0) == []


def fast(**overrides: Any) -> LettaOptions:
    """Options with bounds short enough for unit tests."""
    turn = overrides.pop("turn", None) or LettaTurnOptions(first_token_timeout=2.0, total_timeout=4.0, max_steps=6)
    base: dict[str, Any] = {
        "request_timeout": 0.5,
        "settle_timeout": 0.5,
        "busy_retry_interval": 0.01,
        "retry_initial": 0.05,
        "retry_max": 0.2,
        "close_timeout": 0.5,
    }
    base.update(overrides)
    return LettaOptions(turn=turn, **base)


def as_client(fake: FakeLetta) -> AsyncLetta:
    return cast(AsyncLetta, fake)


def make_backend(fake: FakeLetta, scope: TaskScope, **overrides: Any) -> LettaBackend:
    return LettaBackend(as_client(fake), fast(**overrides), scope=scope)
