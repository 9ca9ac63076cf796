"""The fallback for a Letta server without a conversations API, exercised against the real Letta 0.16.8 by forcing it
(`LettaOptions(conversations="never")`): sessions use the agent's own history, take turns on the agent (one at a
time in the job), and reset it with `reset-messages` when they start and end; memory blocks stay."""

from __future__ import annotations

import asyncio
from pathlib import Path

from letta_client import AsyncLetta, Letta
from livekit.agents import llm
from livekit.plugins.letta import LettaOptions, LettaTurnOptions
from livekit.plugins.letta.conversation import ConversationMode
from livekit.plugins.letta.guard import LettaSessions
from livekit.plugins.session_guard import GuardSession, SessionGuard

from tests.integration.conftest import Stack
from tests.support.letta_checks import model_request
from tests.unit.session_guard.fakes import HANGUP, FakeRoom, fast_options, settle


async def say(letta: LettaSessions, gs: GuardSession | None, text: str) -> str:
    assert gs is not None
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content=text)
    out: list[str] = []
    async with letta.llm_for(gs).chat(chat_ctx=ctx) as stream:
        async for chunk in stream:
            if chunk.delta and chunk.delta.content:
                out.append(chunk.delta.content)
    return "".join(out).strip()


def in_context(letta: Letta, agent_id: str) -> int:
    """How many messages the agent's own history has in context (1: only the system message, as after a reset)."""
    return len(letta.agents.retrieve(agent_id).message_ids or [])


async def test_without_conversations_sessions_take_turns_on_the_agent_and_reset_it(
    stack: Stack, letta_sync: Letta, letta_agent: str, tmp_path: Path
) -> None:
    client = AsyncLetta(base_url=stack.letta_url, max_retries=0, timeout=30)
    room = FakeRoom("fallback-room")
    guard = SessionGuard(room.as_room, fast_options(), state_dir=tmp_path / "state")
    turn = LettaTurnOptions(first_token_timeout=30, total_timeout=40)
    letta = LettaSessions(client, LettaOptions(conversations="never", turn=turn))
    letta.install(guard, agent_id_for=lambda s: letta_agent)
    guard.attach()
    try:
        alice = room.add("alice")
        bob = room.add("bob")
        await settle(guard)
        assert await say(letta, guard.get("alice"), "Remember that my favorite color is blue") == (
            "Got it, I will remember that my favorite color is blue."
        )
        assert await say(letta, guard.get("alice"), "alice two") == "You said: alice two. (turn 2)"
        alice_conv = letta.conversation(guard.get("alice"))  # type: ignore[arg-type]
        assert alice_conv.mode is ConversationMode.AGENT and alice_conv.conversation_id is None
        assert in_context(letta_sync, letta_agent) > 4  # alice's turns, the tool call and its result

        # alice holds the agent: bob's turn waits (nothing of his reaches Letta) until her session ends
        bobs_turn = asyncio.ensure_future(say(letta, guard.get("bob"), "bob one"))
        await asyncio.sleep(2.0)
        assert not bobs_turn.done() and model_request(stack, letta_agent, "bob one") is None
        assert letta.stats.agent_resets == 1  # alice's start

        room.remove(alice, HANGUP)  # her end resets the history and frees the agent; bob's turn goes on
        # turn 1: alice's history is gone (reset at her end and again at bob's start)
        assert await asyncio.wait_for(bobs_turn, 30) == "You said: bob one. (turn 1)"
        assert letta.stats.agent_resets == 3
        assert await say(letta, guard.get("bob"), "What is my favorite color?") == (
            "Memory says: blue. This conversation says: nothing."
        )
        room.remove(bob, HANGUP)
        await settle(guard)
        assert in_context(letta_sync, letta_agent) == 1 and letta.stats.agent_resets == 4
        assert "my favorite color is blue" in str(
            letta_sync.agents.blocks.retrieve("human", agent_id=letta_agent).value
        )
        assert letta_sync.conversations.list(agent_id=letta_agent) == []
    finally:
        await letta.aclose()
        await guard.aclose()
        await client.close()
