"""Wire a livekit ``AgentSession`` to a guard session.

``bind_agent_session(session, agent_session)`` (call it in a start/resume hook, after creating the
AgentSession of this connection):

- ``user_state_changed`` → "away" (the framework's ``user_away_timeout`` of silence) → ``note_away``: the
  guard's idle policy starts; back from away, ``user_input_transcribed``, speaking, and user
  ``conversation_item_added`` (typed text) → ``note_activity``: it stops;
- ``close`` with reason ERROR → a fatal error: the AgentSession's own breaker (``max_unrecoverable_errors``)
  tripped, so the session ends (``EndReason.ERRORS``). The guard keeps no second count of the same errors;
  ``count_errors=True`` forwards unrecoverable ``error`` events to ``note_error`` for an app that also sets
  ``max_consecutive_errors`` (an assistant reply with text → ``note_success`` resets it);
- notices of this connection (idle warning, goodbyes) → ``agent_session.say(text)``, awaited to playout.

The binding lives in the connection scope: when the connection stops (AWAY, takeover, end), its handlers
are removed, the chat history is saved for a resume (a ``ResumeState`` in the guard's resume store:
:func:`saved_chat_ctx`) and the AgentSession is closed (``aclose``), within the scope's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from livekit.agents import AgentSession, llm
from livekit.agents.voice.events import (
    AgentStateChangedEvent,
    CloseEvent,
    CloseReason,
    ConversationItemAddedEvent,
    ErrorEvent,
    UserInputTranscribedEvent,
    UserStateChangedEvent,
)

from .hooks import Notice
from .log import logger
from .session import GuardSession

__all__ = ["REPLY_STARTED_KEY", "AgentSessionBinding", "bind_agent_session", "saved_chat_ctx"]

REPLY_STARTED_KEY = "session_guard.reply_started_after"
"""``GuardSession.shared`` key: the id of the user message the agent started speaking a reply to, until that reply is
in the history. Read by whoever finishes a turn the previous process left (``livekit.plugins.letta``)."""


def _last_message(history: llm.ChatContext) -> llm.ChatMessage | None:
    for item in reversed(history.items):
        if isinstance(item, llm.ChatMessage):
            return item
    return None


async def saved_chat_ctx(session: GuardSession) -> llm.ChatContext | None:
    """The chat history saved when this session's previous connection stopped (for a resume), if any."""
    state = await session.resume_state()
    return state.chat_ctx() if state is not None else None


class AgentSessionBinding:
    def __init__(
        self,
        session: GuardSession,
        agent_session: AgentSession[Any],
        *,
        count_errors: bool,
        count_recoverable_errors: bool,
        end_on_error_close: bool,
        keep_history: bool,
        close_on_stop: bool,
    ) -> None:
        self.session = session
        self.agent_session = agent_session
        self._count_errors = count_errors
        self._count_recoverable = count_recoverable_errors
        self._end_on_error_close = end_on_error_close
        self._keep_history = keep_history
        self._close_on_stop = close_on_stop
        self._handlers: list[tuple[str, Callable[..., None]]] = [
            ("user_input_transcribed", self._on_user_input_transcribed),
            ("user_state_changed", self._on_user_state_changed),
            ("agent_state_changed", self._on_agent_state_changed),
            ("conversation_item_added", self._on_conversation_item_added),
            ("error", self._on_error),
            ("close", self._on_close),
        ]
        for event, handler in self._handlers:
            agent_session.on(event, handler)  # type: ignore[arg-type]
        self._remove_notice = session.add_notice_handler(self._speak)
        self._detached = False
        if keep_history:
            # what the session saves from now on (after each item; the guard saves once the connection's hooks ran)
            session.set_history_source(self._history)

    def _history(self) -> llm.ChatContext:
        return self.agent_session.history

    # -- plain-function handlers

    def _on_user_input_transcribed(self, ev: UserInputTranscribedEvent) -> None:
        self.session.note_activity()

    def _on_user_state_changed(self, ev: UserStateChangedEvent) -> None:
        if ev.new_state == "away":
            self.session.note_away()
        elif ev.new_state == "speaking" or ev.old_state == "away":
            self.session.note_activity()

    def _on_agent_state_changed(self, ev: AgentStateChangedEvent) -> None:
        """The agent starts speaking: if it answers a user message, say so in the saved state before the reply is
        in the history (that happens only after playout). A process that dies in between leaves the mark, and the
        one that adopts the session knows the user heard (part of) a reply: it must not say it again."""
        if ev.new_state != "speaking" or not self._keep_history:
            return
        last = _last_message(self.agent_session.history)
        if last is not None and last.role == "user":
            self.session.shared[REPLY_STARTED_KEY] = last.id
            self.session.note_history(self._history)

    def _on_conversation_item_added(self, ev: ConversationItemAddedEvent) -> None:
        item = ev.item
        if self._keep_history:
            if isinstance(item, llm.ChatMessage) and item.role == "assistant":
                self.session.shared.pop(REPLY_STARTED_KEY, None)  # the reply is in the history now
            self.session.note_history(self._history)  # saved for a resume here or in another process
        if not isinstance(item, llm.ChatMessage):
            return
        if item.role == "user":
            self.session.note_activity()
        elif item.role == "assistant" and item.text_content:
            self.session.note_success()

    def _on_error(self, ev: ErrorEvent) -> None:
        err = ev.error
        if not self._count_errors or (getattr(err, "recoverable", False) and not self._count_recoverable):
            return
        kind = str(getattr(err, "type", None) or type(err).__name__)
        self.session.note_error(kind)

    def _on_close(self, ev: CloseEvent) -> None:
        if ev.reason == CloseReason.ERROR and self._end_on_error_close:
            kind = str(getattr(ev.error, "type", None) or "agent_session_error")
            self.session.note_error(kind, fatal=True)

    async def _speak(self, session: GuardSession, notice: Notice) -> None:
        if not notice.text:
            return
        handle = self.agent_session.say(notice.text, allow_interruptions=False)
        await handle.wait_for_playout()

    # -- lifetime

    def detach(self) -> None:
        if self._detached:
            return
        self._detached = True
        for event, handler in self._handlers:
            with contextlib.suppress(Exception):
                self.agent_session.off(event, handler)  # type: ignore[arg-type]
        self._remove_notice()

    async def hold(self) -> None:
        """Runs in the connection scope until it is cancelled, then lets go of the AgentSession."""
        try:
            await asyncio.Event().wait()
        finally:
            self.detach()
            if self._keep_history:
                try:
                    await self.session.save_resume_state(self.agent_session.history)
                except Exception as e:
                    logger.warning("[SESSION] could not save the chat history: %r", e)
            if self._close_on_stop:
                await self.agent_session.aclose()


def bind_agent_session(
    session: GuardSession,
    agent_session: AgentSession[Any],
    *,
    count_errors: bool = False,
    count_recoverable_errors: bool = False,
    end_on_error_close: bool = True,
    keep_history: bool = True,
    close_on_stop: bool = True,
) -> AgentSessionBinding:
    """Bind ``agent_session`` to the current connection of ``session`` (see the module docstring)."""
    binding = AgentSessionBinding(
        session,
        agent_session,
        count_errors=count_errors,
        count_recoverable_errors=count_recoverable_errors,
        end_on_error_close=end_on_error_close,
        keep_history=keep_history,
        close_on_stop=close_on_stop,
    )
    try:
        session.connection.scope.spawn(binding.hold(), name="agent_session")
    except Exception:
        binding.detach()
        raise
    return binding
