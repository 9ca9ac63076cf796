"""The resume seam: what a returning connection resumes from is *saved state*, as data.

When a connection stops (AWAY, takeover), the guard saves ``ResumeState`` (identity, the session's id, the chat
history as ``ChatContext.to_dict()``) in a ``ResumeStore``; the next connection of that session starts its
AgentSession from what it loads. In one process the store is a dict (``MemoryResumeStore``); a store that lives
outside the process (Redis) makes the same code path resume a session in another process. The guard drops the
state when the session ends, so a hang-up never resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from livekit.agents import llm

__all__ = ["MemoryResumeStore", "ResumeState", "ResumeStore"]


@dataclass(frozen=True)
class ResumeState:
    room: str
    identity: str
    session_id: str
    """Stable for the whole session, across its connections (``GuardSession.session_id``)."""
    chat: dict[str, Any]
    """``ChatContext.to_dict()`` of the connection that stopped (text only: no audio, no images)."""
    saved_at: float = field(default_factory=time.time)
    shared: dict[str, Any] = field(default_factory=dict)
    """``GuardSession.shared`` when saved: JSON-able data of the app and plugins that must follow the session to
    another process (e.g. the Letta conversation id)."""
    started_at: float = 0.0
    """Wall-clock start of the session (its first connection), for ``max_duration`` across processes."""
    resumes: int = 0
    """Resumes so far (``GuardSession.resumes`` when saved)."""

    def chat_ctx(self) -> llm.ChatContext:
        return llm.ChatContext.from_dict(self.chat)

    @classmethod
    def of(
        cls,
        room: str,
        identity: str,
        session_id: str,
        history: llm.ChatContext,
        *,
        shared: dict[str, Any] | None = None,
        started_at: float = 0.0,
        resumes: int = 0,
    ) -> ResumeState:
        return cls(
            room,
            identity,
            session_id,
            history.to_dict(exclude_function_call=False),
            shared=dict(shared or {}),
            started_at=started_at,
            resumes=resumes,
        )


class ResumeStore(Protocol):
    async def save(self, state: ResumeState) -> None: ...

    async def load(self, room: str, identity: str) -> ResumeState | None: ...

    async def drop(self, room: str, identity: str) -> None: ...


class MemoryResumeStore:
    """The in-process store (one per guard): resumes within this job process only."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str], ResumeState] = {}

    async def save(self, state: ResumeState) -> None:
        self._states[(state.room, state.identity)] = state

    async def load(self, room: str, identity: str) -> ResumeState | None:
        return self._states.get((room, identity))

    async def drop(self, room: str, identity: str) -> None:
        self._states.pop((room, identity), None)

    def __len__(self) -> int:
        return len(self._states)
