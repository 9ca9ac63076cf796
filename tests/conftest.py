"""Suite-wide guard on what tests may leave in the logs.

Every test fails if "Task was destroyed but it is pending" shows up in a log record or on stdout/stderr. A directory
whose code owns tasks asks for more by overriding `forbidden_output` in its own conftest (tests/unit/session_guard,
tests/unit/letta). A test that provokes a message on purpose calls `no_destroyed_pending_tasks.expect(message)`.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Iterator

import pytest

DESTROYED = "Task was destroyed but it is pending"


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record is not ours to judge
            self.messages.append(str(record.msg))


class OutputCheck:
    def __init__(self) -> None:
        self.expected: list[str] = []

    def expect(self, needle: str) -> None:
        """This test provokes ``needle`` on purpose: it must appear, and is not a failure."""
        self.expected.append(needle)


@pytest.fixture
def forbidden_output() -> tuple[str, ...]:
    """What no test may log; conftests of stricter suites override this."""
    return (DESTROYED,)


@pytest.fixture(autouse=True)
def no_destroyed_pending_tasks(
    capfd: pytest.CaptureFixture[str], forbidden_output: tuple[str, ...]
) -> Iterator[OutputCheck]:
    """Set up before the test's event loop and torn down after it closed, so the garbage collection here catches
    tasks destroyed while pending."""
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
    out, err = capfd.readouterr()
    print(out, end="")  # give the captured output back to pytest's report
    print(err, end="", file=sys.stderr)
    text = "\n".join([*collector.messages, out, err])
    for needle in check.expected:
        assert needle in text, f"expected output {needle!r} did not appear"
        text = text.replace(needle, "")
    for needle in forbidden_output:
        if needle in text:
            pytest.fail(f"forbidden output {needle!r} appeared:\n{text[-4000:]}")
