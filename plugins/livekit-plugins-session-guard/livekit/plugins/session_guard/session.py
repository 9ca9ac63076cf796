"""What a hook receives: one human's session (``GuardSession``) and its current connection (``Connection``).

A ``GuardSession`` holds no lifecycle state of its own: ``state``, ``resumes``, ``end_reason`` and
``disconnect_reason`` are read from the core's record of this generation (the one source of truth); once the core
forgot the session, from the last record it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from livekit import rtc
from livekit.agents import llm

from .core import (
    ActivityNoted,
    AwayNoted,
    EndReason,
    EndRequested,
    ErrorNoted,
    SessionRecord,
    SessionState,
    SuccessNoted,
)
from .hooks import NoticeHook
from .log import logger
from .resume import ResumeState
from .scope import TaskScope

if TYPE_CHECKING:
    from livekit.agents import Agent, AgentSession, room_io

    from .guard import SessionGuard

__all__ = ["Connection", "GuardSession"]


class Connection:
    """One connection (one SID) of a session. Its scope is closed when the user goes AWAY, when a new
    connection takes over, and when the session ends: put per-connection work (the AgentSession of this
    connection) there."""

    def __init__(
        self,
        *,
        sid: str,
        index: int,
        participant: rtc.RemoteParticipant | None,
        scope: TaskScope,
        connected_at: float,
    ) -> None:
        self.sid = sid
        self.index = index
        self.participant = participant
        self.scope = scope
        self.connected_at = connected_at
        self.notice_handlers: list[NoticeHook] = []

    def __repr__(self) -> str:
        return f"Connection(sid={self.sid!r}, index={self.index}, scope={self.scope!r})"


class GuardSession:
    """One human's session (one generation): what every hook receives."""

    def __init__(
        self,
        guard: SessionGuard,
        record: SessionRecord,
        *,
        connection: Connection,
        scope: TaskScope,
    ) -> None:
        self._guard = guard
        self._last = record
        self.identity = record.identity
        self.generation = record.generation
        self.scope = scope
        """Per-session scope: tasks here live until the session ENDS (survive AWAY / resume)."""
        self.connection = connection
        """The current (or last) connection; ``connection.scope`` stops on AWAY."""
        self.userdata: dict[str, Any] = {}
        """State of the app and plugins for this session, in this process; cleared when the session ends."""
        self.shared: dict[str, Any] = {}
        """JSON-able state that follows the session to another process (saved with its ``ResumeState``; restored
        when a job adopts the session after a crash or a handoff), e.g. ``{"letta": {"conversation_id": ...}}``."""
        self.tracks: dict[str, rtc.RemoteTrackPublication | None] = {}
        """Track publications of the current connection, by track SID."""
        self.session_id = uuid.uuid4().hex
        """Stable for the whole session (all its connections); the key of its saved ``ResumeState``."""
        self.fresh = True
        """True while this session's start runs (a new conversation); False while a connection resumes it."""
        self.started_at = time.time()
        self._started_mono = guard._now()
        self.adopted = False
        """This process took the session over from saved state (another job owned it before: a crash, a deploy)."""
        self._resumes_before = 0  # resumes counted by the processes that owned the session before this one
        self._history_base: llm.ChatContext | None = None  # the saved history this connection started from
        self._history_fn: Callable[[], llm.ChatContext] | None = None
        self._save_wanted: asyncio.Event | None = None
        self._start_hooks_invoked = False
        self._start_done: set[int] = set()  # indices of start hooks that completed

    # -- read from the core

    def _record(self) -> SessionRecord:
        rec = self._guard._state.sessions.get(self.identity)
        if rec is not None and rec.generation == self.generation:
            self._last = rec
        return self._last

    @property
    def state(self) -> SessionState:
        return self._record().state

    @property
    def resumes(self) -> int:
        return self._resumes_before + self._record().resumes

    @property
    def end_reason(self) -> EndReason | None:
        return self._record().end_reason

    @property
    def disconnect_reason(self) -> int | None:
        return self._record().disconnect_reason

    @property
    def room_name(self) -> str:
        return self._guard.room_name

    @property
    def sid(self) -> str:
        return self.connection.sid

    @property
    def participant(self) -> rtc.RemoteParticipant | None:
        return self.connection.participant

    @property
    def duration(self) -> float:
        return self._guard._now() - self._started_mono

    # -- the AgentSession of this connection

    async def start(
        self,
        agent_session: AgentSession[Any],
        agent: Agent,
        *,
        room_options: room_io.RoomOptions | None = None,
        **start_kwargs: Any,
    ) -> None:
        """Start ``agent_session`` for this connection, as the guard needs it (``connect.start_agent_session``):
        linked to this identity, not closed by RoomIO on disconnect, typed text through the room's chat router,
        the history of the previous connection on a resume, and bound to the guard (activity, errors, notices;
        history saved and the AgentSession closed when the connection stops)."""
        from .connect import start_agent_session

        await start_agent_session(self, agent_session, agent, room_options=room_options, **start_kwargs)

    async def resume_state(self) -> ResumeState | None:
        """What this session saved when its previous connection stopped (None on a fresh session)."""
        state = await self._guard.resume_store.load(self.room_name, self.identity)
        return state if state is not None and state.session_id == self.session_id else None

    async def save_resume_state(self, history: llm.ChatContext) -> None:
        """Save this session for its next connection, here or in another process: ``history`` (the current
        AgentSession's) on top of the history this connection started from, ``shared``, the start time, resumes."""
        if self._history_base is not None:
            history = self._history_base.copy().merge(history)
        state = ResumeState.of(
            self.room_name,
            self.identity,
            self.session_id,
            history,
            shared=self.shared,
            started_at=self.started_at,
            resumes=self.resumes,
        )
        await self._guard.resume_store.save(state)

    def set_history_source(self, history: Callable[[], llm.ChatContext]) -> None:
        """Where the session's history comes from now (the current connection's AgentSession)."""
        self._history_fn = history

    def save_soon(self) -> None:
        """Save the session with the history last given to ``note_history`` (nothing before an AgentSession)."""
        if self._history_fn is not None:
            self.note_history(self._history_fn)

    def note_history(self, history: Callable[[], llm.ChatContext]) -> None:
        """The conversation moved on (a turn, an item): save it soon. Saves are coalesced, in order, by one task of
        the session scope; ``history`` is read when the save runs."""
        self._history_fn = history
        if self._save_wanted is None:
            self._save_wanted = asyncio.Event()
            try:
                self.scope.spawn(self._saver(self._save_wanted), name="save_resume_state")
            except Exception:  # the session is ending: its cleanup saves nothing more
                self._save_wanted = None
                return
        self._save_wanted.set()

    async def _saver(self, wanted: asyncio.Event) -> None:
        while True:
            await wanted.wait()
            wanted.clear()
            fn = self._history_fn
            if fn is None:
                continue
            try:
                await self.save_resume_state(fn())
            except Exception as e:
                logger.warning("[SESSION] saving the session failed: %r", e, extra={"room": self.room_name})

    def adopt(self, state: ResumeState) -> None:
        """Take this session over from ``state`` (saved by the job that owned it before)."""
        self.session_id = state.session_id
        self.shared = dict(state.shared)
        if state.started_at:
            self.started_at = state.started_at
        self._resumes_before = state.resumes + 1
        self.adopted = True

    # -- signals from the app (all no-ops once this generation is no longer current)

    def note_activity(self) -> None:
        """The user said or typed something (or is back from "away"): stops the idle policy."""
        self._guard._dispatch(ActivityNoted(self.identity, self.generation, self._guard._now()))

    def note_away(self) -> None:
        """The user went quiet (the AgentSession's user state "away"): the idle policy starts counting."""
        self._guard._dispatch(AwayNoted(self.identity, self.generation, self._guard._now()))

    def note_error(self, kind: str, *, fatal: bool = False) -> None:
        """``fatal``: end the session (reason ERRORS); otherwise counts toward ``max_consecutive_errors`` if set."""
        self._guard._dispatch(ErrorNoted(self.identity, self.generation, kind, fatal, self._guard._now()))

    def note_success(self) -> None:
        """A successful agent reply: resets the consecutive-error breaker."""
        self._guard._dispatch(SuccessNoted(self.identity, self.generation, self._guard._now()))

    def end(self, reason: EndReason = EndReason.REQUESTED) -> None:
        """End this session now (cleanup runs in the background, exactly once)."""
        self._guard._dispatch(EndRequested(self.identity, self.generation, reason, self._guard._now()))

    def add_notice_handler(self, handler: NoticeHook) -> Callable[[], None]:
        """Deliver notices of the *current connection* through ``handler`` (e.g. ``AgentSession.say``).
        Dropped when the connection stops; returns a function that removes it earlier."""
        conn = self.connection
        conn.notice_handlers.append(handler)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                conn.notice_handlers.remove(handler)

        return remove

    def snapshot(self) -> dict[str, Any]:
        return {
            "room": self.room_name,
            "identity": self.identity,
            "sid": self.sid,
            "state": self.state.value,
            "started_at": round(self.started_at, 3),
            "tasks": len(self.scope) + len(self.connection.scope),
            "generation": self.generation,
            "resumes": self.resumes,
            "session_id": self.session_id,
            "adopted": self.adopted,
        }

    def __repr__(self) -> str:
        return (
            f"GuardSession(identity={self.identity!r}, generation={self.generation}, sid={self.sid!r}, "
            f"state={self.state.value})"
        )
