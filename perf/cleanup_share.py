"""The coordinator's own share of a session's cleanup (from scripts/bench-cleanup): the real SessionGuard in-process on
a fake room (tests/unit/session_guard/fakes.py), `tasks` real tasks per session, no-op hooks; disconnect event →
every task cancelled and awaited → "cleanup finished" logged. Milliseconds per session.

`BENCH_METRICS=off|memory|multiprocess` (or `metrics=`): with the guard's Prometheus metrics, in-process values or the
mmap files of a worker's multiprocess mode, to measure their overhead."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator

from livekit.plugins.session_guard import GuardSession, SessionGuard
from livekit.plugins.session_guard.observe import GuardMetricsSink

from tests.unit.session_guard.fakes import HANGUP, SIGNAL_CLOSE, FakeRoom, fast_options

__all__ = ["HANGUP", "SIGNAL_CLOSE", "coordinator_share"]

METRICS_MODES = ("off", "memory", "multiprocess")


@contextlib.contextmanager
def _guard_metrics(mode: str) -> Iterator[GuardMetricsSink | None]:
    """The metrics sink for the guard under test (None: off)."""
    if mode not in METRICS_MODES:
        raise ValueError(f"BENCH_METRICS must be one of {', '.join(METRICS_MODES)}, got {mode!r}")
    if mode == "off":
        yield None
        return
    from livekit.plugins.session_guard.metrics import MultiprocessDir, SessionGuardMetrics
    from prometheus_client import CollectorRegistry

    if mode == "memory":
        yield SessionGuardMetrics(registry=CollectorRegistry())
        return
    directory = MultiprocessDir()
    directory.prepare()
    try:
        yield SessionGuardMetrics(registry=CollectorRegistry())
    finally:
        directory.close()


class _Finished(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.at: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "cleanup finished" in record.getMessage():
            self.at[str(getattr(record, "identity", ""))] = time.perf_counter()


async def coordinator_share(
    reason: int, sessions: int = 300, tasks: int = 8, metrics: str | None = None
) -> list[float]:
    """Latencies (ms) for `sessions` sessions ended by `reason` (a drop is then ended explicitly)."""
    with _guard_metrics(metrics or os.environ.get("BENCH_METRICS", "off")) as sink:
        return await _coordinator_share(reason, sessions, tasks, sink)


async def _coordinator_share(reason: int, sessions: int, tasks: int, sink: GuardMetricsSink | None) -> list[float]:
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options(), state_dir=None, metrics=sink)
    handler = _Finished()
    log = logging.getLogger("livekit.plugins.session_guard")
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    @guard.on_session_start
    async def start(session: GuardSession) -> None:
        for i in range(tasks):
            scope = session.scope if i % 2 else session.connection.scope
            scope.spawn(asyncio.sleep(3600), name=f"work-{i}")

    def spawned(identity: str) -> bool:
        s = guard.get(identity)
        return s is not None and len(s.scope) + len(s.connection.scope) >= tasks

    guard.attach()
    out: list[float] = []
    try:
        for i in range(sessions):
            p = room.add(f"u{i}")
            while not spawned(p.identity):  # noqa: ASYNC110 (a busy poll: the latency is the measurement)
                await asyncio.sleep(0)
            t0 = time.perf_counter()
            room.remove(p, reason)
            if reason != HANGUP:
                guard.end_session(p.identity)
            while p.identity not in handler.at:  # noqa: ASYNC110
                await asyncio.sleep(0)
            out.append((handler.at[p.identity] - t0) * 1000)
    finally:
        await guard.aclose()
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
    return out
