"""A session moving to another process, against the real Letta 0.16.8 (the test provider as its model) and the test
stack's Redis (the retirement journal): two `LettaSessions`, each with its own client, guard and journal, stand for
two job processes. The room side is the session guard's fake room, with the guard's own adoption path (the session
saved with its `shared` data in a resume store both guards read, as the cluster's Redis store is); the
AgentSessions are real ones (no room, no TTS: text in, text out).

- adoption: the second process continues the same Letta conversation by its `shared` data (no new conversation;
  the test provider's "(turn N)" counts on), takes the journal hold the first let go, retires it at the real end;
- an interrupted turn, each way it can end, with exactly one reply per user turn in what Letta stores:
  answered by Letta after its client went away (said from Letta, not asked again), still running when the new owner
  looks (waited for), never received (asked once), and Letta unreachable (the user is asked to repeat it).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from letta_client import AsyncLetta, Letta
from livekit.agents import Agent, AgentSession, llm
from livekit.plugins.letta import LettaOptions, LettaTurnOptions
from livekit.plugins.letta.guard import SHARED_KEY, LettaSessions, RecoveryKind
from livekit.plugins.letta.redis_journal import RedisJournal
from livekit.plugins.session_guard import EndReason, GuardSession, SessionGuard
from livekit.plugins.session_guard.resume import MemoryResumeStore

from tests.integration.conftest import Stack
from tests.support.letta_checks import conversations, model_request, provider_latency, user_messages, wait_for
from tests.unit.session_guard.fakes import HANGUP, FakeRoom, fast_options, settle


def redis_url() -> str:
    url = os.environ.get("SG_REDIS_URL")
    if not url:
        pytest.fail("SG_REDIS_URL is not set: these tests need the test stack's Redis (eval scripts/stack env)")
    return url


class Process:
    """One job process: its own Letta client, LettaSessions, Redis journal and guard (on a fake room)."""

    def __init__(
        self, letta_url: str, agent: str, prefix: str, state: Path, store: MemoryResumeStore, **opts: Any
    ) -> None:
        self.client = AsyncLetta(base_url=letta_url, max_retries=0)
        self.journal = RedisJournal.from_url(redis_url(), prefix=prefix, ttl=1.0, grace=5.0)
        self.room = FakeRoom("room-1")
        self.guard = SessionGuard(
            self.room.as_room, fast_options(reconnect_window=5.0), state_dir=state, resume_store=store
        )
        options = LettaOptions(
            turn=LettaTurnOptions(first_token_timeout=20, total_timeout=40), request_timeout=5.0, **opts
        )
        self.letta = LettaSessions(self.client, options, journal=self.journal)
        self.store = store
        self.letta.install(self.guard, agent_id_for=lambda s: agent)
        self.guard.attach()

    async def join(self, identity: str = "alice") -> GuardSession:
        self.room.add(identity)
        await settle(self.guard, timeout=10)
        gs = self.guard.get(identity)
        assert gs is not None
        return gs

    async def agent_session(self, gs: GuardSession, history: llm.ChatContext) -> AgentSession[Any]:
        """A real AgentSession on this session's Letta LLM, started from `history` (as the guard resumes one)."""
        session: AgentSession[Any] = AgentSession(llm=self.letta.llm_for(gs))
        agent = Agent(instructions="You are a voice assistant.")
        await agent.update_chat_ctx(history)
        await session.start(agent)
        return session

    async def close(self) -> None:
        await self.letta.aclose()
        await self.guard.aclose()
        await self.client.close()


@pytest.fixture
async def two(stack: Stack, letta_agent: str, tmp_path: Path) -> AsyncIterator[tuple[Process, Process]]:
    prefix = f"test-adopt-{os.urandom(4).hex()}"
    store = MemoryResumeStore()
    a = Process(stack.letta_url, letta_agent, prefix, tmp_path / "a", store)
    b = Process(stack.letta_url, letta_agent, prefix, tmp_path / "b", store)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def say(session: AgentSession[Any], text: str) -> str:
    """A user turn through the AgentSession: the reply text."""
    handle = session.generate_reply(user_input=text)
    await handle
    return last_reply(session)


def last_reply(session: AgentSession[Any]) -> str:
    for item in reversed(session.history.items):
        if item.type == "message" and item.role == "assistant":
            return (item.text_content or "").strip()
    return ""


def replies_per_user_turn(letta: Letta, conversation_id: str) -> list[tuple[str, int]]:
    """What Letta stores: each user message with the number of assistant replies after it (before the next)."""
    page = letta.conversations.messages.list(conversation_id, order="asc", limit=200)
    out: list[tuple[str, int]] = []
    for m in page:
        kind = getattr(m, "message_type", "")
        if kind == "user_message":
            out.append((str(getattr(m, "content", "")), 0))
        elif kind == "assistant_message" and out:
            out[-1] = (out[-1][0], out[-1][1] + 1)
    return out


async def first_turn(p: Process) -> tuple[GuardSession, llm.ChatContext, str]:
    """A session with one completed turn; returns it, the history so far and its conversation id."""
    gs = await p.join()
    history = llm.ChatContext.empty()
    session = await p.agent_session(gs, history)
    assert await say(session, "one") == "You said: one. (turn 1)"
    for item in session.history.items:
        if item.type == "message":
            history.add_message(role=item.role, content=item.text_content or "", id=item.id)
    await session.aclose()
    conv_id = p.letta.conversation(gs).conversation_id
    assert conv_id is not None
    return gs, history, conv_id


async def moved(a: Process, b: Process, gs: GuardSession, history: llm.ChatContext) -> GuardSession:
    """The session moves from process a to process b: a saves it and ends it with MOVED (a handoff; a crash leaves
    the same saved state), b's guard adopts it from the saved state."""
    await gs.save_resume_state(history)
    gs.end(EndReason.MOVED)
    await settle(a.guard, timeout=10)
    gs_b = await b.join()
    assert gs_b.adopted and gs_b.session_id == gs.session_id
    return gs_b


async def test_another_process_adopts_the_session_and_continues_the_same_conversation(
    stack: Stack, letta_sync: Letta, letta_agent: str, two: tuple[Process, Process]
) -> None:
    a, b = two
    gs, history, conv_id = await first_turn(a)
    assert gs.shared[SHARED_KEY] == {"agent_id": letta_agent, "conversation_id": conv_id}
    assert a.journal.held == [conv_id]

    gs_b = await moved(a, b, gs, history)
    assert a.journal.held == [] and b.journal.held == [conv_id], "the journal hold did not follow the session"
    assert conversations(letta_sync, letta_agent) == [conv_id], "the move retired or created a conversation"
    session = await b.agent_session(gs_b, history)
    assert await say(session, "two") == "You said: two. (turn 2)", "the adopter did not continue the conversation"
    shown = model_request(stack, letta_agent, "two")
    assert shown is not None and shown["user_turns"] == ["one", "two"]
    assert conversations(letta_sync, letta_agent) == [conv_id]
    assert user_messages(letta_sync, conv_id) == ["one", "two"]
    await session.aclose()

    b.room.remove(b.room.remote_participants["alice"], HANGUP)  # the real end: the adopter retires it
    await settle(b.guard, timeout=10)

    async def retired() -> bool:
        return conversations(letta_sync, letta_agent) == [] and b.journal.held == []

    await wait_for(retired, 10, "the adopted conversation to be retired")


async def test_a_turn_letta_answered_after_its_owner_died_is_said_once_and_not_asked_again(
    letta_sync: Letta, two: tuple[Process, Process]
) -> None:
    a, b = two
    gs, history, conv_id = await first_turn(a)
    pending = history.add_message(role="user", content="two")
    # The owner sent it and died before the reply reached its history: Letta completed the turn without it.
    stream = letta_sync.conversations.messages.create(
        conv_id, messages=[{"role": "user", "content": "two", "otid": pending.id}], streaming=True
    )
    for _ in stream:
        pass
    gs_b = await moved(a, b, gs, history)
    session = await b.agent_session(gs_b, history)
    r = await b.letta.finish_interrupted_turn(gs_b, session, history)
    assert r.kind is RecoveryKind.ANSWERED and r.reply == "You said: two. (turn 2)" and r.user_text == "two"
    await wait_for(lambda: _async(last_reply(session) == r.reply), 10, "the recovered reply to be said")
    assert replies_per_user_turn(letta_sync, conv_id) == [("one", 1), ("two", 1)]
    assert await say(session, "three") == "You said: three. (turn 3)"
    assert replies_per_user_turn(letta_sync, conv_id) == [("one", 1), ("two", 1), ("three", 1)]
    await session.aclose()


async def test_a_turn_still_running_when_the_new_owner_looks_is_waited_for_and_said_once(
    stack: Stack, letta_sync: Letta, two: tuple[Process, Process]
) -> None:
    a, b = two
    gs, history, conv_id = await first_turn(a)
    long = "please say this rather long sentence back to me one slow word at a time"
    pending = history.add_message(role="user", content=long)
    async with provider_latency(stack, first_token_ms=100, token_ms=300):  # ~5 s for the reply
        # The owner's stream: a few words, then its process dies (the client goes away mid-reply).
        client = AsyncLetta(base_url=stack.letta_url, max_retries=0)
        stream = await client.conversations.messages.create(
            conv_id,
            messages=[{"role": "user", "content": long, "otid": pending.id}],
            streaming=True,
            stream_tokens=True,
        )
        async for event in stream:
            if getattr(event, "message_type", "") == "assistant_message":
                break
        await stream.close()
        await client.close()
        assert long not in user_messages(letta_sync, conv_id), "Letta wrote the message before its run finished"
        gs_b = await moved(a, b, gs, history)
        session = await b.agent_session(gs_b, history)
        r = await b.letta.finish_interrupted_turn(gs_b, session, history)
    assert r.kind is RecoveryKind.ANSWERED and r.waited_runs == 1, r
    assert r.reply == f"You said: {long}. (turn 2)"
    assert replies_per_user_turn(letta_sync, conv_id) == [("one", 1), (long, 1)]
    await session.aclose()


async def test_a_turn_letta_never_got_is_asked_once(
    stack: Stack, letta_sync: Letta, letta_agent: str, two: tuple[Process, Process]
) -> None:
    a, b = two
    gs, history, conv_id = await first_turn(a)
    history.add_message(role="user", content="two")  # the owner died before sending it
    gs_b = await moved(a, b, gs, history)
    session = await b.agent_session(gs_b, history)
    r = await b.letta.finish_interrupted_turn(gs_b, session, history)
    assert r.kind is RecoveryKind.UNANSWERED and r.user_text == "two"
    await wait_for(lambda: _async(last_reply(session) == "You said: two. (turn 2)"), 30, "the generated reply")
    assert replies_per_user_turn(letta_sync, conv_id) == [("one", 1), ("two", 1)], "the message went in twice"
    shown = model_request(stack, letta_agent, "two")
    assert shown is not None and shown["user_turns"] == ["one", "two"]
    await session.aclose()


async def test_letta_unreachable_means_the_user_is_asked_to_repeat_and_letta_gets_nothing(
    stack: Stack, letta_sync: Letta, letta_agent: str, tmp_path: Path, two: tuple[Process, Process]
) -> None:
    a, _b = two
    gs, history, conv_id = await first_turn(a)
    history.add_message(role="user", content="two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    c = Process(refused, letta_agent, f"test-adopt-{os.urandom(4).hex()}", tmp_path / "c", a.store)
    try:
        gs_c = await moved(a, c, gs, history)
        session = await c.agent_session(gs_c, history)
        r = await c.letta.finish_interrupted_turn(gs_c, session, history)
        assert r.kind is RecoveryKind.UNKNOWN and "cannot reach Letta" in r.detail
        apology = c.letta.options.lost_turn_apology
        await wait_for(lambda: _async(last_reply(session) == apology), 10, "the apology")
        await session.aclose()
    finally:
        await c.close()
    assert replies_per_user_turn(letta_sync, conv_id) == [("one", 1)]


async def _async(value: bool) -> bool:
    await asyncio.sleep(0)
    return value
