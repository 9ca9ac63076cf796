from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
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


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:
            self.messages.append(str(record.msg))


class OutputCheck:
    def __init__(self) -> None:
        self.expected: list[str] = []

    def expect(self, needle: str) -> None:
        """This test provokes ``needle`` on purpose: it must appear, and is not a failure."""
        self.expected.append(needle)


@pytest.fixture(autouse=True)
def no_destroyed_pending_tasks() -> Iterator[OutputCheck]:
    """Fail the test if asyncio (or a room emitter) complained about a lost task or a failed handler.

    Autouse and function-scoped: set up before the test's event loop, torn down after it closed, so the
    garbage collection here catches tasks destroyed while pending.
    """
    collector = _Collector()
    watched = [logging.getLogger(), logging.getLogger("asyncio"), logging.getLogger("livekit")]
    for lg in watched:
        lg.addHandler(collector)
    check = OutputCheck()
    try:
        yield check
        gc.collect()
    finally:
        for lg in watched:
            lg.removeHandler(collector)
    text = "\n".join(collector.messages)
    for needle in check.expected:
        assert needle in text, f"expected output {needle!r} did not appear"
        text = text.replace(needle, "")
    for needle in FORBIDDEN:
        assert needle not in text, f"forbidden output {needle!r} appeared:\n{text[-4000:]}"
