"""One AgentSession per connection, started the way a guarded session needs it.

LiveKit's AgentSession is not meant to be restarted (a restarted session never auto-closes again), so every
(re)connection gets a new one, made by the app; on a resume it starts from the saved state of the previous
connection (``resume.ResumeState``: the chat history as data), on a fresh session from nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from livekit.agents import Agent, AgentSession, room_io

from .binding import bind_agent_session

if TYPE_CHECKING:
    from .session import GuardSession

__all__ = ["guarded_room_options", "start_agent_session"]


def guarded_room_options(session: GuardSession, base: room_io.RoomOptions | None = None) -> room_io.RoomOptions:
    """The app's RoomOptions with what the guard must decide:

    - ``participant_identity``: this session's human (one AgentSession per human, not "the first participant");
    - ``close_on_disconnect=False``: the guard decides what a disconnect means (hang-up vs network drop);
    - ``text_input=False`` when the guard routes the room's ``lk.chat`` (``chat.ChatRouter``: one owner of the
      topic per room, messages held across a reconnect).
    """
    opts = base or room_io.RoomOptions()
    changes: dict[str, Any] = {"participant_identity": session.identity, "close_on_disconnect": False}
    if session._guard.chat_router is not None:
        changes["text_input"] = False
    return dataclasses.replace(opts, **changes)


async def start_agent_session(
    session: GuardSession,
    agent_session: AgentSession[Any],
    agent: Agent,
    *,
    room_options: room_io.RoomOptions | None = None,
    **start_kwargs: Any,
) -> None:
    state = None if session.fresh else await session.resume_state()
    if state is not None:
        base = state.chat_ctx()
        session._history_base = base  # what this connection saves is this history plus its own
        await agent.update_chat_ctx(base.copy())  # before start: sets the agent's initial context
    # The guard's own count of failed turns only when the app asked for it (options.max_consecutive_errors): the
    # AgentSession's breaker resets whenever the agent speaks, so an app that apologises aloud never trips it.
    bind_agent_session(session, agent_session, count_errors=session._guard.options.max_consecutive_errors is not None)
    await agent_session.start(
        agent,
        room=session._guard.room,
        room_options=guarded_room_options(session, room_options),
        **start_kwargs,
    )
    router = session._guard.chat_router
    if router is not None:
        router.set_target(session.identity, agent_session)
