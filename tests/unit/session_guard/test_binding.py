"""bind_agent_session: AgentSession events drive activity, the error breaker and notices."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from livekit import rtc
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
from livekit.plugins.session_guard import (
    EndReason,
    GuardSession,
    SessionGuard,
    SessionState,
)
from livekit.plugins.session_guard.binding import REPLY_STARTED_KEY, bind_agent_session, saved_chat_ctx

from .fakes import HANGUP, SIGNAL_CLOSE, FakeRoom, HookLog, fast_options, settle, wait_for


class FakeSpeech:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def wait_for_playout(self) -> None:
        await asyncio.sleep(self.delay)


class FakeAgentSession(rtc.EventEmitter[str]):
    """What the binding uses of AgentSession: on/off, say, history, aclose."""

    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []
        self.closed = False
        self.history = llm.ChatContext()
        self.history.add_message(role="user", content="hello")

    def say(self, text: str, *, allow_interruptions: bool = True) -> FakeSpeech:
        self.said.append(text)
        return FakeSpeech(0.01)

    async def aclose(self) -> None:
        await asyncio.sleep(0.01)
        self.closed = True

    @property
    def as_agent_session(self) -> AgentSession[Any]:
        return cast(AgentSession[Any], self)


def llm_error(recoverable: bool = False) -> ErrorEvent:
    err = llm.LLMError(timestamp=time.time(), label="test", error=RuntimeError("x"), recoverable=recoverable)
    return ErrorEvent(error=err, source=None)


def reply(text: str, role: str = "assistant") -> ConversationItemAddedEvent:
    return ConversationItemAddedEvent(item=llm.ChatMessage(role=role, content=[text]))  # type: ignore[arg-type]


async def started(guard: SessionGuard, room: FakeRoom, identity: str = "alice") -> GuardSession:
    room.add(identity)
    await settle(guard)
    session = guard.get(identity)
    assert session is not None
    return session


async def test_error_events_alone_never_end_the_session_by_default() -> None:
    """One breaker: the AgentSession's own. Its error events are not counted a second time by the guard."""
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options(max_consecutive_errors=None))
    log = HookLog(guard)
    guard.attach()
    session = await started(guard, room)
    agent = FakeAgentSession()
    bind_agent_session(session, agent.as_agent_session)
    for _ in range(10):
        agent.emit("error", llm_error())
    await settle(guard)
    assert session.state is SessionState.ACTIVE and not log.of("end")
    await guard.aclose()


async def test_opt_in_error_count_trips_and_the_apology_is_spoken() -> None:
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options(max_consecutive_errors=3))
    log = HookLog(guard)
    guard.attach()
    session = await started(guard, room)
    agent = FakeAgentSession()
    bind_agent_session(session, agent.as_agent_session, count_errors=True)
    for _ in range(5):
        agent.emit("error", llm_error(recoverable=True))  # retries: not counted by default
    agent.emit("error", llm_error())
    agent.emit("error", llm_error())
    agent.emit("conversation_item_added", reply("here you go"))  # a reply resets the breaker
    agent.emit("error", llm_error())
    agent.emit("error", llm_error())
    await settle(guard)
    assert session.state is SessionState.ACTIVE
    agent.emit("error", llm_error())
    await settle(guard)
    assert log.of("end") == [("end", "alice", 1, EndReason.ERRORS)]
    assert len(agent.said) == 1 and "sorry" in agent.said[0].lower()
    assert agent.closed, "the AgentSession of the connection is closed when the session ends"
    await guard.aclose()


async def test_agent_session_closing_on_error_ends_the_session() -> None:
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options())
    log = HookLog(guard)
    guard.attach()
    session = await started(guard, room)
    agent = FakeAgentSession()
    bind_agent_session(session, agent.as_agent_session)
    agent.emit("close", CloseEvent(reason=CloseReason.PARTICIPANT_DISCONNECTED))
    await settle(guard)
    assert session.state is SessionState.ACTIVE
    agent.emit("close", CloseEvent(reason=CloseReason.ERROR))
    await settle(guard)
    assert log.of("end") == [("end", "alice", 1, EndReason.ERRORS)]
    await guard.aclose()


async def test_away_starts_the_idle_policy_and_speech_or_text_stops_it() -> None:
    """The framework measures silence (user_away_timeout -> "away"); the guard only warns and ends after it."""
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options(idle_timeout=0.4, idle_warning_before=0.15))
    log = HookLog(guard)
    guard.attach()
    session = await started(guard, room)
    agent = FakeAgentSession()
    bind_agent_session(session, agent.as_agent_session)
    away = ("user_state_changed", UserStateChangedEvent(old_state="listening", new_state="away"))
    activity: list[tuple[str, Any]] = [
        ("user_input_transcribed", UserInputTranscribedEvent(transcript="hi", is_final=False)),
        ("user_state_changed", UserStateChangedEvent(old_state="listening", new_state="speaking")),
        ("conversation_item_added", reply("typed text", role="user")),
        ("user_state_changed", UserStateChangedEvent(old_state="away", new_state="listening")),
    ]
    await asyncio.sleep(0.6)
    assert not agent.said, "no silence timer of the guard's own: nothing happens before the framework says away"
    for ev in activity:
        agent.emit(*away)
        await wait_for(lambda: len(agent.said) == 1)  # the warning, 0.25 s into the away spell
        agent.emit(*ev)  # the user is back: the idle policy stops
        await asyncio.sleep(0.4)
        assert not log.of("end") and len(agent.said) == 1, ev
        agent.said.clear()
    agent.emit(*away)
    await wait_for(lambda: bool(log.of("end")))
    assert log.of("end") == [("end", "alice", 1, EndReason.IDLE)]
    assert len(agent.said) == 2  # the warning, then the goodbye
    await guard.aclose()


async def test_connection_stop_saves_history_closes_agent_session_and_detaches() -> None:
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options())
    guard.attach()
    p = room.add("alice")
    await settle(guard)
    session = guard.get("alice")
    assert session is not None
    agent = FakeAgentSession()
    bind_agent_session(session, agent.as_agent_session)
    assert agent._events["error"]
    room.remove(p, SIGNAL_CLOSE)
    await settle(guard)
    assert agent.closed and not any(agent._events.values())
    ctx = await saved_chat_ctx(session)
    assert ctx is not None and ctx.items[0].text_content == "hello"  # type: ignore[union-attr]
    agent.emit("error", llm_error())  # a late event of the old AgentSession changes nothing
    room.add("alice")
    await settle(guard)
    assert session.state is SessionState.ACTIVE and await saved_chat_ctx(session) is not None
    await guard.aclose()


async def test_binds_to_a_real_agent_session() -> None:
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options(max_duration=0.1))
    log = HookLog(guard)
    guard.attach()

    @guard.on_session_start
    async def start(session: GuardSession) -> None:
        bind_agent_session(session, AgentSession())

    p = room.add("alice")
    await wait_for(lambda: bool(log.of("end")))
    # say() on a session that never started raises: the goodbye fails in isolation, cleanup goes on
    assert log.of("end") == [("end", "alice", 1, EndReason.MAX_DURATION)]
    # the end hook is one step of the cleanup: the cleanup counts once its last step is done
    await wait_for(lambda: guard.snapshot()["totals"]["cleanups"] == 1)
    room.remove(p, HANGUP)
    await guard.aclose()


async def test_the_user_message_being_answered_is_marked_until_the_reply_is_in_the_history() -> None:
    """Speaking starts before the reply is in the history (that happens after playout): the saved state marks the
    user message being answered, so a process that adopts the session after a crash does not say it again."""
    room = FakeRoom()
    guard = SessionGuard(room.as_room, fast_options())
    guard.attach()
    session = await started(guard, room)
    agent = FakeAgentSession()
    bind_agent_session(session, agent.as_agent_session)
    (user,) = agent.history.items
    agent.emit("agent_state_changed", AgentStateChangedEvent(old_state="thinking", new_state="speaking"))
    assert session.shared[REPLY_STARTED_KEY] == user.id
    await settle(guard)
    saved = await session.resume_state()
    assert saved is not None and saved.shared[REPLY_STARTED_KEY] == user.id, "saved before the reply is"
    agent.emit("conversation_item_added", reply("here you go"))
    assert REPLY_STARTED_KEY not in session.shared
    await guard.aclose()
