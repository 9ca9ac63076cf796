"""Suite-wide guards: nothing may log "Task was destroyed but it is pending"."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

DESTROYED = "Task was destroyed but it is pending"


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return
        if DESTROYED in msg:
            self.hits.append(msg)


@pytest.fixture(autouse=True)
def _no_destroyed_pending_tasks(capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield
    finally:
        root.removeHandler(collector)
    out, err = capfd.readouterr()
    # Give the captured output back to pytest's report.
    print(out, end="")
    import sys

    print(err, end="", file=sys.stderr)
    found = collector.hits + [line for line in (out + err).splitlines() if DESTROYED in line]
    if found:
        pytest.fail(f"{DESTROYED!r} was logged:\n" + "\n".join(found[:5]))
