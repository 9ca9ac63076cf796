"""A fake room that emits the same events as ``rtc.Room`` with fake participants, and small helpers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any, cast

from livekit import rtc
from livekit.plugins.session_guard import SessionGuard, SessionGuardOptions

STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP
EGRESS = rtc.ParticipantKind.PARTICIPANT_KIND_EGRESS
INGRESS = rtc.ParticipantKind.PARTICIPANT_KIND_INGRESS

DR = rtc.DisconnectReason
HANGUP = DR.CLIENT_INITIATED
DUPLICATE = DR.DUPLICATE_IDENTITY
SIGNAL_CLOSE = DR.SIGNAL_CLOSE


class FakePublication:
    def __init__(self, sid: str, kind: int = rtc.TrackKind.KIND_AUDIO) -> None:
        self.sid = sid
        self.kind = kind

    def __repr__(self) -> str:
        return f"FakePublication({self.sid!r})"


class FakeParticipant:
    def __init__(self, identity: str, sid: str, kind: int = STANDARD) -> None:
        self.identity = identity
        self.sid = sid
        self.kind = kind
        self.disconnect_reason: int | None = None
        self.track_publications: dict[str, FakePublication] = {}

    def __repr__(self) -> str:
        return f"FakeParticipant({self.identity!r}, {self.sid!r})"


class FakeRoom(rtc.EventEmitter[str]):
    """Emits participant_connected / participant_disconnected / track_published / track_unpublished /
    connected / disconnected / reconnecting / reconnected like ``rtc.Room`` (handlers must be plain
    functions: the real EventEmitter enforces it)."""

    def __init__(self, name: str = "room-1") -> None:
        super().__init__()
        self.name = name
        self.remote_participants: dict[str, FakeParticipant] = {}
        self._sids = itertools.count(1)
        self._tracks = itertools.count(1)

    def add(self, identity: str, *, kind: int = STANDARD, emit: bool = True) -> FakeParticipant:
        p = FakeParticipant(identity, f"PA_{identity}_{next(self._sids)}", kind)
        self.remote_participants[identity] = p
        if emit:
            self.emit("participant_connected", p)
        return p

    def remove(self, p: FakeParticipant, reason: int | None) -> None:
        p.disconnect_reason = reason if reason else None  # UNKNOWN_REASON reads as None, like the SDK
        if self.remote_participants.get(p.identity) is p:
            del self.remote_participants[p.identity]
        self.emit("participant_disconnected", p)

    def publish(self, p: FakeParticipant, *, emit: bool = True) -> FakePublication:
        pub = FakePublication(f"TR_{next(self._tracks)}")
        p.track_publications[pub.sid] = pub
        if emit:
            self.emit("track_published", pub, p)
        return pub

    def unpublish(self, p: FakeParticipant, pub: FakePublication) -> None:
        p.track_publications.pop(pub.sid, None)
        self.emit("track_unpublished", pub, p)

    def agent_disconnected(self, reason: int = DR.ROOM_DELETED) -> None:
        self.emit("disconnected", reason)

    def handler_count(self) -> int:
        return sum(len(v) for v in self._events.values())

    @property
    def as_room(self) -> rtc.Room:
        return cast(rtc.Room, self)


def fast_options(**overrides: Any) -> SessionGuardOptions:
    """Options with every bound short enough for unit tests (limits off unless asked for)."""
    base: dict[str, Any] = {
        "reconnect_window": 5.0,
        "max_duration": None,
        "idle_timeout": None,
        "max_consecutive_errors": 5,
        "hook_timeout": 1.0,
        "notice_timeout": 1.0,
        "task_cancel_timeout": 0.3,
        "leak_grace": 0.1,
        "shutdown_timeout": 3.0,
        "publish_debounce": 0.01,
        "publish_interval": 0.5,
    }
    base.update(overrides)
    return SessionGuardOptions(**base)


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def settle(guard: SessionGuard, timeout: float = 3.0) -> None:
    """Wait until no session has queued or running work (every runner idle or gone)."""

    def idle() -> bool:
        for runner in list(guard._runners.values()):
            if runner.queue or runner.busy:
                return False
            if runner.cleanup_job is not None and not runner.finished:
                return False
        return True

    # let handlers' follow-up tasks start, then wait for quiet
    await asyncio.sleep(0)
    await wait_for(idle, timeout, "the guard to settle")
    await asyncio.sleep(0)


class HookLog:
    """Records hook calls in order: ("start", identity, generation), ("end", identity, gen, reason)..."""

    def __init__(self, guard: SessionGuard) -> None:
        self.calls: list[tuple[Any, ...]] = []
        guard.on_session_start(self.start)
        guard.on_session_resume(self.resume)
        guard.on_session_away(self.away)
        guard.on_session_end(self.end)
        guard.on_notice(self.notice)
        guard.on_last_human_gone(self.last_human)

    async def start(self, s: Any) -> None:
        self.calls.append(("start", s.identity, s.generation))

    async def resume(self, s: Any) -> None:
        self.calls.append(("resume", s.identity, s.generation))

    async def away(self, s: Any) -> None:
        self.calls.append(("away", s.identity, s.generation))

    async def end(self, s: Any, reason: Any) -> None:
        self.calls.append(("end", s.identity, s.generation, reason))

    async def notice(self, s: Any, notice: Any) -> None:
        self.calls.append(("notice", s.identity, notice.kind))

    async def last_human(self) -> None:
        self.calls.append(("last_human",))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]
