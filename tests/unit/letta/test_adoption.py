"""A session that moves between processes (two `LettaSessions` on two guards, the fake Letta): the conversation is
named in `GuardSession.shared`, adopted without a create request, checked lazily, kept (not retired) when the
session moves away; and a turn the previous process left is recovered from Letta, answered exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from livekit import rtc
from livekit.agents import AgentSession, llm
from livekit.plugins.letta.guard import CONVERSATION_KEY, SHARED_KEY, LettaSessions, RecoveryKind
from livekit.plugins.letta.journal import FileJournal
from livekit.plugins.session_guard import EndReason, GuardSession, SessionGuard
from livekit.plugins.session_guard.binding import REPLY_STARTED_KEY
from livekit.plugins.session_guard.resume import MemoryResumeStore, ResumeState

from tests.unit.letta.conftest import as_client, fast
from tests.unit.letta.fake_letta import FakeLetta
from tests.unit.session_guard.fakes import FakeRoom, fast_options, settle


class Process:
    """One job process: a guard on the room (the saved sessions in a store both processes share), its own
    LettaSessions."""

    def __init__(
        self, fake: FakeLetta, agent: str, journal: Path, name: str, store: MemoryResumeStore, **opts: Any
    ) -> None:
        self.room = FakeRoom("room-1")
        self.store = store
        self.guard = SessionGuard(
            self.room.as_room, fast_options(reconnect_window=5.0), state_dir=journal / name, resume_store=store
        )
        self.letta = LettaSessions(as_client(fake), fast(journal_dir=journal / "journal", **opts))
        self.letta.install(self.guard, agent_id_for=lambda s: agent)
        self.guard.attach()

    async def saved(self, shared: dict[str, Any], history: llm.ChatContext | None = None) -> None:
        """A session of alice saved by a process that is gone."""
        chat = history or llm.ChatContext.empty()
        await self.store.save(ResumeState.of("room-1", "alice", "session-elsewhere", chat, shared=shared))

    def session(self, identity: str = "alice") -> GuardSession:
        gs = self.guard.get(identity)
        assert gs is not None
        return gs

    async def close(self) -> None:
        await self.letta.aclose()
        await self.guard.aclose()


class FakeAgentSession(rtc.EventEmitter[str]):
    def __init__(self) -> None:
        super().__init__()
        self.said: list[tuple[str, bool]] = []
        self.generated = 0
        self.history = llm.ChatContext.empty()

    def say(self, text: str, *, allow_interruptions: bool = True, add_to_chat_ctx: bool = True) -> None:
        self.said.append((text, add_to_chat_ctx))

    def generate_reply(self) -> None:
        self.generated += 1


async def ask(letta: LettaSessions, gs: GuardSession, history: llm.ChatContext, text: str) -> str:
    """One turn the way the AgentSession runs it: the user's message added to the history, the LLM asked."""
    history.add_message(role="user", content=text)
    out: list[str] = []
    async with letta.llm_for(gs).chat(chat_ctx=history.copy()) as stream:
        async for chunk in stream:
            if chunk.delta and chunk.delta.content:
                out.append(chunk.delta.content)
    reply = "".join(out).strip()
    history.add_message(role="assistant", content=reply)
    return reply


@pytest.fixture
async def procs(fake: FakeLetta, tmp_path: Path) -> AsyncIterator[tuple[Process, Process, str]]:
    agent = fake.add_agent()
    store = MemoryResumeStore()
    a = Process(fake, agent, tmp_path, "a", store)
    b = Process(fake, agent, tmp_path, "b", store)
    yield a, b, agent
    await a.close()
    await b.close()


async def test_the_conversation_is_named_in_shared_and_adopted_by_another_process_without_a_create(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    a, b, agent = procs
    a.room.add("alice")
    await settle(a.guard)
    conv = a.letta.conversation(a.session())
    await conv.wait_created()
    shared = a.session().shared[SHARED_KEY]
    assert shared == {"agent_id": agent, "conversation_id": conv.conversation_id}
    history = llm.ChatContext.empty()
    assert await ask(a.letta, a.session(), history, "one") == "You said: one. (turn 1)"

    await a.session().save_resume_state(history)
    a.session().end(EndReason.MOVED)  # the session moves: not retired, the journal entry let go
    await settle(a.guard)
    assert conv.conversation_id in fake.convs and a.letta.stats.conversations_retired == 0

    creates = fake.count("conversations.create")
    b.room.add("alice")  # the guard adopts the saved session: its resume hooks run
    await settle(b.guard)
    assert b.session().adopted and not b.session().fresh
    adopted = b.letta.conversation(b.session())
    assert adopted.conversation_id == conv.conversation_id and adopted.adopted
    assert adopted.journal is not None and adopted.journal.held, "the adopter holds the journal entry"
    assert b.session().shared[SHARED_KEY] == shared
    assert await ask(b.letta, b.session(), history, "two") == "You said: two. (turn 2)"
    assert fake.count("conversations.create") == creates, "adoption created a conversation"
    assert fake.count("conversations.recompile") == 1, "the adopted conversation was checked once"
    assert await ask(b.letta, b.session(), history, "three") == "You said: three. (turn 3)"
    assert fake.count("conversations.recompile") == 1

    b.room.remove(b.room.remote_participants["alice"], rtc.DisconnectReason.CLIENT_INITIATED)
    await settle(b.guard)
    assert fake.convs == {}, "the adopter retires the conversation when the session really ends"


async def test_an_adopted_conversation_letta_no_longer_has_is_replaced_with_a_clear_log(
    fake: FakeLetta, procs: tuple[Process, Process, str], caplog: pytest.LogCaptureFixture
) -> None:
    _a, b, agent = procs
    await b.saved({SHARED_KEY: {"agent_id": agent, "conversation_id": "conv-deleted"}})
    b.room.add("alice")
    await settle(b.guard)
    history = llm.ChatContext.empty()
    assert await ask(b.letta, b.session(), history, "hello") == "You said: hello. (turn 1)"
    assert "Letta no longer has this session's conversation" in caplog.text
    new_id = b.letta.conversation(b.session()).conversation_id
    assert new_id in fake.convs and new_id != "conv-deleted"
    assert b.session().shared[SHARED_KEY] == {"agent_id": agent, "conversation_id": new_id}


async def test_malformed_shared_state_gets_a_new_conversation(
    fake: FakeLetta, procs: tuple[Process, Process, str], caplog: pytest.LogCaptureFixture
) -> None:
    _a, b, _agent = procs
    await b.saved({SHARED_KEY: {"conversation_id": 42}})
    b.room.add("alice")
    await settle(b.guard)
    conv = b.letta.conversation(b.session())
    await conv.wait_created()
    assert conv.conversation_id in fake.convs and "ignoring malformed shared Letta state" in caplog.text


async def test_a_move_releases_the_journal_hold_for_the_new_owner(
    fake: FakeLetta, procs: tuple[Process, Process, str], tmp_path: Path
) -> None:
    a, _b, _agent = procs
    a.room.add("alice")
    await settle(a.guard)
    conv = a.letta.conversation(a.session())
    await conv.wait_created()
    handle = conv.journal
    assert handle is not None and handle.held
    a.session().end(EndReason.MOVED)
    await settle(a.guard)
    assert not handle.held
    # the entry is still there, held by nobody: the new owner (or, after the grace, any job) can take it
    claimed = await FileJournal(tmp_path / "journal").claim_orphans(str(fake.base_url))
    assert [h.entry.conversation_id for h in claimed] == [conv.conversation_id]
    for h in claimed:
        await h.release()


# -- recovery


async def started(p: Process) -> GuardSession:
    p.room.add("alice")
    await settle(p.guard)
    gs = p.session()
    await p.letta.conversation(gs).wait_created()
    return gs


async def test_nothing_pending_when_the_history_ends_with_a_reply(procs: tuple[Process, Process, str]) -> None:
    a, _b, _agent = procs
    gs = await started(a)
    history = llm.ChatContext.empty()
    await ask(a.letta, gs, history, "one")
    agent_session = FakeAgentSession()
    r = await a.letta.finish_interrupted_turn(gs, cast(AgentSession[Any], agent_session), history)
    assert r.kind is RecoveryKind.NOTHING_PENDING and agent_session.said == [] and agent_session.generated == 0


async def test_a_turn_letta_answered_is_said_once_from_letta_and_not_asked_again(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    a, _b, _agent = procs
    gs = await started(a)
    history = llm.ChatContext.empty()
    await ask(a.letta, gs, history, "one")
    reply = await ask(a.letta, gs, history, "two")
    history.items.pop()  # the process died before the reply reached the history
    sent = fake.count("conversations.messages.create")
    agent_session = FakeAgentSession()
    r = await a.letta.finish_interrupted_turn(gs, cast(AgentSession[Any], agent_session), history)
    assert r.kind is RecoveryKind.ANSWERED and r.reply == reply and r.user_text == "two"
    assert agent_session.said == [(reply, True)] and agent_session.generated == 0
    assert fake.count("conversations.messages.create") == sent


async def test_a_reply_the_dead_process_had_started_speaking_is_not_said_again(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    """The previous owner died while speaking the reply (the binding marked the user message it answered; the reply
    reaches the history only after playout): the user heard (part of) it, so it goes into the history, unsaid."""
    a, _b, _agent = procs
    gs = await started(a)
    history = llm.ChatContext.empty()
    reply = await ask(a.letta, gs, history, "one")
    history.items.pop()
    pending = history.items[-1]
    gs.shared[REPLY_STARTED_KEY] = pending.id
    agent_session = FakeAgentSession()
    r = await a.letta.finish_interrupted_turn(gs, cast(AgentSession[Any], agent_session), history)
    assert r.kind is RecoveryKind.ANSWERED and r.reply == reply
    assert agent_session.said == [] and agent_session.generated == 0, "never said twice"
    (kept,) = agent_session.history.items
    assert isinstance(kept, llm.ChatMessage) and kept.role == "assistant" and kept.text_content == reply
    assert REPLY_STARTED_KEY not in gs.shared


async def test_a_turn_the_user_has_moved_past_is_left_alone(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    """While the interrupted turn was being looked up, the user said something new on the new connection: that turn
    is answered normally; the old one is neither said nor generated (generate_reply would send the newest message:
    the new turn twice)."""
    a, _b, _agent = procs
    gs = await started(a)
    history = llm.ChatContext.empty()
    await ask(a.letta, gs, history, "one")
    history.add_message(role="user", content="cut before Letta got it")
    agent_session = FakeAgentSession()
    agent_session.history.add_message(role="user", content="something new")
    r = await a.letta.finish_interrupted_turn(gs, cast(AgentSession[Any], agent_session), history)
    assert r.kind is RecoveryKind.UNANSWERED
    assert agent_session.said == [] and agent_session.generated == 0


async def test_a_turn_letta_never_got_is_generated_once(fake: FakeLetta, procs: tuple[Process, Process, str]) -> None:
    a, _b, _agent = procs
    gs = await started(a)
    history = llm.ChatContext.empty()
    await ask(a.letta, gs, history, "one")
    history.add_message(role="user", content="lost on the way")
    agent_session = FakeAgentSession()
    r = await a.letta.finish_interrupted_turn(gs, cast(AgentSession[Any], agent_session), history)
    assert r.kind is RecoveryKind.UNANSWERED and r.user_text == "lost on the way"
    assert agent_session.generated == 1 and agent_session.said == []


async def test_a_run_still_answering_is_waited_for(fake: FakeLetta, procs: tuple[Process, Process, str]) -> None:
    a, _b, _agent = procs
    gs = await started(a)
    conv = a.letta.conversation(gs)
    history = llm.ChatContext.empty()
    item = history.add_message(role="user", content="slow one")
    fake.tail_delay = 0.3
    stream = await fake.conversations.messages.create(
        conv.conversation_id, messages=[{"role": "user", "content": "slow one", "otid": item.id}]
    )
    await stream.close()  # the client went away; Letta goes on and writes the reply later
    r = await a.letta.recover_turn(gs, history)
    assert r.kind is RecoveryKind.ANSWERED and r.reply == "You said: slow one. (turn 1)" and r.waited_runs == 1


async def test_a_run_past_the_bound_is_cancelled_and_the_turn_is_unanswered(fake: FakeLetta, tmp_path: Path) -> None:
    agent = fake.add_agent()
    p = Process(fake, agent, tmp_path, "c", MemoryResumeStore(), recover_timeout=0.1)
    try:
        gs = await started(p)
        conv = p.letta.conversation(gs)
        history = llm.ChatContext.empty()
        item = history.add_message(role="user", content="very slow")
        fake.tail_delay = 5.0
        stream = await fake.conversations.messages.create(
            conv.conversation_id, messages=[{"role": "user", "content": "very slow", "otid": item.id}]
        )
        await stream.close()
        r = await p.letta.recover_turn(gs, history)
        assert r.kind is RecoveryKind.UNANSWERED and r.waited_runs == 1
        assert fake.running() == [] and fake.convs[str(conv.conversation_id)].messages == []
    finally:
        await p.close()


async def test_letta_unreachable_is_unknown_and_the_user_is_asked_to_repeat(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    a, _b, _agent = procs
    gs = await started(a)
    history = llm.ChatContext.empty()
    history.add_message(role="user", content="anyone there?")
    fake.down = True
    agent_session = FakeAgentSession()
    r = await a.letta.finish_interrupted_turn(gs, cast(AgentSession[Any], agent_session), history)
    fake.down = False
    assert r.kind is RecoveryKind.UNKNOWN and "cannot reach Letta" in r.detail
    assert agent_session.said == [(a.letta.options.lost_turn_apology, True)] and agent_session.generated == 0


async def test_a_turn_waits_for_the_recovery(fake: FakeLetta, procs: tuple[Process, Process, str]) -> None:
    a, _b, _agent = procs
    gs = await started(a)
    conv = a.letta.conversation(gs)
    history = llm.ChatContext.empty()
    item = history.add_message(role="user", content="first")
    fake.tail_delay = 0.3
    stream = await fake.conversations.messages.create(
        conv.conversation_id, messages=[{"role": "user", "content": "first", "otid": item.id}]
    )
    await stream.close()
    recovering = asyncio.ensure_future(a.letta.recover_turn(gs, history))
    await asyncio.sleep(0.05)
    other = llm.ChatContext.empty()
    assert await ask(a.letta, gs, other, "second") == "You said: second. (turn 2)", "overlapped the recovery"
    assert (await recovering).kind is RecoveryKind.ANSWERED
    assert fake.overlaps == 0
    assert CONVERSATION_KEY in gs.userdata


async def test_an_adopted_conversation_with_no_message_yet_is_used_as_it_is(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    _a, b, agent = procs
    conv_id = (await fake.conversations.create(agent_id=agent)).id
    await b.saved({SHARED_KEY: {"conversation_id": conv_id}})  # no agent id: the room's agent
    b.room.add("alice")
    await settle(b.guard)
    fake.fail_next["conversations.recompile"] = [400]  # Letta: "no message yet", like 0.16.8
    history = llm.ChatContext.empty()
    assert await ask(b.letta, b.session(), history, "hello") == "You said: hello. (turn 1)"
    assert await ask(b.letta, b.session(), history, "again") == "You said: again. (turn 2)"
    assert fake.count("conversations.recompile") == 1, "retried a recompile Letta refuses"
    assert b.letta.conversation(b.session()).conversation_id == conv_id


async def test_an_adopted_conversation_letta_is_too_busy_to_check_still_answers(
    fake: FakeLetta, procs: tuple[Process, Process, str]
) -> None:
    """The check of an adopted conversation is not worth a failed turn: Letta slow or unavailable for it (seen with
    ten sessions adopted at once on a loaded machine), the turn goes ahead."""
    _a, b, agent = procs
    conv_id = (await fake.conversations.create(agent_id=agent)).id
    await b.saved({SHARED_KEY: {"conversation_id": conv_id}})
    b.room.add("alice")
    await settle(b.guard)
    fake.fail_next["conversations.recompile"] = [503]
    history = llm.ChatContext.empty()
    assert await ask(b.letta, b.session(), history, "hello") == "You said: hello. (turn 1)"
    assert await ask(b.letta, b.session(), history, "again") == "You said: again. (turn 2)"
    # the check failed; the memory refresh of the same turn recompiled it (so it is known to exist): no third check
    assert fake.count("conversations.recompile") == 2
    assert b.letta.conversation(b.session()).conversation_id == conv_id
