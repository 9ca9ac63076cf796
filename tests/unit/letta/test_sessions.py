"""`LettaSessions` on a real `SessionGuard` (fake room) and the fake Letta: start, resume, end, outages, the apology,
validation, job end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast
from unittest.mock import PropertyMock, patch

import pytest
from livekit import rtc
from livekit.agents import AgentSession, llm
from livekit.agents.voice.events import ErrorEvent, UserStateChangedEvent
from livekit.plugins.letta import LettaConfigError, LettaUnavailableError
from livekit.plugins.letta.guard import CONVERSATION_KEY, LettaSessions
from livekit.plugins.session_guard import SessionGuard, SessionState

from tests.unit.letta.conftest import as_client, fast
from tests.unit.letta.fake_letta import FakeLetta
from tests.unit.session_guard.fakes import HANGUP, SIGNAL_CLOSE, FakeRoom, fast_options, settle


class FakeAgentSession(rtc.EventEmitter[str]):
    def __init__(self) -> None:
        super().__init__()
        self.said: list[tuple[str, bool]] = []

    def say(self, text: str, *, allow_interruptions: bool = True, add_to_chat_ctx: bool = True) -> None:
        self.said.append((text, add_to_chat_ctx))


async def turn(letta: LettaSessions, guard: SessionGuard, identity: str, text: str) -> str:
    model = letta.llm_for(cast(Any, guard.get(identity)))
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content=text)
    out: list[str] = []
    async with model.chat(chat_ctx=ctx) as stream:
        async for chunk in stream:
            if chunk.delta and chunk.delta.content:
                out.append(chunk.delta.content)
    return "".join(out).strip()


@pytest.fixture
async def setup(fake: FakeLetta, tmp_path: Path) -> Any:
    agent = fake.add_agent()
    room = FakeRoom("room-1")
    guard = SessionGuard(room.as_room, fast_options(reconnect_window=5.0), state_dir=tmp_path / "state")
    letta = LettaSessions(as_client(fake), fast(journal_dir=tmp_path / "journal"))
    letta.install(guard, agent_id_for=lambda s: agent)
    guard.attach()
    yield room, guard, letta, agent
    await letta.aclose()
    await guard.aclose()


async def test_a_session_gets_its_own_conversation_resume_asks_nothing_end_retires_it(
    fake: FakeLetta, setup: Any
) -> None:
    room, guard, letta, _agent = setup
    alice = room.add("alice")
    await settle(guard)
    conv = letta.conversation(guard.get("alice"))
    await conv.wait_created()
    assert conv.ready and fake.count("conversations.create") == 1
    assert await turn(letta, guard, "alice", "one") == "You said: one. (turn 1)"

    room.remove(alice, SIGNAL_CLOSE)  # network drop: AWAY
    await settle(guard)
    calls = len(fake.calls)
    alice = room.add("alice")  # back within the window
    await settle(guard)
    assert guard.get("alice").resumes == 1
    assert fake.calls[calls:] == [], "a resume must not ask Letta anything (no block fetch, no conversation call)"
    assert letta.conversation(guard.get("alice")) is conv
    assert await turn(letta, guard, "alice", "two") == "You said: two. (turn 2)"

    room.remove(alice, HANGUP)
    await settle(guard)
    assert fake.convs == {} and letta.stats.conversations_retired == 1


async def test_two_sessions_on_one_agent_have_separate_conversations(fake: FakeLetta, setup: Any) -> None:
    room, guard, letta, _agent = setup
    alice, _bob = room.add("alice"), room.add("bob")
    await settle(guard)
    assert await turn(letta, guard, "alice", "alice one") == "You said: alice one. (turn 1)"
    assert await turn(letta, guard, "bob", "bob one") == "You said: bob one. (turn 1)"
    assert fake.count("blocks.list") == 1, "the second session found the agent's blocks in the job's cache"
    room.remove(alice, HANGUP)
    await settle(guard)
    assert await turn(letta, guard, "bob", "bob two") == "You said: bob two. (turn 2)"
    assert len(fake.convs) == 1


async def test_a_session_starts_while_letta_hangs_and_ends_within_bounds(fake: FakeLetta, setup: Any) -> None:
    room, guard, _letta, _agent = setup
    fake.hang = True
    t0 = time.monotonic()
    alice = room.add("alice")
    await settle(guard)
    assert time.monotonic() - t0 < 0.5, "the start hook waited for Letta"
    assert CONVERSATION_KEY in guard.get("alice").userdata
    t0 = time.monotonic()
    room.remove(alice, HANGUP)
    await settle(guard, timeout=5)
    assert time.monotonic() - t0 < 2.0
    fake.hang = False


async def test_a_start_hook_that_runs_again_reuses_the_conversation(fake: FakeLetta, setup: Any) -> None:
    room, guard, letta, _agent = setup
    room.add("alice")
    await settle(guard)
    gs = guard.get("alice")
    conv = letta.conversation(gs)
    await letta._on_start(gs)  # what the guard does when an incomplete start runs again
    assert letta.conversation(gs) is conv
    await conv.wait_created()
    assert fake.count("conversations.create") == 1


async def test_llm_for_needs_install_first(fake: FakeLetta, setup: Any) -> None:
    room, guard, letta, _agent = setup
    room.add("alice")
    await settle(guard)
    gs = guard.get("alice")
    gs.userdata.pop(CONVERSATION_KEY)
    with pytest.raises(RuntimeError, match="install"):
        letta.llm_for(gs)


async def test_a_failed_turn_is_answered_with_a_spoken_apology_outside_the_history(fake: FakeLetta, setup: Any) -> None:
    room, guard, letta, _agent = setup
    room.add("alice")
    await settle(guard)
    gs = guard.get("alice")
    agent_session = FakeAgentSession()
    letta.bind_agent_session(gs, cast(AgentSession[Any], agent_session))
    model = letta.llm_for(gs)
    failure = llm.LLMError(timestamp=0, label="letta", error=RuntimeError("down"), recoverable=False)
    agent_session.emit("error", ErrorEvent(error=failure, source=model))
    agent_session.emit("error", ErrorEvent(error=failure.model_copy(update={"recoverable": True}), source=model))
    agent_session.emit("error", ErrorEvent(error=failure, source=object()))  # not ours
    await asyncio.sleep(0)
    assert agent_session.said == [(letta.options.apology, False)]

    # a failure that tripped the guard's error breaker: the guard says goodbye, no apology in front of it
    ending = patch.object(type(gs), "state", new=PropertyMock(return_value=SessionState.ENDING))
    ending.start()
    agent_session.emit("error", ErrorEvent(error=failure, source=model))
    await asyncio.sleep(0)
    assert len(agent_session.said) == 1
    ending.stop()

    # the user starting to speak refreshes a stale cache in the background
    letta.backend.cache.invalidate(letta.conversation(gs).agent_id)
    fetches = fake.count("blocks.list")
    agent_session.emit("user_state_changed", UserStateChangedEvent(old_state="listening", new_state="speaking"))
    await asyncio.sleep(0.05)
    assert fake.count("blocks.list") == fetches + 1
    # ... and so does the end of their speech (the turn is committed after the STT's transcript, a moment later)
    letta.backend.cache.invalidate(letta.conversation(gs).agent_id)
    agent_session.emit("user_state_changed", UserStateChangedEvent(old_state="speaking", new_state="listening"))
    await asyncio.sleep(0.05)
    assert fake.count("blocks.list") == fetches + 2
    # a fresh cache is not read again
    agent_session.emit("user_state_changed", UserStateChangedEvent(old_state="listening", new_state="speaking"))
    agent_session.emit("user_state_changed", UserStateChangedEvent(old_state="speaking", new_state="away"))
    await asyncio.sleep(0.05)
    assert fake.count("blocks.list") == fetches + 2
    room.remove(room.remote_participants["alice"], SIGNAL_CLOSE)  # the connection stops: unbound
    await settle(guard)
    agent_session.emit("error", ErrorEvent(error=failure, source=model))
    await asyncio.sleep(0)
    assert len(agent_session.said) == 1


async def test_job_end_waits_for_the_sessions_and_reports_what_letta_did_not_take(
    fake: FakeLetta, setup: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    room, guard, letta, _agent = setup
    room.add("alice")
    await settle(guard)
    conv = letta.conversation(guard.get("alice"))
    await turn(letta, guard, "alice", "hello")
    fake.down = True
    await letta.aclose()  # ends the guard's sessions first
    assert guard.closed and [p.conversation_id for p in letta.pending] == [conv.conversation_id]
    assert "retirement still pending at job end" in caplog.text
    assert len(await asyncio.to_thread(lambda: list((tmp_path / "journal").iterdir()))) == 1


async def test_a_later_job_retires_what_an_earlier_one_left(fake: FakeLetta, tmp_path: Path) -> None:
    agent = fake.add_agent()
    conv_id = (await fake.conversations.create(agent_id=agent)).id
    from livekit.plugins.letta.journal import FileJournal, JournalEntry

    handle = await FileJournal(tmp_path).record(
        JournalEntry(letta_url=str(fake.base_url), agent_id=agent, conversation_id=conv_id)
    )
    assert handle is not None
    await handle.release()  # the earlier job died
    room = FakeRoom("room-2")
    guard = SessionGuard(room.as_room, fast_options(), state_dir=tmp_path / "state")
    letta = LettaSessions(as_client(fake), fast(journal_dir=tmp_path))
    letta.install(guard, agent_id_for=lambda s: agent)
    deadline = time.monotonic() + 2
    while fake.convs and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert fake.convs == {} and letta.stats.orphans_claimed == 1
    await letta.aclose()


async def test_validation_names_the_unknown_agent_and_primes_the_cache(fake: FakeLetta) -> None:
    agent = fake.add_agent(name="my-agent")
    letta = LettaSessions(as_client(fake), fast())
    assert await letta.validate_agent(agent) == "my-agent"
    assert await letta.validate_agent(agent) == "my-agent"
    assert fake.count("agents.retrieve") == 1
    assert agent in letta.cache
    cached = letta.cache.peek(agent)
    assert cached is not None and cached.value("human") == "Nothing known."
    assert (await letta.cache.get(agent)).fingerprint == cached.fingerprint and fake.count("blocks.list") == 0
    with pytest.raises(LettaConfigError, match="has no agent 'agent-missing'"):
        await letta.validate_agent("agent-missing")
    fake.down = True
    with pytest.raises(LettaUnavailableError):
        await letta.validate_agent("agent-other")
    await letta.aclose()


async def test_check_server_names_the_url(fake: FakeLetta) -> None:
    letta = LettaSessions(as_client(fake), fast())
    assert await letta.check_server() == "0.16.8"
    fake.down = True
    with pytest.raises(LettaConfigError, match=r"cannot reach Letta at http://letta\.fake:8283.*LETTA_BASE_URL"):
        await letta.check_server()
    fake.down = False
    fake.fail_next["health"] = [404]
    with pytest.raises(LettaConfigError, match="does not look like a Letta server"):
        await letta.check_server()
    await letta.aclose()
