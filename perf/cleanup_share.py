"""The coordinator's own share of a session's cleanup (from scripts/bench-cleanup): the real SessionGuard in-process on
a fake room (tests/unit/session_guard/fakes.py), `tasks` real tasks per session, no-op hooks; disconnect event →
every task cancelled and awaited → "cleanup finished" logged. Milliseconds per session."""

from __future__ import annotations

import asyncio
import logging
import time

from livekit.plugins.session_guard import GuardSession, SessionGuard

from tests.unit.session_guard.fakes import HANGUP, SIGNAL_CLOSE, FakeRoom, fast_options

__all__ = ["HANGUP", "SIGNAL_CLOSE", "coordinator_share"]


class _Finished(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.at: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "cleanup finished" in record.getMessage():
            self.at[str(getattr(record, "identity", ""))] = time.perf_counter()


async def coordinator_share(reason: int, sessions: int = 300, tasks: int = 8) -> list[float]:
    """Latencies (ms) for `sessions` sessions ended by `reason` (a drop is then ended explicitly)."""
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options(), state_dir=None)
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
