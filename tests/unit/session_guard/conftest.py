from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

FORBIDDEN = (
    "Task was destroyed but it is pending",
    "Task exception was never retrieved",
    "failed to emit event",  # a room handler raised (the EventEmitter swallows it into a log line)
)

# hypothesis profiles for this suite; applied per test (not loaded globally, other suites keep theirs)
settings.register_profile(
    "session-guard-ci",
    max_examples=int(os.environ.get("SESSION_GUARD_CORE_EXAMPLES", "1000")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # a coroutine that was never awaited (a hook created but never run) is a bug here, not a warning
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.filterwarnings("error::RuntimeWarning"))


@pytest.fixture
def forbidden_output() -> tuple[str, ...]:
    """This suite also forbids lost task exceptions and failed room handlers (see tests/conftest.py)."""
    return FORBIDDEN
